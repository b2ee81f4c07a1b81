"""Benchmark converters: tiny hand-written files in each public format -> valid manifests."""

from __future__ import annotations

import argparse
import json
import os
import sys
import types

import pytest

from mova.metrics import METRICS, mme_scores, pope_scores, score
from pipelines.common.manifests.validate import load_manifest, resolve_image
from pipelines.data import cli as data_cli
from pipelines.data.benchmarks import (
    BENCHMARK_CONVERTERS,
    BENCHMARK_METRICS,
    PROMPT_SUFFIXES,
    SHORT_ANSWER,
    YES_OR_NO,
    build_prompt,
    convert_benchmark,
    convert_chartqa,
    convert_docvqa,
    convert_easyvqa,
    convert_gqa,
    convert_mme,
    convert_pope,
    convert_textvqa,
    convert_vqav2,
)


def _dump(path, data) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return str(path)


def _load(out) -> dict:
    """The manifest's samples by id, after full validation (images must exist and decode)."""
    return {s.id: s for s in load_manifest(str(out), check_images=True)}


def _human(sample) -> str:
    return sample.conversations[0]["value"]


def test_registry_prompts_and_metrics_are_consistent():
    assert set(BENCHMARK_CONVERTERS) == set(PROMPT_SUFFIXES) == set(BENCHMARK_METRICS)
    assert set(BENCHMARK_METRICS.values()) <= set(METRICS)
    assert build_prompt("gqa", "Is it red?") == f"<image>\nIs it red?\n{SHORT_ANSWER}"
    # MME questions already carry the suffix: it is not added twice
    assert build_prompt("mme", f"Is it red? {YES_OR_NO}") == f"<image>\nIs it red? {YES_OR_NO}"
    with pytest.raises(ValueError, match="unknown 'nope'"):
        build_prompt("nope", "q")
    with pytest.raises(ValueError, match="unknown 'nope'"):
        convert_benchmark("nope", "x", "y.jsonl")


def test_vqav2(tmp_path, png_file):
    png_file(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg", 8)
    png_file(tmp_path / "val2014" / "COCO_val2014_000000000007.jpg", 8)
    q = _dump(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", {
        "data_subtype": "val2014",
        "questions": [{"image_id": 42, "question": "What color?", "question_id": 420},
                      {"image_id": 7, "question": "How many?", "question_id": 70}]})
    answers = ["red"] * 6 + ["dark red"] * 4
    _dump(tmp_path / "v2_mscoco_val2014_annotations.json", {"annotations": [
        {"question_id": 70, "answers": [{"answer": "2"}] * 10, "multiple_choice_answer": "2"},
        {"question_id": 420, "answers": [{"answer": a, "answer_id": i}
                                         for i, a in enumerate(answers)],
         "multiple_choice_answer": "red"}]})
    out = tmp_path / "out" / "vqav2.jsonl"
    # the annotations file is found by its official sibling name
    assert convert_vqav2(q, str(out), image_root=str(tmp_path / "val2014")) == 2
    samples = _load(out)
    s = samples["420"]
    assert s.image == "../val2014/COCO_val2014_000000000042.jpg"
    assert s.answers == answers and s.metric == "vqa_accuracy"
    assert s.conversations[1]["value"] == "red"
    assert _human(s) == f"<image>\nWhat color?\n{SHORT_ANSWER}"
    assert s.meta == {"benchmark": "vqav2", "question": "What color?", "question_id": 420,
                      "image_id": 42}
    assert score(s.metric, "Red", s.answers) == 1.0
    assert samples["70"].answers == ["2"] * 10


def test_vqav2_missing_annotations_and_unknown_question(tmp_path):
    q = _dump(tmp_path / "qs.json", {"questions": [
        {"image_id": 1, "question": "Q?", "question_id": 1}]})
    with pytest.raises(ValueError, match="--annotations"):
        convert_vqav2(q, str(tmp_path / "o.jsonl"))
    ann = _dump(tmp_path / "ann.json", {"annotations": []})
    with pytest.raises(ValueError, match="question_id 1 has no entry"):
        convert_vqav2(q, str(tmp_path / "o.jsonl"), annotations=ann)
    assert not (tmp_path / "o.jsonl").exists()


