"""GPU checks (`make test-gpu`; skipped without CUDA): what the CPU suite cannot run.

- one bf16 ZeRO-2 training step with computed expert features on one GPU (experts on the
  engine's device and dtype, exported in bf16);
- one request through the Serve app with its replicas on the GPU;
- `mova bench model --preset full --device cuda` (the paper's shapes, random weights) writes
  its section of a results file.

They need a CUDA build of torch 2.13 in the environment (``make setup`` installs the CPU wheel;
on a GPU machine install the CUDA one into .venv first).
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


def test_one_request_through_the_serve_app_on_the_gpu(workspace, ray_gpu):
    import httpx
    from PIL import Image
    from ray import serve

    from pipelines.serve.app import start
    from pipelines.serve.recipe import ServeRecipe

    recipe = ServeRecipe(checkpoint=workspace["init"], port=18431, device="cuda")
    recipe.llm.num_gpus = 0.5
    recipe.adapter.num_gpus = 0.25
    url = start(recipe)
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
