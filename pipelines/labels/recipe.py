"""The routing-label recipe (`mova labels --config jobs/labels.yaml`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipelines.common.recipe import MlflowConfig, TrackedRecipe

PRECISIONS = ("auto", "fp32", "bf16")


def _default_mlflow() -> MlflowConfig:
    return MlflowConfig(experiment="mova-labels", run_name="labels", system_metrics=False)


@dataclass
class LabelsRecipe(TrackedRecipe):
    """`mova labels`: replace each sample's routing label by the experts that lower its loss."""

    kind = "labels"
    paths = ("manifest", "checkpoint", "output", "cache", "losses", "report")

    manifest: str = ""  # a JSON-lines or Parquet file, or a folder of them
    checkpoint: str = ""
    output: str = ""  # a folder: the new manifest's parts and _SUCCESS
    cache: str | None = None
    only: list[str] = field(default_factory=list)
    max_experts: int = 3
    margin: float = 0.0
    losses: str | None = None
    batch_size: int = 8
    max_length: int | None = None
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    precision: str = "auto"
    overwrite: bool = False
    skip_bad_rows: bool = False
    report: str | None = None
    mlflow: MlflowConfig = field(default_factory=_default_mlflow)

    def validate(self) -> LabelsRecipe:
        self.require("manifest", "checkpoint", "output")
        if self.max_experts < 1:
            raise ValueError(f"labels recipe: max_experts={self.max_experts} must be >= 1")
        if not math.isfinite(self.margin) or self.margin < 0:
            raise ValueError(f"labels recipe: margin={self.margin} must be a number >= 0 "
                             "(nats of mean token loss)")
        self.at_least(1, "batch_size", "workers")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError("labels recipe: max_length must be null or >= 1")
        self.at_least(0, "cpus_per_worker", "gpus_per_worker")
        if self.precision not in PRECISIONS:
            raise ValueError(f"labels recipe: precision={self.precision!r}; expected one of "
                             f"{', '.join(PRECISIONS)}")
        if len(set(self.only)) != len(self.only):
            raise ValueError(f"labels recipe: only={self.only} names an expert twice")
        return self
