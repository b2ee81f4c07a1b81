"""The node's cache of downloaded checkpoints: one download per node, bounded in size.

Every process on a node that needs a checkpoint resolves it here. Entries live under
``$MOVA_CACHE/checkpoints/<key>`` (``key``: the digest of the published ``files.json``). Beside
each entry, two (hidden) lock files coordinate the node's processes:

* ``.<key>.fetch``: held exclusively while a process fetches files into the entry; the others
  wait (bounded) and then find the files there, so the node downloads each file once;
* ``.<key>.use``: held shared by every process that uses the entry, for its whole life; the
  evictor removes an entry only when it can take this lock exclusively, so nothing in use is
  ever evicted.

The cache holds at most ``$MOVA_CHECKPOINT_CACHE_GB`` (default 100) GiB: before a fetch, the
least recently used entries that no process uses are removed until the new files fit.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from pipelines.common.local_cache import cache_dir

log = logging.getLogger(__name__)

DEFAULT_CAP_GB = 100.0
LOCK_POLL_S = 0.2
FETCH_WAIT_S = 3600.0  # how long a process waits for another one's download on its node
LAST_USED = ".last-used"
_held: dict[str, int] = {}  # key -> fd of its shared ".use" lock, for this process's life


class CacheBusyError(TimeoutError):
    """Another process held a cache lock past the wait limit."""


def cap_bytes() -> int:
    return int(float(os.environ.get("MOVA_CHECKPOINT_CACHE_GB", DEFAULT_CAP_GB)) * (1 << 30))


def lock_fd(path: Path, mode: int, wait_s: float, poll_s: float = LOCK_POLL_S) -> int:
    """An fd of ``path`` locked with ``mode`` (polled every ``poll_s`` until ``wait_s``; a
    ``CacheBusyError`` then); the caller closes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return fd
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
        if time.monotonic() >= deadline:
            os.close(fd)
            raise CacheBusyError(f"{path} stayed locked by another process for {wait_s:.0f} s")
        time.sleep(poll_s)


class NodeCache:
    """The checkpoint cache of this node (see the module's description)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache_dir("checkpoints")

    def entry(self, key: str) -> Path:
        return self.root / key

    @contextlib.contextmanager
    def fetching(self, key: str, wait_s: float = FETCH_WAIT_S) -> Iterator[Path]:
        """The entry folder, with this process the only one fetching into it."""
        fd = lock_fd(self.root / f".{key}.fetch", fcntl.LOCK_EX, wait_s)
        try:
            yield self.entry(key)
        finally:
            os.close(fd)

    def use(self, key: str) -> None:
        """Mark the entry in use by this process (until it exits) and recently used."""
        if key not in _held:
            _held[key] = lock_fd(self.root / f".{key}.use", fcntl.LOCK_SH, FETCH_WAIT_S)
        stamp = self.entry(key) / LAST_USED
        if stamp.parent.is_dir():
            stamp.touch()

    def release(self, key: str) -> None:
        """Stop using the entry (tests, and processes done with a checkpoint)."""
        fd = _held.pop(key, None)
        if fd is not None:
            os.close(fd)

    def size(self, key: str) -> int:
        folder = self.entry(key)
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

    def keys(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return [p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")]

    def make_room(self, incoming: int, keep: str, cap: int | None = None) -> list[str]:
        """Evict least recently used entries nobody uses (never ``keep``) until ``incoming``
        more bytes fit under the cap; returns the evicted keys."""
        cap = cap_bytes() if cap is None else cap
        sizes = {k: self.size(k) for k in self.keys()}
        total = sum(sizes.values())
        evicted = []
        for key in sorted((k for k in sizes if k != keep), key=self._last_used):
            if total + incoming <= cap:
                break
            if self._evict(key):
                total -= sizes[key]
                evicted.append(key)
        if total + incoming > cap:
            log.warning("checkpoint cache %s: %.1f GiB after evicting what no process uses, "
                        "over its %.1f GiB cap (MOVA_CHECKPOINT_CACHE_GB)", self.root,
                        (total + incoming) / (1 << 30), cap / (1 << 30))
        return evicted

    def _last_used(self, key: str) -> float:
        stamp = self.entry(key) / LAST_USED
        return stamp.stat().st_mtime if stamp.exists() else 0.0

    def _evict(self, key: str) -> bool:
        """Remove the entry if no process uses or fetches it right now."""
        try:
            use = lock_fd(self.root / f".{key}.use", fcntl.LOCK_EX, 0.0)
        except CacheBusyError:
            return False
        try:
            fetch = lock_fd(self.root / f".{key}.fetch", fcntl.LOCK_EX, 0.0)
        except CacheBusyError:
            os.close(use)
            return False
        try:
            shutil.rmtree(self.entry(key), ignore_errors=True)
            log.info("evicted checkpoint %s from the node cache %s", key, self.root)
            return True
        finally:
            os.close(fetch)
            os.close(use)
