"""The expert-value experiment's result: its record, table, goals, docs section and MLflow run
(:mod:`pipelines.demo.expert_value` runs it)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import mlflow
import torch

from pipelines.bench.harness import machine_info
from pipelines.data.expert_value import DETAIL_EXPERT, KINDS
from pipelines.demo.console import EXPERIMENT
from pipelines.demo.session import RunRecord, jobs_dir

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

WRONG_EXPERT = "sam"  # a tiny random expert: it sees nothing the base does not
CANDIDATES = [DETAIL_EXPERT, WRONG_EXPERT]
# label -> (the trained model, eval routing, forced experts)
COMPARED = {"base-only": ("base", "forced", []),
            "MoVA (the LLM routes)": ("mova", "model", []),
            f"MoVA ({DETAIL_EXPERT} forced: right)": ("mova", "forced", [DETAIL_EXPERT]),
            f"MoVA ({WRONG_EXPERT} forced: wrong)": ("mova", "forced", [WRONG_EXPERT])}
ROUTED = "MoVA (the LLM routes)"


@dataclass
class ExpertValueResult(RunRecord):
    # compared model -> question kind -> {"accuracy", "stderr", "questions"}
    accuracy: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    # question kind -> share of rows whose routing equals the ground truth
    routing_accuracy: dict[str, float] = field(default_factory=dict)
    # question kind -> routed expert set ("none" when empty) -> count
    routing_confusion: dict[str, dict[str, int]] = field(default_factory=dict)
    label_agreement: dict[str, float] = field(default_factory=dict)
    train_rows: dict[str, int] = field(default_factory=dict)
    final_loss: dict[str, float] = field(default_factory=dict)
    mlflow_run_id: str = ""


def stderr(p: float, n: int) -> float:
    """The standard error of an accuracy ``p`` measured on ``n`` questions."""
    return math.sqrt(p * (1 - p) / n) if n else math.nan


SECTION = "bench:expert-value"
REPRODUCE = "OMP_NUM_THREADS=1 mova demo --expert-value --write-docs"


def docs_benchmarks() -> Path:
    """The checkout's docs/benchmarks.md (where ``--write-docs`` puts the section)."""
    return jobs_dir().parent / "docs" / "benchmarks.md"


def goals(r: ExpertValueResult) -> list[tuple[str, bool, str]]:
    """The issue's goals: (goal, met, what was measured)."""
    def cell(label: str, kind: str) -> dict[str, float]:
        return r.accuracy.get(label, {}).get(kind, {"accuracy": math.nan, "stderr": math.nan})

    base, routed = cell("base-only", "detail"), cell(ROUTED, "detail")
    right = cell(f"MoVA ({DETAIL_EXPERT} forced: right)", "detail")
    gain = routed["accuracy"] - base["accuracy"]
    se = math.hypot(routed["stderr"], base["stderr"])
    colour_base, colour_routed = cell("base-only", "base"), cell(ROUTED, "base")
    colour_se = math.hypot(colour_base["stderr"], colour_routed["stderr"])
    routing = (sum(r.routing_accuracy.values()) / len(r.routing_accuracy)
               if r.routing_accuracy else math.nan)
    labels = r.label_agreement.get("detail", math.nan)
    return [
        ("routed >= base-only + 15 points on detail questions, and >= 3 standard errors",
         gain >= 0.15 and gain >= 3 * se,
         f"{100 * gain:+.1f} points, {gain / se if se else math.nan:.1f} standard errors"),
        ("routed not worse than base-only on base questions (within one standard error)",
         colour_routed["accuracy"] >= colour_base["accuracy"] - colour_se,
         f"{100 * (colour_routed['accuracy'] - colour_base['accuracy']):+.1f} points "
         f"(one standard error {100 * colour_se:.1f})"),
        ("routing equal to the ground truth >= 90% (both kinds)", routing >= 0.9,
         f"{100 * routing:.1f}%"),
        ("routed within 3 points of the right expert forced (detail questions)",
         abs(routed["accuracy"] - right["accuracy"]) <= 0.03,
         f"{100 * (routed['accuracy'] - right['accuracy']):+.1f} points"),
        ("loss-driven labels equal to the ground truth on >= 90% of detail questions",
         labels >= 0.9, f"{100 * labels:.1f}%"),
    ]


