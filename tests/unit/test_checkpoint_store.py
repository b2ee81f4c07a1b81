"""Checkpoint transfer at constant memory: streamed, hashed pieces; which files each part
needs; the node cache's locks, in-use marks and least-recently-used eviction."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest

from pipelines.common.checkpoint_store import part_files
from pipelines.common.node_cache import CacheBusyError, NodeCache
from pipelines.common.transfer import TransferError, download

COMPONENTS = {"llm": "llm", "text_encoder": "text_encoder", "base_encoder": "base_encoder",
              "adapter": "adapter.safetensors",
              "experts": {"dinov2": {"path": "experts/dinov2"},
                          "sam": {"reference": "facebook/sam"}}}
FILES = ["config.json", "components.json", "adapter.safetensors", "llm/config.json",
         "llm/tokenizer.json", "llm/model.safetensors", "text_encoder/model.safetensors",
         "text_encoder/vocab.txt", "base_encoder/model.safetensors",
         "experts/dinov2/config.json", "experts/dinov2/model.safetensors",
         "experts/dinov2/mova_head.safetensors"]
META = ["components.json", "config.json", "experts/dinov2/config.json", "llm/config.json",
        "llm/tokenizer.json", "text_encoder/vocab.txt"]


def test_each_part_fetches_its_weights_and_every_part_the_configs():
    assert part_files(FILES, COMPONENTS, ["meta"]) == META
    assert part_files(FILES, None, ["llm"]) == META  # where llm lives is not known yet
    assert part_files(FILES, COMPONENTS, ["llm"]) == sorted([*META, "llm/model.safetensors"])
    assert part_files(FILES, COMPONENTS, ["expert:dinov2"]) == sorted(
        [*META, "experts/dinov2/model.safetensors", "experts/dinov2/mova_head.safetensors"])
    assert part_files(FILES, COMPONENTS, ["expert:sam"]) == META  # stored by reference
    assert part_files(FILES, COMPONENTS, ["adapter", "base_encoder"]) == sorted(
        [*META, "adapter.safetensors", "base_encoder/model.safetensors"])
    assert part_files(FILES, COMPONENTS, None) == sorted(FILES)
    assert part_files(FILES, COMPONENTS, ["all"]) == sorted(FILES)
    with pytest.raises(ValueError, match="checkpoint part 'vision'"):
        part_files(FILES, COMPONENTS, ["vision"])
    with pytest.raises(Exception, match="no expert 'vary'"):
        part_files(FILES, COMPONENTS, ["expert:vary"])


def test_download_streams_in_order_and_checks_size_and_digest(tmp_path):
    data = os.urandom(1000)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    dest = tmp_path / "out" / "dest.bin"
    moved = download(str(src), dest, size=1000, sha256=hashlib.sha256(data).hexdigest(),
                     piece_bytes=7, threads=3)  # 143 pieces, 3 in flight, reassembled in order
    assert dest.read_bytes() == data and moved.bytes == 1000
    dest.write_bytes(b"old")
    with pytest.raises(TransferError, match="SHA-256 is .* expected 00"):
        download(str(src), dest, sha256="00" * 32, piece_bytes=64)
    with pytest.raises(TransferError, match="holds 1000 bytes; expected 999"):
        download(str(src), dest, size=999)
    assert dest.read_bytes() == b"old"  # a failed transfer leaves the old file in place
    assert [p.name for p in dest.parent.iterdir()] == ["dest.bin"]  # and no temp file
    with pytest.raises(FileNotFoundError, match="missing.bin: no such file"):
        download(str(tmp_path / "missing.bin"), dest)


def _entry(cache: NodeCache, key: str, size: int, used_at: float) -> None:
    folder = cache.entry(key)
    folder.mkdir(parents=True)
    (folder / "weights.safetensors").write_bytes(b"x" * size)
    (folder / ".last-used").touch()
    os.utime(folder / ".last-used", (used_at, used_at))


def test_eviction_takes_the_least_recently_used_and_never_one_in_use(tmp_path):
    cache = NodeCache(tmp_path / "checkpoints")
    _entry(cache, "old", 400, 1000.0)
    _entry(cache, "mid", 400, 2000.0)
    _entry(cache, "new", 400, 3000.0)
    cache.use("old")  # this process holds the oldest
    try:
        evicted = cache.make_room(300, keep="new", cap=1000)
    finally:
        cache.release("old")
    assert evicted == ["mid"] and sorted(cache.keys()) == ["new", "old"]
    assert cache.make_room(300, keep="new", cap=1000) == ["old"]  # released: evictable now
    assert cache.make_room(10_000, keep="new", cap=1000) == []  # never the one being fetched
    assert cache.keys() == ["new"]


def test_one_process_fetches_while_the_others_wait(tmp_path):
    cache = NodeCache(tmp_path)
    order: list[str] = []
    with cache.fetching("k"):
        def other() -> None:
            with NodeCache(tmp_path).fetching("k", wait_s=10):
                order.append("other")

        thread = threading.Thread(target=other)
        thread.start()
        time.sleep(0.5)
        order.append("first done")
    thread.join(timeout=10)
    assert order == ["first done", "other"]
    with cache.fetching("k"), pytest.raises(CacheBusyError, match=r"\.k\.fetch stayed locked"):
        with NodeCache(tmp_path).fetching("k", wait_s=0.3):
            pass


def test_checkpoint_bench_report_states_each_goal():
    from pipelines.bench.checkpoint import CheckpointBenchResult, ProcessFetch
    from pipelines.bench.checkpoint_report import goals, render_markdown

    r = CheckpointBenchResult(size_mib=1536, processes=2, needed_bytes=1000, boto3_s=10.0)
    r.fetches = [ProcessFetch("llm", 400, 520, 9, 1000, 12.5, ["llm/model.safetensors"]),
                 ProcessFetch("llm", 410, 430, 0, 0, 12.0, ["llm/model.safetensors"]),
                 ProcessFetch("expert:sam", 390, 395, 3, 10, 0.5,
                              ["experts/sam/model.safetensors"])]
    g = goals(r)
    assert g == {"peak_above_rest_mib": 120, "node_bytes_ratio": 1.0,
                 "throughput_vs_boto3": 0.8}
    text = render_markdown(r)
    assert "**+120 MiB** (goal: at most +256 MiB: met)" in text
    assert "**1.00x** what the node's replicas need" in text
    assert "**0.80x** a plain boto3" in text and "**met** (0.80)" in text
    assert "holds only its expert's weights: **yes**" in text
