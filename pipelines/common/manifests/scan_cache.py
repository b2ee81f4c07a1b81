"""Reusing a manifest's scan: every stage of a run (features, train, labels, eval) scans the
same manifest, and at millions of rows that pass is most of a job's start-up. A scan is kept
under ``$MOVA_SCAN_CACHE`` (default ``$MOVA_CACHE/scans``, on the node that ran it), keyed by
what it depends on: each data file's URI, size and modification time, the expert pool, the
chunk and range sizes. A changed file, pool or setting is a new key; a scan whose bad rows
must be reported is always redone (the report is written by the scan tasks)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from pipelines.common import storage
from pipelines.common.local_cache import cache_dir
from pipelines.common.manifests.chunks import Chunk, ManifestScan
from pipelines.common.manifests.rows import RowError

log = logging.getLogger(__name__)

VERSION = 2  # 2: a Parquet chunk is one whole row group


def scan_dir() -> Path:
    """``$MOVA_SCAN_CACHE``, else ``$MOVA_CACHE/scans``."""
    if os.environ.get("MOVA_SCAN_CACHE"):
        return Path(os.environ["MOVA_SCAN_CACHE"])
    return cache_dir("scans")


def scan_key(files: Sequence[str], pool: Sequence[str] | None, chunk_rows: int,
             range_bytes: int) -> str | None:
    """The key of a scan of ``files``, or None when a file's size or time is unknown."""
    stamps = []
    for path in files:
        fs, fpath = storage.filesystem(path)
        info = fs.get_file_info(fpath)
        if info.size is None or info.mtime_ns is None:
            return None
        stamps.append([path, info.size, info.mtime_ns])
    text = json.dumps({"v": VERSION, "files": stamps, "pool": list(pool) if pool else None,
                       "chunk_rows": chunk_rows, "range_bytes": range_bytes})
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def load(key: str | None, uri: str) -> ManifestScan | None:
    """The kept scan for ``key``, or None."""
    if key is None:
        return None
    path = scan_dir() / f"{key}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    scan = ManifestScan(uri=uri, chunks=[Chunk(**c) for c in data["chunks"]],
                        rows=data["rows"], valid=data["valid"],
                        error_count=data["error_count"],
                        errors=[RowError(**e) for e in data["errors"]])
    log.info("reusing the scan of %s (%d rows, %d chunks) from %s", uri, scan.rows,
             len(scan.chunks), path)
    return scan


def save(key: str | None, scan: ManifestScan) -> None:
    """Keep ``scan`` (atomically; a failure to write only loses the reuse)."""
    if key is None:
        return
    folder = scan_dir()
    data = {"chunks": [c.to_dict() for c in scan.chunks], "rows": scan.rows,
            "valid": scan.valid, "error_count": scan.error_count,
            "errors": [asdict(e) for e in scan.errors]}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(data))
        tmp.replace(folder / f"{key}.json")
    except OSError as exc:
        log.warning("could not keep the scan in %s: %s", folder, exc)
