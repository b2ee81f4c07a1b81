"""`mova labels`: loss-driven routing labels with Ray Data (METHOD.md, "Routing labels").

Flow: read + validate the manifest (before Ray starts) -> one actor pool that loads the
checkpoint once per actor and computes, for every answer sample with an image, the LM loss with
the base alone and with each single expert (features from the feature cache when present, else
computed) -> the driver keeps the experts that beat the base (at most ``max_experts``, the
lowest losses, optionally by a margin) and writes a new manifest with the routing labels
replaced, a per-sample loss report (Parquet) and an activation-rate plot, prints the activation
rate per expert and per domain, and logs all of it to MLflow. Routing-instruction and text-only
samples pass through unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.common import storage
from pipelines.common.ray_init import actor_pool_args
from pipelines.labels.recipe import MANIFEST_SUFFIXES, LabelsRecipe
from pipelines.labels.report import NO_DOMAIN, LabelsSummary, mean_losses, plot, track, write_losses

log = logging.getLogger(__name__)


def _stem(uri: str) -> str:
    lower = uri.lower()
    for suffix in MANIFEST_SUFFIXES:
        if lower.endswith(suffix):
            return uri[: -len(suffix)]
    return uri


def check_inputs(recipe: LabelsRecipe) -> None:
    """Fail early, naming the missing or unusable input, before Ray starts."""
    from mova.checkpoint import CheckpointError, load_config, read_components

    if storage.is_remote(recipe.checkpoint):
        raise ValueError(f"labels recipe: checkpoint={recipe.checkpoint!r}: give a local "
                         "folder (each actor loads it with from_pretrained)")
    if not Path(recipe.checkpoint).is_dir():
        raise FileNotFoundError(f"labels recipe: checkpoint not found: {recipe.checkpoint}")
    try:
        read_components(recipe.checkpoint)
        load_config(recipe.checkpoint)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        raise ValueError(f"labels recipe: checkpoint {recipe.checkpoint!r} is not a usable MoVA "
                         f"checkpoint: {exc}") from exc
    if not storage.exists(recipe.manifest):
        raise FileNotFoundError(f"labels recipe: manifest not found: {recipe.manifest}")
    if recipe.output == recipe.manifest:
        raise ValueError("labels recipe: output must differ from manifest (the input manifest "
                         "is never overwritten)")
    if storage.exists(recipe.output) and not recipe.overwrite:
        raise ValueError(f"labels recipe: output {recipe.output} already exists; choose another "
                         "output or set overwrite=true")


class LossWorker:
    """Ray Data actor: the checkpoint loaded once; per batch, each sample's LM loss with no
    expert and with each candidate expert alone."""

    def __init__(self, checkpoint: str, manifest: str, cache: str | None, experts: list[str],
                 max_length: int | None, precision: str) -> None:
        import torch

        from mova.factory import from_pretrained
        from pipelines.train.dataset import PrepareSpec

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = from_pretrained(checkpoint, device=self.device)
        if precision == "bf16" or (precision == "auto" and self.device == "cuda"):
            self.model.to(torch.bfloat16)
        elif precision == "fp32":
            self.model.to(torch.float32)
        self.experts = list(experts)
        self.cached = PrepareSpec(checkpoint, manifest, cache, "cached", max_length) \
            if cache else None
        self.compute = PrepareSpec(checkpoint, manifest, None, "compute", max_length)

    def _prepare(self, row: dict) -> tuple[dict, str]:
        """One row with every candidate expert's features (cache) or inputs (compute)."""
        from pipelines.train.dataset import prepare_row

        row = {**row, "experts": self.experts, "kind": "answer"}
        if self.cached is not None:
            try:
                return prepare_row(row, self.cached), "cache"
            except ValueError as exc:
                if not isinstance(exc.__cause__, KeyError):
                    raise
        return prepare_row(row, self.compute), "compute"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from mova.images import ImageError
        from pipelines.train.dataset import _plain

        keys = list(batch)
        rows = [_plain(dict(zip(keys, values, strict=True)))
                for values in zip(*batch.values(), strict=True)]
        prepared, sources, errors = [], [], []
        for row in rows:
            try:
                p, source = self._prepare(row)
                prepared.append(p)
                sources.append(source)
                errors.append("")
            except (ImageError, FileNotFoundError, OSError, ValueError) as exc:
                prepared.append(None)
                sources.append("")
                errors.append(f"{type(exc).__name__}: {exc}")
        losses = np.full((len(rows), 1 + len(self.experts)), np.nan)
        good = [i for i, p in enumerate(prepared) if p is not None]
        if good:
            losses[good] = self._losses([prepared[i] for i in good],
                                        [sources[i] for i in good])
        return {"id": [str(r["id"]) for r in rows],
                "losses": [row.tolist() for row in losses],
                "source": sources, "error": errors}

    def _losses(self, prepared: list[dict], sources: list[str]) -> np.ndarray:
        import torch

        from mova.labels import single_expert_losses
        from pipelines.train.dataset import _unpack, collate

        model = self.model
        plain = {k: [p[k] for p in prepared]
                 for k in ("input_ids", "labels", "gate_input_ids", "pixel_values", "routing")}
        plain["expert_mask"] = [np.zeros(len(model.expert_names), bool) for _ in prepared]
        inputs = collate(plain, model.expert_names, model.tokenizer.pad_token_id)
        features: dict[str, torch.Tensor] = {}
        for name in self.experts:
            blobs = [_unpack(p[f"x_{name}"]) for p in prepared]
            rows = [None] * len(prepared)
            compute = [i for i, s in enumerate(sources) if s == "compute"]
            if compute:
                out = model.expert_features(name, torch.stack([blobs[i] for i in compute]))
                for k, i in enumerate(compute):
                    rows[i] = out[k].float().cpu()
            for i, s in enumerate(sources):
                if s == "cache":
                    rows[i] = blobs[i].float()
            features[name] = torch.stack(rows)
        losses = single_expert_losses(
            model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"],
            inputs["pixel_values"], inputs["gate_input_ids"], inputs["gate_attention_mask"],
            expert_features=features, experts=self.experts)
        return losses.cpu().double().numpy()


