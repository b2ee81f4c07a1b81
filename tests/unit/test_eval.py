"""`mova eval` without Ray: scores against hand-computed values, reading benchmark files,
recipe checks, batch prediction with bad rows, and the HTTP client's retries."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from pipelines.cli import build_parser
from pipelines.common.manifests.validate import check_row, read_rows, write_manifest
from pipelines.data.benchmarks import convert_gqa
from pipelines.evaluate.http import ask_endpoint, openai_client, to_messages
from pipelines.evaluate.items import item_of
from pipelines.evaluate.job import run_eval
from pipelines.evaluate.recipe import BenchmarkSpec, EvalRecipe
from pipelines.evaluate.report import build_records
from pipelines.evaluate.scoring import (
    activation_markdown,
    activation_table,
    benchmark_kind,
    sample_score,
    score_all,
    score_benchmark,
    scores_markdown,
)
from pipelines.evaluate.workers import predict_batch


def _rec(pred, answers, metric, domain=None, error=None, meta=None, experts=(), bench="b"):
    return {"benchmark": bench, "id": f"{bench}-{pred}-{domain}", "domain": domain,
            "prediction": pred, "answers": list(answers), "metric": metric, "error": error,
            "meta": meta or {}, "experts": None if error else list(experts)}


# ---- hand-computed fixtures ----------------------------------------------------------------

MIXED = [
    # 2 of 10 annotators said "red": leave-one-out mean (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    _rec("Red.", ["red"] * 2 + ["dark red"] * 8, "vqa_accuracy", "scenes"),
    _rec("two", ["2"], "vqa_accuracy", "scenes"),  # number word normalised: 1.0
    _rec("invoice", ["Invoice."], "anls", "documents"),  # 1 - 1/8 = 0.875
    _rec("abc", ["xyz"], "anls", "documents"),  # similarity 0 < 0.5: 0
    _rec("10.4", ["10"], "relaxed_accuracy", "charts"),  # 4% off: 1
    _rec("11", ["10"], "relaxed_accuracy", "charts"),  # 10% off: 0
    _rec("Dog.", ["dog"], "exact_match", "biomedical"),  # case and final period: 1
]
MIXED_SCORES = [0.6, 1.0, 0.875, 0.0, 1.0, 0.0, 1.0]


def test_per_sample_scores_match_hand_computed():
    for record, expected in zip(MIXED, MIXED_SCORES, strict=True):
        assert sample_score(record) == pytest.approx(expected)
    failed = _rec("", ["x"], "exact_match", error="image: broken")
    assert sample_score(failed, "empty") == 0.0
    assert sample_score(failed, "skip") is None


def test_mixed_benchmark_mean_and_breakdowns():
    s = score_benchmark("synth", MIXED)
    assert (s.kind, s.metric, s.headline, s.unit) == ("mean", "mixed", "mixed", "fraction")
    assert s.score == pytest.approx(4.475 / 7)
    assert (s.questions, s.scored, s.errors) == (7, 7, 0)
    assert s.details == pytest.approx({
        "domain/biomedical": 1.0, "domain/charts": 0.5, "domain/documents": 0.4375,
        "domain/scenes": 0.8, "metric/anls": 0.4375, "metric/exact_match": 1.0,
        "metric/relaxed_accuracy": 0.5, "metric/vqa_accuracy": 0.8})


def test_single_metric_benchmark_with_a_failed_question():
    rows = MIXED[:2] + [_rec("", ["blue"], "vqa_accuracy", "scenes", error="image: gone")]
    empty = score_benchmark("vqav2", rows, "empty")
    assert (empty.headline, empty.scored, empty.errors) == ("vqa_accuracy", 3, 1)
    assert empty.score == pytest.approx(1.6 / 3)
    skip = score_benchmark("vqav2", rows, "skip")
    assert (skip.scored, skip.errors) == (2, 1)
    assert skip.score == pytest.approx(0.8)
    only_failed = score_benchmark("vqav2", rows[2:], "skip")
    assert (only_failed.score, only_failed.scored) == (0.0, 0)


def _pope(pred, label, category, error=None):
    return _rec(pred, [label], "exact_match", error=error, bench="pope",
                meta={"benchmark": "pope", "label": label, "category": category})


POPE = [
    _pope("Yes, there is a dog.", "yes", "adversarial"),  # TP
    _pope("No", "yes", "adversarial"),  # FN
    _pope("yes", "no", "adversarial"),  # FP
    _pope("Yes", "no", "adversarial"),  # FP
    _pope("I cannot tell", "no", "adversarial"),  # unparsable -> "no": TN
    _pope("Yes", "yes", "random"),  # TP
    _pope("yes", "yes", "random"),  # TP
    _pope("There is no cat", "no", "random"),  # negation -> "no": TN
]


def test_pope_scores_hand_computed():
    s = score_benchmark("pope", POPE)
    assert (s.kind, s.headline) == ("pope", "f1")
    # adversarial: TP1 FP2 FN1 TN1 -> P 1/3, R 1/2, F1 0.4; random: F1 1.0; headline mean
    assert s.details["adversarial/f1"] == pytest.approx(0.4)
    assert s.details["adversarial/accuracy"] == pytest.approx(0.4)
    assert s.details["random/f1"] == pytest.approx(1.0)
    assert s.score == pytest.approx(0.7)
    # overall: TP3 FP2 FN1 TN2 -> P 0.6, R 0.75, F1 2/3, accuracy 5/8, yes ratio 5/8
    assert s.details["f1"] == pytest.approx(2 / 3)
    assert s.details["precision"] == pytest.approx(0.6)
    assert s.details["recall"] == pytest.approx(0.75)
    assert s.details["accuracy"] == pytest.approx(5 / 8)
    assert s.details["yes_ratio"] == pytest.approx(5 / 8)
    assert (s.details["tp"], s.details["fp"], s.details["tn"], s.details["fn"],
            s.details["unparsable"]) == (3, 2, 2, 1, 1)
    # a failed question scored as an empty answer counts as "no" (the POPE convention)
    failed = POPE + [_pope("", "no", "random", error="image: broken")]
    assert score_benchmark("pope", failed, "empty").details["random/accuracy"] == 1.0
    assert score_benchmark("pope", failed, "skip").scored == 8
    # without categories the headline is the overall F1
    plain = [dict(r, meta={"benchmark": "pope", "label": r["answers"][0]}) for r in POPE]
    assert score_benchmark("pope", plain).score == pytest.approx(2 / 3)


def _mme(pred, label, category, image):
    return _rec(pred, [label], "exact_match", bench="mme",
                meta={"benchmark": "mme", "label": label, "category": category,
                      "image_id": image})


MME = [
    _mme("Yes", "yes", "existence", "a.png"), _mme("No", "no", "existence", "a.png"),
    _mme("Yes", "yes", "existence", "b.png"), _mme("Yes", "no", "existence", "b.png"),
    _mme("No", "yes", "count", "c.png"), _mme("No", "no", "count", "c.png"),
    _mme("yes", "yes", "commonsense_reasoning", "d.png"),
    _mme("no", "no", "commonsense_reasoning", "d.png"),
]


def test_mme_scores_hand_computed():
    s = score_benchmark("mme", MME)
    assert (s.kind, s.headline, s.unit) == ("mme", "perception", "points")
    # existence: acc 3/4 = 75, acc+ 1/2 images = 50 -> 125; count: 50 + 0; reasoning: 200
    assert s.details["existence/acc"] == pytest.approx(75.0)
    assert s.details["existence/acc_plus"] == pytest.approx(50.0)
    assert s.details["existence/score"] == pytest.approx(125.0)
    assert s.details["count/score"] == pytest.approx(50.0)
    assert s.details["commonsense_reasoning/score"] == pytest.approx(200.0)
    assert s.score == s.details["perception"] == pytest.approx(175.0)
    assert s.details["cognition"] == pytest.approx(200.0)
    bad = [dict(r, meta={"benchmark": "mme", "label": "yes"}) for r in MME]
    with pytest.raises(ValueError, match="MME rows need meta"):
        score_benchmark("mme", bad)


def test_benchmark_kind_needs_every_row():
    assert benchmark_kind(POPE) == "pope"
    assert benchmark_kind(POPE + MIXED[:1]) == "mean"
    assert set(score_all(MIXED + POPE + MME)) == {"b", "pope", "mme"}


def test_activation_table_hand_computed():
    pool = ["dinov2", "vary", "sam"]
    rows = [_rec("x", ["x"], "exact_match", "d1", experts=["dinov2", "vary"]),
            _rec("y", ["x"], "exact_match", "d1", experts=["dinov2"]),
            _rec("z", ["x"], "exact_match", "d2", experts=[]),
            _rec("", ["x"], "exact_match", "d2", error="image: broken"),
            _rec("w", ["x"], "exact_match", "d2", experts=["vary", "sam"])]
    table = activation_table(rows, pool)
    assert list(table) == ["b", "b/d1", "b/d2"]
    assert table["b"] == pytest.approx({"dinov2": 0.5, "vary": 0.5, "sam": 0.25,
                                        "experts/q": 1.25})
    assert table["b/d1"] == pytest.approx({"dinov2": 1.0, "vary": 0.5, "sam": 0.0,
                                           "experts/q": 1.5})
    assert table["b/d2"] == pytest.approx({"dinov2": 0.0, "vary": 0.5, "sam": 0.5,
                                           "experts/q": 1.0})
    text = activation_markdown(table, pool)
    assert "| b/d1 | 100.0 | 50.0 | 0.0 | 1.50 |" in text


def test_markdown_tables():
    text = scores_markdown(score_all(MIXED[:2] + POPE + MME))
    assert "| b | vqa_accuracy | 80.0 | 2 | 2 | 0 |" in text
    assert "| pope | f1 | 70.0 | 8 | 8 | 0 |" in text
    assert "| mme | perception | 175.0 | 8 | 8 | 0 |" in text
    assert "cognition 200.0" in text and "tp 3" in text


# ---- benchmark files -----------------------------------------------------------------------


def _items(path, name, metric=None, routing="model", pool=None):
    """The questions of a (small) benchmark file, as the eval job's stream makes them."""
    samples = [check_row(row, line, None, str(path))[0] for line, row in read_rows(str(path))]
    items = [item_of(s, str(path), name, metric, routing, pool) for s in samples]
    return [i for i in items if i is not None]


