"""Storage and manifests against a real S3 API (a moto server on loopback)."""

from __future__ import annotations

import argparse
import json
import socket
import time
import uuid
from io import BytesIO

import pytest
from PIL import Image

from pipelines.common import storage
from pipelines.common.manifests.schema import Sample
from pipelines.common.manifests.validate import (
    ManifestError,
    load_manifest,
    validate_manifest,
    write_manifest,
)
from pipelines.data import cli as data_cli

pytestmark = pytest.mark.integration

S3_BUCKET = "mova-test"  # created by the s3_endpoint fixture


@pytest.fixture
def prefix(s3_endpoint) -> str:
    """A fresh S3 prefix per test, so tests never see each other's objects."""
    return f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:8]}"


def _png_bytes(color=(10, 120, 200)) -> bytes:
    buffer = BytesIO()
    Image.new("RGB", (16, 16), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _turns(question: str = "<image>\nWhat?", answer: str = "Blue.") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def test_s3_write_read_list_exists_delete(prefix):
    uri = storage.join(prefix, "a", "x.txt")
    assert not storage.exists(uri)
    storage.write_text_atomic(uri, "first")
    storage.write_text_atomic(uri, "second")  # overwrite: readers see one or the other
    assert storage.read_text(uri) == "second" and storage.exists(uri)
    storage.write_bytes_atomic(storage.join(prefix, "a", "b", "y.bin"), b"\x00\x01")
    storage.write_text_atomic(storage.join(prefix, "a", ".hidden"), "h")
    storage.write_text_atomic(storage.join(prefix, "_tmp.part"), "t")
    assert storage.exists(storage.join(prefix, "a"))  # a prefix reads as a folder
    assert storage.list_files(prefix) == [f"{prefix}/a/b/y.bin", f"{prefix}/a/x.txt"]
    assert storage.list_files(prefix, suffix=".bin") == [f"{prefix}/a/b/y.bin"]
    assert storage.read_bytes(f"{prefix}/a/b/y.bin") == b"\x00\x01"
    storage.delete(uri)
    assert not storage.exists(uri)
    with pytest.raises(FileNotFoundError, match=uri):
        storage.read_bytes(uri)
    with pytest.raises(FileNotFoundError, match="missing"):
        storage.list_files(storage.join(prefix, "missing"))
    storage.delete(storage.join(prefix, "a"))
    assert storage.list_files(prefix) == []


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_s3_manifest_with_s3_images(prefix, tmp_path, suffix):
    storage.write_bytes_atomic(f"{prefix}/images/ok.png", _png_bytes())
    storage.write_bytes_atomic(f"{prefix}/elsewhere/abs.png", _png_bytes((0, 0, 0)))
    storage.write_bytes_atomic(f"{prefix}/images/garbage.png", b"not a png")
    good = [
        Sample(id="rel", image="images/ok.png", conversations=_turns(), experts=["sam"],
               meta={"k": 1}),
        Sample(id="abs", image=f"{prefix}/elsewhere/abs.png", conversations=_turns()),
        Sample(id="text", image=None, conversations=_turns("Hi", "Yo")),
    ]
    bad = [
        Sample(id="missing", image="images/missing.png", conversations=_turns()),
        Sample(id="garbage", image="images/garbage.png", conversations=_turns()),
    ]
    uri = f"{prefix}/m{suffix}"
    write_manifest(good + bad, uri)
    report = validate_manifest(uri)
    assert [(e.line, e.id, e.field) for e in report.errors] == [
        (4, "missing", "image"), (5, "garbage", "image")]
    assert f"{prefix}/images/missing.png" in report.errors[0].message
    report_uri = f"{prefix}/reports/bad.jsonl"
    assert load_manifest(uri, skip_bad_rows=True, report_uri=report_uri) == good
    records = [json.loads(x) for x in storage.read_text(report_uri).splitlines()]
    assert [r["id"] for r in records] == ["missing", "garbage"]
    write_manifest(good, uri)
    assert load_manifest(uri) == good


def test_validate_on_ray_streams_the_checks_to_tasks(ray_session, prefix, capsys):
    """``mova data validate --ray``: Ray tasks read the S3 manifest and its S3 images; the bad
    rows come back by line and go, every one, to the report folder."""
    storage.write_bytes_atomic(f"{prefix}/images/ok.png", _png_bytes())
    storage.write_bytes_atomic(f"{prefix}/images/garbage.png", b"not a png")
    rows = [Sample(id="ok", image="images/ok.png", conversations=_turns()),
            Sample(id="gone", image="images/missing.png", conversations=_turns()),
            Sample(id="bad", image="images/garbage.png", conversations=_turns()),
            Sample(id="ok", image=None, conversations=_turns("Hi", "Yo"))]
    uri = f"{prefix}/m.parquet"
    write_manifest(rows, uri)
    parser = argparse.ArgumentParser(prog="mova")
    data_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "validate", uri, "--ray", "--report", f"{prefix}/bad"])
    assert args.func(args) == 1
    out = capsys.readouterr().out
    assert "4 rows, 1 ok, 3 error(s) in 3 row(s)" in out
    assert "row 2 (id=gone): image: image file not found" in out.replace("line 2", "row 2")
    records = [json.loads(line) for part in storage.list_files(f"{prefix}/bad")
               for line in storage.read_text(part).splitlines()]
    assert sorted((r["line"], r["field"]) for r in records) == [(2, "image"), (3, "image"),
                                                                 (4, "id")]
    args = parser.parse_args(["data", "validate", uri, "--ray", "--no-check-images"])
    assert args.func(args) == 1
    assert "4 rows, 3 ok, 1 error(s)" in capsys.readouterr().out


def test_unreachable_endpoint_fails_fast_naming_it(s3_endpoint, monkeypatch):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))  # bound but never listening: connections are refused
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", closed)
        start = time.monotonic()
        with pytest.raises(storage.StorageError, match=closed):
            storage.read_bytes(f"s3://{S3_BUCKET}/anything.txt")
        with pytest.raises(storage.StorageError, match=closed):
            storage.exists(f"s3://{S3_BUCKET}/anything.txt")
        with pytest.raises(ManifestError, match=closed):
            load_manifest(f"s3://{S3_BUCKET}/m.jsonl")
        elapsed = time.monotonic() - start
    assert elapsed < 15, f"three failed requests took {elapsed:.1f} s"
