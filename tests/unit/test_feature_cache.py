"""The feature cache: shards + index parts, ranged reads, compaction, concurrent writers."""

from __future__ import annotations

import pytest
import torch

from pipelines.common.feature_cache import FeatureCache, feature_bytes


def _features(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 4, generator=g) for _ in range(n)]


def _hashes(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:063x}"[-64:] for i in range(n)]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_round_trip_in_each_storage_dtype(tmp_path, dtype):
    cache = FeatureCache(str(tmp_path))
    hashes, feats = _hashes("a", 5), _features(5, 0)
    cache.write_shard("dinov2", "k1", hashes, feats, dtype=dtype)
    got = cache.get_many("dinov2", "k1", hashes[::-1])
    for h, f in zip(hashes[::-1], got, strict=True):
        want = feats[hashes.index(h)]
        assert f.shape == (6, 4) and str(f.dtype) == f"torch.{dtype}"
        assert torch.allclose(f.float(), want, atol=1e-2, rtol=1e-2)


def test_neighbours_are_read_with_one_request_and_only_what_is_asked(tmp_path):
    cache = FeatureCache(str(tmp_path))
    hashes = _hashes("b", 8)
    cache.write_shard("sam", "k", hashes, _features(8, 1))
    one = feature_bytes(6, 4, "float16")
    cache.get_many("sam", "k", hashes[2:5])  # a contiguous run: exactly its bytes
    assert cache.bytes_read == cache.bytes_served == 3 * one
    cache.get_many("sam", "k", [hashes[0], hashes[7]])  # two runs: no bytes in between
    assert cache.bytes_read == cache.bytes_served == 5 * one


def test_missing_features_are_named(tmp_path):
    cache = FeatureCache(str(tmp_path))
    cache.write_shard("sam", "k", _hashes("c", 2), _features(2, 2))
    with pytest.raises(KeyError, match="no cached sam features.*and 1 more"):
        cache.get_many("sam", "k", _hashes("d", 2))
    assert cache.cached("sam", "k", _hashes("c", 3)).tolist() == [True, True, False]


def test_two_writers_compaction_and_fresh_readers(tmp_path):
    writer_a, writer_b = FeatureCache(str(tmp_path)), FeatureCache(str(tmp_path))
    first, second = _hashes("e", 4), _hashes("f", 3)
    writer_a.write_shard("x", "k", first, _features(4, 3))
    writer_b.write_shard("x", "k", first[:2] + second, _features(5, 4))  # overlaps writer_a
    assert len(writer_a.index_parts("x", "k")) == 2
    reader = FeatureCache(str(tmp_path))
    assert reader.hashes("x", "k") == set(first) | set(second)
    before = {h: t.clone() for h, t in zip(first + second,
                                           reader.get_many("x", "k", first + second),
                                           strict=True)}
    assert writer_a.compact("x", "k") == 7
    assert len(writer_a.index_parts("x", "k")) == 1
    after = FeatureCache(str(tmp_path)).get_many("x", "k", first + second)
    for h, t in zip(first + second, after, strict=True):
        assert torch.equal(before[h], t), h  # the same entry wins before and after
    # a write after compaction adds a part next to the compacted one
    writer_b.write_shard("x", "k", _hashes("g", 1), _features(1, 5))
    assert len(FeatureCache(str(tmp_path)).hashes("x", "k")) == 8


def test_a_shard_is_a_safetensors_file_keyed_by_image_hash(tmp_path):
    from safetensors.torch import load_file

    cache = FeatureCache(str(tmp_path))
    hashes, feats = _hashes("h", 3), _features(3, 6)
    path, size = cache.write_shard("vary", "k", hashes, feats, dtype="bfloat16")
    assert path.endswith(".safetensors") and size == (tmp_path / path).stat().st_size
    stored = load_file(path)
    assert sorted(stored) == sorted(hashes)
    for h, f in zip(hashes, feats, strict=True):
        assert torch.equal(stored[h], f.to(torch.bfloat16))
        assert torch.equal(cache.get("vary", "k", h), stored[h])


def test_the_by_image_shuffle_is_sized_by_rows_and_cpus():
    from pipelines.features.job import ROWS_PER_SHUFFLE_PARTITION, shuffle_partitions

    assert shuffle_partitions(480, cpus=2) == 2  # not Ray Data's 200 for a small manifest
    assert shuffle_partitions(0, cpus=0.5) == 1
    assert shuffle_partitions(100_000_000, cpus=64) == 100_000_000 // ROWS_PER_SHUFFLE_PARTITION