def test_textvqa(tmp_path, png_file):
    png_file(tmp_path / "train_images" / "abc123.jpg", 8)
    src = _dump(tmp_path / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
        {"question_id": 34602, "question": "what brand?", "image_id": "abc123",
         "answers": ["nokia"] * 7 + ["Nokia phone"] * 3}]})
    out = tmp_path / "m" / "textvqa.jsonl"
    assert convert_textvqa(src, str(out), image_root=str(tmp_path / "train_images")) == 1
    s = _load(out)["34602"]
    assert s.image == "../train_images/abc123.jpg"
    assert s.metric == "vqa_accuracy" and len(s.answers) == 10
    assert s.conversations[1]["value"] == "nokia"
    assert _human(s).endswith(f"what brand?\n{SHORT_ANSWER}")
    assert s.meta["image_id"] == "abc123" and s.meta["question"] == "what brand?"


def test_docvqa(tmp_path, png_file):
    png_file(tmp_path / "val" / "documents" / "pybv0228_81.png", 8)
    src = _dump(tmp_path / "val" / "val_v1.0.json", {"dataset_split": "val", "data": [
        {"questionId": 52212, "question": "What is the date?", "docId": 1968,
         "image": "documents/pybv0228_81.png", "answers": ["1/8/93", "January 8, 1993"]}]})
    out = tmp_path / "docvqa.parquet"
    assert convert_docvqa(src, str(out)) == 1  # image paths relative to the JSON's folder
    s = _load(out)["52212"]
    assert s.image == "val/documents/pybv0228_81.png"
    assert s.metric == "anls" and s.answers == ["1/8/93", "January 8, 1993"]
    assert s.meta["doc_id"] == 1968
    assert score("anls", "january 8, 1993", s.answers) == 1.0


def test_chartqa(tmp_path, png_file):
    png_file(tmp_path / "test" / "png" / "41699051005347.png", 8)
    png_file(tmp_path / "test" / "png" / "multi_col_1.png", 8)
    src = _dump(tmp_path / "test" / "test_human.json", [
        {"imgname": "41699051005347.png", "query": "What is the peak value?", "label": "57"},
        {"imgname": "multi_col_1.png", "query": "Which is larger?", "label": 12.5}])
    out = tmp_path / "test" / "chartqa.jsonl"
    assert convert_chartqa(src, str(out)) == 2  # images default to <json folder>/png
    samples = _load(out)
    assert sorted(samples) == ["test_human-0", "test_human-1"]
    s = samples["test_human-0"]
    assert s.image == "png/41699051005347.png" and s.answers == ["57"]
    assert s.metric == "relaxed_accuracy" and score(s.metric, "58", s.answers) == 1.0
    assert samples["test_human-1"].answers == ["12.5"]  # a numeric label becomes text


def test_gqa(tmp_path, png_file):
    png_file(tmp_path / "images" / "n161313.jpg", 8)
    src = _dump(tmp_path / "testdev_balanced_questions.json", {
        "201307251": {"imageId": "n161313", "question": "Is it a truck?", "answer": "no",
                      "fullAnswer": "No, it is a car."}})
    out = tmp_path / "gqa.jsonl"
    assert convert_gqa(src, str(out), image_root=str(tmp_path / "images")) == 1
    s = _load(out)["201307251"]
    assert s.image == "images/n161313.jpg" and s.answers == ["no"]
    assert s.metric == "exact_match"
    assert s.meta == {"benchmark": "gqa", "question": "Is it a truck?",
                      "question_id": "201307251", "image_id": "n161313"}
    with pytest.raises(ValueError, match="expected a JSON object"):
        convert_gqa(_dump(tmp_path / "bad.json", []), str(out))


