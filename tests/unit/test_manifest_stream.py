"""The manifest scan and the chunked reads it drives, without Ray: ranges cut anywhere give the
same rows, line numbers and errors as one pass, and every valid row is read exactly once."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from pipelines.common.manifests.parts import (
    begin_parts,
    is_published,
    publish_parts,
    write_jsonl_part,
)
from pipelines.common.manifests.rows import SUCCESS, ManifestError, manifest_files, write_manifest
from pipelines.common.manifests.scan import (
    _lines_before,
    merge_ranges,
    scan_range,
    scan_tasks,
    shift_report_lines,
    write_report_part,
)
from pipelines.common.manifests.stream import chunk_lines, chunk_samples


def _row(i: int, image: str) -> dict:
    return {"id": f"s{i}", "image": image,
            "conversations": [{"from": "human", "value": f"<image>\nQ{i}?"},
                              {"from": "gpt", "value": f"A{i}"}]}


@pytest.fixture
def image(tmp_path, png_file):
    return png_file(tmp_path / "img.png")


@pytest.fixture
def jsonl(tmp_path, image):
    """40 rows with a blank line, a row that is not JSON and a duplicate id in between."""
    png_file = image
    lines = []
    for i in range(40):
        if i == 7:
            lines.append("")
        if i == 13:
            lines.append("{not json")
        if i == 21:
            lines.append(json.dumps(_row(3, png_file)))  # duplicate id s3
        lines.append(json.dumps(_row(i, png_file)))
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, lines


def _scan(path, range_bytes, chunk_rows=5, report=None):
    tasks = scan_tasks([str(path)], range_bytes)
    return merge_ranges(str(path), tasks,
                        [scan_range(t, None, chunk_rows, report) for t in tasks]), tasks


@pytest.mark.parametrize("range_bytes", [1 << 20, 97, 300, 1])
def test_ranges_cut_anywhere_give_the_same_scan(jsonl, range_bytes):
    path, lines = jsonl
    whole, _ = _scan(path, 1 << 20)
    cut, tasks = _scan(path, range_bytes)
    if range_bytes < 1000:
        assert len(tasks) > 3
    assert (whole.rows, whole.valid, whole.error_count) == (42, 40, 2)
    assert [(e.line, e.field) for e in whole.errors] == [(15, "json"), (24, "id")]
    # A range checks ids within itself; duplicates across ranges are found by a Ray pass
    # (scan_manifest, covered by the integration tests).
    assert (cut.rows, cut.error_count) == (42, cut.rows - cut.valid)
    assert [e.line for e in cut.errors][0] == 15  # file-wide line numbers (blank one counted)
    # Every non-blank line is in exactly one chunk, and chunk lines are file-wide.
    seen = [(line, row) for c in cut.chunks for line, row in chunk_lines(c.to_dict())]
    expected = [(n, text) for n, text in enumerate(lines, start=1) if text]
    assert [n for n, _ in seen] == [n for n, _ in expected]
    for (_, row), (_, text) in zip(seen, expected, strict=True):
        if isinstance(row, dict):
            assert row == json.loads(text)
    assert all(c.rows <= 5 for c in cut.chunks)
    assert sum(c.valid for c in cut.chunks) == cut.valid
    # The readers drop what the scan does not count as valid (the duplicate, here).
    read = [s.id for c in whole.chunks for _, s in chunk_samples(c.to_dict(), None, True)]
    assert len(read) == whole.valid == 40 and len(set(read)) == 40


def test_chunk_samples_raise_or_skip_and_honour_the_limit(jsonl):
    path, _ = jsonl
    scan, _ = _scan(path, 1 << 20, chunk_rows=100)
    (chunk,) = [c.to_dict() for c in scan.chunks]
    with pytest.raises(ManifestError, match=r"m\.jsonl.*line 15"):
        chunk_samples(chunk, None, skip_bad_rows=False)
    samples = chunk_samples(chunk, None, skip_bad_rows=True)
    assert len(samples) == 40 and chunk["skip"] == [24]  # the later s3 is dropped
    assert [s.id for _, s in samples[:3]] == ["s0", "s1", "s2"]
    assert len(chunk_samples({**chunk, "limit": 4}, None, skip_bad_rows=True)) == 4
    with pytest.raises(ManifestError, match="error"):
        scan.require_ok(skip_bad_rows=False)
    scan.require_ok(skip_bad_rows=True)


def test_scan_writes_every_bad_row_to_the_report(jsonl, tmp_path):
    path, _ = jsonl
    report = tmp_path / "report"
    tasks = scan_tasks([str(path)], 97)
    results = [scan_range(t, None, 5, str(report)) for t in tasks]
    for result, before in zip(results, _lines_before(tasks, results), strict=True):
        if result.get("report_part") and before:
            shift_report_lines(result["report_part"], before)
    records = [json.loads(line) for part in sorted(report.iterdir())
               for line in part.read_text().splitlines()]
    assert sorted(r["line"] for r in records) == [15]  # one range cannot see the duplicate
    assert all(r["file"] == str(path) for r in records)
    raw = path.read_bytes()
    assert raw[records[0]["offset"]:].startswith(b"{not json")
    one = write_report_part(str(report), "rows", [{"x": 1}])
    assert json.loads(open(one).read()) == {"x": 1}


def test_parquet_chunks_are_row_groups_read_once(tmp_path, image, monkeypatch):
    """A Parquet chunk is one whole row group: a reader decodes each group once, never a group
    to keep a slice of it; large files get one scan task per run of groups."""
    png_file = image
    rows = [_row(i, png_file) for i in range(23)]
    path = tmp_path / "m.parquet"
    write_manifest(rows, str(tmp_path / "tmp.parquet"))
    pq.write_table(pq.read_table(tmp_path / "tmp.parquet"), path, row_group_size=10)
    scan, tasks = _scan(path, 1 << 20, chunk_rows=4)
    assert len(tasks) == 1 and scan.valid == 23, scan.format_errors()
    assert [(c.start, c.end, c.line) for c in scan.chunks] == [(0, 10, 1), (10, 20, 11),
                                                               (20, 23, 21)]
    decoded = []
    real = pq.ParquetFile.iter_batches

    def counting(self, *args, **kwargs):
        for batch in real(self, *args, **kwargs):
            decoded.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    got = [(line, s.id) for c in scan.chunks
           for line, s in chunk_samples(c.to_dict(), None, False)]
    assert got == [(i + 1, r["id"]) for i, r in enumerate(rows)]
    assert sum(decoded) == 23, "every row decoded exactly once"
    scan, tasks = _scan(path, 1, chunk_rows=4)  # ~1 byte per task: one task per row group
    assert [(t["start"], t["end"]) for t in tasks] == [(0, 1), (1, 2), (2, 3)]
    assert [(c.start, c.end, c.line) for c in scan.chunks] == [(0, 10, 1), (10, 20, 11),
                                                               (20, 23, 21)]


def test_a_published_folder_lists_exactly_its_parts(tmp_path, image):
    png_file = image
    folder = tmp_path / "out"
    a = write_jsonl_part(str(folder), "part-00000-000001.jsonl", [_row(0, png_file)])
    b = write_jsonl_part(str(folder), "part-00000-000002.jsonl", [_row(1, png_file)])
    assert not is_published(str(folder))
    assert manifest_files(str(folder)) == [a, b]  # someone's folder of files: all are read
    begin_parts(str(folder), "test job")
    with pytest.raises(ManifestError, match="did not finish"):
        manifest_files(str(folder))
    (folder / "part-stray.jsonl").write_text(json.dumps(_row(9, png_file)) + "\n")
    publish_parts(str(folder), [a, b], rows=2)
    assert is_published(str(folder)) and (folder / SUCCESS).is_file()
    assert manifest_files(str(folder)) == [a, b]  # the stray part is not read
    (folder / SUCCESS).write_text("")  # Spark's empty marker: the folder's files are read
    assert len(manifest_files(str(folder))) == 3


def test_manifest_files_name_what_is_wrong(tmp_path, image):
    with pytest.raises(ValueError, match="unknown format"):
        manifest_files(str(tmp_path / "m.csv"))
    (tmp_path / "m.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown format"):
        manifest_files(str(tmp_path / "m.csv"))
    dotted = tmp_path / "train.labels"  # a folder whose name has a dot
    part = write_jsonl_part(str(dotted), "part-00000-000001.jsonl", [_row(0, image)])
    publish_parts(str(dotted), [part], rows=1)
    assert manifest_files(str(dotted)) == [part]
    with pytest.raises(ManifestError, match="not found|does not exist|no such"):
        manifest_files(str(tmp_path / "missing.jsonl"))


def test_a_kept_scan_is_reused_only_for_the_same_files_and_settings(jsonl, monkeypatch,
                                                                   tmp_path):
    import os

    from pipelines.common.manifests import scan_cache

    monkeypatch.setenv("MOVA_SCAN_CACHE", str(tmp_path / "scans"))
    path, _ = jsonl
    scan, _ = _scan(path, 1 << 20)
    key = scan_cache.scan_key([str(path)], None, 5, 1 << 20)
    assert scan_cache.load(key, str(path)) is None
    scan_cache.save(key, scan)
    kept = scan_cache.load(key, str(path))
    assert kept.chunks == scan.chunks and (kept.rows, kept.valid, kept.error_count) == (
        scan.rows, scan.valid, scan.error_count)
    assert [e.line for e in kept.errors] == [e.line for e in scan.errors]
    assert scan_cache.scan_key([str(path)], ["sam"], 5, 1 << 20) != key  # another pool
    assert scan_cache.scan_key([str(path)], None, 6, 1 << 20) != key  # another chunk size
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # the file changed
    assert scan_cache.scan_key([str(path)], None, 5, 1 << 20) != key