def _image_for_output(manifest: str, output: str, image: str | None) -> str | None:
    """Relative image paths are relative to the manifest's folder: re-point them for the
    output's folder."""
    from pipelines.data.manifest import resolve_image

    if image is None or storage.is_remote(image) or os.path.isabs(image):
        return image
    if storage.parent(manifest) == storage.parent(output):
        return image
    resolved = resolve_image(manifest, image)
    if storage.is_remote(resolved) or storage.is_remote(output):
        return resolved
    return os.path.relpath(resolved, storage.parent(output))


def _score(recipe: LabelsRecipe, samples: list, experts: list[str]) -> list[dict]:
    """Run the actor pool over the samples to score; rows of id, losses, source, error."""
    import ray

    rows = [{"id": s.id, "image": s.image, "conversations": s.conversations} for s in samples]
    return (
        ray.data.from_items(rows)
        .map_batches(
            LossWorker,
            fn_constructor_kwargs={"checkpoint": recipe.checkpoint, "manifest": recipe.manifest,
                                   "cache": recipe.cache, "experts": experts,
                                   "max_length": recipe.max_length,
                                   "precision": recipe.precision},
            batch_size=recipe.batch_size,
            **actor_pool_args(recipe.workers, recipe.cpus_per_worker,
                              recipe.gpus_per_worker),
        )
        .take_all()
    )


@dataclass
class _Scored:
    """The relabelled samples and what the job learnt about them."""

    samples: list
    loss_rows: list[dict]
    new_labels: dict[str, list[str]]
    unscored: int


def run_labels(recipe: LabelsRecipe) -> LabelsSummary:
    """Run the routing-label job; returns what it did (see :class:`LabelsSummary`)."""
    start = time.perf_counter()
    recipe = recipe.validate().absolute()
    check_inputs(recipe)
    experts, max_experts = _candidates(recipe)
    samples, bad = _read_manifest(recipe, experts)
    to_score = [s for s in samples if s.kind == "answer" and s.image]
    log.info("%d samples, %d to score against %d experts (%s)", len(samples), len(to_score),
             len(experts), ", ".join(experts))
    results = {}
    if to_score:
        recipe.start_ray()
        results = {str(r["id"]): r for r in _score(recipe, to_score, experts)}
    failed = _failures(recipe, to_score, results)
    bad += [{"line": None, "id": s.id, "field": "image", "message": results[s.id]["error"]}
            for s in failed]
    scored = _relabel(recipe, samples, results, {s.id for s in failed}, experts, max_experts)
    summary, png = _write_outputs(recipe, samples, scored, experts, bad)
    summary.seconds = time.perf_counter() - start
    track(recipe, summary, png)
    summary.seconds = time.perf_counter() - start
    return summary


def _candidates(recipe: LabelsRecipe) -> tuple[list[str], int]:
    """The experts to score (the pool, or ``only``) and the label size limit."""
    from mova.checkpoint import load_config

    config = load_config(recipe.checkpoint)
    pool = config.expert_names
    unknown = [e for e in recipe.only if e not in pool]
    if unknown:
        raise ValueError(f"labels recipe: only={unknown} are not in the checkpoint's pool {pool}")
    max_experts = min(recipe.max_experts, config.routing.max_experts)
    if max_experts < recipe.max_experts:
        log.warning("max_experts=%d lowered to the checkpoint's routing.max_experts=%d",
                    recipe.max_experts, max_experts)
    return [e for e in pool if not recipe.only or e in recipe.only], max_experts


