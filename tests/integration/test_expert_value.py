"""`mova demo --expert-value --quick` in its own process: every stage of the experiment ran and
left what the table is made of (on tiny random models, 2 steps: its accuracy figures mean
nothing; the full run's, on the real weights, are in docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.common.manifests.rows import manifest_files
from pipelines.data.expert_value import DETAIL_EXPERT, KINDS
from pipelines.demo.expert_value_report import COMPARED, ROUTED, WRONG_EXPERT
from pipelines.demo.plans import EXPERT_VALUE_QUICK

pytestmark = pytest.mark.integration


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for part in manifest_files(str(folder))
            for line in Path(part).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    out = tmp_path_factory.mktemp("ev") / "out"
    report = out.parent / "result.json"
    exe = Path(sys.executable).parent / "mova"
    proc = subprocess.run([str(exe), "demo", "--expert-value", "--quick", "--out", str(out),
                           "--json", str(report)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, json.loads(report.read_text()), proc.stdout


def test_every_stage_ran_and_the_table_is_complete(experiment):
    out, result, printed = experiment
    titles = " ".join(result["steps_seconds"]).replace("\n", " ")
    assert "prepare-real" not in titles  # --quick: tiny random models
    for stage in ("mova model init", "mova features", "pretrain",
                  "mova labels", "SFT", "mova eval", "MLflow"):
        assert stage in titles, (stage, titles)
    per_kind = EXPERT_VALUE_QUICK.sizes["test_per_kind"]
    assert set(result["accuracy"]) == set(COMPARED)
    for label, kinds in result["accuracy"].items():
        assert set(kinds) == set(KINDS), label
        for cell in kinds.values():
            assert cell["questions"] == per_kind and 0 <= cell["accuracy"] <= 1
            assert cell["stderr"] >= 0
        assert f"| {label} |" in printed
    for kind in KINDS:  # every held-out question of the routed run is in the confusion
        assert sum(result["routing_confusion"][kind].values()) == per_kind
        assert 0 <= result["routing_accuracy"][kind] <= 1
        assert 0 <= result["label_agreement"][kind] <= 1
    assert set(result["final_loss"]) == {"pretrain", "mova", "base"}


def test_each_stage_left_its_outputs(experiment):
    out, result, _ = experiment
    for folder in ("init", "pretrain", "mova", "base"):  # checkpoints
        assert (out / folder / "config.json").is_file(), folder
    assert any((out / "features").rglob("*.safetensors"))  # the candidates' cached features
    labelled = _records(out / "data" / "train.labels")
    assert len(labelled) == 2 * EXPERT_VALUE_QUICK.sizes["train_per_kind"]
    assert all(set(r["experts"]) <= {DETAIL_EXPERT, WRONG_EXPERT} for r in labelled)
    sft = [json.loads(line) for line in
           (out / "data" / "sft.mova.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "routing" for r in sft) == EXPERT_VALUE_QUICK.sizes["routing_rows"]
    assert all(Path(r["image"]).is_file() for r in sft)
    base = [json.loads(line) for line in
            (out / "data" / "sft.base.jsonl").read_text().splitlines()]
    assert all(r["experts"] == [] and r["kind"] == "answer" for r in base)
    runs = {label: _records(out / "eval" / f"run{i}" / "predictions")
            for i, label in enumerate(COMPARED)}
    for label, (_, routing, forced) in COMPARED.items():
        assert len(runs[label]) == 2 * EXPERT_VALUE_QUICK.sizes["test_per_kind"]
        if routing == "forced":  # the forced runs used exactly the forced experts
            assert all(r["forced"] and r["experts"] == forced for r in runs[label]), label
    assert not any(r["forced"] for r in runs[ROUTED])


def test_mlflow_has_the_table_the_confusion_and_the_plot(experiment):
    import mlflow

    out, result, _ = experiment
    client = mlflow.tracking.MlflowClient(result["tracking_uri"])
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.metrics["routing_accuracy.detail"] == result["routing_accuracy"]["detail"]
    assert any(k.startswith("accuracy.base_only.") for k in run.data.metrics)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"expert_value.md", "expert_value.json", "accuracy.png"} <= names
