"""The node's store of expert features for serving: a bounded, least-recently-used cache of
tensors on local disk, shared by every process of the node.

Layout under the root (a local folder: nodes share no disk, so it is the node's own)::

    <expert>/<key>/<hash[:2]>/<hash>.safetensors   the features of one image (tensor
                                                   ``features``; expert, key and hash in its
                                                   metadata)
    .lock                                          flock'ed while the store changes; holds the
                                                   bytes the entries take (decimal text)

``key`` is the expert's cache key (:func:`mova.checkpoint.expert_cache_key`), so a changed
expert never reads stale features: its old entries age out. A put writes a temporary file
beside the entry and renames it in (``os.replace``): a reader sees a whole entry or none. A
get refreshes the entry's mtime, which is its recency. A put adds its bytes to the count in
``.lock`` under the lock; only when the count passes ``max_bytes`` does it scan the tree
(under the lock), remove the least recently used entries down to :data:`LOW_WATER` of the
bound, and write the exact total back: one scan per ``(1 - LOW_WATER) * max_bytes`` of puts,
not one per put. Readers never lock. An entry that cannot be read (truncated, corrupt, another
image's) is a miss: it is removed and logged, never an error.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from pipelines.common.node_cache import CacheBusyError, lock_fd

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
TENSOR = "features"
LOCK_FILE = ".lock"
LOW_WATER = 0.9  # an eviction leaves the store at this fraction of max_bytes
LOCK_WAIT_S = 10.0  # a put gives up (the entry is not stored) after waiting this long
LOCK_POLL_S = 0.005  # how often a put waiting for the lock tries again
STALE_TEMP_S = 600.0  # a scan removes temporary files older than this (killed writers)
_HASH = re.compile(r"[0-9a-f]{16,128}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


def valid_hash(image_hash: str) -> bool:
    """Whether ``image_hash`` names an entry (lowercase hex, 16 to 128 digits)."""
    return bool(_HASH.fullmatch(image_hash or ""))


class _Lock:
    """The store's lock file, held exclusively; it also keeps the byte count."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def read(self) -> int | None:
        """The recorded bytes, or None when the count is missing or unreadable."""
        text = os.pread(self.fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else None

    def write(self, used: int) -> None:
        data = str(max(0, used)).encode()
        os.pwrite(self.fd, data, 0)
        os.ftruncate(self.fd, len(data))


def _touch(path: Path) -> None:
    """Mark ``path`` used now (its mtime is its recency); gone already is fine."""
    now = time.time_ns()
    with contextlib.suppress(FileNotFoundError):
        os.utime(path, ns=(now, now))


def _decode(data: bytes, image_hash: str) -> torch.Tensor:
    """The tensor of one entry's bytes; ValueError (or safetensors' error) if it is not a
    whole entry of ``image_hash``."""
    size = int.from_bytes(data[:8], "little")
    if len(data) < 8 or size > len(data) - 8:
        raise ValueError(f"{len(data)} bytes hold no safetensors header")
    meta = json.loads(data[8:8 + size]).get("__metadata__") or {}
    if meta.get("image_hash") != image_hash:
        raise ValueError(f"the entry holds image {meta.get('image_hash')!r}")
    return load_tensors(data)[TENSOR].clone()


class FeatureStore:
    """Expert features of images under ``root``, at most ``max_bytes`` of them (see the
    module's description). Safe to share between threads and processes of one node."""

    def __init__(self, root: str | Path, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes={max_bytes} must be >= 1")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.bytes_used = 0  # the store's total as this process last saw it (a put, a scan)

    def path(self, expert: str, key: str, image_hash: str) -> Path:
        """Where the entry of (expert, key, image) lives; ValueError for a malformed part."""
        for what, value in (("expert", expert), ("key", key)):
            if not _NAME.fullmatch(value or ""):
                raise ValueError(f"feature store: {what}={value!r} is not a plain name")
        if not valid_hash(image_hash):
            raise ValueError(f"feature store: image_hash={image_hash!r} is not a lowercase "
                             "hex digest")
        return self.root / expert / key / image_hash[:2] / f"{image_hash}{SUFFIX}"

    # ---- reading ---------------------------------------------------------------------------
    def get(self, expert: str, key: str, image_hash: str) -> torch.Tensor | None:
        """The stored features, or None (a miss); a hit becomes the most recently used."""
        path = self.path(expert, key, image_hash)
        try:
            with open(path, "rb") as handle:
                data = handle.read()
                stat = os.fstat(handle.fileno())
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("feature store: cannot read %s (%r); a miss", path, exc)
            return None
        try:
            tensor = _decode(data, image_hash)
        except Exception as exc:  # truncated, corrupt or foreign: a miss, never an error
            log.warning("feature store: %s is unreadable (%s); removed", path, exc)
            self._discard(path, stat)
            return None
        _touch(path)
        return tensor

    def _discard(self, path: Path, seen: os.stat_result) -> None:
        """Remove the file read as ``seen``, unless a put has replaced it since."""
        try:
            with self._lock() as lock:
                try:
                    now = os.stat(path)
                except FileNotFoundError:
                    return
                if (now.st_ino, now.st_dev) == (seen.st_ino, seen.st_dev):
                    path.unlink()
                    used = lock.read()
                    if used is not None:
                        lock.write(used - now.st_size)
        except (OSError, CacheBusyError) as exc:
            log.warning("feature store: could not remove %s (%r)", path, exc)

    # ---- writing ---------------------------------------------------------------------------
    def put(self, expert: str, key: str, image_hash: str, features: torch.Tensor) -> bool:
        """Store one image's features (dtype and shape kept), evicting least recently used
        entries if the store passes its bound; False if the entry alone exceeds it."""
        path = self.path(expert, key, image_hash)
        blob = save_tensors({TENSOR: features.detach().cpu().contiguous()},
                            metadata={"expert": expert, "key": key, "image_hash": image_hash})
        if len(blob) > self.max_bytes:
            log.debug("feature store: %d bytes of %s exceed the bound", len(blob), path)
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            temp.write_bytes(blob)
            with self._lock() as lock:
                try:
                    replaced = os.stat(path).st_size
                except FileNotFoundError:
                    replaced = 0
                os.replace(temp, path)
                _touch(path)
                used = lock.read()  # None: first put, or a lost count: count afresh
                used = self.usage() if used is None else used + len(blob) - replaced
                if used > self.max_bytes:
                    used = self._evict(keep=path)
                lock.write(used)
                self.bytes_used = used
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
        return True

    @contextlib.contextmanager
    def _lock(self) -> Iterator[_Lock]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = lock_fd(self.root / LOCK_FILE, fcntl.LOCK_EX, LOCK_WAIT_S, poll_s=LOCK_POLL_S)
        try:
            yield _Lock(fd)
        finally:
            os.close(fd)

    # ---- eviction (under the lock) ----------------------------------------------------------
    def _evict(self, keep: Path) -> int:
        """Remove least recently used entries (never ``keep``) until the store holds at most
        :data:`LOW_WATER` of its bound; returns the bytes that remain."""
        entries = sorted(self._entries())
        total = sum(size for _, size, _ in entries)
        target = int(self.max_bytes * LOW_WATER)
        removed = 0
        for _, size, path in entries:
            if total <= target:
                break
            if path == keep:
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            total -= size
            removed += 1
        if removed:
            log.info("feature store %s: evicted %d entries; %d bytes remain (bound %d)",
                     self.root, removed, total, self.max_bytes)
        return total

    def _entries(self) -> Iterator[tuple[int, int, Path]]:
        """(mtime ns, bytes, path) of every entry; removes stale temporary files."""
        stale = time.time_ns() - int(STALE_TEMP_S * 1e9)
        for bucket in _folders(self.root, depth=3):
            for item in _scan(bucket):
                if not item.is_file(follow_symlinks=False):
                    continue
                try:
                    stat = item.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if item.name.endswith(SUFFIX) and not item.name.startswith("."):
                    yield stat.st_mtime_ns, stat.st_size, Path(item.path)
                elif item.name.endswith(".tmp") and stat.st_mtime_ns < stale:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(item.path)

    def usage(self) -> int:
        """The bytes every entry takes now (a full scan; for tests and reports)."""
        return sum(size for _, size, _ in self._entries())


def _scan(folder: str | Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _folders(root: Path, depth: int) -> Iterator[str]:
    """The folders ``depth`` levels below ``root`` (names starting with '.' skipped)."""
    level = [str(root)]
    for _ in range(depth):
        level = [e.path for folder in level for e in _scan(folder)
                 if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]
    yield from level
