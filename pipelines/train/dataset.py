"""The training data of one worker: its rows of the epoch order, prepared, as a Ray Dataset.

The epoch order (:mod:`pipelines.train.order`) is dealt in windows of chunks; each worker parses
its windows, keeps its own rows in order and prepares them with the shared batch preparation
(:mod:`pipelines.common.batches`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray

from pipelines.common.batches import PrepareSpec, prepare_batch
from pipelines.common.manifests.stream import chunk_samples
from pipelines.train.order import EpochOrder, positions_in_window, worker_windows


def window_rows(batch: dict[str, np.ndarray], order: EpochOrder, rank: int,
                pool: list[str], skip_bad_rows: bool) -> dict[str, list]:
    """One window of the epoch order -> this worker's rows of it, in order (no images read)."""
    files, lines, samples = [], [], []
    for raw in batch["window"]:
        window = json.loads(str(raw))
        rows = [(c["path"], line, s) for c in window["chunk_specs"]
                for line, s in chunk_samples(c, pool, skip_bad_rows)]
        if len(rows) != window["size"]:
            raise RuntimeError(f"the manifest changed since it was scanned: a window holds "
                               f"{len(rows)} valid rows, the scan counted {window['size']}")
        for i in positions_in_window(window, order, rank):
            path, line, sample = rows[i]
            files.append(path)
            lines.append(line)
            samples.append(json.dumps(sample.to_dict(), ensure_ascii=False))
    return {"file": files, "line": lines, "sample": samples}


def worker_dataset(chunks: Sequence[dict], order: EpochOrder, rank: int, start_row: int,
                   spec: PrepareSpec, pool: list[str], *, skip_bad_rows: bool = False,
                   prepare_batch_size: int = 8) -> Any:
    """This worker's prepared rows of one epoch from its row ``start_row`` on, in order."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the order is the point
    windows = worker_windows([c["valid"] for c in chunks], order, rank, start_row)
    for w in windows:
        w["chunk_specs"] = [chunks[c] for c in w["chunks"]]
    if not windows:
        raise ValueError(f"worker {rank} has no rows left in epoch {order.epoch}")
    items = [{"window": json.dumps(w)} for w in windows]
    return (ray.data.from_items(items, override_num_blocks=len(items))
            # one window at a time: parsing a window is cheap next to preparing its rows, and
            # windows read side by side would only delay the first batch on a busy node
            .map_batches(window_rows, batch_size=1,
                         compute=ray.data.TaskPoolStrategy(size=1),
                         fn_kwargs={"order": order, "rank": rank, "pool": pool,
                                    "skip_bad_rows": skip_bad_rows})
            .map_batches(prepare_batch, batch_size=prepare_batch_size,
                         fn_kwargs={"spec": spec}))