def _pope_file(path, labels) -> str:
    lines = [json.dumps({"question_id": i + 1, "image": "COCO_val2014_000000000001.jpg",
                         "text": f"Is there a dog number {i} in the image?", "label": lab})
             for i, lab in enumerate(labels)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_pope_file_and_folder(tmp_path, png_file):
    images = tmp_path / "val2014"
    png_file(images / "COCO_val2014_000000000001.jpg", 8)
    _pope_file(tmp_path / "pope" / "coco_pope_adversarial.json", ["yes", "no"])
    _pope_file(tmp_path / "pope" / "coco_pope_random.json", ["No", "yes"])
    out = tmp_path / "pope.jsonl"
    assert convert_pope(str(tmp_path / "pope"), str(out), image_root=str(images)) == 4
    samples = _load(out)
    assert sorted(samples) == ["adversarial-1", "adversarial-2", "random-1", "random-2"]
    s = samples["random-1"]
    assert s.answers == ["no"] and s.metric == "exact_match"
    assert _human(s) == f"<image>\nIs there a dog number 0 in the image?\n{YES_OR_NO}"
    assert s.image == "val2014/COCO_val2014_000000000001.jpg"
    assert s.meta["benchmark"] == "pope" and s.meta["category"] == "random"
    # what evaluation does with it: POPE P/R/F1 from the labels in meta
    labels = [samples[k].meta["label"] for k in sorted(samples)]
    assert pope_scores(["Yes.", "No", "no", "yes"], labels)["accuracy"] == 1.0
    one = tmp_path / "one.jsonl"
    assert convert_pope(str(tmp_path / "pope" / "coco_pope_random.json"), str(one),
                        image_root=str(images)) == 2


def test_pope_bad_label(tmp_path):
    src = _pope_file(tmp_path / "coco_pope_popular.json", ["maybe"])
    with pytest.raises(ValueError, match=r"line 1: label 'maybe'"):
        convert_pope(src, str(tmp_path / "o.jsonl"))


def _mme_tree(png_file, root) -> None:
    # nested layout: <category>/images + <category>/questions_answers_YN
    png_file(root / "artwork" / "images" / "10002.jpg", 8)
    qa = root / "artwork" / "questions_answers_YN" / "10002.txt"
    qa.parent.mkdir(parents=True)
    qa.write_text(f"Is this by Monet? {YES_OR_NO}\tYes\nIs this by Dali? {YES_OR_NO}\tNo\n")
    # flat layout: <category>/x.png next to <category>/x.txt
    png_file(root / "code_reasoning" / "0020.png", 8)
    (root / "code_reasoning" / "0020.txt").write_text(
        f"Does it print 3? {YES_OR_NO}\tYes\r\nDoes it print 4? {YES_OR_NO}\tNo\r\n")
    (root / "eval_tool" / "Your_Results").mkdir(parents=True)
    (root / "eval_tool" / "Your_Results" / "OCR.txt").write_text("a.jpg\tq\tYes\n")
    (root / "readme.txt").write_text("MME")


def test_mme_both_layouts(tmp_path, png_file):
    _mme_tree(png_file, tmp_path / "MME")
    out = tmp_path / "mme.jsonl"
    assert convert_mme(str(tmp_path / "MME"), str(out)) == 4
    samples = _load(out)
    assert sorted(samples) == ["artwork-10002-1", "artwork-10002-2", "code_reasoning-0020-1",
                               "code_reasoning-0020-2"]
    s = samples["artwork-10002-2"]
    assert s.image == "MME/artwork/images/10002.jpg"
    assert s.answers == ["no"] and s.metric == "exact_match"
    assert _human(s) == f"<image>\nIs this by Dali? {YES_OR_NO}"
    assert s.meta == {"benchmark": "mme", "question": f"Is this by Dali? {YES_OR_NO}",
                      "category": "artwork", "image_id": "10002.jpg", "label": "no"}
    assert samples["code_reasoning-0020-1"].image == "MME/code_reasoning/0020.png"
    records = [{**s.meta, "prediction": s.answers[0]} for s in samples.values()]
    result = mme_scores(records)
    assert result["artwork"]["score"] == 200.0 and result["code_reasoning"]["images"] == 1


def test_mme_errors(tmp_path, png_file):
    with pytest.raises(ValueError, match="no MME question files"):
        convert_mme(str(tmp_path), str(tmp_path / "o.jsonl"))
    bad = tmp_path / "MME" / "count" / "questions_answers_YN" / "1.txt"
    bad.parent.mkdir(parents=True)
    bad.write_text("no tab here\n")
    with pytest.raises(ValueError, match="no image 1"):
        convert_mme(str(tmp_path / "MME"), str(tmp_path / "o.jsonl"))
    png_file(tmp_path / "MME" / "count" / "images" / "1.png", 8)
    with pytest.raises(ValueError, match="line 1: expected 'question<TAB>answer'"):
        convert_mme(str(tmp_path / "MME"), str(tmp_path / "o.jsonl"))
    with pytest.raises(ValueError, match="image_root"):
        convert_mme(str(tmp_path / "MME"), str(tmp_path / "o.jsonl"), image_root="x")


def _fake_easy_vqa(png_file, tmp_path) -> types.ModuleType:
    paths = {i: png_file(tmp_path / "pkg" / split / f"{i}.png", 8) for split in ("train", "test")
             for i in range(3)}
    module = types.ModuleType("easy_vqa")
    module.get_test_questions = lambda: (
        ["What shape is in the image?", "Is there a red shape?", "What color is the shape?"],
        ["circle", "yes", "blue"], [2, 0, 1])
    module.get_test_image_paths = lambda: {i: p for i, p in paths.items()}
    module.get_train_questions = lambda: (["Is it a square?"], ["no"], [1])
    module.get_train_image_paths = lambda: dict(paths)
    return module


def test_easyvqa_with_a_fake_package(tmp_path, monkeypatch, png_file):
    monkeypatch.setitem(sys.modules, "easy_vqa", _fake_easy_vqa(png_file, tmp_path))
    out = tmp_path / "out" / "easyvqa.jsonl"
    assert convert_easyvqa(None, str(out), limit=2) == 2
    samples = _load(out)
    assert sorted(samples) == ["easyvqa-test-0", "easyvqa-test-1"]
    s = samples["easyvqa-test-0"]
    assert os.path.isabs(s.image) and s.image == str(tmp_path / "pkg" / "test" / "2.png")
    assert s.answers == ["circle"] and s.metric == "exact_match"
    assert _human(s) == f"<image>\nWhat shape is in the image?\n{SHORT_ANSWER}"
    assert s.meta == {"benchmark": "easyvqa", "question": "What shape is in the image?",
                      "split": "test", "image_id": 2}
    assert convert_benchmark("easyvqa", None, str(out), split="train") == 1
    assert _load(out)["easyvqa-train-0"].answers == ["no"]
    with pytest.raises(ValueError, match="split: expected one of"):
        convert_easyvqa(None, str(out), split="val")
    with pytest.raises(ValueError, match="contradicts"):
        convert_easyvqa("train", str(out), split="test")


def test_easyvqa_missing_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "easy_vqa", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install easy-vqa"):
        convert_easyvqa(None, str(tmp_path / "o.jsonl"))


def test_easyvqa_real_package(tmp_path):
    pytest.importorskip("easy_vqa", reason="easy-vqa is not installed (pip install easy-vqa)")
    out = tmp_path / "easyvqa.jsonl"
    assert convert_easyvqa("test", str(out), limit=5) == 5
    assert len(_load(out)) == 5


def _cli(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    data_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_dispatches_benchmarks(tmp_path, monkeypatch, capsys, png_file):
    png_file(tmp_path / "images" / "n1.jpg", 8)
    src = _dump(tmp_path / "gqa.json", {"q1": {"imageId": "n1", "question": "Q?",
                                               "answer": "yes"}})
    out = tmp_path / "gqa.jsonl"
    args = _cli(["data", "convert", "gqa", src, str(out), "--image-root",
                 str(tmp_path / "images")])
    assert args.func(args) == 0
    assert "wrote 1 sample(s)" in capsys.readouterr().out
    assert _load(out)["q1"].meta["benchmark"] == "gqa"

    _mme_tree(png_file, tmp_path / "MME")
    args = _cli(["data", "convert", "mme", str(tmp_path / "MME"), str(tmp_path / "mme.jsonl")])
    assert args.func(args) == 0 and len(_load(tmp_path / "mme.jsonl")) == 4

    monkeypatch.setitem(sys.modules, "easy_vqa", _fake_easy_vqa(png_file, tmp_path))
    args = _cli(["data", "convert", "easyvqa", "test", str(tmp_path / "e.jsonl"),
                 "--limit", "1"])
    assert args.func(args) == 0 and list(_load(tmp_path / "e.jsonl")) == ["easyvqa-test-0"]
    monkeypatch.setitem(sys.modules, "easy_vqa", None)
    assert args.func(args) == 2
    assert "pip install easy-vqa" in capsys.readouterr().err


def test_resolved_image_paths_point_at_the_files(tmp_path, png_file):
    png_file(tmp_path / "imgs" / "a.jpg", 8)
    src = _dump(tmp_path / "src" / "t.json", {"data": [
        {"question_id": 1, "question": "Q?", "image_id": "a", "answers": ["x"]}]})
    out = tmp_path / "deep" / "er" / "t.jsonl"
    convert_textvqa(src, str(out), image_root=str(tmp_path / "imgs"))
    s = _load(out)["1"]
    assert os.path.samefile(resolve_image(str(out), s.image), tmp_path / "imgs" / "a.jpg")