def test_items_from_converter_output(tmp_path, png_file):
    png_file(tmp_path / "gqa" / "img1.jpg")
    src = tmp_path / "gqa" / "questions.json"
    src.write_text(json.dumps({"q1": {"imageId": "img1", "question": "Is it green?",
                                      "answer": "yes"},
                               "q2": {"imageId": "img1", "question": "What colour?",
                                      "answer": "green"}}))
    out = tmp_path / "bench" / "gqa.jsonl"
    convert_gqa(str(src), str(out))
    items = _items(out, "gqa")
    assert [i.id for i in items] == ["q1", "q2"]
    first = items[0]
    assert first.image == str(tmp_path / "gqa" / "img1.jpg")
    assert first.turns[-1]["value"].startswith("<image>\nIs it green?\n")
    assert first.question.startswith("Is it green?")
    assert (first.answers, first.metric, first.meta["benchmark"]) == (["yes"], "exact_match",
                                                                      "gqa")
    with pytest.raises(ValueError, match="routing=label needs a routing label"):
        _items(out, "gqa", routing="label")


def test_items_from_training_style_rows(tmp_path, png_file):
    """Synth-style rows: answers/metric on the row; a bare Q/A row takes the gpt turn as its
    reference and the entry's metric; routing-instruction rows are skipped."""
    png_file(tmp_path / "a.png")
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A"}]
    path = tmp_path / "m.jsonl"
    write_manifest([
        {"id": "s1", "image": "a.png", "conversations": turns, "answers": ["A", "a"],
         "metric": "anls", "domain": "documents", "experts": ["vary"]},
        {"id": "r1", "image": "a.png", "conversations": turns, "kind": "routing",
         "experts": ["vary"]},
        {"id": "s2", "image": "a.png", "conversations": turns},
    ], str(path))
    with pytest.raises(ValueError, match="row 's2': no metric"):
        _items(path, "m")
    with pytest.raises(ValueError, match=r"routing label \['vary'\] is not in the model's"):
        _items(path, "m", "exact_match", routing="label", pool=["sam"])
    items = _items(path, "m", "exact_match")
    assert [(i.id, i.answers, i.metric) for i in items] == [
        ("s1", ["A", "a"], "anls"), ("s2", ["A"], "exact_match")]
    assert items[0].turns == turns[:1] and items[0].experts == ["vary"]
    assert items[0].domain == "documents"


