"""The expert-value experiment's data and bookkeeping: answers drawn from the image's own
parameters, ground-truth routing per question kind, agreement and confusion, the report."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mova.config import ExpertConfig
from mova.experts.preprocess import base_input, expert_input
from mova.experts.registry import resolve_expert
from pipelines.data.expert_value import (
    BACKGROUND,
    DETAIL_EXPERT,
    PATTERNS,
    TRUTH,
    ExpertValueData,
    draw,
    generate,
    pattern_tile,
)
from pipelines.demo.expert_value import _agreement, routing_rows
from pipelines.demo.expert_value_report import (
    COMPARED,
    ExpertValueResult,
    goals,
    render_section,
    report,
    stderr,
)


def _rows(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_the_data_holds_both_kinds_with_their_truth(tmp_path):
    from pipelines.common.manifests.validate import load_manifest

    paths = generate(ExpertValueData(out=str(tmp_path), train_per_kind=6, test_per_kind=3))
    train, test = _rows(paths["train"]), _rows(paths["test"])
    assert len(train) == 12 and len(test) == 6
    for row in train + test:
        kind, meta = row["meta"]["question_kind"], row["meta"]
        assert row["experts"] == meta["truth"] == TRUTH[kind]
        assert row["answers"] == [meta["colour"] if kind == "base" else meta["pattern"]]
        assert row["conversations"][-1]["value"] == row["answers"][0]
    assert [r["meta"]["question_kind"] for r in train[:4]] == ["base", "detail"] * 2
    assert not {r["image"] for r in train} & {r["image"] for r in test}
    for path in paths.values():
        assert load_manifest(path, check_images=True)
    again = generate(ExpertValueData(out=str(tmp_path / "again"), train_per_kind=6,
                                     test_per_kind=3))
    assert _rows(again["train"]) == train  # deterministic by seed


def test_the_tag_s_patterns_vanish_at_the_base_s_resolution_only():
    image, meta = draw(random.Random(3), 224, 18, 6)
    assert meta["pattern"] in PATTERNS
    left, top, side = meta["tag"]
    assert 224 - 18 - 12 <= left <= 224 - 18 - 6 and 6 <= top <= 12 and side == 18
    pixels = np.asarray(image)
    assert (pixels[40:] == np.asarray(BACKGROUND)).all(axis=-1).sum() > 100
    means = {p: float(np.asarray(pattern_tile(p, 18)).mean()) for p in PATTERNS}
    assert max(means.values()) - min(means.values()) <= 1, means  # one brightness
    base, expert = {}, {}
    resolved = resolve_expert(ExpertConfig(name=DETAIL_EXPERT, preset="full", image_size=224))
    for pattern in PATTERNS:
        canvas = Image.new("RGB", (224, 224), BACKGROUND)
        canvas.paste(pattern_tile(pattern, 18), (left, top))
        base[pattern], expert[pattern] = base_input(canvas, 28), expert_input(canvas, resolved)
    for a, b in itertools.combinations(PATTERNS, 2):
        # the base's 28 px input: within a few grey levels; the expert's: ink against grey
        assert (base[a] - base[b]).abs().max() < 0.25, (a, b)
        assert (expert[a] - expert[b]).abs().max() > 2, (a, b)


def test_agreement_and_routing_rows():
    rows = [{"id": f"r{i}", "image": f"i{i}.png", "domain": "d", "experts": experts,
             "meta": {"question_kind": kind, "truth": TRUTH[kind], "question": "Q?"}}
            for i, (kind, experts) in enumerate([("base", []), ("base", [DETAIL_EXPERT]),
                                                 ("detail", [DETAIL_EXPERT]),
                                                 ("detail", None)])]
    agreement, confusion = _agreement(rows)
    assert agreement == {"base": 0.5, "detail": 0.5}
    assert confusion == {"base": {"none": 1, DETAIL_EXPERT: 1},
                         "detail": {DETAIL_EXPERT: 1, "none": 1}}
    made = routing_rows(rows[:1] + rows[2:3], 20, seed=0)
    assert len(made) == 20 and all(r["kind"] == "routing" for r in made)
    for row in made:
        source = {"r0": [], "r2": [DETAIL_EXPERT]}[row["meta"]["source"]]
        answer = row["conversations"][-1]["value"]
        if not source:
            assert answer == "None"
        elif DETAIL_EXPERT in row["meta"]["pool"]:
            letter = "ABCDEFG"[row["meta"]["pool"].index(DETAIL_EXPERT)]
            assert answer == letter


def test_report_has_every_cell_with_its_standard_error():
    cell = {"accuracy": 0.5, "questions": 100, "stderr": stderr(0.5, 100)}
    result = ExpertValueResult(out="/o", tracking_uri="sqlite:////o/m.db",
                               accuracy={"base-only": {"base": cell, "detail": cell}},
                               routing_accuracy={"detail": 0.9}, label_agreement={"detail": 1})
    text = report(result)
    assert "| base-only | 50.0% ± 5.0 (n=100) | 50.0% ± 5.0 (n=100) |" in text
    assert "detail 90.0%" in text and stderr(0.5, 100) == pytest.approx(0.05)


def test_goals_are_judged_from_the_measurements():
    def cells(base: float, detail: float) -> dict:
        return {kind: {"accuracy": p, "questions": 100, "stderr": stderr(p, 100)}
                for kind, p in (("base", base), ("detail", detail))}

    labels = list(COMPARED)  # base-only, routed, right forced, wrong forced
    result = ExpertValueResult(
        out="/o", tracking_uri="sqlite:////o/m.db",
        accuracy={labels[0]: cells(0.9, 0.3), labels[1]: cells(0.88, 0.8),
                  labels[2]: cells(0.9, 0.82), labels[3]: cells(0.85, 0.3)},
        routing_accuracy={"base": 0.95, "detail": 0.97}, label_agreement={"detail": 0.8})
    assert [met for _, met, _ in goals(result)] == [True, True, True, True, False]
    result.accuracy[labels[1]] = cells(0.7, 0.4)  # +10 points: missed; colours 2.6 SE worse
    met = [m for _, m, _ in goals(result)]
    assert met[:2] == [False, False] and met[3] is False
    text = render_section(result)
    assert "| loss-driven labels" in text and "**missed**" in text and "Machine:" in text
