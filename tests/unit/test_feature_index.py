"""The feature cache's index at scale: bucketed compaction, lookups that read one row group,
a reader whose memory stays within its budget whatever the index holds."""

from __future__ import annotations

import hashlib
import json
import threading

import pytest

from pipelines.common import feature_compaction as fc
from pipelines.common import feature_index as fi


def _hash(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def _rows(first: int, n: int, shard: str) -> list[dict]:
    return [{"image_hash": _hash(i), "shard": shard, "offset": i, "length": 1, "tokens": 1,
             "channels": 1, "dtype": "float16"} for i in range(first, first + n)]


@pytest.fixture
def small_buckets(monkeypatch):
    """Buckets of 50 entries and row groups of 8, so a few hundred entries split like 1M."""
    monkeypatch.setattr(fc, "BUCKET_ENTRIES", 50)
    monkeypatch.setattr(fc, "ROW_GROUP", 8)


def test_compaction_splits_into_buckets_and_lookups_read_one_row_group(tmp_path,
                                                                       small_buckets):
    folder = str(tmp_path / "index")
    for part in range(6):
        fi.write_part(folder, f"p{part}", _rows(part * 50, 50, f"s{part}"))
    assert fc.compact(folder) == 300
    compacts, fresh = fi.list_index(folder)
    assert not fresh and len(compacts) == 1
    assert fc.bucket_digits(300) == 1  # 16 buckets
    reader = fi.IndexReader(folder)
    found = reader.find([_hash(7), _hash(299), _hash(1000)])
    assert [e.offset if e else None for e in found] == [7, 299, None]
    assert found[0].shard == "s0" and found[1].shard == "s5"
    assert reader.loads <= 2  # one row group per found hash (the third's bucket may be empty)
    reader.find([_hash(7)])
    assert reader.loads <= 2, "a row group already read is kept"
    assert reader.all_hashes() == {_hash(i) for i in range(300)}


def test_the_reader_keeps_at_most_its_budget(tmp_path, small_buckets):
    folder = str(tmp_path / "index")
    fi.write_part(folder, "p", _rows(0, 400, "s"))
    fc.compact(folder)
    reader = fi.IndexReader(folder, budget=3000)
    for i in range(0, 400, 7):
        assert reader.find([_hash(i)])[0].offset == i
        assert reader._kept_bytes <= 3000 or len(reader._kept) == 1
    assert reader.loads > 3  # row groups were dropped and read again when needed


def test_recompaction_keeps_old_entries_first_and_changes_bucket_count(tmp_path,
                                                                      small_buckets):
    folder = str(tmp_path / "index")
    fi.write_part(folder, "a", _rows(0, 40, "old"))
    assert fc.compact(folder) == 40 and fc.bucket_digits(40) == 0
    fi.write_part(folder, "b", _rows(20, 900, "new"))  # 20 hashes cached twice
    fi.write_part(folder, "c", _rows(0, 5, "newer"))
    reader_before = fi.IndexReader(folder)  # compacted + fresh parts, before compaction
    assert reader_before.find([_hash(25)])[0].shard == "old"
    assert fc.compact(folder) == 920 and fc.bucket_digits(920) == 2
    reader = fi.IndexReader(folder)
    assert [reader.find([_hash(i)])[0].shard for i in (3, 25, 500)] == ["old", "old", "new"]
    assert not fi.list_index(folder)[1]
    assert not [p for p in (tmp_path / "index").iterdir() if p.name.startswith("_tmp")]


def test_concurrent_compactions_lose_no_entry_and_readers_survive_them(tmp_path,
                                                                       small_buckets):
    """Two jobs compacting one index at once while writers add parts (the features job's end,
    twice at the same time): no compaction fails on the other's deletions, every entry stays
    findable, and a reader opened before the compactions still finds everything after."""
    folder = str(tmp_path / "index")
    for part in range(10):
        fi.write_part(folder, f"a{part}", _rows(part * 30, 30, f"s{part}"))
    early = fi.IndexReader(folder)
    errors: list[BaseException] = []
    written = [300]

    def compactor() -> None:
        try:
            for _ in range(4):
                fc.compact(folder)
        except BaseException as exc:  # reported below
            errors.append(exc)

    def writer() -> None:
        for part in range(10, 20):
            fi.write_part(folder, f"b{part}", _rows(part * 30, 30, f"s{part}"))
            written[0] += 30

    threads = [threading.Thread(target=compactor) for _ in range(2)]
    threads.append(threading.Thread(target=writer))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    fc.compact(folder)
    everything = {_hash(i) for i in range(written[0])}
    assert fi.IndexReader(folder).all_hashes() == everything
    assert all(e is not None for e in fi.IndexReader(folder).find(sorted(everything)))
    assert [e.offset for e in early.find([_hash(3), _hash(299)])] == [3, 299]
    compacts, fresh = fi.list_index(folder)
    assert len(compacts) == 1 and not fresh


def test_a_reader_opens_again_when_a_compaction_deletes_its_index(tmp_path, small_buckets):
    folder = str(tmp_path / "index")
    fi.write_part(folder, "a", _rows(0, 100, "first"))
    fc.compact(folder)
    reader = fi.IndexReader(folder)
    fi.write_part(folder, "b", _rows(100, 100, "second"))
    fc.compact(folder)  # merges the reader's index into a new one and deletes it
    assert reader.find([_hash(5)])[0].offset == 5 and reader.reopened == 1
    assert reader.find([_hash(150)])[0].shard == "second"  # what the new index holds


def test_an_index_compacted_before_markers_is_read_and_merged(tmp_path, small_buckets):
    """A cache written by an earlier version: its compacted index is complete by the
    ``_SUCCESS`` file in its folder, and has no marker."""
    folder = tmp_path / "index"
    fi.write_part(str(folder), "a", _rows(0, 100, "old"))
    fc.compact(str(folder))
    (marker,) = folder.glob("compact-*.json")
    meta = json.loads(marker.read_text())
    (folder / marker.stem / fi.SUCCESS).write_text(json.dumps(
        {"digits": meta["digits"], "entries": meta["entries"]}))
    marker.unlink()
    assert fi.IndexReader(str(folder)).find([_hash(42)])[0].offset == 42
    fi.write_part(str(folder), "b", _rows(100, 10, "new"))
    assert fc.compact(str(folder)) == 110
    assert not (folder / marker.stem).exists()
    assert fi.IndexReader(str(folder)).all_hashes() == {_hash(i) for i in range(110)}
