"""The Ray Data feature cache on a real local Ray: hits, misses, bad rows, kills, S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from mova.checkpoint import expert_cache_keys
from mova.factory import build_tiny_mova, from_pretrained
from mova.images import image_hash, load_image
from pipelines.common import storage
from pipelines.common.feature_cache import FeatureCache
from pipelines.features.job import run_features
from pipelines.features.recipe import FeaturesRecipe

pytestmark = pytest.mark.integration

LABELS = [["dinov2", "codetr"], ["vary", "pix2struct"], ["deplot"], None, ["pix2struct"], []]
# Each expert's actor pool costs a worker start (torch + transformers imports): tests use a
# subset of the pool to stay quick on 2 cores.
ONLY = ["vary", "pix2struct"]


def _write_dataset(folder: Path, n: int = 6, seed: int = 0) -> Path:
    rng = np.random.RandomState(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w") as f:
        for i in range(n):
            Image.fromarray((rng.rand(48, 56, 3) * 255).astype("uint8")).save(
                folder / "img" / f"{i}.png")
            f.write(json.dumps({
                "id": f"s{i}", "image": f"img/{i}.png", "experts": LABELS[i % len(LABELS)],
                "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                  {"from": "gpt", "value": "a thing"}],
            }) + "\n")
    return folder / "train.jsonl"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "init"
    build_tiny_mova(seed=0).save_pretrained(path)
    return path


def _recipe(manifest, checkpoint, cache, **kw) -> FeaturesRecipe:
    return FeaturesRecipe(manifest=str(manifest), checkpoint=str(checkpoint), cache=str(cache),
                          batch_size=4, **kw).validate()


def _decodes(folder: Path) -> list[str]:
    """The images of ``folder`` that feature jobs decoded, one entry per decode."""
    logs = Path(os.environ["MOVA_TRACE_DECODES"]).glob("decodes-*.log")
    return [line for log in logs for line in log.read_text().splitlines()
            if line.startswith(str(folder))]


def _expected_counts(mode: str, only: list[str] = ONLY) -> dict[str, int]:
    pool = ["dinov2", "vary", "codetr", "pix2struct", "deplot", "biomedclip", "sam"]
    counts = dict.fromkeys(pool, 0)
    for label in LABELS:
        for e in (pool if label is None or mode == "all" else label):
            counts[e] += e in only
    return counts


def test_cache_miss_zero_work_rerun_equal_features_and_a_changed_expert(
        ray_session, tmp_path, checkpoint, no_driver_rows):
    manifest = _write_dataset(tmp_path / "data")
    with open(manifest) as f:  # every image twice: rows share images, as LLaVA's do
        rows = f.read()
    manifest.write_text(rows + rows.replace('"id": "s', '"id": "t'))
    cache_dir = tmp_path / "cache"
    first = run_features(_recipe(manifest, checkpoint, cache_dir, only=ONLY))
    computed = {e.expert: e.computed for e in first.experts}
    assert computed == _expected_counts("label")
    assert first.skipped == 0 and first.images == 3  # images whose rows need one of ONLY
    decodes = _decodes(tmp_path / "data")
    assert sorted(decodes) == sorted(set(decodes)) and len(decodes) == 3, \
        "each image decoded once, for every expert and row that needs it"
    no_driver_rows.undo()
    second = run_features(_recipe(manifest, checkpoint, cache_dir, only=ONLY))
    assert second.computed == 0
    assert second.skipped == sum(computed.values())
    # Cached features equal what the model library computes directly (fp16 storage).
    model = from_pretrained(checkpoint)
    keys = expert_cache_keys(checkpoint)
    cache = FeatureCache(str(cache_dir))
    image = load_image(manifest.parent / "img" / "1.png")
    for name in ("vary", "pix2struct"):
        direct = model.expert_features(name, model.processor.expert(name, [image]))[0]
        cached = cache.get(name, keys[name], image_hash(image))
        assert cached.dtype == torch.float16
        torch.testing.assert_close(cached.float(), direct, atol=2e-3, rtol=2e-3)
    # A changed expert (pix2struct's weights) gets a new key: nothing of its old features is
    # served; the unchanged ones are. "all" computes the rest of the pool's features.
    other = tmp_path / "other"
    with torch.no_grad():
        next(model.experts["pix2struct"].parameters()).add_(0.5)
    model.save_pretrained(other)
    new_keys = expert_cache_keys(other)
    assert new_keys["pix2struct"] != keys["pix2struct"] and new_keys["vary"] == keys["vary"]
    third = run_features(_recipe(manifest, other, cache_dir, experts="all", only=ONLY))
    by_name = {e.expert: e for e in third.experts}
    assert {n: e.computed + e.cached for n, e in by_name.items()} == _expected_counts("all")
    assert by_name["pix2struct"].cached == 0 and by_name["pix2struct"].computed > 0
    assert by_name["vary"].cached == computed["vary"] > 0


def test_bad_rows_fail_clearly_or_are_skipped_with_a_report(ray_session, tmp_path, checkpoint):
    manifest = _write_dataset(tmp_path / "data")
    (tmp_path / "data" / "img" / "broken.png").write_bytes(b"\x89PNG not really")
    with open(manifest, "a") as f:
        f.write(json.dumps({"id": "bad1", "image": "img/broken.png", "experts": ["vary"],
                            "conversations": [{"from": "human", "value": "<image>\nq"},
                                              {"from": "gpt", "value": "a"}]}) + "\n")
        f.write(json.dumps({"id": "bad2", "image": "img/0.png", "experts": ["nope"],
                            "conversations": [{"from": "human", "value": "<image>\nq"},
                                              {"from": "gpt", "value": "a"}]}) + "\n")
    cache_dir = tmp_path / "cache"
    with pytest.raises(ValueError, match="nope"):
        run_features(_recipe(manifest, checkpoint, cache_dir))
    assert not cache_dir.exists()
    report = tmp_path / "skipped"
    summary = run_features(_recipe(manifest, checkpoint, cache_dir, skip_bad_rows=True,
                                   report=str(report), only=ONLY))
    assert summary.bad_images == 1 and summary.bad_rows == 1 and summary.report == str(report)
    skipped = [json.loads(line) for part in report.glob("*.jsonl")
               for line in part.read_text().splitlines()]
    assert any("broken.png" in row.get("image", "") for row in skipped)
    assert any(row.get("id") == "bad2" and "nope" in row["message"] for row in skipped)
    assert {e.expert: e.computed for e in summary.experts} == _expected_counts("label")


def _ray_pids(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "cmdline").read_bytes().decode(errors="ignore"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def test_killed_job_leaves_no_partial_shard_and_rerun_completes(ray_session, tmp_path,
                                                                checkpoint):
    manifest = _write_dataset(tmp_path / "data", n=16, seed=1)
    cache_dir = tmp_path / "cache"
    ray_tmp = f"/tmp/mova-kill-{os.getpid()}"
    env = dict(os.environ, RAY_ADDRESS="", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "pipelines.cli", "features", f"manifest={manifest}",
           f"checkpoint={checkpoint}", f"cache={cache_dir}", "batch_size=1", "experts=all",
           "only=[dinov2]",
           "ray.num_cpus=2", f"ray.temp_dir={ray_tmp}"]
    proc = subprocess.Popen(cmd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            shards = list(cache_dir.rglob("shards/*.safetensors"))
            if len(shards) >= 3 or proc.poll() is not None:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the job finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in _ray_pids(ray_tmp):  # the killed driver's own Ray, by PID
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for part in cache_dir.rglob("index/*.parquet"):  # every indexed feature is complete
        for entry in pq.read_table(part).to_pylist():
            shard = part.parent.parent / "shards" / entry["shard"]
            assert shard.stat().st_size >= entry["offset"] + entry["length"]
            assert safe_open(shard, "pt").get_tensor(entry["image_hash"]).shape == (
                entry["tokens"], entry["channels"])
    summary = run_features(_recipe(manifest, checkpoint, cache_dir, experts="all",
                                   only=["dinov2"]))
    assert summary.skipped > 0
    keys = expert_cache_keys(checkpoint)
    cache = FeatureCache(str(cache_dir))
    hashes = {image_hash(load_image(p)) for p in (tmp_path / "data" / "img").glob("*.png")}
    assert cache.hashes("dinov2", keys["dinov2"]) == hashes
    assert len(cache.index_parts("dinov2", keys["dinov2"])) == 1, "the job merged its index"


def test_cache_on_s3(ray_session, s3_endpoint, tmp_path, checkpoint):
    manifest = _write_dataset(tmp_path / "data")
    cache_uri = f"s3://mova-test/cache-{os.getpid()}"
    first = run_features(_recipe(manifest, checkpoint, cache_uri, only=["dinov2"]))
    assert first.computed == _expected_counts("label", ["dinov2"])["dinov2"] > 0
    assert any(p.endswith(".parquet") for p in storage.list_files(cache_uri))
    keys = expert_cache_keys(checkpoint)
    image = load_image(manifest.parent / "img" / "0.png")
    reader = FeatureCache(cache_uri)  # the compacted index and the shards, read on S3
    assert reader.cached("dinov2", keys["dinov2"], [image_hash(image)]).all()
    feats = reader.get("dinov2", keys["dinov2"], image_hash(image))
    assert feats.shape == (64, 24)


def test_two_jobs_writing_one_cache_at_once(ray_session, tmp_path, checkpoint):
    """Two feature jobs on overlapping manifests, at the same time, into one cache: every
    image is readable afterwards and equals what the expert computes."""
    import threading

    first = _write_dataset(tmp_path / "a", n=8, seed=3)
    second = _write_dataset(tmp_path / "b", n=8, seed=3)  # the same images, other files
    cache_dir = tmp_path / "cache"
    errors = []

    def job(manifest):
        try:
            run_features(_recipe(manifest, checkpoint, cache_dir, experts="all",
                                 only=["sam"], cpus_per_worker=0.4))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=job, args=(m,)) for m in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors and not any(t.is_alive() for t in threads)
    keys = expert_cache_keys(checkpoint)
    cache = FeatureCache(str(cache_dir))
    images = [load_image(p) for p in sorted((tmp_path / "a" / "img").glob("*.png"))]
    assert cache.hashes("sam", keys["sam"]) == {image_hash(i) for i in images}
    model = from_pretrained(checkpoint)
    direct = model.expert_features("sam", model.processor.expert("sam", images))
    cached = cache.get_many("sam", keys["sam"], [image_hash(i) for i in images])
    for a, b in zip(cached, direct, strict=True):
        torch.testing.assert_close(a.float(), b, atol=2e-3, rtol=2e-3)
    assert cache.bytes_read == cache.bytes_served, "reads fetched exactly the features' bytes"
