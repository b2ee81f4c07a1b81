"""Local storage, manifest round trips and validation, converters and the `data` CLI."""

from __future__ import annotations

import argparse
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.common import storage
from pipelines.common.manifests.scan import merge_ranges, scan_range, scan_tasks
from pipelines.common.manifests.schema import Sample
from pipelines.common.manifests.validate import (
    ManifestError,
    load_manifest,
    read_rows,
    resolve_image,
    validate_manifest,
    validate_row,
    write_manifest,
)
from pipelines.data import cli as data_cli
from pipelines.data.convert import convert_llava, convert_vqa


def _turns(question="<image>\nWhat is this?", answer="A square."):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _samples() -> list[Sample]:
    return [
        Sample(id="a", image="images/a.png", conversations=_turns(), experts=["dinov2", "sam"],
               domain="general", answers=["square", "a square"], metric="vqa_accuracy",
               meta={"source": "unit", "nested": {"k": [1, 2.5, None]}, "ünï": "cödé"}),
        Sample(id="b", image=None, conversations=[
            {"from": "system", "value": "Be brief."}, *_turns("Hi?", "Hello."),
            *_turns("And?", "Bye.")]),
        Sample(id="c", image="images/a.png", conversations=_turns("<image>\nPick.", "A B"),
               experts=[], kind="routing", answers=[], meta={}),
    ]


# --------------------------------------------------------------------------------------------
# storage (local)
# --------------------------------------------------------------------------------------------

def test_storage_local_read_write_list_delete(tmp_path):
    target = str(tmp_path / "deep" / "folder" / "x.txt")
    storage.write_text_atomic(target, "hello")
    assert storage.read_text(target) == "hello" and storage.exists(target)
    storage.write_bytes_atomic(target, b"again")
    assert storage.read_bytes(target) == b"again"
    storage.write_text_atomic(str(tmp_path / "deep" / ".hidden"), "h")
    storage.write_text_atomic(str(tmp_path / "deep" / "_tmp.part"), "t")
    storage.write_text_atomic(str(tmp_path / "deep" / "b.json"), "{}")
    # No temp files are left behind, hidden and _tmp names are skipped, results are sorted.
    assert storage.list_files(str(tmp_path)) == [
        str(tmp_path / "deep" / "b.json"), str(tmp_path / "deep" / "folder" / "x.txt")]
    assert storage.list_files(str(tmp_path), suffix=".txt") == [target]
    storage.delete(str(tmp_path / "deep" / "folder"))
    assert not storage.exists(target)
    with pytest.raises(FileNotFoundError, match="x.txt"):
        storage.read_bytes(target)
    with pytest.raises(FileNotFoundError, match="nope"):
        storage.list_files(str(tmp_path / "nope"))
    storage.delete(target, missing_ok=True)
    storage.makedirs(str(tmp_path / "m" / "n"))
    assert (tmp_path / "m" / "n").is_dir()


