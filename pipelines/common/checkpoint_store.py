"""Checkpoints anywhere a recipe points: publish a local folder to a local path or s3://, and
get a node-local copy of (parts of) a published checkpoint in whichever process needs it.

A checkpoint is complete when its ``files.json`` (every file with its size and SHA-256,
:func:`mova.checkpoint.write_file_list`) is present: publishing writes it last, so a crash
leaves a checkpoint that readers refuse, naming what is missing.

A process asks for the parts it runs (:data:`PARTS`): an expert replica its expert, the
adapter its encoders and adapter, the LLM its folder, the Serve build task and the ingress only
the configs and tokenizers (``meta``, always included). Files stream in pieces with their
SHA-256 checked (:mod:`pipelines.common.transfer`), once per node, under the node cache's locks
(:mod:`pipelines.common.node_cache`). A node-local copy lists in its own ``files.json`` the
files it holds, so the model library loads from it like from any checkpoint folder.
URIs, never these local paths, cross process boundaries: each process resolves its own copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from mova.checkpoint import COMPONENTS, FILES, CheckpointError, check_complete
from pipelines.common import storage
from pipelines.common.node_cache import NodeCache
from pipelines.common.transfer import TransferError, download, upload

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
MODEL_PARTS = ("llm", "text_encoder", "base_encoder", "adapter")
PARTS = ("meta", *MODEL_PARTS, "expert:<name>", "all")
PUBLISHED = ".published.json"  # the published listing, kept beside a partial local copy
FETCHED = {"files": 0, "bytes": 0}  # what this process fetched from storage (tests, benchmarks)


def publish(local_dir: str | Path, uri: str) -> str:
    """Copy a complete local checkpoint to ``uri`` (a local folder or s3://), replacing what was
    there, one streamed file at a time (each checked against ``files.json`` on the way);
    ``files.json`` goes last, so readers never take a half-written one for complete."""
    local_dir = Path(local_dir)
    listing = check_complete(local_dir)
    if not storage.is_remote(uri):
        return storage.upload_folder(str(local_dir), uri)
    if storage.exists(uri):
        storage.delete(storage.join(uri, FILES), missing_ok=True)  # unpublish first
    for name, meta in listing["files"].items():
        moved = upload(local_dir / name, storage.join(uri, name))
        if moved.sha256 != meta["sha256"]:
            raise CheckpointError(f"{local_dir / name} changed since {FILES} was written "
                                  "(its digest differs); not published")
    upload(local_dir / FILES, storage.join(uri, FILES))
    log.info("published checkpoint %s to %s (%d files)", local_dir, uri, len(listing["files"]))
    return uri


def published_listing(uri: str) -> tuple[dict, bytes]:
    """The published ``files.json`` of ``uri`` (parsed, and its raw bytes)."""
    try:
        raw = storage.read_bytes(storage.join(uri, FILES))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {uri} has no {FILES} (the file written last when a "
                              "checkpoint is complete): it is incomplete, still being "
                              "published, or not a MoVA checkpoint") from None
    return json.loads(raw), raw


def part_files(names: Iterable[str], components: dict | None, parts: Sequence[str] | None
               ) -> list[str]:
    """The files of a checkpoint that ``parts`` need (None or ``all``: every file); ``meta``
    (configs and tokenizers: every file that holds no weights) always. Without
    ``components`` (not fetched yet) only ``meta`` is known."""
    names = sorted(names)
    if parts is None or "all" in parts:
        return names
    prefixes = []
    for part in parts:
        if part in MODEL_PARTS and components is not None:
            prefixes.append(components[part].rstrip("/"))
        elif part.startswith("expert:") and components is not None:
            entry = components["experts"].get(part.split(":", 1)[1])
            if entry is None:
                raise CheckpointError(f"the checkpoint has no expert {part.split(':', 1)[1]!r};"
                                      f" it has {sorted(components['experts'])}")
            if entry.get("path"):
                prefixes.append(entry["path"].rstrip("/"))
        elif part != "meta" and part not in MODEL_PARTS and not part.startswith("expert:"):
            raise ValueError(f"checkpoint part {part!r}; expected one of {list(PARTS)}")
    return [n for n in names if not n.endswith(WEIGHT_SUFFIXES)
            or any(n == p or n.startswith(p + "/") for p in prefixes)]


def local_checkpoint(uri: str, parts: Sequence[str] | None = None) -> str:
    """A local folder holding checkpoint ``uri`` (at least ``parts``, see :func:`part_files`):
    a local path is checked and returned; an s3:// one is fetched into this node's cache
    (each file once per node, streamed) and marked in use by this process."""
    if not storage.is_remote(uri):
        check_complete(uri)
        return str(Path(uri).resolve())
    listing, raw = published_listing(uri)
    key = hashlib.sha256(raw).hexdigest()[:24]
    cache = NodeCache()
    cache.use(key)
    folder = cache.entry(key)
    files = listing["files"]
    for stage in (["meta"], parts):  # components.json (meta) says where the parts are
        components = _components(folder)
        wanted = part_files(files, components, stage)
        if not _holds(folder, wanted):
            with cache.fetching(key) as folder:
                missing = [n for n in wanted if not _present(folder, n)]
                _fetch(uri, folder, files, missing, cache, key)
                _write_local_listing(folder, files, raw)
    cache.use(key)  # recently used (the copy exists now)
    return str(folder)


def _components(folder: Path) -> dict | None:
    path = folder / COMPONENTS
    return json.loads(path.read_text()) if path.is_file() else None


def _present(folder: Path, name: str) -> bool:
    return (folder / name).is_file()


def _holds(folder: Path, names: Iterable[str]) -> bool:
    return all(_present(folder, n) for n in names)


def _fetch(uri: str, folder: Path, files: dict, names: list[str], cache: NodeCache,
           key: str) -> None:
    """Fetch ``names`` (those still missing once this process holds the fetch lock)."""
    if not names:
        return
    cache.make_room(sum(files[n]["bytes"] for n in names), keep=key)
    folder.mkdir(parents=True, exist_ok=True)
    moved = 0
    for name in names:
        meta = files[name]
        try:
            moved += download(storage.join(uri, name), folder / name, size=meta["bytes"],
                              sha256=meta["sha256"]).bytes
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {uri} is incomplete: {FILES} lists {name}, "
                                  "which is not there") from None
        except TransferError as exc:
            raise CheckpointError(f"checkpoint {uri}: {name} does not match its size or "
                                  f"digest in {FILES} ({exc})") from exc
    FETCHED["files"] += len(names)
    FETCHED["bytes"] += moved
    log.info("fetched %d file(s) of checkpoint %s into %s (%.1f MB)", len(names), uri, folder,
             moved / 1e6)


def _write_local_listing(folder: Path, files: dict, raw: bytes) -> None:
    """``files.json`` of the local copy: the files it holds, so that loaders check exactly
    those; the published listing stays beside it."""
    held = {n: m for n, m in files.items() if _present(folder, n)}
    current = folder / FILES
    if current.is_file() and json.loads(current.read_text()).get("files") == held:
        return
    listing = {**json.loads(raw), "files": held}
    for name, data in ((PUBLISHED, raw), (FILES, json.dumps(listing, indent=2).encode())):
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        tmp.replace(folder / name)


def part_bytes(uri: str, prefix: str = "") -> int:
    """Bytes of the published checkpoint ``uri`` under ``prefix`` (``""``: all of it;
    ``"llm/"``, ``"experts/dinov2/"``), from its file list; an expert stored by reference
    counts its local folder (a hub id counts nothing)."""
    listing = published_listing(uri)[0] if storage.is_remote(uri) else check_complete(uri)
    total = sum(m["bytes"] for name, m in listing["files"].items() if name.startswith(prefix))
    if prefix.startswith("experts/"):
        components = json.loads(storage.read_bytes(storage.join(uri, COMPONENTS)))
        reference = components["experts"].get(prefix.split("/")[1], {}).get("reference")
        folder = Path(str(reference or "")).expanduser()
        if reference and folder.is_dir():
            total += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return total
