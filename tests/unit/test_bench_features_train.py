"""Tests for `mova bench features` and `mova bench train` without Ray: the plain feature loop,
throughputs and ratios computed from the measured numbers, the in-process training comparison,
the docs sections and the CLI (the Ray parts are in tests/integration)."""

from __future__ import annotations

import argparse
import json
import statistics

import pytest
import torch

from mova.checkpoint import expert_cache_keys
from mova.factory import from_pretrained
from mova.images import image_hash, load_image
from pipelines.bench.cli import zero_stages
from pipelines.bench.features import (
    FeaturesBenchResult,
    RunTiming,
    make_workspace,
    manifest_images,
    plain_features,
    ratios,
    subset_manifest,
    throughput,
)
from pipelines.bench.features_report import render_markdown
from pipelines.bench.harness import markers, write_section
from pipelines.common.feature_cache import FeatureCache

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
    assert len(cache.shard_files("deplot", key)) == len(cache.index_parts("deplot", key)) == 2
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
    """The in-process comparison through the CLI: four configurations on the same samples plus
    the no-expert floor, speed-ups recomputed from the raw step times, the section written."""
    from pipelines.cli import main

    out, js = tmp_path / "bench.md", tmp_path / "bench.json"
    argv = ["bench", "train", "--quick", "--steps", "2", "--batch-size", "2", "--zero-stages",
            "none", "--image-size", "64", "--workdir", str(tmp_path / "ws"), "--out", str(out),
            "--json", str(js)]
    assert main(argv) == 0
    data = json.loads(js.read_text())
    assert data["zero"] == [] and data["steps"] == 2 and data["samples"] == 2 * 2 * 3
    configs = {(c["masks"], c["features"]): c for c in data["configs"]}
    assert set(configs) == {(m, f) for m in ("label", "all") for f in ("cached", "compute")} \
        | {("none", "cached")}
    assert configs[("none", "cached")]["experts_per_sample"] == 0
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
    for masks in ("label", "all"):  # the routed experts' forward, timed after compute steps
        cached, compute = configs[(masks, "cached")], configs[(masks, "compute")]
        assert cached["expert_ms"] == [] and len(compute["expert_ms"]) == 2
        cost = data["expert_cost"][masks]
        assert cost["ratio"] == pytest.approx(
            (compute["median_ms"] - cached["median_ms"]) / cost["expert_ms"])
    assert configs[("all", "cached")]["experts_per_sample"] == 7.0
    assert 1.0 <= configs[("label", "cached")]["experts_per_sample"] <= 2.0
    text = out.read_text()
    assert text.count("<!-- bench:train:cpu -->") == 1
    assert "Cached / compute speed-up" in text and "MFU is not measured" in text
    floor = configs[("label", "cached")]["median_ms"] / configs[("none", "cached")]["median_ms"]
    assert f"takes **{floor:.2f}x** a step routing no expert at all" in text
    assert "per ZeRO stage" not in text  # none were run


# ---- --real: the real DINOv2-S workspace, the expert-cost ratio, the sections ------------------
def test_real_workspace_routes_dinov2_with_the_real_checkpoint(tmp_path, monkeypatch):
    """``real=True`` builds the checkpoint from ``real_model_config`` (here the tiny config,
    so no real weights are needed) and relabels every answer row to ``dinov2``."""
    from mova.checkpoint import load_config
    from mova.factory import tiny_config
    from pipelines.bench import real

    calls = []
    monkeypatch.setattr(real, "real_model_config", lambda: calls.append(1) or tiny_config())
    manifest, checkpoint = make_workspace(tmp_path / "real", 8, image_size=64, real=True)
    rows = [json.loads(line) for line in open(manifest)]
    assert calls == [1] and len(rows) == 8 and len({r["domain"] for r in rows}) == 4
    assert all(r["experts"] == ["dinov2"] for r in rows)
    assert "dinov2" in load_config(checkpoint).expert_names
    tiny, _ = make_workspace(tmp_path / "tiny", 4, image_size=64)  # keeps the domain labels
    assert calls == [1] and {tuple(json.loads(line)["experts"]) for line in open(tiny)} == {
        ("vary", "pix2struct"), ("deplot", "pix2struct"), ("dinov2", "codetr"), ("biomedclip",)}
    assert real.relabel({"kind": "routing", "experts": ["sam"]}) == {"kind": "routing",
                                                                     "experts": ["sam"]}
    real.check_expert("dinov2")
    with pytest.raises(ValueError, match="only 'dinov2' has real weights"):
        real.check_expert("deplot")


def test_real_model_config_has_the_real_experts():
    from pipelines.bench.real import REAL_IMAGE_SIZE, real_model_config, unavailable_reason
    from pipelines.model.real_assets import default_cache_dir

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    config = real_model_config()  # reads the prepared configs only
    (dinov2,) = [e for e in config.experts if e.name == "dinov2"]
    cache = default_cache_dir()
    assert dinov2.preset == "full" and dinov2.image_size == REAL_IMAGE_SIZE == 224
    assert dinov2.pretrained.startswith(str(cache)) and dinov2.hidden_size == 384
    assert config.llm.pretrained.startswith(str(cache))
    assert config.text_encoder.pretrained.startswith(str(cache))
    assert all(e.preset == "tiny" for e in config.experts if e.name != "dinov2")


