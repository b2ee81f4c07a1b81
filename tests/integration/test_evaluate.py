"""`mova eval` end to end: Ray Data batch inference on a tiny checkpoint, and the HTTP mode
against a small OpenAI-compatible server answering from the same model."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mova.factory import build_tiny_mova, from_pretrained
from mova.images import load_image
from mova.metrics import score
from pipelines.common.llm_engine import LLMEngineRecipe, VLLMRecipe, vllm_installed
from pipelines.common.manifests.validate import write_manifest
from pipelines.common.recipe import MlflowConfig
from pipelines.evaluate.job import run_eval
from pipelines.evaluate.recipe import BenchmarkSpec, EvalRecipe
from pipelines.evaluate.scoring import score_all

pytestmark = pytest.mark.integration

MAX_NEW = 6
QUESTIONS = ["What is the title of this document?", "What is the value of bar B?",
             "How many red circles are there?", "What colour is the square?",
             "Is there a lesion in this scan?"]
DOMAINS = ["documents", "charts", "scenes", "scenes", "biomedical"]
METRICS = ["anls", "relaxed_accuracy", "vqa_accuracy", "vqa_accuracy", "exact_match"]
LABELS = [["vary", "pix2struct"], ["deplot"], ["dinov2", "codetr"], [], ["biomedclip"]]
POPE_LABELS = ["yes", "no", "no"]
SUFFIX = "\nAnswer the question using a single word or phrase."


def _turns(question: str) -> list[dict]:
    return [{"from": "human", "value": f"<image>\n{question}{SUFFIX}"}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny checkpoint whose LLM says varied things, 8 images (+1 corrupt) in two benchmark
    files, and each question's expected greedy answer with the label routing and the
    model's own routing (from ``model.generate`` one question at a time)."""
    root = tmp_path_factory.mktemp("eval")
    model = build_tiny_mova(seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a random-init LLM only emits newlines: make it talk
        for p in model.llm.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3, generator=gen)
    ckpt = root / "ckpt"
    model.save_pretrained(ckpt)
    model = from_pretrained(ckpt)

    rng = np.random.RandomState(0)
    (root / "img").mkdir()
    images = []
    for i in range(8):
        path = root / "img" / f"{i}.png"
        Image.fromarray((rng.rand(40 + 4 * i, 48, 3) * 255).astype("uint8")).save(path)
        images.append(path)
    (root / "img" / "bad.png").write_bytes(b"not a png")
    questions = QUESTIONS + ["Is there a dog in the image?"] * 3
    labels = LABELS + [["dinov2", "codetr"]] * 3

    def expected(experts):
        out = []
        for i, q in enumerate(questions):
            forced = None if experts is None else [experts[i]]
            out.append(model.generate([load_image(images[i])], [_turns(q)], experts=forced,
                                      max_new_tokens=MAX_NEW, do_sample=False)[0])
        return out

    by_label, by_model = expected(labels), expected(None)
    mixed = []
    for i in range(5):
        # two rows list the model's own answer among the references, so scores are not all 0
        refs = [by_label[i].answer or "x", "other"] if i in (0, 2) else ["nothing like it"]
        mixed.append({"id": f"m{i}", "image": f"img/{i}.png", "domain": DOMAINS[i],
                      "conversations": _turns(QUESTIONS[i]) + [{"from": "gpt",
                                                                 "value": refs[0]}],
                      "answers": refs, "metric": METRICS[i], "experts": LABELS[i]})
    mixed.append({"id": "m-bad", "image": "img/bad.png", "domain": "scenes",
                  "conversations": _turns("What is it?") + [{"from": "gpt", "value": "x"}],
                  "answers": ["x"], "metric": "exact_match", "experts": []})
    pope = [{"id": f"p{j}", "image": f"img/{5 + j}.png",
             "conversations": _turns(questions[5 + j]) + [{"from": "gpt", "value": lab}],
             "answers": [lab], "metric": "exact_match", "experts": ["dinov2", "codetr"],
             "meta": {"benchmark": "pope", "label": lab, "category": "random",
                      "question_id": j}}
            for j, lab in enumerate(POPE_LABELS)]
    write_manifest(mixed, str(root / "mixed.jsonl"))
    write_manifest(pope, str(root / "pope.jsonl"))
    return {"root": root, "ckpt": ckpt, "model": model, "images": images,
            "by_label": by_label, "by_model": by_model, "labels": labels}