def test_storage_atomic_write_keeps_old_content_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    storage.write_text_atomic(str(target), "old")

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        storage.write_text_atomic(str(target), "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_storage_uri_helpers():
    assert storage.is_remote("s3://b/k") and not storage.is_remote("/tmp/x")
    assert storage.join("s3://b/data", "img", "a.png") == "s3://b/data/img/a.png"
    assert storage.join("s3://b/data/", "../x.png") == "s3://b/x.png"
    assert storage.parent("s3://b/data/m.jsonl") == "s3://b/data"
    assert storage.parent("/a/b/m.jsonl") == "/a/b" and storage.parent("m.jsonl") == "."
    fs, path = storage.filesystem("s3://bucket/key/x")
    assert path == "bucket/key/x" and fs.type_name == "s3"
    with pytest.raises(ValueError, match="no bucket"):
        storage.filesystem("s3://")


# --------------------------------------------------------------------------------------------
# manifests: round trip, validation
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_manifest_round_trip_is_exact(tmp_path, suffix, png_file):
    png_file(tmp_path / "images" / "a.png")
    uri = str(tmp_path / f"m{suffix}")
    assert write_manifest(_samples(), uri) == uri
    assert load_manifest(uri) == _samples()
    # dict input writes the same thing
    write_manifest([s.to_dict() for s in _samples()], uri)
    assert load_manifest(uri) == _samples()


def test_parquet_column_types(tmp_path):
    uri = str(tmp_path / "m.parquet")
    write_manifest(_samples(), uri)
    schema = pq.read_schema(uri)
    assert schema.field("conversations").type == pa.list_(
        pa.struct([("from", pa.string()), ("value", pa.string())]))
    assert schema.field("experts").type == pa.list_(pa.string())
    assert schema.field("answers").type == pa.list_(pa.string())
    assert schema.field("meta").type == pa.string()


def test_write_manifest_rejects_unknown_keys_and_suffix(tmp_path):
    with pytest.raises(ValueError, match="colour"):
        write_manifest([{"id": "x", "conversations": _turns(), "colour": 1}],
                       str(tmp_path / "m.jsonl"))
    with pytest.raises(ValueError, match="unknown format"):
        write_manifest(_samples(), str(tmp_path / "m.csv"))


def _bad_manifest(png_file, tmp_path) -> tuple[str, set[tuple[int, str]]]:
    """A manifest with one problem per bad line; returns it and the expected (line, field)."""
    png_file(tmp_path / "images" / "ok.png")
    (tmp_path / "images" / "garbage.png").write_bytes(b"\x89PNG not really an image")
    good = {"id": "g1", "image": "images/ok.png", "conversations": _turns()}
    lines = [
        json.dumps(good),                                                            # 1
        '{"id": "broken", ',                                                         # 2
        json.dumps({"image": None, "conversations": _turns("Hi", "Yo")}),           # 3
        json.dumps({**good}),                                                        # 4
        json.dumps({**good, "id": "e", "experts": ["dinov2", "foo"]}),              # 5
        json.dumps({"id": "r", "image": None, "conversations": [
            {"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}),     # 6
        json.dumps({**good, "id": "m", "image": "images/missing.png"}),            # 7
        json.dumps({**good, "id": "u", "image": "images/garbage.png"}),            # 8
        json.dumps({**good, "id": "k", "colour": "red"}),                           # 9
        json.dumps({**good, "id": "q", "metric": "bleu"}),                          # 10
        json.dumps({"id": "g2", "image": None, "conversations": _turns("Hi", "Yo")}),  # 11
        "",                                                                          # 12
        json.dumps({**good, "id": "g3", "experts": ["vary"], "kind": "routing"}),   # 13
    ]
    uri = tmp_path / "manifest.jsonl"
    uri.write_text("\n".join(lines) + "\n")
    expected = {(2, "json"), (3, "id"), (4, "id"), (5, "experts"), (6, "conversations"),
                (7, "image"), (8, "image"), (9, "colour"), (10, "metric")}
    return str(uri), expected


def test_validation_reports_every_bad_row(tmp_path, png_file):
    uri, expected = _bad_manifest(png_file, tmp_path)
    report = validate_manifest(uri)
    assert not report.ok and report.total == 12
    assert {(e.line, e.field) for e in report.errors} == expected
    assert [s.id for s in report.samples] == ["g1", "g2", "g3"]
    by_line = {e.line: e for e in report.errors}
    assert by_line[4].message.startswith("duplicate id 'g1' (first on line 1)")
    assert by_line[5].id == "e" and "unknown expert 'foo'" in by_line[5].message
    assert "turn 0" in by_line[6].message
    assert "missing.png" in by_line[7].message and "cannot be decoded" in by_line[8].message
    text = report.format()
    assert "line 5 (id=e): experts: unknown expert 'foo'; pool: [" in text
    assert len(report.format(limit=3).splitlines()) == 4
    # without image checks, the two image rows pass
    quick = validate_manifest(uri, check_images=False)
    assert {(e.line, e.field) for e in quick.errors} == expected - {(7, "image"), (8, "image")}


def test_load_manifest_raises_or_skips_with_report(tmp_path, png_file):
    uri, expected = _bad_manifest(png_file, tmp_path)
    with pytest.raises(ManifestError) as info:
        load_manifest(uri)
    message = str(info.value)
    assert "9 bad row(s) of 12" in message
    for line, field in expected:
        assert f"line {line}" in message and f": {field}: " in message
    report_uri = str(tmp_path / "out" / "bad_rows.jsonl")
    samples = load_manifest(uri, skip_bad_rows=True, report_uri=report_uri)
    assert [s.id for s in samples] == ["g1", "g2", "g3"]
    assert samples[0].image == "images/ok.png" and samples[2].kind == "routing"
    records = [json.loads(x) for x in open(report_uri)]
    assert {(r["line"], r["field"]) for r in records} == expected
    assert all(set(r) == {"line", "id", "field", "message"} for r in records)
    assert next(r for r in records if r["line"] == 9)["id"] == "k"


def test_unreadable_manifests(tmp_path):
    with pytest.raises(ManifestError, match="missing.jsonl"):
        load_manifest(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"definitely not parquet")
    with pytest.raises(ManifestError, match="bad.parquet"):
        validate_manifest(str(bad))
    with pytest.raises(ValueError, match="unknown format"):
        read_rows(str(tmp_path / "m.txt"))


def test_validate_row_pool_and_types(tmp_path):
    row = {"id": "x", "image": None, "conversations": _turns("Hi", "Yo"), "experts": ["sam"]}
    assert validate_row(row, 1, None, str(tmp_path / "m.jsonl"), check_image=False) == []
    errors = validate_row(row, 4, ["dinov2"], str(tmp_path / "m.jsonl"), check_image=False)
    assert [(e.line, e.field) for e in errors] == [(4, "experts")]
    assert "not in the pool ['dinov2']" in errors[0].message
    bad = {**row, "experts": ["sam", "sam"], "answers": "yes", "kind": "other", "meta": [1],
           "conversations": _turns("<image>\nHi", "Yo")}
    fields = [e.field for e in validate_row(bad, 1, None, "m.jsonl", check_image=False)]
    assert fields == ["conversations", "experts", "kind", "answers", "meta"]
    with pytest.raises(ValueError, match="unknown expert"):
        validate_row(row, 1, ["nope"], "m.jsonl", check_image=False)


def test_relative_images_resolve_against_the_manifest_folder(tmp_path, monkeypatch, png_file):
    assert resolve_image("/data/sets/m.jsonl", "img/a.png") == "/data/sets/img/a.png"
    assert resolve_image("/data/sets/m.jsonl", "/abs/a.png") == "/abs/a.png"
    assert resolve_image("s3://b/sets/m.jsonl", "img/a.png") == "s3://b/sets/img/a.png"
    assert resolve_image("/data/m.jsonl", "s3://b/a.png") == "s3://b/a.png"
    png_file(tmp_path / "shared" / "a.png")
    uri = str(tmp_path / "sets" / "m.jsonl")
    write_manifest([Sample(id="x", image="../shared/a.png", conversations=_turns())], uri)
    monkeypatch.chdir(tmp_path / "shared")  # not the manifest's folder
    assert validate_manifest(uri).ok


# --------------------------------------------------------------------------------------------
# converters
# --------------------------------------------------------------------------------------------

def test_convert_llava_with_and_without_image(tmp_path, png_file):
    png_file(tmp_path / "coco" / "1.png")
    src = tmp_path / "src" / "llava.json"
    src.parent.mkdir()
    src.write_text(json.dumps([
        {"id": "1", "image": "1.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "Red."}]},
        {"id": 2, "conversations": [
            {"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello"}]},
    ]))
    out = str(tmp_path / "out" / "m.parquet")
    assert convert_llava(str(src), out, image_root=str(tmp_path / "coco")) == 2
    samples = load_manifest(out)
    assert samples[0].image == os.path.join("..", "coco", "1.png")
    assert samples[1].id == "2" and samples[1].image is None
    assert samples[1].conversations == [{"from": "human", "value": "Hi"},
                                        {"from": "gpt", "value": "Hello"}]


def test_convert_llava_rejects_malformed_rows(tmp_path):
    src = tmp_path / "llava.json"
    src.write_text(json.dumps([
        {"id": "1", "conversations": _turns("Hi", "Yo")},
        {"id": "2", "conversations": [{"from": "gpt", "value": "x"}]},
    ]))
    with pytest.raises(ValueError, match="row 2: conversations: turn 0"):
        convert_llava(str(src), str(tmp_path / "m.jsonl"))
    src.write_text(json.dumps([{"id": "1", "conversations": _turns("Hi", "Yo")}] * 2))
    with pytest.raises(ValueError, match="row 2: duplicate id '1'"):
        convert_llava(str(src), str(tmp_path / "m.jsonl"))
    assert not (tmp_path / "m.jsonl").exists()


def test_convert_vqa_most_common_answer(tmp_path, png_file):
    png_file(tmp_path / "img" / "q.png")
    answers = ["two", "2", "two", "two", "three", "2", "two", "two", "2", "two"]
    src = tmp_path / "vqa.jsonl"
    src.write_text("\n".join([
        json.dumps({"image": "img/q.png", "question": "How many?", "answers": answers,
                    "question_id": 17}),
        json.dumps({"image": "img/q.png", "question": "Color?", "answer": "red", "id": "c"}),
        json.dumps({"image": "img/q.png", "question": "Tie?", "answers": [
            {"answer": "yes"}, {"answer": "no"}]}),
    ]) + "\n")
    out = str(tmp_path / "m.jsonl")
    assert convert_vqa(str(src), out) == 3
    first, second, third = load_manifest(out)
    assert first.id == "17" and first.image == os.path.join("img", "q.png")
    assert first.conversations == _turns("<image>\nHow many?", "two")
    assert first.answers == answers and first.metric == "vqa_accuracy"
    assert second.conversations[1]["value"] == "red" and second.answers == ["red"]
    assert third.id == "vqa-3" and third.conversations[1]["value"] == "yes"
    src.write_text(json.dumps({"image": "img/q.png", "question": "Q?", "answers": answers})
                   + "\n" + json.dumps({"image": "img/q.png", "question": "Q?"}) + "\n")
    with pytest.raises(ValueError, match="line 2: expected 'answers'"):
        convert_vqa(str(src), out)
    with pytest.raises(ValueError, match="metric"):
        convert_vqa(str(src), out, metric="bleu")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mova")
    data_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_validate_exit_codes(tmp_path, capsys, png_file):
    bad_uri, _ = _bad_manifest(png_file, tmp_path)
    args = _parse(["data", "validate", bad_uri])
    assert args.func(args) == 1
    out = capsys.readouterr().out
    assert "12 rows, 3 ok, 9 error(s) in 9 row(s)" in out and "line 10 (id=q): metric" in out
    good_uri = str(tmp_path / "good.jsonl")
    write_manifest(_samples()[1:2], good_uri)
    args = _parse(["data", "validate", good_uri, "--pool", "dinov2,sam", "--no-check-images"])
    assert args.func(args) == 0
    assert "1 rows, 1 ok, 0 error(s)" in capsys.readouterr().out
    args = _parse(["data", "validate", bad_uri, "--pool", "dinov2", "--no-check-images"])
    assert args.func(args) == 1
    assert "line 13 (id=g3): experts: expert 'vary' is not in the pool" in capsys.readouterr().out


def test_scan_tasks_check_images_as_validation_does(tmp_path, png_file):
    """The rows ``mova data validate --ray`` hands to Ray tasks fail as in one process."""
    uri, expected = _bad_manifest(png_file, tmp_path)
    tasks = scan_tasks([uri])
    scan = merge_ranges(uri, tasks, [scan_range(t, None, 4, None, check_images=True)
                                     for t in tasks])
    assert {(e.line, e.field) for e in scan.errors} == expected
    assert (scan.rows, scan.valid) == (12, 3)
    unchecked = merge_ranges(uri, tasks, [scan_range(t, None, 4) for t in tasks])
    assert {e.line for e in unchecked.errors} == {line for line, _ in expected} - {7, 8}


def test_cli_convert(tmp_path, capsys, png_file):
    png_file(tmp_path / "q.png")
    src = tmp_path / "vqa.jsonl"
    src.write_text(json.dumps({"image": "q.png", "question": "Q?", "answers": ["a"]}) + "\n")
    out = str(tmp_path / "m.jsonl")
    args = _parse(["data", "convert", "vqa", str(src), out, "--metric", "exact_match"])
    assert args.func(args) == 0
    assert f"wrote 1 sample(s) from {src} to {out}" in capsys.readouterr().out
    assert load_manifest(out)[0].metric == "exact_match"
