"""`mova bench serve --real --engine ...` without running it: engine labels become recipe
overrides (bad ones refused before anything runs), and the section compares each engine's app
with the loop, the batched call and the torch-served app, listing answers that differ."""

from __future__ import annotations

import pytest

from pipelines.bench.serve import LoadResult, ServeBenchResult
from pipelines.bench.serve_real import (
    check_engines,
    engine_overrides,
    render_real,
    serve_recipe_for,
)
from pipelines.common import llm_engine


def test_engine_labels_become_overrides_and_bad_ones_are_refused(monkeypatch):
    assert engine_overrides("torch") == ["llm.engine=torch"]
    assert engine_overrides("vllm:bfloat16") == ["llm.engine=vllm", "llm.vllm.dtype=bfloat16"]

    def build(engine):
        return serve_recipe_for("ckpt", engine)

    monkeypatch.setattr(llm_engine, "vllm_installed", lambda: True)
    check_engines(["torch", "vllm", "vllm:float32"], build)
    for engines, named in ((["vllm:fp8"], "vllm:fp8"), (["tensorrt"], "tensorrt"),
                           (["torch", "torch"], "name each engine once")):
        with pytest.raises(ValueError, match=named):
            check_engines(engines, build)
    monkeypatch.setattr(llm_engine, "vllm_installed", lambda: False)
    with pytest.raises(ValueError, match="vLLM is not installed"):
        check_engines(["vllm"], build)


def _level(engine: str, clients: int, seconds: float, identical: int = 8,
           differ: list | None = None) -> LoadResult:
    return LoadResult(clients, 8, seconds, [1000.0] * 8, identical=identical, engine=engine,
                      differ=differ or [])


def test_the_section_compares_each_engine_with_the_loop_and_the_torch_app():
    result = ServeBenchResult(
        machine={"cpu": "x"}, key="bench:serve:real:cpu",
        settings={"levels": [1, 16], "max_new_tokens": 16, "engines": ["torch", "vllm"]},
        reference=[_level("", 1, 16.0), _level("", 16, 16.0)],
        served=[_level("torch", 1, 16.0), _level("torch", 16, 8.0),
                _level("vllm", 1, 8.0), _level("vllm", 16, 2.0, identical=7,
                                                 differ=[(3, "a red circle", "a red square")])],
        real={"routing": {"free": {"median_ms": 10, "mean_steps": 2, "well_formed": 8,
                                   "requests": 8},
                          "constrained": {"median_ms": 10, "mean_steps": 2, "well_formed": 8,
                                          "requests": 8}},
              "batched": {"throughput": 1.0, "requests": 16, "seconds": 16.0,
                          "identical_to_loop": 16},
              "engines": {"torch": {"memory_mib": {"LLM": 900, "Ingress": 100},
                                    "llm": {"decode": {"steps": 40, "mean_rows": 3.5}}},
                          "vllm": {"memory_mib": {"LLM": 1500, "Ingress": 100},
                                   "llm": {"decode": {"engine": "vllm", "started_s": 21.4,
                                                      "requests": 64, "aborted": 0}}}}})
    text = render_real(result)
    assert "--engine torch,vllm" in text
    rows = {tuple(cells[1:3]): cells for cells in
            (line.split(" | ") for line in text.splitlines() if line.startswith("| vllm"))}
    # 16 clients: 4 req/s served by vLLM, 0.5 by the loop, 1.0 by the torch-served app
    vllm16 = rows[("16", "8")]
    assert vllm16[8:11] == ["8.00x", "4.00x", "4.00x"] and vllm16[11] == "7/8"
    assert "| 3 | 'a red circle' | 'a red square' |" in text
    assert "vLLM engine started in 21 s, served 64 passes" in text
    assert "decode loop 40 steps, 3.5 rows per step" in text and "1600 MiB RSS" in text
