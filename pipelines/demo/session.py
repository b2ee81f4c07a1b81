"""The skeleton both demos share: an output folder, one MLflow store, numbered steps, a private
local Ray that is always stopped, and recipes loaded from `jobs/` with the plan's overrides.

A step's recipe is ``jobs/<job>.yaml`` + the plan's overrides for that job (printed) + where
this run's files go (under the output folder) + the demo's shared Ray and MLflow store. So every
step is the command a user would type, run in-process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from pipelines.common.command import format_overrides
from pipelines.common.recipe import JobRecipe, TrackedRecipe, load_recipe
from pipelines.demo.console import (
    EXPERIMENT,
    DemoRay,
    Steps,
    TrainProgress,
    prepare_out,
    quiet_screen,
)
from pipelines.demo.plans import Plan
from pipelines.features.job import FeaturesSummary, run_features
from pipelines.features.recipe import FeaturesRecipe
from pipelines.train.job import TrainResult, run_train
from pipelines.train.recipe import TrainRecipe

JOBS_DIR = Path(__file__).resolve().parents[2] / "jobs"


@dataclass
class RunRecord:
    """What every demo records: where, how long each step took, what was stopped."""

    out: str
    tracking_uri: str
    plan: str = ""
    steps_seconds: dict[str, float] = field(default_factory=dict)
    stopped: list[str] = field(default_factory=list)
    seconds: float = 0.0


R = TypeVar("R", bound=RunRecord)


def jobs_dir() -> Path:
    """The project's ``jobs/`` folder (the recipes every step loads)."""
    if not JOBS_DIR.is_dir():
        raise FileNotFoundError(f"the demo reads its recipes from {JOBS_DIR}, which holds "
                                "none: run it from a checkout of the project")
    return JOBS_DIR


class DemoSession(Generic[R]):
    """One demo run, as a context: on entry the output folder is prepared and the MLflow store
    set; on exit (also on Ctrl-C or an error) the private Ray is stopped, and after a
    successful run ``<out>/<record>`` holds the result."""

    def __init__(self, out: str | Path, plan: Plan, steps: int, *, record: str,
                 ray_prefix: str, result: Callable[[str, str], R],
                 echo: Callable[[str], None] = print) -> None:
        self.out, self.plan, self.total, self.record = Path(out), plan, steps, record
        self.ray_prefix, self.make_result, self.echo = ray_prefix, result, echo

    def __enter__(self) -> DemoSession[R]:
        quiet_screen()
        self.started = time.perf_counter()
        self.root = prepare_out(self.out)
        self.tracking_uri = f"sqlite:///{self.root / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = self.tracking_uri
        self.result = self.make_result(str(self.root), self.tracking_uri)
        self.result.plan = self.plan.name
        self.steps = Steps(self.total, self.result, self.echo)
        self.ray = DemoRay(self.root, self.ray_prefix, self.echo).__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: Any) -> None:
        self.ray.__exit__(exc_type, *exc)
        self.result.stopped = self.ray.stopped
        self.result.seconds = time.perf_counter() - self.started
        if exc_type is None:
            (self.root / self.record).write_text(
                json.dumps(dataclasses.asdict(self.result), indent=2, default=str))

    def step(self, title: str, fn: Callable[[], Any]) -> Any:
        return self.steps.run(title, fn)

    def start_ray(self) -> None:
        cpus = self.ray.start()
        self.echo(f"    local Ray started ({cpus:g} CPUs); worker logs go to "
                  f"{self.root / 'ray-logs'}")

    def recipe(self, job: str, cls: type, *, run_name: str | None = None,
               **where: Any) -> Any:
        """``jobs/<job>.yaml`` with the plan's overrides, then ``where`` (this run's paths and
        per-step choices), on the demo's Ray and MLflow store."""
        plan = self.plan.overrides(job)
        shown = " ".join(plan) or "(no overrides)"
        self.echo(f"    recipe jobs/{job}.yaml + {shown}")
        session: dict[str, Any] = {"ray.address": "local"} if issubclass(cls, JobRecipe) else {}
        if issubclass(cls, TrackedRecipe):
            session.update({"mlflow.tracking_uri": self.tracking_uri,
                            "mlflow.experiment": EXPERIMENT, "mlflow.system_metrics": False,
                            "mlflow.run_name": run_name or job})
        overrides = [*plan, *format_overrides(where), *format_overrides(session)]
        return load_recipe(cls, jobs_dir() / f"{job}.yaml", overrides)

    def features(self, title: str, manifest: str, checkpoint: str | Path,
                 **where: Any) -> FeaturesSummary:
        """Start the demo's Ray and run ``mova features`` as step ``title`` into
        ``<out>/features`` (``where``: more recipe fields, e.g. ``only``)."""
        self.start_ray()
        return self.step(title, lambda: run_features(self.recipe(
            "features", FeaturesRecipe, manifest=manifest, checkpoint=checkpoint,
            cache=self.root / "features", **where)))

    def train(self, job: str, run_name: str, *, init_from: str | Path, manifest: str,
              output: str, seed: int) -> TrainResult:
        """``mova train`` with ``jobs/<job>.yaml`` (inside a step): the demo's feature cache,
        ``<out>/<output>``, and a progress line per logged step from its MLflow metrics."""
        steps = int(self.plan.value(job, "max_steps"))
        recipe = self.recipe(job, TrainRecipe, run_name=run_name, init_from=init_from,
                             manifest=manifest, cache=self.root / "features",
                             output=self.root / output, name=run_name, seed=seed,
                             storage_path=self.root / "ray_results")
        with TrainProgress(self.tracking_uri, run_name, steps, self.echo):
            return run_train(recipe)
