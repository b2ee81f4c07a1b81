"""Tests for `mova bench features` and `mova bench train` without Ray: the plain feature loop,
throughputs and ratios computed from the measured numbers, the in-process training comparison,
the docs sections and the CLI (the Ray parts are in tests/integration)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from mova.checkpoint import expert_cache_keys
from mova.factory import from_pretrained
from mova.images import image_hash, load_image
from pipelines.bench.cli import zero_stages
from pipelines.bench.common import markers, write_section
from pipelines.bench.features import (
    FeaturesBenchResult,
    RunTiming,
    make_workspace,
    manifest_images,
    plain_features,
    ratios,
    render_markdown,
    subset_manifest,
    throughput,
)
from pipelines.features.cache import FeatureCache

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-ws")
    manifest, checkpoint = make_workspace(root, 6, image_size=64)
    return manifest, checkpoint


def test_workspace_interleaves_domains_and_subsets_keep_the_images(workspace):
    manifest, _ = workspace
    rows = [json.loads(line) for line in open(manifest)]
    assert len(rows) == 6 and all(r["kind"] == "answer" for r in rows)
    assert len({r["domain"] for r in rows[:4]}) == 4
    small = subset_manifest(manifest, 2, "small.jsonl")
    assert set(manifest_images(small)) <= set(manifest_images(manifest))
    assert len(manifest_images(small)) == 2 and len(manifest_images(manifest)) == 6


def test_plain_loop_caches_what_the_expert_computes(workspace, tmp_path):
    manifest, checkpoint = workspace
    uris = manifest_images(manifest)
    cache_root = tmp_path / "cache"
    run = plain_features(uris, checkpoint, "deplot", str(cache_root), batch_size=4)
    assert run.images == 6 and len(run.batch_seconds) == 2 and run.bytes_written > 0
    assert run.seconds >= run.setup_seconds + sum(run.batch_seconds) * 0.99
    key = expert_cache_keys(checkpoint)["deplot"]
    cache = FeatureCache(str(cache_root))
    assert len(cache.shards("deplot", key)) == 2
    model = from_pretrained(checkpoint)
    for uri in uris[:3]:
        image = load_image(uri)
        direct = model.expert_features("deplot", model.processor.expert("deplot", [image]))[0]
        cached = cache.get("deplot", key, image_hash(image))
        torch.testing.assert_close(cached.float(), direct, atol=2e-3, rtol=2e-3)


def _result() -> FeaturesBenchResult:
    r = FeaturesBenchResult("dinov2", images=400, small_images=100, batch_size=16, workers=1,
                            repeats=2, image_size=128, dtype="float16",
                            machine={"cpu": "x", "torch threads": "1", "gpu": "none"})
    r.runs = [RunTiming("ray_cold", 400, 400, 20.0, 9.0),
              RunTiming("plain", 400, 400, 4.0, 3.0), RunTiming("ray", 400, 400, 10.0, 8.0),
              RunTiming("ray_small", 100, 100, 6.0, 4.0),
              RunTiming("plain", 400, 400, 6.0, 5.0), RunTiming("ray", 400, 400, 12.0, 10.0),
              RunTiming("ray_small", 100, 100, 8.0, 6.0),
              RunTiming("ray_cached", 400, 0, 1.1, 0.0)]
    return r


def test_throughputs_and_ratios_come_from_the_measured_runs():
    r = _result()
    tp = throughput(r)
    assert tp["plain"] == pytest.approx(400 / 5.0) and tp["plain_batches"] == pytest.approx(100)
    assert tp["ray_cold"] == pytest.approx(20) and tp["ray"] == pytest.approx(400 / 11.0)
    assert tp["ray_stage"] == pytest.approx(400 / 9.0)
    assert tp["ray_small"] == pytest.approx(100 / 7.0)
    assert tp["ray_steady"] == pytest.approx(300 / (9.0 - 5.0))  # marginal: 75 images/s
    assert tp["ray_fixed_s"] == pytest.approx(9.0 - 400 / 75)
    rt = ratios(r)
    assert rt["ray_cold/plain"] == pytest.approx(20 / 80)
    assert rt["ray/plain"] == pytest.approx((400 / 11.0) / 80)
    assert rt["ray_stage/plain"] == pytest.approx((400 / 9.0) / 80)
    assert rt["ray_steady/plain_batches"] == pytest.approx(0.75)
    assert rt["cached_vs_compute"] == pytest.approx(1.1 / 11.0)
    # Without a cold run (Ray already running) or with a noisy negative marginal: not measured.
    r.runs = [x for x in r.runs if x.kind != "ray_cold"]
    r.runs += [RunTiming("ray_small", 100, 100, 30.0, 30.0)] * 2
    tp, rt = throughput(r), ratios(r)
    assert tp["ray_cold"] is None and rt["ray_cold/plain"] is None
    assert tp["ray_steady"] is None and rt["ray_steady/plain_batches"] is None
    assert r.to_dict()["ratios"] == rt


def test_features_section_is_written_and_keeps_other_sections(tmp_path):
    r = _result()
    assert r.key == "bench:features:cpu"
    path = tmp_path / "benchmarks.md"
    other = "<!-- bench:model:tiny:cpu -->\nmodel numbers\n<!-- /bench:model:tiny:cpu -->\n"
    path.write_text("# Benchmarks\n\n" + other)
    body = render_markdown(r)
    write_section(path, r.key, body)
    write_section(path, r.key, body)
    text = path.read_text()
    start, end = markers(r.key)
    assert text.count(start) == 1 and text.count(end) == 1 and other in text
    assert "| steady state: marginal rate vs the plain batches | " in text
    assert "| 0.75 |" in text and "| 0.25 |" in text  # steady and cold ratios
    assert "OMP_NUM_THREADS=1 mova bench features --images 400" in text


def test_zero_stage_parser():
    assert zero_stages("1,2,3") == [1, 2, 3] and zero_stages("none") == [] == zero_stages("")
    for bad in ("4", "a", "1,,x"):
        with pytest.raises(argparse.ArgumentTypeError):
            zero_stages(bad)


def test_train_cli_quick_in_process(tmp_path):
    """The in-process comparison through the CLI: four configurations on the same samples,
    speed-ups recomputed from the raw step times, the section written."""
    from pipelines.cli import main

    out, js = tmp_path / "bench.md", tmp_path / "bench.json"
    argv = ["bench", "train", "--quick", "--steps", "2", "--batch-size", "2", "--zero-stages",
            "none", "--image-size", "64", "--workdir", str(tmp_path / "ws"), "--out", str(out),
            "--json", str(js)]
    assert main(argv) == 0
    data = json.loads(js.read_text())
    assert data["zero"] == [] and data["steps"] == 2 and data["samples"] == 2 * 2 * 3
    configs = {(c["masks"], c["features"]): c for c in data["configs"]}
    assert set(configs) == {(m, f) for m in ("label", "all") for f in ("cached", "compute")}
    for c in configs.values():
        assert len(c["step_ms"]) == 2 and all(ms > 0 for ms in c["step_ms"])
        assert c["steps_per_s"] == pytest.approx(2000 / sum(c["step_ms"]))
        assert c["tokens_per_s"] == pytest.approx(1000 * sum(c["tokens"]) / sum(c["step_ms"]))
    for masks in ("label", "all"):
        cached, compute = configs[(masks, "cached")], configs[(masks, "compute")]
        assert cached["tokens"] == compute["tokens"]  # the same samples in both modes
        assert cached["experts_per_sample"] == compute["experts_per_sample"]
        assert data["speedups"][masks]["steps_per_s"] == pytest.approx(
            sum(compute["step_ms"]) / sum(cached["step_ms"]))
    assert configs[("all", "cached")]["experts_per_sample"] == 7.0
    assert 1.0 <= configs[("label", "cached")]["experts_per_sample"] <= 2.0
    text = out.read_text()
    assert text.count("<!-- bench:train:cpu -->") == 1
    assert "Cached / compute speed-up" in text and "MFU is not measured" in text
    assert "per ZeRO stage" not in text  # none were run
