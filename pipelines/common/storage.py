"""One small file API over local folders and ``s3://bucket/key`` URIs (via ``pyarrow.fs``).

Every pipeline step reads and writes through these functions, so a recipe can point any path at
a local folder or at S3 without code changes. S3 is configured from the standard environment
variables: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (MinIO, moto, ...),
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN`` and ``AWS_REGION`` or
``AWS_DEFAULT_REGION`` (default ``us-east-1``).
"""

from __future__ import annotations

import functools
import os
import posixpath
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

S3_SCHEME = "s3://"
DEFAULT_REGION = "us-east-1"
# Seconds; pyarrow applies the request timeout only on Windows and macOS.
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 60.0
S3_MAX_ATTEMPTS = 3
_SKIP_PREFIXES = (".", "_tmp")


class StorageError(OSError):
    """An S3 request that failed for a reason other than a missing file; names the endpoint."""


def is_remote(uri: str) -> bool:
    """True for ``s3://`` URIs, False for local paths."""
    return str(uri).startswith(S3_SCHEME)


def _local_path(uri: str) -> str:
    text = str(uri)
    if text.startswith("file://"):
        text = urlparse(text).path
    return os.path.abspath(os.path.expanduser(text))


def _s3_key(uri: str) -> str:
    """``bucket/key`` (the pyarrow path) of an ``s3://`` URI."""
    path = uri[len(S3_SCHEME):].strip("/")
    if not path:
        raise ValueError(f"S3 URI {uri!r} has no bucket; expected s3://bucket/key")
    return path


def _endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def endpoint_description() -> str:
    """The S3 endpoint the current environment points at (for error messages and logs)."""
    return _endpoint_url() or "the default AWS S3 endpoint"


@functools.lru_cache(maxsize=8)
def _s3(endpoint: str | None, key: str | None, secret: str | None, token: str | None,
        region: str) -> pafs.S3FileSystem:
    kwargs: dict = {
        "region": region,
        "connect_timeout": CONNECT_TIMEOUT_S,
        "request_timeout": REQUEST_TIMEOUT_S,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
        # Each part of a multipart upload is sent before the next is accepted: with background
        # writes pyarrow queues parts without bound when storage is slower than the disk, and
        # a multi-GiB upload then holds GiBs of RAM.
        "background_writes": False,
    }
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret, session_token=token or None)
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["scheme"] = parsed.scheme or "https"
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path to pass to it.

    Local paths become absolute; S3 URIs become ``bucket/key`` on an ``S3FileSystem`` built
    from the environment (cached per configuration, so changed variables take effect).
    """
    if is_remote(uri):
        env = os.environ
        fs = _s3(
            _endpoint_url(),
            env.get("AWS_ACCESS_KEY_ID"),
            env.get("AWS_SECRET_ACCESS_KEY"),
            env.get("AWS_SESSION_TOKEN"),
            env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION,
        )
        return fs, _s3_key(uri)
    return pafs.LocalFileSystem(), _local_path(uri)


def _wrap(uri: str, action: str, exc: OSError) -> OSError:
    """Turn a pyarrow error into FileNotFoundError or a StorageError naming the endpoint."""
    if isinstance(exc, FileNotFoundError):
        return FileNotFoundError(f"{uri}: no such file")
    if not is_remote(uri):
        return exc
    hint = ""
    if any(code in str(exc) for code in ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId",
                                         "SignatureDoesNotMatch", "403")):
        hint = (" (access denied: check the credentials, AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY or the node's role, and the bucket's policy)")
    return StorageError(
        f"S3 {action} of {uri} at endpoint {endpoint_description()} failed{hint}: {exc}"
    )


def _info(uri: str) -> pafs.FileInfo:
    fs, path = filesystem(uri)
    try:
        return fs.get_file_info(path)
    except OSError as exc:
        raise _wrap(uri, "lookup", exc) from exc


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local folder or an S3 prefix (for S3, ``..`` is resolved)."""
    if is_remote(base):
        key = posixpath.join(base[len(S3_SCHEME):], *[p.lstrip("/") for p in parts])
        return S3_SCHEME + posixpath.normpath(key)
    return os.path.join(str(base), *parts)


def parent(uri: str) -> str:
    """The folder containing ``uri`` (``.`` for a bare local file name)."""
    if is_remote(uri):
        head = posixpath.dirname(uri[len(S3_SCHEME):].rstrip("/"))
        return S3_SCHEME + head if head else S3_SCHEME
    return os.path.dirname(str(uri).rstrip(os.sep)) or "."


def exists(uri: str) -> bool:
    """True if ``uri`` is an existing file or folder."""
    return _info(uri).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    """The whole content of a file; FileNotFoundError naming ``uri`` if it is missing."""
    fs, path = filesystem(uri)
    try:
        with fs.open_input_file(path) as stream:
            return stream.read()
    except OSError as exc:
        raise _wrap(uri, "read", exc) from exc


