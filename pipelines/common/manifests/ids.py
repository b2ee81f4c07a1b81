"""Row ids are unique across a whole manifest: predictions, labels and batch records are keyed
by them. The first row with an id is kept; every later one is a bad row (``field`` ``id``).

A scan task finds the duplicates inside its own byte range; when a manifest takes several
ranges (a big file, or a folder of files), one Ray Data pass groups every valid row's id across
the manifest (a distributed hash shuffle: no process holds all the ids). The duplicates found
are then marked on the scan's chunks (``skip``: their lines), so every reader drops exactly the
rows the scan did not count as valid.
"""

from __future__ import annotations

import bisect
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import ray

from pipelines.common.manifests.rows import ManifestError, RowError
from pipelines.common.manifests.stream import chunk_lines
from pipelines.common.manifests.validate import check_row

log = logging.getLogger(__name__)

MAX_SKIPPED = 100_000
"""More duplicates than this are not skipped even with ``skip_bad_rows``: fix the manifest."""


def _id_rows(batch: dict[str, np.ndarray], pool: list[str] | None) -> dict[str, list]:
    """(id, file, line) of every row of a batch of chunks that passes the row checks."""
    ids, files, lines = [], [], []
    for raw in batch["chunk"]:
        chunk = json.loads(str(raw))
        for line, row in chunk_lines(chunk):
            sample, _ = check_row(row, line, pool, chunk["path"])
            if sample is not None:
                ids.append(sample.id)
                files.append(int(chunk["file_index"]))
                lines.append(line)
    return {"id": ids, "file": files, "line": lines}


def _later_rows(group: dict[str, np.ndarray]) -> dict[str, list]:
    """Of the rows sharing one id, all but the first in manifest order."""
    if len(group["id"]) < 2:
        return {"id": [], "file": [], "line": [], "first_file": [], "first_line": []}
    order = np.lexsort((group["line"], group["file"]))
    first = order[0]
    rest = order[1:]
    return {"id": [str(group["id"][i]) for i in rest],
            "file": [int(group["file"][i]) for i in rest],
            "line": [int(group["line"][i]) for i in rest],
            "first_file": [int(group["file"][first])] * len(rest),
            "first_line": [int(group["line"][first])] * len(rest)}


def duplicates_across(chunks: Sequence[dict], files: Sequence[str],
                      pool: Sequence[str] | None) -> Iterator[dict]:
    """Stream every later row of a duplicated id (Ray must be up): ``id``, ``file``, ``line``,
    ``first_file``, ``first_line`` with files as paths."""
    index = {path: i for i, path in enumerate(files)}
    items = [{"chunk": json.dumps({**c, "file_index": index[c["path"]]})} for c in chunks]
    if not items:
        return
    dataset = (ray.data.from_items(items, override_num_blocks=min(len(items), 200))
               .map_batches(_id_rows, batch_size=4,
                            fn_kwargs={"pool": list(pool) if pool else None})
               .groupby("id").map_groups(_later_rows, batch_format="numpy"))
    for row in dataset.iter_rows():
        yield {**row, "file": files[row["file"]], "first_file": files[row["first_file"]]}


def mark_duplicates(scan: Any, found: Iterable[dict], several_files: bool) -> list[dict]:
    """Count each duplicate as a bad row of ``scan`` and put its line on its chunk's ``skip``
    list; returns the report records. More than :data:`MAX_SKIPPED` is an error."""
    by_file: dict[str, list[int]] = {}
    for i, chunk in enumerate(scan.chunks):
        by_file.setdefault(chunk.path, []).append(i)
    starts = {path: [scan.chunks[i].line for i in positions]  # once, not per duplicate
              for path, positions in by_file.items()}
    records = []
    for dup in found:
        if len(records) >= MAX_SKIPPED:
            raise ManifestError(f"manifest {scan.uri}: more than {MAX_SKIPPED} rows repeat an "
                                "earlier row's id; ids must be unique")
        positions = by_file[dup["file"]]
        at = bisect.bisect_right(starts[dup["file"]], dup["line"]) - 1
        chunk = scan.chunks[positions[at]]
        chunk.valid -= 1
        chunk.skip.append(dup["line"])
        scan.valid -= 1
        scan.error_count += 1
        where = (f"line {dup['first_line']} of {dup['first_file']}" if several_files
                 else f"line {dup['first_line']}")
        message = f"duplicate id {dup['id']!r} (first on {where})"
        if len(scan.errors) < 50:
            scan.errors.append(RowError(dup["line"], dup["id"], "id",
                                        f"{dup['file']}: {message}" if several_files
                                        else message))
        records.append({"file": dup["file"], "line": dup["line"], "id": dup["id"],
                        "field": "id", "message": message})
    if records:
        log.warning("manifest %s: %d row(s) repeat an earlier row's id", scan.uri, len(records))
    return records
