"""The feature cache's index at scale: bucketed compaction, lookups that read one row group,
a reader whose memory stays within its budget whatever the index holds."""

from __future__ import annotations

import hashlib

import pytest

from pipelines.common import feature_index as fi


def _hash(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def _rows(first: int, n: int, shard: str) -> list[dict]:
    return [{"image_hash": _hash(i), "shard": shard, "offset": i, "length": 1, "tokens": 1,
             "channels": 1, "dtype": "float16"} for i in range(first, first + n)]


@pytest.fixture
def small_buckets(monkeypatch):
    """Buckets of 50 entries and row groups of 8, so a few hundred entries split like 1M."""
    monkeypatch.setattr(fi, "BUCKET_ENTRIES", 50)
    monkeypatch.setattr(fi, "ROW_GROUP", 8)


def test_compaction_splits_into_buckets_and_lookups_read_one_row_group(tmp_path,
                                                                       small_buckets):
    folder = str(tmp_path / "index")
    for part in range(6):
        fi.write_part(folder, f"p{part}", _rows(part * 50, 50, f"s{part}"))
    assert fi.compact(folder) == 300
    compact, fresh = fi.list_index(folder)
    assert not fresh and compact is not None
    assert fi.bucket_digits(300) == 1  # 16 buckets
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
    fi.compact(folder)
    reader = fi.IndexReader(folder, budget=3000)
    for i in range(0, 400, 7):
        assert reader.find([_hash(i)])[0].offset == i
        assert reader._kept_bytes <= 3000 or len(reader._kept) == 1
    assert reader.loads > 3  # row groups were dropped and read again when needed


def test_recompaction_keeps_old_entries_first_and_changes_bucket_count(tmp_path,
                                                                      small_buckets):
    folder = str(tmp_path / "index")
    fi.write_part(folder, "a", _rows(0, 40, "old"))
    assert fi.compact(folder) == 40 and fi.bucket_digits(40) == 0
    fi.write_part(folder, "b", _rows(20, 900, "new"))  # 20 hashes cached twice
    fi.write_part(folder, "c", _rows(0, 5, "newer"))
    reader_before = fi.IndexReader(folder)  # compacted + fresh parts, before compaction
    assert reader_before.find([_hash(25)])[0].shard == "old"
    assert fi.compact(folder) == 920 and fi.bucket_digits(920) == 2
    reader = fi.IndexReader(folder)
    assert [reader.find([_hash(i)])[0].shard for i in (3, 25, 500)] == ["old", "old", "new"]
    assert not fi.list_index(folder)[1]
    assert not [p for p in (tmp_path / "index").iterdir() if p.name.startswith("_tmp")]
