"""GPU checks (`make test-gpu`; skipped without CUDA): what the CPU suite cannot run.

- one bf16 ZeRO-2 training step with computed expert features on one GPU (experts on the
  engine's device and dtype, exported in bf16);
- one request through the Serve app with its replicas on the GPU;
- `mova bench model --preset full --device cuda` (the paper's shapes, random weights) writes
  its section of a results file;
- with vLLM installed (the ``vllm`` extra): one request through the Serve app whose LLM runs
  on vLLM in bf16, and `mova bench llm-engine --shape llama-8b` (decode ms/token and TTFT at
  batch 1 and 16 for the paper's 8B LLM shape, random bf16 weights) writes its section.

They need a CUDA build of torch in the environment (``make setup`` installs the CPU wheel; on a
GPU machine install the CUDA one into .venv first, or ``pip install -e .[vllm]``, which brings
torch 2.14 with CUDA).
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from mova.factory import build_tiny_mova
    from pipelines.data.synth import SynthRecipe, generate

    root = tmp_path_factory.mktemp("gpu")
    data = generate(SynthRecipe(out=str(root / "data"), per_domain=2, test_per_domain=0,
                                routing_samples=0, domains=("charts",), image_size=64))
    build_tiny_mova(seed=0, experts=["deplot", "dinov2"]).save_pretrained(root / "init")
    return {"root": root, "manifest": str(data.train_manifest), "init": str(root / "init")}


@pytest.fixture(scope="module")
def ray_gpu():
    from pipelines.common.ray_init import init_ray

    init_ray("local", num_cpus=4, temp_dir=f"/tmp/mova-gpu-ray-{os.getpid()}")
    import ray

    yield ray
    ray.shutdown()


def test_bf16_zero2_step_with_computed_features(workspace, ray_gpu):
    from mova.factory import from_pretrained
    from pipelines.train.job import run_train
    from pipelines.train.recipe import TrainRecipe

    root = workspace["root"]
    recipe = TrainRecipe(stage="pretrain", init_from=workspace["init"],
                         manifest=workspace["manifest"], features="compute",
                         output=str(root / "bf16"), name="gpu-bf16",
                         storage_path=str(root / "ray_results"), num_workers=1,
                         cpus_per_worker=1.0, use_gpu=True, precision="bf16", batch_size=2,
                         max_steps=1, checkpoint_every=1).validate()
    recipe.deepspeed.zero_stage = 2
    result = run_train(recipe)
    assert result.steps == 1 and result.final_loss is not None
    model = from_pretrained(result.output)
    assert model.config.dtype == "bfloat16"
    assert {p.dtype for p in model.experts.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("engine", ["torch", "vllm"])
def test_one_request_through_the_serve_app_on_the_gpu(workspace, ray_gpu, engine):
    import httpx
    from PIL import Image
    from ray import serve

    from pipelines.common.llm_engine import vllm_installed
    from pipelines.serve.app import start
    from pipelines.serve.recipe import ServeRecipe

    if engine == "vllm" and not vllm_installed():
        pytest.skip("vLLM is not installed (pip install -e .[vllm])")
    recipe = ServeRecipe(checkpoint=workspace["init"], port=18431, device="cuda")
    recipe.llm.num_gpus = 0.5
    recipe.adapter.num_gpus = 0.25
    recipe.llm.engine = engine
    recipe.llm.vllm.dtype = "bfloat16"
    recipe.llm.vllm.enforce_eager = False  # CUDA graphs, as a GPU user serves
    url = start(recipe.validate())
    try:
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (10, 20, 30)).save(buf, "PNG")
        image = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        body = {"model": "mova", "max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is it?"},
            {"type": "image_url", "image_url": {"url": image}}]}]}
        resp = httpx.post(f"{url.rstrip('/')}/v1/chat/completions", json=body, timeout=120)
        assert resp.status_code == 200, resp.text
    finally:
        serve.delete(recipe.app_name)


def test_bench_model_full_preset_on_cuda(tmp_path):
    out = tmp_path / "bench.md"
    subprocess.run([sys.executable, "-m", "pipelines.cli", "bench", "model", "--preset", "full",
                    "--device", "cuda", "--repeats", "3", "--warmup", "1", "--out", str(out),
                    "--json", str(tmp_path / "bench.json")], cwd=ROOT, check=True, timeout=1800)
    assert "<!-- bench:model:full:cuda -->" in out.read_text()
    assert json.loads((tmp_path / "bench.json").read_text())


def test_vllm_at_the_8b_shape_writes_its_figures(tmp_path):
    """Decode ms/token and TTFT at batch 1 and 16 (the issue's goal: at most 6 ms/token at
    batch 1 on an H100; recorded, not asserted)."""
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e .[vllm])")
    out, raw = tmp_path / "bench.md", tmp_path / "bench.json"
    subprocess.run([sys.executable, "-m", "pipelines.cli", "bench", "llm-engine", "--shape",
                    "llama-8b", "--batches", "1,16", "--out", str(out), "--json", str(raw)],
                   cwd=ROOT, check=True, timeout=1200)
    assert "<!-- bench:llm-engine:llama-8b:cuda -->" in out.read_text()
    rows = json.loads(raw.read_text())["rows"]
    print("\n" + out.read_text())
    assert [r["batch"] for r in rows] == [1, 16]
    assert all(r["decode_ms_per_token"] > 0 and r["ttft_ms"] > 0 for r in rows)


def test_each_serving_replica_reserves_only_what_it_keeps(workspace, tmp_path):
    """What a fractional-GPU replica holds on the device: the parts it runs, nothing of the
    rest (printed per replica kind, with the whole model for comparison)."""
    from mova.factory import from_pretrained
    from pipelines.serve.deployments import load_serving_model

    reserved = {}
    for kind, keep in (("LLM", ("llm",)), ("Adapter", ("base", "text")), ("whole", None)):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model = (from_pretrained(workspace["init"], device="cuda") if keep is None
                 else load_serving_model(workspace["init"], "cuda", keep))
        torch.cuda.synchronize()
        reserved[kind] = torch.cuda.max_memory_reserved()
        del model
    print(f"\nmax_memory_reserved per replica kind (bytes): {reserved}")
    (tmp_path / "reserved.json").write_text(json.dumps(reserved))
    assert reserved["LLM"] < reserved["whole"] and reserved["Adapter"] < reserved["whole"]
