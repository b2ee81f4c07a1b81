"""Moving one large file between a node and object storage at constant memory.

A download reads the object in pieces with parallel ranged reads, writes each piece at its
place and feeds the SHA-256 in order as the pieces arrive, so at most ``threads`` pieces are in
memory whatever the file's size (a 16 GB safetensors shard costs the same RAM as a 16 MB one).
An upload streams the local file in pieces into one output stream (a multipart upload on S3)
and hashes it on the way. Both leave nothing half-written in place: a download lands in a temp
file renamed after its size and digest were checked; an S3 object appears when its upload
completes, a local one is renamed into place.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pipelines.common import storage

log = logging.getLogger(__name__)

MIB = 1 << 20
PIECE_BYTES = 32 * MIB  # one ranged read
THREADS = 4  # ranged reads in flight per file: at most THREADS * PIECE_BYTES in memory
STREAM_BYTES = 8 * MIB  # one write of an upload


class TransferError(OSError):
    """A file that could not be moved, or arrived with another size or digest."""


@dataclass
class Moved:
    """What one transfer moved: bytes over the wire and the content's SHA-256."""

    bytes: int
    sha256: str


def _threads() -> int:
    return max(1, int(os.environ.get("MOVA_TRANSFER_THREADS", THREADS)))


def download(uri: str, dest: Path, *, size: int | None = None, sha256: str | None = None,
             piece_bytes: int = PIECE_BYTES, threads: int | None = None) -> Moved:
    """Copy the file at ``uri`` (local or s3://) to ``dest``; with ``size``/``sha256`` the copy
    must match them (else :class:`TransferError`, and ``dest`` is left as it was)."""
    fs, path = storage.filesystem(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    try:
        with fs.open_input_file(path) as src, open(tmp, "wb") as out:
            total = src.size()
            if size is not None and total != size:
                raise TransferError(f"{uri} holds {total} bytes; expected {size}")
            for data in _pieces(src, total, piece_bytes, threads or _threads()):
                digest.update(data)
                out.write(data)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise TransferError(f"{uri}: its SHA-256 is {digest.hexdigest()}; expected "
                                f"{sha256} (changed while being read?)")
        os.replace(tmp, dest)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: no such file") from None
    except OSError as exc:
        if isinstance(exc, TransferError):
            raise
        raise TransferError(f"download of {uri} failed: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return Moved(total, digest.hexdigest())


def _pieces(src, total: int, piece_bytes: int, threads: int):
    """The file's bytes in order, read ``threads`` pieces ahead with ranged reads."""
    offsets = iter(range(0, total, piece_bytes))
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mova-fetch") as pool:
        pending: deque[Future] = deque()

        def submit() -> None:
            offset = next(offsets, None)
            if offset is not None:
                pending.append(pool.submit(src.read_at, min(piece_bytes, total - offset),
                                           offset))

        for _ in range(threads):
            submit()
        while pending:
            data = pending.popleft().result()
            submit()
            yield data


def upload(src: Path, uri: str, *, stream_bytes: int = STREAM_BYTES) -> Moved:
    """Copy the local file ``src`` to ``uri`` (local or s3://), streamed and hashed."""
    if not storage.is_remote(uri):
        return download(str(src), Path(storage.absolute(uri)))
    fs, path = storage.filesystem(uri)
    digest, total = hashlib.sha256(), 0
    try:
        with open(src, "rb") as handle, fs.open_output_stream(path) as out:
            for data in iter(lambda: handle.read(stream_bytes), b""):
                digest.update(data)
                out.write(data)
                total += len(data)
    except OSError as exc:
        raise TransferError(f"upload of {src} to {uri} failed: {exc}") from exc
    return Moved(total, digest.hexdigest())