def read_range(uri: str, offset: int, length: int) -> bytes:
    """``length`` bytes of a file from ``offset`` (one ranged request on S3)."""
    fs, path = filesystem(uri)
    try:
        with fs.open_input_file(path) as stream:
            return stream.read_at(length, offset)
    except OSError as exc:
        raise _wrap(uri, "read", exc) from exc


def read_text(uri: str, encoding: str = "utf-8") -> str:
    """A text file's content."""
    return read_bytes(uri).decode(encoding)


def write_bytes_atomic(uri: str, data: bytes) -> str:
    """Write a file so readers see the old content or the new, never a partial file.

    Local: a temp file in the same folder, then ``os.replace``. S3: one upload (an object
    appears only when its upload completes). Parent folders are created. Returns ``uri``.
    """
    if is_remote(uri):
        fs, path = filesystem(uri)
        try:
            with fs.open_output_stream(path) as stream:
                stream.write(data)
        except OSError as exc:
            raise _wrap(uri, "write", exc) from exc
        return uri
    path = _local_path(uri)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="_tmp.", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return uri


def write_text_atomic(uri: str, text: str, encoding: str = "utf-8") -> str:
    """Atomically write a text file (see :func:`write_bytes_atomic`)."""
    return write_bytes_atomic(uri, text.encode(encoding))


def _skipped(rel: str) -> bool:
    return any(part.startswith(_SKIP_PREFIXES) for part in rel.replace(os.sep, "/").split("/"))


def list_files(uri: str, suffix: str | None = None) -> list[str]:
    """Files under a folder or prefix, recursively and sorted, as full URIs.

    Names (files or folders) starting with ``.`` or ``_tmp`` are skipped; ``suffix`` keeps only
    names ending with it. A file ``uri`` lists as itself; a missing one raises
    FileNotFoundError.
    """
    fs, base = filesystem(uri)
    info = _info(uri)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: no such file or folder")
    if info.type == pafs.FileType.File:
        return [uri] if suffix is None or uri.endswith(suffix) else []
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except OSError as exc:
        raise _wrap(uri, "listing", exc) from exc
    out = []
    for item in infos:
        if item.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(item.path, base) if is_remote(uri) else os.path.relpath(
            item.path, base)
        if _skipped(rel) or (suffix is not None and not rel.endswith(suffix)):
            continue
        out.append(join(uri, rel))
    return sorted(out)


def list_dir(uri: str) -> tuple[list[str], list[str]]:
    """The files and the folders directly in a folder or prefix (not recursive), each sorted
    by name, as full URIs; names starting with ``.`` or ``_tmp`` are skipped and a missing
    folder lists as empty. Names come in byte order (S3 lists keys so; a local folder is
    sorted here)."""
    fs, base = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=False,
                                                   allow_not_found=True))
    except OSError as exc:
        raise _wrap(uri, "listing", exc) from exc
    files, folders = [], []
    for item in infos:
        name = item.base_name
        if _skipped(name):
            continue
        if item.type == pafs.FileType.File:
            files.append(join(uri, name))
        elif item.type == pafs.FileType.Directory:
            folders.append(join(uri, name))
    return sorted(files), sorted(folders)


def delete(uri: str, missing_ok: bool = False) -> None:
    """Delete a file, or a folder with everything under it."""
    fs, path = filesystem(uri)
    kind = _info(uri).type
    if kind == pafs.FileType.NotFound:
        if missing_ok:
            return
        raise FileNotFoundError(f"{uri}: no such file or folder")
    try:
        if kind == pafs.FileType.Directory:
            fs.delete_dir(path)
        else:
            fs.delete_file(path)
    except OSError as exc:
        raise _wrap(uri, "delete", exc) from exc


def makedirs(uri: str) -> None:
    """Create a folder and its parents (for S3, a folder marker; the bucket must exist)."""
    fs, path = filesystem(uri)
    try:
        fs.create_dir(path, recursive=True)
    except OSError as exc:
        raise _wrap(uri, "create-folder", exc) from exc


def upload_folder(local_dir: str, uri: str) -> str:
    """Copy a local folder to ``uri`` (local or s3://), replacing what was there.

    Locally the copy lands in a hidden sibling first and is renamed into place, so readers
    never see half a folder. On S3 every object is one atomic put; ``components.json``-style
    manifests should be written last by the caller's layout (files are put in sorted order).
    """
    src = Path(local_dir)
    if not is_remote(uri):
        dest = Path(_local_path(uri))
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        shutil.rmtree(tmp)
        shutil.copytree(src, tmp)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
        return str(dest)
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        write_bytes_atomic(join(uri, path.relative_to(src).as_posix()), path.read_bytes())
    return uri


def absolute(uri: str) -> str:
    """A local path made absolute (``~`` expanded); an s3:// URI unchanged."""
    return uri if is_remote(uri) else _local_path(uri)
