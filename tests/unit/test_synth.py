"""The synthetic data set: determinism, counts, schema, images and re-checkable answers."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mova.conversation import validate_turns
from mova.experts.registry import DEFAULT_POOL
from mova.images import load_image
from mova.routing import parse_routing
from pipelines.common.manifests.schema import FIELDS, KINDS, Sample
from pipelines.data import render
from pipelines.data.synth import SynthRecipe, generate
from pipelines.data.synth_domains import DOMAINS, LABELS, answer_from_meta

JOBS = Path(__file__).resolve().parents[2] / "jobs"

SIZE = 80
PER_DOMAIN, TEST_PER_DOMAIN, ROUTING = 8, 4, 12


def _config(out: Path, **changes) -> SynthRecipe:
    base = SynthRecipe(out=str(out), seed=3, per_domain=PER_DOMAIN,
                       test_per_domain=TEST_PER_DOMAIN, image_size=SIZE,
                       routing_samples=ROUTING)
    return dataclasses.replace(base, **changes)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_a")
    result = generate(_config(out))
    return out, result, _rows(result.train_manifest), _rows(result.test_manifest)


def test_same_seed_gives_byte_identical_files(generated, tmp_path):
    out, _, _, _ = generated
    generate(_config(tmp_path / "b"))
    first, second = _digests(out), _digests(tmp_path / "b")
    assert first == second
    assert "train.jsonl" in first and "test.jsonl" in first and "synth.json" in first
    other = generate(_config(tmp_path / "c", seed=4))
    assert other.train_manifest.read_bytes() != (out / "train.jsonl").read_bytes()


def test_counts_per_domain_and_split(generated):
    out, result, train, test = generated
    answer_rows = [r for r in train if r["kind"] == "answer"]
    for domain in DOMAINS:
        assert result.counts[f"train/{domain}"] == PER_DOMAIN
        assert result.counts[f"test/{domain}"] == TEST_PER_DOMAIN
        assert sum(r["domain"] == domain for r in answer_rows) == PER_DOMAIN
        assert sum(r["domain"] == domain for r in test) == TEST_PER_DOMAIN
    assert result.counts["train/routing"] == ROUTING
    assert sum(r["kind"] == "routing" for r in train) == ROUTING
    assert not any(r["kind"] == "routing" for r in test)
    assert result.counts["train"] == len(train) == 4 * PER_DOMAIN + ROUTING
    assert result.counts["test"] == len(test) == 4 * TEST_PER_DOMAIN
    record = json.loads((out / "synth.json").read_text())
    assert record["counts"] == result.counts and record["config"]["seed"] == 3
    assert len(list((out / "images").rglob("*.png"))) == 4 * (PER_DOMAIN + TEST_PER_DOMAIN)


def test_records_follow_the_schema(generated):
    out, _, train, test = generated
    for row in train + test:
        assert tuple(row) == FIELDS
        assert Sample.from_dict(row).to_dict() == row
        turns = validate_turns(row["conversations"])
        assert [t["from"] for t in turns] == ["human", "gpt"]
        assert row["kind"] in KINDS
        assert row["experts"] == LABELS[row["domain"]]
        assert not Path(row["image"]).is_absolute() and (out / row["image"]).is_file()
        if row["kind"] == "answer":
            assert turns[0]["value"].startswith("<image>\n")
            assert turns[1]["value"] == row["answers"][0]
            assert row["metric"] in ("anls", "relaxed_accuracy", "vqa_accuracy", "exact_match")


def test_images_decode_at_the_configured_size(generated):
    out, _, train, test = generated
    for row in train + test:
        assert load_image(out / row["image"]).size == (SIZE, SIZE)


def test_train_and_test_are_disjoint(generated):
    out, _, train, test = generated
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    train_hashes = {hashlib.sha256((out / r["image"]).read_bytes()).hexdigest() for r in train}
    test_hashes = {hashlib.sha256((out / r["image"]).read_bytes()).hexdigest() for r in test}
    assert len(test_hashes) == len(test) and not train_hashes & test_hashes


def _check_document(row: dict, meta: dict, answer: str, pixels: np.ndarray) -> None:
    if meta["template"] == "title":
        assert answer == meta["title"]
    else:
        assert meta["ask"] in row["conversations"][0]["value"]
        assert answer == str(dict(meta["fields"])[meta["ask"]])
        assert 0 <= int(answer) <= 99
    assert (pixels.min(axis=2) < 100).any()  # dark ink on the page
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    assert (border == 255).all()  # nothing written runs off the page


def _check_chart(row: dict, meta: dict, answer: str, pixels: np.ndarray) -> None:
    values = meta["values"]
    assert all(1 <= v <= 9 for v in values)
    if meta["template"] == "highest":
        assert answer == "ABCD"[int(np.argmax(values))]
    elif meta["template"] == "lowest":
        assert answer == "ABCD"[int(np.argmin(values))]
    else:
        assert f"bar {meta['bar']}" in row["conversations"][0]["value"]
        assert answer == str(values["ABCD".index(meta["bar"])])
    # Bar heights in the pixels are in the order of the values.
    is_bar = (np.abs(pixels.astype(int) - meta["colour"]).sum(axis=2) < 30)
    heights = []
    for i in range(4):
        column = is_bar[:, round(SIZE * (0.08 + (i + 0.5) * 0.87 / 4))]
        heights.append(int(column.sum()))
    assert np.argsort(heights, kind="stable").tolist() == np.argsort(values, kind="stable").tolist()


def _check_scene(row: dict, meta: dict, answer: str, pixels: np.ndarray) -> None:
    same_shape = [s for s in meta["shapes"] if s["shape"] == meta["shape"]]
    same = [s for s in same_shape if s["colour"] == meta["colour"]]
    if meta["template"] == "count":
        assert answer == str(len(same)) and 1 <= len(same) <= 4
    elif meta["template"] == "colour":
        assert len(same_shape) == 1 and answer == same_shape[0]["colour"]
    else:
        assert answer == ("yes" if same else "no")
    for shape in meta["shapes"]:  # the pixel at each centre has the shape's colour
        centre = pixels[int(shape["y"]), int(shape["x"])]
        assert tuple(int(c) for c in centre) == render.COLOURS[shape["colour"]]


def _check_scan(row: dict, meta: dict, answer: str, pixels: np.ndarray) -> None:
    lesion = meta["lesion"]
    if meta["template"] == "lesion":
        assert answer == ("yes" if lesion else "no")
    else:
        assert answer == ("no" if lesion else "yes")
    gray = pixels[..., 0].astype(float)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    body = (((xx - meta["body"]["cx"]) / meta["body"]["rx"]) ** 2
            + ((yy - meta["body"]["cy"]) / meta["body"]["ry"]) ** 2) < 0.8
    if lesion:
        disc = np.hypot(xx - lesion["x"], yy - lesion["y"]) < 0.6 * lesion["r"]
        assert gray[disc].mean() > 190
    else:
        assert np.percentile(gray[body], 99) < 190


CHECKS = {"documents": _check_document, "charts": _check_chart, "scenes": _check_scene,
          "biomedical": _check_scan}


def test_answers_follow_from_the_drawing_parameters(generated):
    out, _, train, test = generated
    templates = {d: set() for d in DOMAINS}
    for row in train + test:
        if row["kind"] != "answer":
            continue
        meta, answer = row["meta"], row["conversations"][1]["value"]
        assert answer_from_meta(row["domain"], meta) == answer
        pixels = np.asarray(load_image(out / row["image"]))
        CHECKS[row["domain"]](row, meta, answer, pixels)
        templates[row["domain"]].add(meta["template"])
    assert all(len(kinds) >= 2 for kinds in templates.values()), templates


def test_routing_answers_point_at_the_label_experts(generated):
    out, _, train, _ = generated
    train_images = {r["image"] for r in train if r["kind"] == "answer"}
    routing = [r for r in train if r["kind"] == "routing"]
    assert {r["domain"] for r in routing} <= set(DOMAINS)
    for row in routing:
        pool = row["meta"]["pool"]
        assert set(pool) <= set(DEFAULT_POOL) and len(pool) >= 2
        prompt, answer = (t["value"] for t in row["conversations"])
        assert prompt.startswith("<image>\n") and prompt.count("<image>") == 1
        chosen = {pool[i] for i in parse_routing(answer, len(pool))}
        assert chosen == set(row["experts"]) & set(pool)
        assert row["image"] in train_images and row["answers"] is None


def test_yes_no_answers_are_balanced(tmp_path):
    result = generate(_config(tmp_path, per_domain=40, test_per_domain=0, routing_samples=0,
                              image_size=64, domains=("biomedical", "scenes")))
    rows = _rows(result.train_manifest)
    scans = [r for r in rows if r["domain"] == "biomedical"]
    answers = [r["conversations"][1]["value"] for r in rows]
    yes_no = [a for a in answers if a in ("yes", "no")]
    assert len(scans) == 40 and len(yes_no) > 40
    assert 0.3 <= yes_no.count("yes") / len(yes_no) <= 0.7
    with_lesion = sum(r["meta"]["lesion"] is not None for r in scans)
    assert 0.3 <= with_lesion / len(scans) <= 0.7


@pytest.mark.skipif(shutil.which("tesseract") is None, reason="tesseract is not installed")
def test_document_title_is_readable_by_ocr(tmp_path):
    result = generate(_config(tmp_path, per_domain=1, test_per_domain=0, routing_samples=0,
                              image_size=256, domains=("documents",)))
    row = _rows(result.train_manifest)[0]
    image = load_image(tmp_path / row["image"])
    big = tmp_path / "big.png"
    image.resize((image.width * 3, image.height * 3)).save(big)
    text = subprocess.run(["tesseract", str(big), "stdout"], capture_output=True, text=True,
                          check=True, timeout=60).stdout
    assert row["meta"]["title"].lower() in text.lower()


@pytest.mark.parametrize("changes", [
    {"domains": ("documents", "maps")}, {"domains": ()}, {"image_size": 32},
    {"per_domain": -1}, {"per_domain": 0, "routing_samples": 5},
])
def test_bad_config_raises(tmp_path, changes):
    with pytest.raises(ValueError):
        generate(_config(tmp_path, **changes))


def test_cli_synth(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["data", "synth", "--config", str(JOBS / "synth.yaml"), f"out={tmp_path}",
                 "seed=1", "per_domain=2", "test_per_domain=1", "image_size=64",
                 "routing_samples=3", "domains=[charts, scenes]"]) == 0
    printed = capsys.readouterr().out
    assert "charts" in printed and "scenes" in printed and "documents" not in printed
    assert str(tmp_path / "train.jsonl") in printed
    train = _rows(tmp_path / "train.jsonl")
    assert len(train) == 2 * 2 + 3 and len(_rows(tmp_path / "test.jsonl")) == 2


def test_a_repeated_image_is_redrawn_then_refused(tmp_path, monkeypatch):
    from pipelines.data import synth, synth_domains

    real = synth_domains.GENERATORS["charts"]
    calls = []

    def same_chart(rng, size, yes):
        calls.append(1)
        return real(random.Random(0), size, yes)

    monkeypatch.setitem(synth_domains.GENERATORS, "charts", same_chart)
    with pytest.raises(ValueError, match="no new image"):
        generate(_config(tmp_path, per_domain=2, test_per_domain=0, routing_samples=0,
                         domains=("charts",)))
    assert len(calls) == 1 + synth.MAX_TRIES