def test_expert_cost_ratio_from_given_numbers():
    from pipelines.bench.real import cost_removed, expert_cost, paired_cost_removed
    from pipelines.bench.train import ConfigTiming, TrainBenchResult
    from pipelines.bench.train_report import render_markdown

    assert cost_removed(1300.0, 300.0, 1000.0) == pytest.approx(1.0)
    assert cost_removed(1200.0, 300.0, 1000.0) == pytest.approx(0.9)
    assert cost_removed(1000.0, 300.0, 0.0) is None
    assert paired_cost_removed([1300, 1200, 2000], [300, 300, 400], [1000, 1000, 800]) == \
        pytest.approx(1.0)  # rounds: 1.0, 0.9, 2.0
    assert paired_cost_removed([], [], []) is None
    r = TrainBenchResult(steps=3, batch_size=4, stage="pretrain", samples=32, image_size=224,
                         machine={"torch threads": "1", "gpu": "none"}, real=True)
    r.configs = [
        ConfigTiming("label", "cached", [3000, 3100, 2900], [100] * 3, 1.0, 2.0, 1.0),
        ConfigTiming("label", "compute", [3700, 3600, 3800], [100] * 3, 1.0, 9.0, 1.0,
                     expert_ms=[800, 760, 700]),
        ConfigTiming("all", "cached", [3200, 3200, 3200], [100] * 3, 7.0, 2.0, 1.0),
        ConfigTiming("all", "compute", [3600, 3600, 3600], [100] * 3, 7.0, 9.0, 1.0)]
    cost = expert_cost(r)
    assert set(cost) == {"label"}  # "all" has no expert timing
    assert cost["label"]["expert_ms"] == 760 and cost["label"]["saved_ms"] == 700
    assert cost["label"]["ratio"] == pytest.approx(700 / 760)
    assert cost["label"]["paired"] == pytest.approx(statistics.median(
        [700 / 800, 500 / 760, 900 / 700]))
    assert r.key == "bench:train:real:cpu" and r.to_dict()["expert_cost"] == cost
    text = render_markdown(r)
    assert "OMP_NUM_THREADS=1 mova bench train --real --steps 3 --batch-size 4 " \
           "--zero-stages none" in text
    assert "| label | 760.0 | 700.0 | 0.92 |" in text and "**met** (0.92)" in text
    assert "SmolLM2-135M" in text and "per ZeRO stage" not in text
    r.configs[1].expert_ms = [1000, 1000, 1000]
    assert "**not met** (0.70)" in render_markdown(r)


def test_real_features_section_sits_beside_the_tiny_one(tmp_path):
    tiny, real = _result(), _result()
    real.real, real.image_size = True, 224
    assert real.key == "bench:features:real:cpu" != tiny.key
    path = tmp_path / "benchmarks.md"
    write_section(path, tiny.key, render_markdown(tiny))
    write_section(path, real.key, render_markdown(real))
    text = path.read_text()
    assert text.count("<!-- bench:features:cpu -->") == 1
    assert text.count("<!-- bench:features:real:cpu -->") == 1
    body = render_markdown(real)
    assert "mova bench features --real --images 400 --expert dinov2" in body
    assert "the real DINOv2-S/14 `dinov2` expert" in body and "--image-size" not in body
    assert "Goal (Ray Data steady state / plain batched loop >= 0.9): **not met** (0.75)" in body


def test_real_cli_defaults(tmp_path, monkeypatch):
    """``--real`` picks the smaller sizes, 224 px and (train) no ZeRO runs unless asked."""
    from pipelines.bench import features, train
    from pipelines.cli import main

    seen = {}

    def fake_train(root, **kw):
        seen["train"] = kw
        return train.TrainBenchResult(kw["steps"], kw["batch_size"], "pretrain", 1,
                                      kw["image_size"], real=kw["real"])

    def fake_features(root, **kw):
        seen["features"] = kw
        return FeaturesBenchResult(kw["expert"], kw["images"], 1, kw["batch_size"], 1,
                                   kw["repeats"], kw["image_size"], "float16", real=kw["real"])

    monkeypatch.setattr(train, "bench_train", fake_train)
    monkeypatch.setattr(features, "bench_features", fake_features)
    out = tmp_path / "b.md"
    assert main(["bench", "train", "--real", "--out", str(out)]) == 0
    assert {k: seen["train"][k] for k in ("steps", "batch_size", "zero_stages", "image_size",
                                           "real")} == {"steps": 8, "batch_size": 4,
                                                        "zero_stages": [], "image_size": 224,
                                                        "real": True}
    assert main(["bench", "train", "--real", "--zero-stages", "2", "--steps", "3", "--out",
                 str(out)]) == 0
    assert seen["train"]["zero_stages"] == [2] and seen["train"]["steps"] == 3
    assert main(["bench", "train", "--out", str(out)]) == 0
    assert seen["train"]["zero_stages"] == [1, 2, 3] and seen["train"]["image_size"] == 128
    assert main(["bench", "features", "--real", "--out", str(out)]) == 0
    assert {k: seen["features"][k] for k in ("images", "repeats", "image_size", "expert",
                                              "real")} == {"images": 256, "repeats": 2,
                                                           "image_size": 224,
                                                           "expert": "dinov2", "real": True}
    text = out.read_text()
    assert "<!-- bench:train:real:cpu -->" in text and "<!-- bench:train:cpu -->" in text
    assert "<!-- bench:features:real:cpu -->" in text
