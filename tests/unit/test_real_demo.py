"""`mova demo --real`'s data: MoVA and base-only manifests that differ only in routing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.data.synth import SynthRecipe
from pipelines.demo.real import EASYVQA_LABEL, build_data, report

pytest.importorskip("easy_vqa", reason="easy-VQA ships in the easy-vqa package "
                                       "(make setup installs it)")


def _rows(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_mova_and_base_only_manifests_hold_the_same_answers(tmp_path):
    from pipelines.common.manifests.validate import load_manifest

    synth = SynthRecipe(out=str(tmp_path / "data"), per_domain=2, test_per_domain=1,
                        image_size=64, routing_samples=4)
    data = build_data(synth, train_questions=40, test_questions=12)
    mova, base, test = _rows(data["mova"]), _rows(data["base"]), _rows(data["test"])
    easy = [r for r in mova if r.get("domain") == "easyvqa"]
    assert len(easy) == 40 and all(r["experts"] == EASYVQA_LABEL for r in easy)
    # questions are drawn across the set, not the first 40 (which share a few images)
    assert len({r["image"] for r in easy}) > 20
    routing = [r for r in mova if r.get("kind") == "routing"]
    assert len(routing) == 4
    answers = sorted((r["id"], json.dumps(r["conversations"])) for r in mova
                     if r.get("kind") != "routing")
    assert answers == sorted((r["id"], json.dumps(r["conversations"])) for r in base)
    assert all(r["experts"] == [] for r in base)
    assert len(test) == 12 and all(r["meta"]["split"] == "test" for r in test)
    assert not {r["image"] for r in test} & {r["image"] for r in easy}
    for key in ("mova", "base", "test"):  # each validates as a manifest, images included
        assert load_manifest(data[key], check_images=True)
    assert json.loads(data["counts"]) == {"mova": len(mova), "base": len(base),
                                          "easyvqa_train": 40, "test": 12}


def test_report_lists_every_accuracy():
    from pipelines.demo.real import RealDemoResult

    text = report(RealDemoResult(out="/o", tracking_uri="sqlite:////o/mlflow.db",
                                 accuracy={"base-only": 0.5, "MoVA (the LLM routes)": 0.625},
                                 questions=8, final_loss={"mova": 1.0, "base": 1.2}))
    assert "| base-only | 50.0% |" in text and "| MoVA (the LLM routes) | 62.5% |" in text
    assert "8 questions" in text and "mova 1.000" in text