def _recipe(setup, out: str, **kw) -> EvalRecipe:
    """The tests' eval recipe, on the torch loop unless ``llm`` says otherwise."""
    root = setup["root"]
    kw.setdefault("llm", LLMEngineRecipe(engine="torch"))
    return EvalRecipe(
        benchmarks=[BenchmarkSpec(name="mixed", path=str(root / "mixed.jsonl")),
                    BenchmarkSpec(name="pope", path=str(root / "pope.jsonl"))],
        max_new_tokens=MAX_NEW, output=str(root / out),
        mlflow=MlflowConfig(tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
                            experiment="eval-test", run_name=out, system_metrics=False), **kw)


def _records(summary) -> list[dict]:
    """The prediction records the workers wrote (parts of a published folder), in benchmark
    and id order."""
    folder = Path(summary.predictions)
    parts = json.loads((folder / "_SUCCESS").read_text())["parts"]
    records = [json.loads(line) for part in parts
               for line in (folder / part).read_text().splitlines()]
    return sorted(records, key=lambda r: (r["benchmark"], r["id"]))


def _check_records(records, expected):
    """Each good row equals model.generate's answer and routing; every score recomputes."""
    good = [r for r in records if r["id"] != "m-bad"]
    assert [r["id"] for r in good] == [f"m{i}" for i in range(5)] + ["p0", "p1", "p2"]
    for record, exp in zip(good, expected, strict=True):
        assert record["error"] is None
        assert record["prediction"] == exp.answer
        assert record["experts"] == exp.experts
        assert record["score"] == score(record["metric"], record["prediction"],
                                        record["answers"])
    assert any(r["prediction"] for r in good)
    bad = next(r for r in records if r["id"] == "m-bad")
    assert bad["error"].startswith("image ") and "bad.png" in bad["error"]


def _mlflow_run(setup, run_id):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{setup['root'] / 'mlflow.db'}")
    run = client.get_run(run_id)
    artifacts = {a.path for a in client.list_artifacts(run_id, "eval")}
    return run, artifacts


