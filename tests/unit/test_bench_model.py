"""Tests for `mova bench model`: every step timed, k-of-N ratios from the measured numbers,
the docs section replaced in place, and the CLI entry point."""

from __future__ import annotations

import json

import pytest
import torch

from pipelines.bench.harness import markers, measure_interleaved, write_section
from pipelines.bench.shapes import full_config
from pipelines.bench.step_latency import K_VALUES, bench_model, step_names, vision_path
from pipelines.bench.step_latency_report import render_markdown, step_label

BATCHES = (1, 2)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def result():
    return bench_model("tiny", device=torch.device("cpu"), batch_sizes=BATCHES, repeats=1,
                       warmup=0, max_new_tokens=2)


def test_every_step_is_timed_at_every_batch(result):
    names = result.expert_names
    assert len(names) == 7
    expected = set(step_names(names))
    assert {"preprocess", "encode_base", "encode_questions", "routing_tokens", "route",
            "generate:routed", "generate:forced_all"} <= expected
    assert all(f"expert_features:{n}" in expected for n in names)
    for b in BATCHES:
        timed = [s for s in result.steps if s.batch == b]
        assert sorted(s.step for s in timed) == sorted(expected)
        for s in timed:
            assert len(s.samples_ms) == 1 and s.median_ms == s.samples_ms[0] > 0
    route = result.step("route", 1)
    assert "LLM steps" in route.note
    forced = result.step("generate:forced_all", 2).note
    assert all(n in forced for n in names)


def test_k_of_7_ratios_come_from_the_measured_times(result):
    names = result.expert_names
    for b in BATCHES:
        all7 = result.cost(b, "all", len(names))
        assert all7.ratio == 1.0 and sorted(all7.experts) == sorted(names)
        per_expert = {n: result.step(f"expert_features:{n}", b).median_ms for n in names}
        for order in ("cheapest", "costliest"):
            for k in K_VALUES:
                c = result.cost(b, order, k)
                assert len(c.experts) == k and c.median_ms > 0 and c.fuse_ms > 0
                assert c.ratio == pytest.approx(c.median_ms / all7.median_ms, rel=1e-12)
                assert c.ratio_min == pytest.approx(c.min_ms / all7.min_ms, rel=1e-12)
            chosen = result.cost(b, order, max(K_VALUES)).experts
            others = [per_expert[n] for n in names if n not in chosen]
            if order == "cheapest":
                assert max(per_expert[n] for n in chosen) <= min(others)
            else:
                assert min(per_expert[n] for n in chosen) >= max(others)
        for stat in ("median", "min"):
            rows = vision_path(result, b, stat)
            assert rows[0][2] == 1.0 and len(rows) == 1 + 2 * len(K_VALUES)
            assert all(ratio == pytest.approx(ms / rows[0][1]) for _, ms, ratio in rows)
        # the fixed mixture = base + all experts' preprocessing, base + text encoding, all experts
        parts = ["preprocess:base", "encode_base", "encode_questions"] + [
            f"preprocess:{n}" for n in names]
        fixed = sum(result.step(p, b).median_ms for p in parts) + all7.median_ms
        assert vision_path(result, b)[0][1] == pytest.approx(fixed)


def test_markdown_section_is_replaced_in_place(result, tmp_path):
    path = tmp_path / "benchmarks.md"
    before = ("# Benchmarks\n\nintro\n\n<!-- bench:train:x -->\ntrain results\n"
              "<!-- /bench:train:x -->\n")
    after = "\n<!-- bench:serve:y -->\nserve results\n<!-- /bench:serve:y -->\n"
    start, end = markers(result.key)
    path.write_text(before + f"{start}\nstale numbers\n{end}" + after)
    body = render_markdown(result)
    write_section(path, result.key, body)
    write_section(path, result.key, body.replace("## `mova bench model`", "## rerun"))
    text = path.read_text()
    assert text.count(start) == 1 and text.count(end) == 1
    assert "## rerun" in text and "## `mova bench model`" not in text
    assert "stale numbers" not in text
    assert text.startswith(before) and text.endswith(after)
    for step in step_names(result.expert_names):
        assert step_label(step, len(result.expert_names)) in text
    assert "ratio to all" in text and "Machine: cpu:" in text


def test_write_section_creates_the_file_and_rejects_an_unmatched_marker(tmp_path):
    path = tmp_path / "docs" / "b.md"
    write_section(path, "bench:model:tiny:cpu", "numbers")
    text = path.read_text()
    assert text.startswith("# Benchmarks") and "mova bench model" in text
    assert text.rstrip().endswith("numbers\n<!-- /bench:model:tiny:cpu -->")
    path.write_text("<!-- bench:model:tiny:cpu -->\nno end\n")
    with pytest.raises(ValueError, match="unmatched marker"):
        write_section(path, "bench:model:tiny:cpu", "numbers")


def test_measure_interleaved_runs_every_call_side_by_side():
    calls = []
    fns = {name: (lambda name=name: calls.append(name) or len(calls)) for name in "abc"}
    timed = measure_interleaved(fns, repeats=3, warmup=2, device=torch.device("cpu"))
    assert calls[:6] == list("aabbcc")  # warm-up
    assert calls[6:] == list("abc" "bca" "cab")  # rounds, each starting one further along
    assert {n: len(s) for n, (s, _) in timed.items()} == {"a": 3, "b": 3, "c": 3}
    assert timed["b"][1] == 15 and all(ms >= 0 for s, _ in timed.values() for ms in s)
    with pytest.raises(ValueError, match="repeats"):
        measure_interleaved(fns, repeats=0, warmup=0, device=torch.device("cpu"))


def test_full_config_has_the_paper_shapes():
    config = full_config("1b")
    assert (config.base.image_size, config.base.grid_size, config.base.hidden_size) == (672, 48,
                                                                                        1024)
    assert config.num_image_tokens == 576 and config.num_routing_tokens == 144
    assert all(e.preset == "full" for e in config.experts) and len(config.experts) == 7
    assert config.adapter.num_heads == 16 and config.text_encoder.num_layers == 24
    assert (config.llm.hidden_size, config.llm.num_layers, config.llm.num_kv_heads) == (2048, 16,
                                                                                        8)
    assert config.dtype == "bfloat16"
    with pytest.raises(ValueError, match="llm_size"):
        full_config("13b")


def test_cli_quick_run_writes_the_section(tmp_path):
    from pipelines.cli import main

    out, js = tmp_path / "bench.md", tmp_path / "bench.json"
    argv = ["bench", "model", "--quick", "--batch-sizes", "1", "--device", "cpu",
            "--out", str(out), "--json", str(js)]
    assert main(argv) == 0
    assert out.read_text().count("<!-- bench:model:tiny:cpu -->") == 1
    data = json.loads(js.read_text())
    assert data["batch_sizes"] == [1] and data["repeats"] == 1 and data["warmup"] == 0
    assert {c["k"] for c in data["expert_costs"]} == {*K_VALUES, 7}
