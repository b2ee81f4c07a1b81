"""The demo's plumbing without Ray: its output folder, progress lines and tables."""

from __future__ import annotations

import dataclasses
import time

import pytest
import yaml

from pipelines.common.recipe import load_recipe
from pipelines.common.tracking import Tracker
from pipelines.data.synth import SynthRecipe
from pipelines.demo.console import EXPERIMENT, MARKER, TrainProgress, prepare_out
from pipelines.demo.plans import PLANS, QUICK
from pipelines.demo.report import DemoResult, eval_table
from pipelines.demo.session import JOBS_DIR, DemoSession, RunRecord
from pipelines.evaluate.recipe import EvalRecipe
from pipelines.features.recipe import FeaturesRecipe
from pipelines.labels.recipe import LabelsRecipe
from pipelines.serve.recipe import ServeRecipe
from pipelines.train.recipe import TrainRecipe


def test_prepare_out_replaces_an_earlier_demo_and_refuses_anything_else(tmp_path):
    out = prepare_out(tmp_path / "demo")
    (out / "stale.txt").write_text("from the last run")
    out = prepare_out(out)
    assert (out / MARKER).is_file() and not (out / "stale.txt").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    with pytest.raises(ValueError, match="not empty and was not made by `mova demo`"):
        prepare_out(mine)
    assert (mine / "thesis.tex").read_text() == "keep me"


def test_progress_lines_come_from_the_runs_mlflow_metrics(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lines: list[str] = []
    progress = TrainProgress(uri, "demo-sft", 40, lines.append, every_s=0.05)
    assert progress.latest() is None  # no experiment yet
    tracker = Tracker(uri, EXPERIMENT, str(tmp_path / "art"), run_name="demo-sft",
                      system_metrics=False)
    try:
        with progress:
            tracker.log_metrics({"loss": 3.25}, step=4)
            tracker.flush()
            deadline = time.monotonic() + 20
            while not lines and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        tracker.mlflow.end_run()
    assert progress.latest() == (4, 3.25)
    assert lines[0] == "    step 4/40, loss 3.250"


def test_eval_table_lists_overall_and_every_domain():
    result = DemoResult(out="/o", tracking_uri="sqlite:////o/m.db", eval={
        "untrained": {"score": 0.0, "questions": 8,
                      "details": {"domain/charts": 0.0, "domain/scans": 0.0}},
        "trained": {"score": 0.25, "questions": 8,
                    "details": {"domain/charts": 0.0, "domain/scans": 0.5}}})
    table = eval_table(result)
    assert "| overall | 0.0% | 25.0% |" in table and "| scans | 0.0% | 50.0% |" in table
    assert result.trained_beats_untrained


RECIPES = {"synth": SynthRecipe, "features": FeaturesRecipe, "pretrain": TrainRecipe,
           "sft": TrainRecipe, "labels": LabelsRecipe, "eval": EvalRecipe, "serve": ServeRecipe}
PATHS = {"manifest": "m.jsonl", "checkpoint": "ckpt", "init_from": "init", "cache": "feats",
         "output": "out", "out": "data"}


def _flat(obj, prefix=""):
    data = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        out.update(_flat(value, name + ".") if isinstance(value, dict) else {name: value})
    return out


@pytest.mark.parametrize("plan", list(PLANS.values()), ids=list(PLANS))
def test_each_plan_only_sizes_the_jobs_recipes(plan):
    """Every override of a plan names a field of its recipe and changes only that field."""
    for job, overrides in plan.jobs.items():
        path = JOBS_DIR / f"{job}.yaml"
        where = [f"{k}={v}" for k, v in PATHS.items()
                 if k in {f.name for f in dataclasses.fields(RECIPES[job])}]
        plain = _flat(load_recipe(RECIPES[job], path, where))
        sized = _flat(load_recipe(RECIPES[job], path, [*where, *overrides]))
        changed = {k for k in sized if sized[k] != plain.get(k)}
        named = {o.split("=", 1)[0] for o in overrides}
        assert changed <= named, (job, changed - named)
        for item in overrides:
            key, value = item.split("=", 1)
            assert sized[key] == yaml.safe_load(value), (job, key)


def test_a_step_runs_the_jobs_recipe_with_the_plan_and_the_runs_paths(tmp_path):
    lines: list[str] = []
    session = DemoSession(tmp_path, QUICK, 1, record="r.json", ray_prefix="x-",
                          result=RunRecord, echo=lines.append)
    session.tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe = session.recipe("pretrain", TrainRecipe, run_name="demo-pretrain",
                            init_from=tmp_path / "init", manifest=tmp_path / "train.jsonl",
                            output=tmp_path / "pretrain")
    from_file = load_recipe(TrainRecipe, JOBS_DIR / "pretrain.yaml",
                            ["init_from=i", "manifest=m"])
    assert recipe.deepspeed == from_file.deepspeed and recipe.optim.betas == from_file.optim.betas
    assert recipe.max_steps == int(QUICK.value("pretrain", "max_steps"))
    assert recipe.optim.lr == 2.0e-3 and recipe.init_from == str(tmp_path / "init")
    assert (recipe.ray.address, recipe.mlflow.run_name) == ("local", "demo-pretrain")
    assert recipe.mlflow.tracking_uri == session.tracking_uri
    assert lines == ["    recipe jobs/pretrain.yaml + " + " ".join(QUICK.overrides("pretrain"))]
    for job, cls in RECIPES.items():  # every step's recipe loads through the session
        where = {k: tmp_path / v for k, v in PATHS.items()
                 if k in {f.name for f in dataclasses.fields(cls)}}
        assert isinstance(session.recipe(job, cls, **where), cls)