def render_section(r: ExpertValueResult) -> str:
    """The docs/benchmarks.md section of a run."""
    machine = "; ".join(f"{k}: {v}" for k, v in machine_info(torch.device("cpu")).items())
    lines = ["## `mova demo --expert-value`: do the trained experts matter?", "",
             f"Reproduce: `{REPRODUCE}` (plan `{r.plan}`, {r.seconds / 60:.1f} min)", "",
             f"Machine: {machine}", "",
             "Colour questions about a large shape (the base encoder sees them) and the pattern "
             "of an 18 px corner tag (1-pixel `horizontal` or `vertical` lines, `checked`, or "
             "`plain` grey of the same brightness: only DINOv2-S/14 at 224 px resolves them; "
             "the base is a frozen random tiny CLIP at 28 px, where all four are one grey). "
             "Real SmolLM2-135M-Instruct, MiniLM and DINOv2-S; `sam` (tiny, random) is the "
             f"wrong expert. Training rows: {r.train_rows}. Accuracy on held-out questions "
             "(exact match, ± one standard error):", "", table(r), "",
             "Routing equal to the ground truth: " + ", ".join(
                 f"{k} {100 * v:.1f}%" for k, v in r.routing_accuracy.items())
             + f"; routed expert sets per kind: `{r.routing_confusion}`.", "",
             "Loss-driven labels (`mova labels`) equal to the ground truth: " + ", ".join(
                 f"{k} {100 * v:.1f}%" for k, v in r.label_agreement.items()) + ".", "",
             "| goal | met | measured |", "|---|---|---|"]
    lines += [f"| {goal} | {'yes' if met else '**missed**'} | {measured} |"
              for goal, met, measured in goals(r)]
    lines += ["", f"MLflow: run `{r.mlflow_run_id}` (the table, the routing confusion, "
                  "`accuracy.png`)."]
    return "\n".join(lines)


def plot_accuracy(r: ExpertValueResult, path: Path) -> Path:
    """Accuracy per question kind for each compared model, with standard-error bars."""
    labels = list(r.accuracy)
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(KINDS)
    for j, kind in enumerate(KINDS):
        cells = [r.accuracy[label].get(kind, {}) for label in labels]
        ax.bar([i + j * width for i in range(len(labels))],
               [100 * c.get("accuracy", 0.0) for c in cells], width,
               yerr=[100 * c.get("stderr", 0.0) for c in cells], capsize=3,
               label=f"{kind} questions")
    ax.set_xticks([i + width * (len(KINDS) - 1) / 2 for i in range(len(labels))], labels,
                  fontsize=7)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.set_title("Expert value: accuracy per question kind (± 1 standard error)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_result(r: ExpertValueResult, tracking_uri: str, folder: Path) -> str:
    """The table, the routing confusion and the plot, in one MLflow run; returns its id."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name="expert-value") as run:
        for label, kinds in r.accuracy.items():
            for kind, cell in kinds.items():
                key = "".join(c if c.isalnum() else "_" for c in label).strip("_").lower()
                mlflow.log_metric(f"accuracy.{key}.{kind}", cell["accuracy"])
        for kind, value in r.routing_accuracy.items():
            mlflow.log_metric(f"routing_accuracy.{kind}", value)
        for kind, value in r.label_agreement.items():
            mlflow.log_metric(f"label_agreement.{kind}", value)
        mlflow.log_text(report(r), "expert_value.md")
        mlflow.log_dict({"routing_confusion": r.routing_confusion,
                         "accuracy": r.accuracy}, "expert_value.json")
        mlflow.log_artifact(str(plot_accuracy(r, folder / "accuracy.png")))
        return run.info.run_id


def table(r: ExpertValueResult) -> str:
    """Accuracy per compared model and question kind, as a Markdown table."""
    lines = ["| model | base questions (colour) | detail questions (tag pattern) |",
             "|---|---|---|"]
    for label, kinds in r.accuracy.items():
        cells = [f"{100 * v['accuracy']:.1f}% ± {100 * v['stderr']:.1f} "
                 f"(n={int(v['questions'])})" for v in (kinds.get(k, {}) for k in KINDS) if v]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(r: ExpertValueResult) -> str:
    """The experiment's table, as Markdown."""
    lines = [f"\nThe expert-value experiment finished in {r.seconds / 60:.1f} min. Outputs "
             f"under {r.out} (expert-value.json, eval/, mova/, base/).", table(r)]
    lines += ["Routing equal to the ground truth: " + ", ".join(
                  f"{k} {100 * v:.1f}%" for k, v in r.routing_accuracy.items()),
              f"Routing per kind: {r.routing_confusion}",
              "Loss-driven labels equal to the ground truth: " + ", ".join(
                  f"{k} {100 * v:.1f}%" for k, v in r.label_agreement.items()),
              "Final training loss: " + ", ".join(f"{k} {v:.3f}"
                                                    for k, v in r.final_loss.items())]
    if r.stopped:
        lines.append("Stopped: " + "; ".join(r.stopped) + ".")
    return "\n".join(lines)
