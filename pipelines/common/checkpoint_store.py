"""Checkpoints anywhere a recipe points: publish a local folder to a local path or s3://, and
get a local copy of a published checkpoint on whichever node needs it.

A checkpoint is complete when its ``files.json`` (every file with its size and SHA-256,
:func:`mova.checkpoint.write_file_list`) is present: publishing writes it last, so a crash
leaves a checkpoint that readers refuse, naming what is missing. On S3, :func:`local_checkpoint`
downloads a checkpoint once into a local cache keyed by the digest of its ``files.json`` (a
changed checkpoint gets a new key), checks every file's size and digest, and moves it into place
atomically; later calls on that node reuse it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

from mova.checkpoint import FILES, CheckpointError, check_complete, file_digest
from pipelines.common import storage
from pipelines.common.local_cache import cache_dir

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """Where downloaded checkpoints live: ``$MOVA_CACHE/checkpoints``."""
    return cache_dir("checkpoints")


def publish(local_dir: str | Path, uri: str) -> str:
    """Copy a complete local checkpoint to ``uri`` (a local folder or s3://), replacing what was
    there; ``files.json`` goes last, so readers never take a half-written one for complete."""
    local_dir = Path(local_dir)
    listing = check_complete(local_dir)
    if not storage.is_remote(uri):
        return storage.upload_folder(str(local_dir), uri)
    if storage.exists(uri):
        storage.delete(storage.join(uri, FILES), missing_ok=True)  # unpublish first
    for name in listing["files"]:
        storage.write_bytes_atomic(storage.join(uri, name), (local_dir / name).read_bytes())
    storage.write_bytes_atomic(storage.join(uri, FILES), (local_dir / FILES).read_bytes())
    log.info("published checkpoint %s to %s (%d files)", local_dir, uri, len(listing["files"]))
    return uri


def local_checkpoint(uri: str) -> str:
    """A local folder holding checkpoint ``uri``: a local path is checked and returned, an
    s3:// one is downloaded (once per node) into the cache."""
    if not storage.is_remote(uri):
        check_complete(uri)
        return str(Path(uri).resolve())
    try:
        raw = storage.read_bytes(storage.join(uri, FILES))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {uri} has no {FILES} (the file written last when a "
                              "checkpoint is complete): it is incomplete, still being "
                              "published, or not a MoVA checkpoint") from None
    listing = json.loads(raw)
    target = cache_root() / hashlib.sha256(raw).hexdigest()[:24]
    if (target / FILES).is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        for name, meta in listing["files"].items():
            dest = tmp / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                dest.write_bytes(storage.read_bytes(storage.join(uri, name)))
            except FileNotFoundError:
                raise CheckpointError(f"checkpoint {uri} is incomplete: {FILES} lists {name}, "
                                      "which is not there") from None
            if dest.stat().st_size != meta["bytes"] or file_digest(dest) != meta["sha256"]:
                raise CheckpointError(f"checkpoint {uri}: {name} does not match its size or "
                                      f"digest in {FILES} (changed while being read?)")
        (tmp / FILES).write_bytes(raw)
        try:
            tmp.rename(target)
        except OSError:  # another process on this node finished the same download first
            if not (target / FILES).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("downloaded checkpoint %s to %s (%d files)", uri, target, len(listing["files"]))
    return str(target)
