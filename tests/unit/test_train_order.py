"""The epoch order: every valid row dealt once per epoch, equal shares, seeded, resumable."""

from __future__ import annotations

import pytest

from pipelines.train.order import (
    EpochOrder,
    batches_per_epoch,
    positions_in_window,
    rows_per_worker,
    worker_windows,
)

VALID = [5, 0, 7, 3, 9, 1, 6, 4, 8, 2]  # valid rows per chunk (one empty chunk)


def _epoch(order: EpochOrder, rank: int, start_row: int = 0) -> list[tuple[int, int]]:
    """(chunk, row within the chunk's valid rows) this worker takes, in order."""
    out = []
    for window in worker_windows(VALID, order, rank, start_row):
        members = [(c, r) for c in window["chunks"] for r in range(VALID[c])]
        out += [members[i] for i in positions_in_window(window, order, rank)]
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("window_chunks", [1, 3, 100])
def test_every_row_once_in_equal_shares(world, window_chunks):
    order = EpochOrder(seed=7, epoch=0, world=world, window_chunks=window_chunks)
    shares = [_epoch(order, rank) for rank in range(world)]
    total = sum(VALID)
    assert all(len(s) == rows_per_worker(total, world) for s in shares)
    taken = [row for s in shares for row in s]
    assert len(set(taken)) == len(taken) == rows_per_worker(total, world) * world
    assert set(taken) <= {(c, r) for c, n in enumerate(VALID) for r in range(n)}


def test_the_order_is_seeded_per_epoch_and_off_when_shuffle_is_off():
    a = _epoch(EpochOrder(seed=1, epoch=0, world=2), 0)
    assert a == _epoch(EpochOrder(seed=1, epoch=0, world=2), 0)
    assert a != _epoch(EpochOrder(seed=1, epoch=1, world=2), 0)
    assert a != _epoch(EpochOrder(seed=2, epoch=0, world=2), 0)
    plain = _epoch(EpochOrder(seed=1, epoch=0, world=1, shuffle=False), 0)
    assert plain == [(c, r) for c, n in enumerate(VALID) for r in range(n)]


@pytest.mark.parametrize("start_row", [0, 1, 6, 17, 22])
def test_resuming_at_a_row_continues_the_same_sequence(start_row):
    order = EpochOrder(seed=3, epoch=2, world=2, window_chunks=2)
    full = _epoch(order, 1)
    assert _epoch(order, 1, start_row) == full[start_row:]
    # windows wholly before the start are not read at all
    windows = worker_windows(VALID, order, 1, start_row)
    assert all(w["stop"] > w["first"] for w in windows)


def test_counts_and_rank_checks():
    assert batches_per_epoch(45, 2, 4) == 6  # 22 rows per worker -> 5 full batches + 1
    assert rows_per_worker(45, 2) == 22
    with pytest.raises(ValueError, match="rank 2 outside a world of 2"):
        worker_windows(VALID, EpochOrder(seed=0, epoch=0, world=2), 2)


@pytest.mark.parametrize("world", [2, 4])
def test_each_worker_reads_only_the_windows_of_its_stretch(world):
    """Chunks read per worker add up to the manifest plus at most one shared window per
    neighbour: no worker reads the whole manifest."""
    valid = [1024] * 64
    order = EpochOrder(seed=5, epoch=1, world=world, window_chunks=4)
    read = [sum(len(w["chunks"]) for w in worker_windows(valid, order, rank))
            for rank in range(world)]
    assert sum(read) <= len(valid) + 2 * (world - 1) * order.window_chunks
    assert max(read) <= 1.2 * len(valid) / world  # windows shrink to a tenth of a stretch
