"""The realistic-compute mode (``--real``) of `mova bench features` and `mova bench train`.

The tiny experts cost so little that those benchmarks measure mostly overheads. With ``--real`` the
workspace checkpoint is MoVA with the real DINOv2-S/14 ``dinov2`` expert, SmolLM2-135M LLM and
MiniLM text encoder (:func:`pipelines.model.real_assets.real_config`, from the weights that
``mova model prepare-real`` put in the local cache; nothing is downloaded), every answer row routes
``dinov2`` only, and the synthetic images are 224 px. This module holds what both benchmarks share:
the checkpoint builder, the labels, and the "expert cost removed" ratio of the training benchmark.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mova.factory import build_model, build_tiny_mova
from pipelines.bench.harness import markdown_table
from pipelines.model.real_assets import (
    COMPONENTS,
    default_cache_dir,
    install_command,
    missing_packages,
    prepare_real_assets,
    read_manifest,
    real_config,
)

REAL_EXPERT = "dinov2"  # the one expert of the pool with real weights
REAL_LABEL = [REAL_EXPERT]  # what every answer row routes in --real mode
REAL_IMAGE_SIZE = 224  # the synthetic images and dinov2's input (a 16 x 16 grid of 14 px)
EXPERT_COST_GOAL = 0.9  # the goal for (step computed - step cached) / expert forward


def unavailable_reason() -> str | None:
    """Why the real weights cannot be used here without preparing them (None when the local
    cache already holds every component)."""
    cache = default_cache_dir()
    try:
        comps = read_manifest(cache)["components"]
    except ValueError as exc:
        return str(exc)
    absent = [c for c in COMPONENTS
              if not (cache / comps.get(c, {}).get("path", c) / "model.safetensors").is_file()]
    if not absent:
        return None
    missing = missing_packages()
    how = (f"install {', '.join(missing)} ({install_command()}) and run `mova model prepare-real`"
           if missing else "run `mova model prepare-real`")
    return f"real weights for {', '.join(absent)} are not prepared in {cache}: {how}"


def real_model_config() -> Any:
    """The ``--real`` MoVAConfig: :func:`real_config` at :data:`REAL_IMAGE_SIZE` over the local
    cache (prepared there from the installed packages if needed; never downloaded)."""
    return real_config(prepare_real_assets(default_cache_dir()), image_size=REAL_IMAGE_SIZE)


def save_checkpoint(path: str | Path, *, real: bool = False, seed: int = 0) -> str:
    """Write the workspace checkpoint: the tiny MoVA, or with ``real`` the MoVA of
    :func:`real_model_config`; returns its folder."""
    model = build_model(real_model_config(), seed=seed) if real else build_tiny_mova(seed=seed)
    model.save_pretrained(path)
    return str(path)


def relabel(row: dict[str, Any], experts: Sequence[str] = REAL_LABEL) -> dict[str, Any]:
    """An answer row routed to ``experts`` instead of its domain's label (routing-instruction
    rows are kept: their text names their experts)."""
    return {**row, "experts": list(experts)} if row.get("kind", "answer") == "answer" else row


def check_expert(expert: str) -> None:
    """``--real`` benchmarks the one expert that has real weights."""
    if expert != REAL_EXPERT:
        raise ValueError(f"expert={expert!r}: with real=True only {REAL_EXPERT!r} has real "
                         "weights (the other experts stay tiny)")


# ---- the training benchmark's "expert cost removed" -------------------------------------------
def cost_removed(step_compute_ms: float, step_cached_ms: float, expert_ms: float
                 ) -> float | None:
    """The share of the expert's cost that cached features remove from a training step:
    (step with computed features - step with cached) / (the routed experts' forward alone).
    1.0: caching saves exactly the expert's forward; None when the forward time is not
    positive."""
    if not expert_ms or expert_ms <= 0:
        return None
    return (step_compute_ms - step_cached_ms) / expert_ms


def paired_cost_removed(compute_ms: Sequence[float], cached_ms: Sequence[float],
                        expert_ms: Sequence[float]) -> float | None:
    """The median over rounds of :func:`cost_removed` on one round's three timings (each round
    steps both configurations and times the expert within a short span, so a slow spell of a
    shared machine hits the three alike); None without complete rounds."""
    values = [v for v in (cost_removed(c, k, e) for c, k, e in
                          zip(compute_ms, cached_ms, expert_ms, strict=False)) if v is not None]
    return float(statistics.median(values)) if values else None


def expert_cost(r: Any) -> dict[str, dict[str, float | None]]:
    """Per mask variant of a ``TrainBenchResult`` whose compute configuration timed the expert
    forward: the routed experts' forward alone (median ms), the step time cached features save
    (median compute step - median cached step), :func:`cost_removed` from those medians
    (``ratio``, the issue's figure) and :func:`paired_cost_removed` (``paired``)."""
    out = {}
    for compute in r.configs:
        cached = [c for c in r.configs if (c.masks, c.features) == (compute.masks, "cached")]
        if compute.features != "compute" or not compute.expert_ms or not cached:
            continue
        expert = float(statistics.median(compute.expert_ms))
        out[compute.masks] = {
            "expert_ms": expert, "saved_ms": compute.median_ms - cached[0].median_ms,
            "ratio": cost_removed(compute.median_ms, cached[0].median_ms, expert),
            "paired": paired_cost_removed(compute.step_ms, cached[0].step_ms, compute.expert_ms)}
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def expert_cost_markdown(costs: dict[str, dict[str, float | None]]) -> list[str]:
    """The "expert cost removed" table and the goal's verdict (on the ``label`` masks), as
    markdown lines; none when the expert forward was not timed."""
    if not costs:
        return []
    rows = [[masks, _fmt(c["expert_ms"], ".1f"), _fmt(c["saved_ms"], ".1f"),
             _fmt(c["ratio"], ".2f"), _fmt(c["paired"], ".2f")] for masks, c in costs.items()]
    label = costs.get("label", {}).get("ratio")
    return ["Share of the expert's cost that cached features remove: (median step with "
            "computed features - median step with cached) / (median forward of the routed "
            "experts alone: `routed_expert_features` on the same batch, right after each "
            "compute step, no grad, same model, dtype and threads). 1.0 = the whole forward "
            "is saved; the per-round column takes the same ratio within each interleaved round "
            "and its median (less exposed to a slow spell of the shared machine).", "",
            markdown_table(["masks", "expert forward ms", "step ms saved", "ratio",
                            "per-round median"], rows), "",
            goal_verdict(label, EXPERT_COST_GOAL, "`label` ratio"), ""]


def goal_verdict(value: float | None, goal: float, what: str) -> str:
    """``**met**`` / ``**not met**`` with the figure, for a goal of ``value >= goal``."""
    if value is None:
        return f"Goal ({what} >= {goal}): not measured."
    verdict = "met" if value >= goal else "not met"
    return f"Goal ({what} >= {goal}): **{verdict}** ({value:.2f})."


FEATURES_NOTE = (
    "Realistic compute (`--real`): the expert is the real DINOv2-S/14 (22M parameters, 224 px "
    "input, 256 patch tokens x 384 channels cached per image) from `mova model prepare-real`, "
    "so the batches are dominated by the expert's forward, as in a real feature-cache job, "
    "instead of by overheads as with the tiny expert.")

TRAIN_NOTE = (
    "Realistic compute (`--real`): MoVA with the real SmolLM2-135M LLM, MiniLM text encoder and "
    "DINOv2-S/14 `dinov2` expert (224 px) from `mova model prepare-real`; the CLIP base "
    "encoder, the adapter and the six other experts are the tiny random-init ones. Every "
    "answer row's label is `dinov2` (so `label` routes the real expert only; `all` routes it "
    "plus the six tiny experts). The Ray Train ZeRO runs are skipped unless `--zero-stages` "
    "is given (SmolLM2 on 2 CPU workers would take too long).")