def test_recipe_validation():
    spec = [BenchmarkSpec(name="a", path="a.jsonl")]
    ok = EvalRecipe(checkpoint="c", benchmarks=spec, output="o").validate()
    assert ok.routing == "model" and ok.on_error == "empty"
    cases = [
        ({"endpoint": "http://x"}, "exactly one of checkpoint"),
        ({"checkpoint": "", "endpoint": "x:80"}, "http:// or https://"),
        ({"benchmarks": []}, "benchmarks is empty"),
        ({"benchmarks": spec + spec}, "appears twice"),
        ({"benchmarks": [BenchmarkSpec(name="a b", path="p")]}, "name='a b'"),
        ({"benchmarks": [BenchmarkSpec(name="a", path="p", metric="bleu")]}, "metric='bleu'"),
        ({"benchmarks": [BenchmarkSpec(name="a", path="p", limit=0)]}, "limit must be"),
        ({"routing": "oracle"}, "routing='oracle'"),
        ({"experts": ["vary"]}, "experts is for routing=forced"),
        ({"on_error": "ignore"}, "on_error='ignore'"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"output": ""}, "output must be set"),
    ]
    for changes, message in cases:
        fields = {"checkpoint": "c", "benchmarks": spec, "output": "o", **changes}
        with pytest.raises(ValueError, match=message):
            EvalRecipe(**fields).validate()