def test_eval_on_ray_with_label_routing(ray_session, setup, no_driver_rows):
    """On vLLM where it is installed (fp32: the eval actor holds no LLM weights, vLLM decodes
    the answers), else on the torch loop: every answer equals the library's ``generate``. (The
    torch loop's Ray Data eval runs in test_demo and test_shared_nothing; the imported released
    checkpoint's, on the default engine, in test_serve_reference.)"""
    llm = LLMEngineRecipe(engine="vllm" if vllm_installed() else "torch",
                          vllm=VLLMRecipe(dtype="float32", max_model_len=1024))
    recipe = _recipe(setup, "out-ray", checkpoint=str(setup["ckpt"]), routing="label",
                     batch_size=3, workers=1, cpus_per_worker=1.0, llm=llm)
    summary = run_eval(recipe)
    no_driver_rows.undo()
    assert (summary.questions, summary.errors, summary.mode) == (9, 1, "checkpoint")
    records = _records(summary)
    _check_records(records, setup["by_label"])
    for r in records:
        if r["id"] != "m-bad":
            assert r["forced"] is True and r["routing_reply"] is None
    # scores: the aggregation of the written predictions (failed row scored as empty)
    recomputed = score_all(records, "empty")
    assert {k: v.to_dict() for k, v in summary.scores.items()} == \
        {k: v.to_dict() for k, v in recomputed.items()}
    mixed = summary.scores["mixed"]
    assert (mixed.questions, mixed.scored, mixed.errors, mixed.metric) == (6, 6, 1, "mixed")
    assert mixed.score == pytest.approx(sum(r["score"] for r in records
                                            if r["benchmark"] == "mixed") / 6)
    assert mixed.score > 0
    assert summary.scores["pope"].kind == "pope"
    # activation follows the labels; the failed row has no routing
    assert summary.activation["mixed"] == pytest.approx({
        "dinov2": 0.2, "vary": 0.2, "codetr": 0.2, "pix2struct": 0.2, "deplot": 0.2,
        "biomedclip": 0.2, "sam": 0.0, "experts/q": 1.2})
    assert summary.activation["pope"]["dinov2"] == 1.0
    assert summary.activation["pope"]["vary"] == 0.0
    assert summary.activation["mixed/documents"]["vary"] == 1.0
    saved = json.loads(Path(summary.scores_path).read_text())
    assert saved["scores"]["mixed"]["score"] == pytest.approx(mixed.score)
    assert "| mixed | mixed |" in Path(summary.report).read_text()
    run, artifacts = _mlflow_run(setup, summary.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["mixed/score"] == pytest.approx(mixed.score)
    assert run.data.metrics["pope/score"] == pytest.approx(summary.scores["pope"].score)
    assert run.data.metrics["activation/mixed/vary"] == pytest.approx(0.2)
    assert run.data.metrics["errors"] == 1
    assert run.data.params["routing"] == "label"
    assert run.data.params["llm.engine"] == llm.engine
    assert artifacts == {"eval/predictions", "eval/scores.json", "eval/report.md"}


class _FakeServer(BaseHTTPRequestHandler):
    """OpenAI-compatible enough: answers from the test's model; the first chat request gets
    a 503 with Retry-After, a wrong key a 401."""

    model = None
    lock = threading.Lock()
    calls: list[int] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, status, body, headers=None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.headers.get("Authorization") != "Bearer k":
            return self._send(401, {"error": {"message": "bad key"}})
        return self._send(200, {"object": "list", "data": [{"id": "mova"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.headers.get("Authorization") != "Bearer k":
            return self._send(401, {"error": {"message": "bad key"}})
        with self.lock:
            self.calls.append(1)
            if len(self.calls) == 1:
                return self._send(503, {"error": {"message": "busy"}}, {"Retry-After": "0"})
        turns, image = [], None
        for msg in body["messages"]:
            parts = msg["content"] if isinstance(msg["content"], list) else [
                {"type": "text", "text": msg["content"]}]
            text = "\n".join(p["text"] for p in parts if p["type"] == "text")
            image = next((p["image_url"]["url"] for p in parts if p["type"] == "image_url"),
                         image)
            turns.append({"from": {"user": "human", "assistant": "gpt"}[msg["role"]],
                          "value": text})
        forced = (body.get("mova") or {}).get("experts")
        with self.lock:
            out = self.model.generate([load_image(image)], [turns],
                                      experts=None if forced is None else [forced],
                                      max_new_tokens=body["max_tokens"], do_sample=False)[0]
        return self._send(200, {
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out.answer}}],
            "mova": {"experts": out.experts, "forced": forced is not None,
                     "routing_reply": out.routing_reply, "pool": self.model.expert_names,
                     "vision_ms": 1.0}})


def test_eval_over_http_with_model_routing(ray_session, setup):
    _FakeServer.model = setup["model"]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(ValueError, match="refused the API key"):
            run_eval(_recipe(setup, "out-http-nokey", endpoint=endpoint, api_key="wrong"))
        summary = run_eval(_recipe(setup, "out-http", endpoint=endpoint, api_key="k",
                                   concurrency=3, on_error="skip"))
    finally:
        server.shutdown()
        server.server_close()
    assert (summary.questions, summary.errors, summary.mode) == (9, 1, "endpoint")
    assert len(_FakeServer.calls) == 9  # 8 answers + the 503 that was retried
    records = _records(summary)
    _check_records(records, setup["by_model"])
    for r in records:
        if r["id"] != "m-bad":
            assert r["forced"] is False and r["routing_reply"] is not None
    assert summary.pool == setup["model"].expert_names
    recomputed = score_all(records, "skip")
    assert {k: v.to_dict() for k, v in summary.scores.items()} == \
        {k: v.to_dict() for k, v in recomputed.items()}
    assert (summary.scores["mixed"].scored, summary.scores["mixed"].errors) == (5, 1)
    run, artifacts = _mlflow_run(setup, summary.mlflow_run_id)
    assert run.data.params["api_key"] == "***" and run.data.params["mode"] == "endpoint"
    assert run.data.metrics["mixed/score"] == pytest.approx(summary.scores["mixed"].score)
    assert "eval/predictions" in artifacts

