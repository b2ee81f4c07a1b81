"""The training data order: a seeded shuffle per epoch, dealt to the workers, resumable exactly.

The epoch order is computed from the manifest scan's chunks, never from the rows themselves:
the chunks are permuted (seeded by ``seed`` and the epoch), cut into windows of
``window_chunks`` chunks (fewer when the manifest is small: a worker's stretch spans at least
:data:`WINDOWS_PER_STRETCH` windows), and the valid rows of each window are permuted (seeded by
``seed``, the epoch and the window). Worker ``rank`` takes the contiguous stretch ``[rank * R,
(rank + 1) * R)`` of that sequence (``R`` rows each, the remainder dropped), in order: it reads
only the windows of its stretch, so a worker reads about ``1/world`` of the manifest's bytes
(plus at most the two windows it shares with its neighbours), never the whole manifest.

A worker that resumes at batch ``b`` of an epoch starts at its position ``b * batch_size``: the
windows before it are never read, and the rows before it in its window are dropped before any
preparation. So the next batch after a restart is exactly the one the uninterrupted run would
have prepared next, and the skipped batches cost nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# A worker reads every chunk of the windows its stretch touches, so its stretch spans at least
# this many windows: the two it shares with its neighbours add at most ~20% to its reads.
WINDOWS_PER_STRETCH = 10


@dataclass(frozen=True)
class EpochOrder:
    """How one epoch's rows are ordered and dealt (all integers, so it pickles small)."""

    seed: int
    epoch: int
    world: int
    window_chunks: int = 8
    shuffle: bool = True

    def chunk_order(self, num_chunks: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(num_chunks)
        return np.random.default_rng([self.seed, self.epoch, 0]).permutation(num_chunks)

    def row_order(self, window: int, rows: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(rows)
        return np.random.default_rng([self.seed, self.epoch, 1, window]).permutation(rows)


def window_size(chunks: int, order: EpochOrder) -> int:
    """Chunks per window: ``window_chunks``, at most a tenth of a worker's chunks (at least 1)."""
    return max(1, min(order.window_chunks, chunks // (order.world * WINDOWS_PER_STRETCH)))


def rows_per_worker(valid: int, world: int) -> int:
    """Rows each worker takes in an epoch (equal for all; the remainder is dropped)."""
    return valid // world


def batches_per_epoch(valid: int, world: int, batch_size: int) -> int:
    """Micro-batches per worker per epoch (the last may be short)."""
    return math.ceil(rows_per_worker(valid, world) / batch_size)


def worker_windows(valid_per_chunk: Sequence[int], order: EpochOrder, rank: int,
                   start_row: int = 0) -> list[dict]:
    """The windows worker ``rank`` reads this epoch, from its row ``start_row`` on: per window
    the chunk indices (in window order), its index, the global position of its first row and
    the global positions to keep (``first`` inclusive to ``stop`` exclusive: the part of the
    worker's stretch inside the window)."""
    if not 0 <= rank < order.world:
        raise ValueError(f"rank {rank} outside a world of {order.world}")
    share = rows_per_worker(int(sum(valid_per_chunk)), order.world)
    first, stop = rank * share + start_row, (rank + 1) * share
    chunks = [int(c) for c in order.chunk_order(len(valid_per_chunk))]
    size_of = window_size(len(chunks), order)
    out, base = [], 0
    for w in range(0, len(chunks), size_of):
        members = chunks[w:w + size_of]
        size = int(sum(valid_per_chunk[c] for c in members))
        lo, hi = max(first, base), min(stop, base + size)
        if lo < hi:
            out.append({"window": w // size_of, "chunks": members, "base": base,
                        "size": size, "first": lo, "stop": hi})
        base += size
    return out


def positions_in_window(window: dict, order: EpochOrder, rank: int) -> list[int]:
    """Which of a window's rows (indices into its concatenated valid rows) worker ``rank``
    takes, in its order."""
    perm = order.row_order(window["window"], window["size"])
    lo, hi = window["first"] - window["base"], window["stop"] - window["base"]
    return [int(row) for row in perm[lo:hi]]