def test_missing_inputs_fail_before_any_work(tmp_path, monkeypatch, png_file):
    from pipelines.evaluate import job as evaluate

    def no_work(*args, **kwargs):
        raise AssertionError("inference started despite bad inputs")

    monkeypatch.setattr(evaluate, "_pipeline", no_work)
    good = Path(png_file(tmp_path / "a.png"))
    bench = tmp_path / "b.jsonl"
    write_manifest([{"id": "s", "image": good.name, "answers": ["x"], "metric": "exact_match",
                     "conversations": [{"from": "human", "value": "<image>\nQ?"},
                                       {"from": "gpt", "value": "x"}]}], str(bench))
    spec = [BenchmarkSpec(name="b", path=str(bench))]
    with pytest.raises(ValueError, match="checkpoint folder not found: .*nockpt"):
        run_eval(EvalRecipe(checkpoint=str(tmp_path / "nockpt"), benchmarks=spec,
                            output=str(tmp_path / "out")))
    missing = [BenchmarkSpec(name="b", path=str(tmp_path / "missing.jsonl"))]
    with pytest.raises(FileNotFoundError, match="benchmark 'b': file not found: .*missing"):
        run_eval(EvalRecipe(endpoint="http://127.0.0.1:9", benchmarks=missing,
                            output=str(tmp_path / "out")))
    with pytest.raises(ValueError, match="cannot be reached"):
        run_eval(EvalRecipe(endpoint="http://127.0.0.1:9", benchmarks=spec,
                            output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


# ---- batch prediction with a fake model -----------------------------------------------------


class _Result:
    def __init__(self, answer, experts):
        self.answer, self.experts, self.routing_reply = answer, experts, "A"


class _FakeModel:
    """Answers with the question's last word; refuses questions containing 'LONG'."""

    def __init__(self):
        self.calls = []

    def generate(self, images, questions, experts=None, **kwargs):
        self.calls.append((len(images), experts, kwargs))
        if any("LONG" in q[-1]["value"] for q in questions):
            raise ValueError("prompt too long")
        return [_Result(q[-1]["value"].split()[-1], e or ["vary"])
                for q, e in zip(questions, experts or [None] * len(questions), strict=True)]


def test_predict_batch_isolates_bad_rows(tmp_path, png_file):
    good = str(png_file(tmp_path / "a.png"))
    broken = tmp_path / "bad.png"
    broken.write_bytes(b"not an image")
    turns = [[{"from": "human", "value": f"<image>\nsay {w}"}] for w in ("one", "two", "LONG",
                                                                       "four")]
    model = _FakeModel()
    out = predict_batch(model, [good, str(broken), good, good], turns, [None] * 4, 5)
    assert [r["prediction"] for r in out] == ["one", "", "", "four"]
    assert out[1]["error"].startswith(f"image {broken}: ")
    assert "cannot be decoded" in out[1]["error"]
    assert out[2]["error"] == "model: prompt too long"
    assert out[0]["experts"] == ["vary"] and out[0]["forced"] is False
    assert model.calls[0] == (3, None, {"max_new_tokens": 5, "do_sample": False})
    forced = predict_batch(model, [good], turns[:1], [["sam"]], 5)
    assert forced[0]["experts"] == ["sam"] and forced[0]["forced"] is True
    missing = predict_batch(model, [str(tmp_path / "gone.png")], turns[:1], [None], 5)
    assert "no such file" in missing[0]["error"]


def test_build_records_scores_each_row(tmp_path):
    from pipelines.evaluate.items import EvalItem

    items = [EvalItem("b", "1", "i.png", [{"from": "human", "value": "<image>\nQ one?"}],
                      ["yes"], "exact_match"),
             EvalItem("b", "2", "i.png", [{"from": "human", "value": "<image>\nQ two?"}],
                      ["no"], "exact_match")]
    results = [{"prediction": "Yes.", "experts": ["sam"], "routing_reply": "G", "error": None},
               {"prediction": "", "experts": None, "error": "image: x"}]
    records = build_records(items, results, "empty")
    assert [r["score"] for r in records] == [1.0, 0.0]
    assert records[0]["question"] == "Q one?" and records[0]["experts"] == ["sam"]
    assert build_records(items, results, "skip")[1]["score"] is None


# ---- HTTP client ---------------------------------------------------------------------------


def test_to_messages_moves_the_image_out_of_the_text():
    turns = [{"from": "system", "value": "Be brief."},
             {"from": "human", "value": "<image>\nWhat is it?\nAnswer briefly."},
             {"from": "gpt", "value": "A cat."}, {"from": "human", "value": "Colour?"}]
    messages = to_messages(turns, "data:image/png;base64,AAAA")
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1]["role"] == "user"
    assert messages[1]["content"] == [
        {"type": "text", "text": "What is it?\nAnswer briefly."},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    assert messages[2:] == [{"role": "assistant", "content": "A cat."},
                            {"role": "user", "content": "Colour?"}]


def _client(handler, max_retries: int = 0):
    return openai_client("http://x/", None, max_retries=max_retries,
                         http_client=httpx.Client(transport=httpx.MockTransport(handler)))


def test_overload_is_retried_after_retry_after_by_the_openai_client(tmp_path, png_file):
    image = str(png_file(tmp_path / "a.png"))
    turns = [{"from": "human", "value": "<image>\nColour?"}]
    answers = [httpx.Response(503, headers={"retry-after-ms": "20"}, text="busy"),
               httpx.Response(200, json={"id": "c", "object": "chat.completion", "created": 0,
                                         "model": "mova", "choices": [{
                                             "index": 0, "finish_reason": "stop",
                                             "message": {"role": "assistant",
                                                         "content": "ok"}}]})]
    seen = []

    def handler(request):
        seen.append(request.url.path)
        return answers.pop(0)

    out = ask_endpoint(_client(handler, max_retries=3), model="m", image=image, turns=turns,
                       experts=None, max_new_tokens=4)
    assert out["prediction"] == "ok" and out["error"] is None
    assert seen == ["/v1/chat/completions"] * 2

    def refuse(request):
        seen.append("refused")
        return httpx.Response(400, json={"error": {"message": "bad field", "type": "x"}})

    seen.clear()
    out = ask_endpoint(_client(refuse, max_retries=3), model="m", image=image, turns=turns,
                       experts=None, max_new_tokens=4)
    assert out["error"] == "request: HTTP 400: bad field" and seen == ["refused"]

    def always_busy(request):
        seen.append("busy")
        return httpx.Response(503, headers={"retry-after-ms": "5"})

    seen.clear()
    out = ask_endpoint(_client(always_busy, max_retries=2), model="m", image=image,
                       turns=turns, experts=None, max_new_tokens=4)
    assert out["error"].startswith("request: HTTP 503") and seen == ["busy"] * 3


def test_ask_endpoint_sends_image_and_routing(tmp_path, png_file):
    image = str(png_file(tmp_path / "a.png"))
    sent = []

    def handler(request):
        sent.append(json.loads(request.content))
        return httpx.Response(200, json={
            "id": "c", "object": "chat.completion", "created": 0, "model": "mova",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": " Green "}}],
            "mova": {"experts": ["vary"], "forced": True, "routing_reply": None,
                     "pool": ["vary", "sam"], "vision_ms": 3.5}})

    client = _client(handler)
    turns = [{"from": "human", "value": "<image>\nColour?"}]
    out = ask_endpoint(client, model="mova", image=image, turns=turns, experts=["vary"],
                       max_new_tokens=7)
    assert out == {"prediction": "Green", "experts": ["vary"], "routing_reply": None,
                   "forced": True, "pool": ["vary", "sam"], "error": None}
    body = sent[0]
    assert (body["model"], body["max_tokens"], body["temperature"]) == ("mova", 7, 0)
    assert body["mova"] == {"experts": ["vary"]}
    url = body["messages"][0]["content"][1]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    broken = tmp_path / "bad.png"
    broken.write_bytes(b"junk")
    out = ask_endpoint(client, model="mova", image=str(broken), turns=turns, experts=None,
                       max_new_tokens=7)
    assert out["error"].startswith(f"image {broken}: ") and len(sent) == 1


def test_cli_has_eval():
    args = build_parser("eval").parse_args(["eval", "--config", "jobs/eval.yaml", "workers=2"])
    assert args.command == "eval" and args.overrides == ["workers=2"]
