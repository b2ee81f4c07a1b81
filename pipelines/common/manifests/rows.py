"""Reading and writing manifest rows: JSON lines (``.jsonl``/``.json``) or Parquet, local or
s3://, one :class:`~pipelines.common.manifests.schema.Sample` per line or row."""

from __future__ import annotations

import io
import json
import logging
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.common import storage
from pipelines.common.manifests.schema import FIELDS, Sample

logger = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"  # the file that publishes a folder written in parts
STARTED = "_STARTED"  # written when a job starts writing a folder in parts
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)

PARQUET_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("image", pa.string()),
    ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))),
    ("experts", pa.list_(pa.string())),
    ("kind", pa.string()),
    ("domain", pa.string()),
    ("answers", pa.list_(pa.string())),
    ("metric", pa.string()),
    ("meta", pa.string()),  # a JSON object as text: free-form keys do not fit a fixed schema
])




class ManifestError(ValueError):
    """A manifest that cannot be read, or has bad rows; the message lists them."""


@dataclass
class RowError:
    """One problem in one manifest row."""

    line: int
    id: str | None
    field: str
    message: str

    def format(self) -> str:
        where = f"line {self.line}" + (f" (id={self.id})" if self.id is not None else "")
        return f"{where}: {self.field}: {self.message}"


def parse_line(text: str, line: int) -> dict | RowError:
    """One JSON line as a dict, or the :class:`RowError` saying why it is not one."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        return RowError(line, None, "json", f"not valid JSON: {exc}")
    if not isinstance(row, dict):
        return RowError(line, None, "json", f"expected a JSON object, got {type(row).__name__}")
    return row


def parquet_row(row: dict, line: int) -> dict | RowError:
    """Parquet stores ``meta`` as JSON text; decode it back to an object."""
    meta = row.get("meta")
    if not isinstance(meta, str):
        return row
    try:
        row["meta"] = json.loads(meta)
    except json.JSONDecodeError as exc:
        ident = row.get("id") if isinstance(row.get("id"), str) else None
        return RowError(line, ident, "meta", f"invalid JSON text in the meta column: {exc}")
    return row


def manifest_files(uri: str) -> list[str]:
    """The data files of a manifest: the file itself, or a folder's parts in name order."""
    fs, path = storage.filesystem(uri)
    try:
        kind = fs.get_file_info(path).type
    except OSError as exc:
        raise ManifestError(f"manifest {uri} cannot be read (S3 endpoint "
                            f"{storage.endpoint_description()}): {exc}") from exc
    if kind == pafs.FileType.NotFound:
        if posixpath.splitext(uri.rstrip("/"))[1]:  # a file name: its suffix must be ours
            format_of(uri)
        raise ManifestError(f"manifest {uri} not found")
    if kind == pafs.FileType.File:
        format_of(uri)
        return [uri]
    marker = storage.join(uri, SUCCESS)
    if storage.exists(marker):
        try:
            listing = json.loads(storage.read_text(marker) or "null")
        except json.JSONDecodeError:
            listing = None
        if isinstance(listing, dict) and isinstance(listing.get("parts"), list):
            return [storage.join(uri, p) for p in listing["parts"]]
        # someone else's marker (Spark writes an empty _SUCCESS): read the folder's files
    elif storage.exists(storage.join(uri, STARTED)):
        raise ManifestError(f"manifest folder {uri} is the output of a mova job that did not "
                            f"finish ({STARTED} but no {SUCCESS}); run that job again")
    files = [f for f in storage.list_files(uri)
             if f.lower().endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES)]
    if not files:
        raise ManifestError(f"manifest folder {uri} holds no .jsonl or .parquet file")
    return files


def format_of(uri: str) -> str:
    name = str(uri).lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    raise ValueError(
        f"manifest {uri!r}: unknown format; expected a name ending in "
        f"{', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)}"
    )


def read_rows(uri: str) -> list[tuple[int, dict | RowError]]:
    """The raw rows of a small manifest (a file, or a folder of part files in order) with their
    line numbers (1-based per file; Parquet: row index + 1); jobs stream manifests instead
    (``pipelines.common.manifests.stream``). A JSON line that does not parse, or is not an
    object, comes back as a :class:`RowError` in place of its dict. An unreadable manifest raises
    :class:`ManifestError` naming ``uri``."""
    return [row for path in manifest_files(uri) for row in _read_file_rows(path)]


def _read_file_rows(uri: str) -> list[tuple[int, dict | RowError]]:
    """The raw rows of a manifest with their line numbers (1-based; Parquet: row index + 1).

    A JSON line that does not parse, or is not an object, comes back as a :class:`RowError`
    in place of its dict, so one bad line never hides the rest. An unreadable manifest raises
    :class:`ManifestError` naming ``uri``.
    """
    fmt = format_of(uri)
    try:
        data = storage.read_bytes(uri)
    except OSError as exc:
        raise ManifestError(f"manifest {uri} cannot be read: {exc}") from exc
    if fmt == "parquet":
        try:
            records = pq.read_table(io.BytesIO(data)).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise ManifestError(f"manifest {uri} is not a readable Parquet file: {exc}") from exc
        return [(i + 1, parquet_row(record, i + 1)) for i, record in enumerate(records)]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"manifest {uri} is not UTF-8 text: {exc}") from exc
    return [(number, parse_line(line, number))
            for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _as_sample(item: Sample | dict, index: int) -> Sample:
    if isinstance(item, Sample):
        return item
    if not isinstance(item, dict):
        raise ValueError(f"sample {index}: expected a Sample or a dict, got {type(item).__name__}")
    unknown = sorted(set(item) - set(FIELDS))
    if unknown:
        raise ValueError(f"sample {index}: unknown key(s) {unknown}; expected among {FIELDS}")
    missing = [k for k in ("id", "conversations") if k not in item]
    if missing:
        raise ValueError(f"sample {index}: missing key(s) {missing}")
    return Sample.from_dict({"image": None, **item})


def write_manifest(samples: Iterable[Sample | dict], uri: str) -> str:
    """Write samples as JSON lines or Parquet (by suffix), atomically; returns ``uri``.

    Rows are written as given (not validated); run :func:`validate_manifest` on the result.
    """
    fmt = format_of(uri)
    rows = [_as_sample(s, i).to_dict() for i, s in enumerate(samples)]
    if fmt == "jsonl":
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    else:
        for r in rows:
            r["meta"] = json.dumps(r["meta"] if r["meta"] is not None else {},
                                   ensure_ascii=False)
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA), buffer)
        data = buffer.getvalue()
    storage.write_bytes_atomic(uri, data)
    logger.info("wrote %d sample(s) to %s", len(rows), uri)
    return uri
