"""What a labels run reports: the summary, the activation table and plot, the per-sample loss
file and the MLflow run."""

from __future__ import annotations

import io
import json
import math
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.figure import Figure

from pipelines.common.tracking import flatten, open_run
from pipelines.labels.recipe import LabelsRecipe

NO_DOMAIN = "(none)"


@dataclass
class LabelsSummary:
    """What a labels run did and where it wrote."""

    output: str
    losses: str
    plot: str
    experts: list[str]
    samples: int = 0
    scored: int = 0
    labelled: int = 0
    changed: int = 0
    passed_through: int = 0
    unscored: int = 0
    skipped: int = 0
    activation: dict[str, float] = field(default_factory=dict)
    activation_by_domain: dict[str, dict[str, float]] = field(default_factory=dict)
    domain_counts: dict[str, int] = field(default_factory=dict)
    mean_experts: float = 0.0
    mean_loss: dict[str, float] = field(default_factory=dict)
    report: str | None = None
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """Activation rate per expert (rows), over all scored samples and per domain."""
        return activation_table(self.activation, self.activation_by_domain, self.domain_counts,
                                self.scored, self.experts)

    def format(self) -> str:
        lines = [self.table(), "",
                 f"{self.scored} of {self.samples} samples scored in {self.seconds:.1f} s: "
                 f"{self.labelled} got at least one expert, {self.changed} labels changed, "
                 f"{self.mean_experts:.2f} experts per sample on average"]
        if self.passed_through:
            lines.append(f"{self.passed_through} samples kept their previous label "
                         f"(routing-instruction or text-only rows; {self.unscored} without "
                         "supervised tokens)")
        if self.skipped:
            lines.append(f"{self.skipped} bad rows skipped; see {self.report}")
        lines += [f"New manifest     : {self.output}",
                  f"Per-sample losses: {self.losses}",
                  f"Activation plot  : {self.plot}"]
        if self.mlflow_run_id:
            lines.append(f"MLflow run       : {self.mlflow_run_id} at {self.tracking_uri}")
        if self.tracking_uri and self.tracking_uri.startswith("sqlite:///"):
            lines.append(f"Open the MLflow UI: mlflow ui --backend-store-uri {self.tracking_uri}")
        return "\n".join(lines)


def activation_table(overall: dict[str, float], by_domain: dict[str, dict[str, float]],
                     counts: dict[str, int], scored: int, experts: list[str]) -> str:
    """A plain-text table: one row per expert, columns ``all`` then each domain."""
    columns = ["all", *by_domain]
    title = "activation rate"
    width = max([10, *(len(c) + 2 for c in columns)])
    name_width = max([len(title) + 1, *(len(e) + 2 for e in experts)])
    lines = [title.ljust(name_width) + "".join(c.rjust(width) for c in columns)]
    for e in experts:
        values = [overall.get(e, 0.0), *(by_domain[d].get(e, 0.0) for d in by_domain)]
        lines.append(e.ljust(name_width) + "".join(f"{v:.3f}".rjust(width) for v in values))
    sizes = [scored, *(counts.get(d, 0) for d in by_domain)]
    lines.append("samples".ljust(name_width) + "".join(str(n).rjust(width) for n in sizes))
    return "\n".join(lines)


def _metric_name(text: str) -> str:
    """MLflow metric names allow letters, digits, ``_ - . /`` and spaces."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", text)


def plot(summary: LabelsSummary) -> bytes:
    """A heatmap of activation rates (experts x all/domains) as PNG bytes (no display)."""
    columns = ["all", *summary.activation_by_domain]
    data = np.array([[summary.activation.get(e, 0.0),
                      *(summary.activation_by_domain[d].get(e, 0.0)
                        for d in summary.activation_by_domain)] for e in summary.experts])
    fig = Figure(figsize=(1.6 + 1.1 * len(columns), 1.2 + 0.45 * len(summary.experts)))
    ax = fig.add_subplot()
    image = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)),
                  [f"{c}\n(n={summary.scored if c == 'all' else summary.domain_counts[c]})"
                   for c in columns], fontsize=8)
    ax.set_yticks(range(len(summary.experts)), summary.experts, fontsize=8)
    for (i, j), value in np.ndenumerate(data):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                color="white" if value < 0.6 else "black")
    ax.set_title("routing-label activation rate", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def track(recipe: LabelsRecipe, summary: LabelsSummary, png: bytes) -> None:
    """One MLflow run: the recipe as params and artifact, rates as metrics, table and plot."""
    tracker = open_run(recipe.mlflow, recipe.output, joins_cluster=recipe.joins_cluster())
    status = "FAILED"
    try:
        tracker.log_params({**flatten(asdict(recipe)), "pool": ",".join(summary.experts)})
        metrics = {
            "samples": summary.samples, "scored": summary.scored, "labelled": summary.labelled,
            "changed": summary.changed, "skipped": summary.skipped,
            "mean_experts": summary.mean_experts,
            "no_expert_rate": (1 - summary.labelled / summary.scored) if summary.scored else 0.0,
            **{f"activation/{_metric_name(e)}": v for e, v in summary.activation.items()},
            **{f"activation/{_metric_name(d)}/{_metric_name(e)}": v
               for d, rates in summary.activation_by_domain.items() for e, v in rates.items()},
            **{f"loss/{_metric_name(e)}": v for e, v in summary.mean_loss.items()
               if math.isfinite(v)},
        }
        tracker.log_metrics(metrics, step=0)
        tracker.log_text(yaml.safe_dump(asdict(recipe), sort_keys=False), "recipe.yaml")
        tracker.log_text(summary.table() + "\n", "labels/activation.txt")
        tracker.log_text(json.dumps({"overall": summary.activation,
                                     "by_domain": summary.activation_by_domain,
                                     "samples": summary.domain_counts}, indent=2) + "\n",
                         "labels/activation.json")
        with tempfile.TemporaryDirectory(prefix="mova-labels-") as folder:
            plot = Path(folder) / "activation.png"
            plot.write_bytes(png)
            tracker.log_artifact(str(plot), "labels")
        tracker.log_parts(summary.losses, "labels/losses")
        status = "FINISHED"
    finally:
        tracker.end(status)
    summary.mlflow_run_id = tracker.run_id
    summary.tracking_uri = tracker.tracking_uri