def _read_manifest(recipe: LabelsRecipe, experts: list[str]) -> tuple[list, list[dict]]:
    """The valid samples and the bad rows (an error unless ``skip_bad_rows``)."""
    from mova.checkpoint import load_config
    from pipelines.data.manifest import ManifestError, validate_manifest

    pool = load_config(recipe.checkpoint).expert_names
    validation = validate_manifest(recipe.manifest, pool=pool, check_images=False)
    if validation.errors and not recipe.skip_bad_rows:
        raise ManifestError(
            f"manifest {recipe.manifest}: {validation.bad_rows} bad row(s) of "
            f"{validation.total}, {len(validation.errors)} error(s) (use skip_bad_rows=true to "
            f"skip and report them):\n{validation.format()}")
    bad = [{"line": e.line, "id": e.id, "field": e.field, "message": e.message}
           for e in validation.errors]
    return validation.samples, bad


def _failures(recipe: LabelsRecipe, to_score: list, results: dict[str, dict]) -> list:
    """Samples that could not be scored; an error naming them unless ``skip_bad_rows``."""
    failed = [s for s in to_score if results[s.id]["error"]]
    if failed and not recipe.skip_bad_rows:
        lines = "\n".join(f"  {s.id} ({s.image}): {results[s.id]['error']}" for s in failed[:20])
        more = f"\n  ... and {len(failed) - 20} more" if len(failed) > 20 else ""
        raise ValueError(f"{len(failed)} sample(s) cannot be scored (use skip_bad_rows=true to "
                         f"skip and report them):\n{lines}{more}")
    return failed


def _relabel(recipe: LabelsRecipe, samples: list, results: dict[str, dict],
             failed_ids: set[str], experts: list[str], max_experts: int) -> _Scored:
    """Apply the label rule to each scored sample; others keep their label."""
    from mova.labels import select_experts

    out = _Scored(samples=[], loss_rows=[], new_labels={}, unscored=0)
    for s in samples:
        if s.id in failed_ids:
            continue
        result = results.get(s.id)
        label = s.experts
        if result is not None:
            losses = [float(x) for x in result["losses"]]
            if math.isfinite(losses[0]):
                label = select_experts(losses[0], dict(zip(experts, losses[1:], strict=True)),
                                       max_experts=max_experts, margin=recipe.margin)
                out.new_labels[s.id] = label
            else:
                out.unscored += 1
            out.loss_rows.append({"id": s.id, "domain": s.domain, "base_loss": losses[0],
                                  **{f"loss_{e}": v for e, v in zip(experts, losses[1:],
                                                                    strict=True)},
                                  "experts": label, "previous": s.experts,
                                  "features": result["source"]})
        out.samples.append(dataclasses.replace(
            s, experts=label, image=_image_for_output(recipe.manifest, recipe.output, s.image)))
    return out


def _write_outputs(recipe: LabelsRecipe, samples: list, scored: _Scored, experts: list[str],
                   bad: list[dict]) -> tuple[LabelsSummary, bytes]:
    """The new manifest, the loss file, the bad-row report and the plot; the summary and the
    plot's PNG bytes."""
    from mova.labels import activation_rates
    from pipelines.data.manifest import write_manifest

    stem = _stem(recipe.output)
    losses_uri = recipe.losses or f"{stem}.losses.parquet"
    write_manifest(scored.samples, recipe.output)
    write_losses(scored.loss_rows, experts, losses_uri)
    report = None
    if bad:
        report = recipe.report or f"{stem}.bad-rows.jsonl"
        storage.write_text_atomic(report, "".join(json.dumps(b, ensure_ascii=False) + "\n"
                                                  for b in bad))
        log.warning("skipped %d bad row(s); see %s", len(bad), report)
    by_id = {s.id: s for s in samples}
    new = scored.new_labels
    labelled = [by_id[i] for i in new]
    domains = sorted({s.domain or NO_DOMAIN for s in labelled})
    summary = LabelsSummary(
        output=recipe.output, losses=losses_uri, plot=f"{stem}.activation.png",
        experts=experts, samples=len(scored.samples), scored=len(new),
        labelled=sum(1 for v in new.values() if v),
        changed=sum(1 for i, v in new.items() if by_id[i].experts != v),
        passed_through=len(scored.samples) - len(new), unscored=scored.unscored,
        skipped=len(bad), report=report,
        activation=activation_rates(list(new.values()), experts),
        activation_by_domain={d: activation_rates([new[s.id] for s in labelled
                                                   if (s.domain or NO_DOMAIN) == d], experts)
                              for d in domains},
        domain_counts=dict(Counter(s.domain or NO_DOMAIN for s in labelled)),
        mean_experts=sum(len(v) for v in new.values()) / len(new) if new else 0.0,
        mean_loss=mean_losses(scored.loss_rows, experts))
    png = plot(summary)
    storage.write_bytes_atomic(summary.plot, png)
    return summary, png
