"""The authors' released checkpoint, imported with `mova model import-reference`, runs through
our stack unchanged: `mova eval` on Ray Data and the Serve app (its answers equal the library's,
and ``mova.debug`` returns each adapter block's router logits and top-k picks)."""

from __future__ import annotations

import base64
import io
import json
import socket

import openai
import pytest
import torch
from PIL import Image
from released_layout import BLOCKS, Parts

from mova.convert.reference import import_reference
from mova.experts.registry import DEFAULT_POOL

pytestmark = pytest.mark.integration

QUESTION = "What is in the picture?"


def _image_uri() -> str:
    image = Image.new("RGB", (72, 56), (30, 140, 90))
    for x in range(0, 72, 5):
        image.putpixel((x, x * 56 // 72), (240, 20, 20))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    src = Parts(root / "parts").write(root / "src")
    import_reference(src, root / "model", expert_preset="tiny")
    return root


def test_eval_runs_the_imported_checkpoint(ray_session, imported):
    from pipelines.evaluate.job import run_eval
    from pipelines.evaluate.recipe import BenchmarkSpec, EvalRecipe

    image = imported / "q.png"
    Image.new("RGB", (64, 48), (200, 40, 40)).save(image)
    manifest = imported / "questions.jsonl"
    manifest.write_text("".join(json.dumps({
        "id": f"q{i}", "image": "q.png", "answers": ["red"], "metric": "exact_match",
        "conversations": [{"from": "human", "value": f"<image>\nWhat colour is it? ({i})"},
                          {"from": "gpt", "value": "red"}]}) + "\n" for i in range(2)))
    summary = run_eval(EvalRecipe(
        checkpoint=str(imported / "model"), benchmarks=[BenchmarkSpec("t", str(manifest))],
        output=str(imported / "eval"), batch_size=2, workers=1, cpus_per_worker=1.0,
        max_new_tokens=4).validate())
    assert (summary.questions, summary.errors) == (2, 0)
    assert summary.pool == list(DEFAULT_POOL)


def test_the_serve_app_answers_with_the_imported_checkpoint(ray_session, imported):
    from ray import serve

    from mova.factory import from_pretrained
    from mova.routing_constraint import use_constrained_routing
    from pipelines.common.recipe import load_recipe
    from pipelines.serve.app import start
    from pipelines.serve.recipe import ServeRecipe

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    recipe = load_recipe(ServeRecipe, None, [
        f"checkpoint={imported / 'model'}", f"port={port}", "app_name=released",
        "llm.engine=torch",  # (the eval above decodes it on the default engine, vLLM here)
        "experts.default.num_replicas=1", "experts.default.autoscaling=null"])
    url = start(recipe)
    try:
        client = openai.OpenAI(base_url=f"{url.rstrip('/')}/v1", api_key="unused",
                               max_retries=0, timeout=120)
        image = _image_uri()
        resp = client.chat.completions.create(
            model="mova", max_tokens=6, temperature=0, extra_body={"mova": {"debug": True}},
            messages=[{"role": "user", "content": [
                {"type": "text", "text": QUESTION},
                {"type": "image_url", "image_url": {"url": image}}]}])
        info = resp.model_extra["mova"]
        model = use_constrained_routing(from_pretrained(imported / "model"))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the replicas run
        try:
            expected = model.generate([image], [QUESTION], max_new_tokens=6)[0]
        finally:
            torch.set_num_threads(threads)
        assert resp.choices[0].message.content == expected.answer
        assert info["routing_reply"] == expected.routing_reply
        assert info["experts"] == expected.experts and info["pool"] == list(DEFAULT_POOL)
        # debug: per block, one raw logit per pool expert and the top-k picks
        assert len(info["router_logits"]) == len(info["top_k"]) == BLOCKS
        assert all(len(row) == len(DEFAULT_POOL) for row in info["router_logits"])
        routed = {DEFAULT_POOL.index(n) for n in info["experts"]}
        for picks in info["top_k"]:
            assert {p for p in picks if p >= 0} <= routed
        plain = client.chat.completions.create(
            model="mova", max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "text", "text": QUESTION},
                {"type": "image_url", "image_url": {"url": image}}]}])
        assert plain.model_extra["mova"].get("router_logits") is None  # off by default
    finally:
        serve.shutdown()
