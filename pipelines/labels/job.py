"""`mova labels`: loss-driven routing labels with Ray Data (METHOD.md, "Routing labels").

One streaming dataset: the manifest's chunks -> rows -> one actor pool that loads the checkpoint
once per actor and computes, for every answer sample with an image, the LM loss with the base
alone and with each single expert (features from the feature cache when present, else computed)
and keeps the experts that beat the base (at most ``max_experts``, the lowest losses, optionally
by a margin) -> workers write the new manifest and the per-sample loss table in parts -> the
driver adds up the counts, publishes both outputs (``_SUCCESS`` last), writes the activation
table and plot and logs it all to MLflow. Routing-instruction and text-only samples pass
through unchanged.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter

from mova.checkpoint import CheckpointError, load_config, read_components
from pipelines.common import storage
from pipelines.common.checkpoint_store import local_checkpoint
from pipelines.common.manifests.parts import begin_parts, is_published, publish_parts
from pipelines.common.manifests.scan import manifest_files, scan_manifest
from pipelines.common.manifests.stream import manifest_dataset
from pipelines.common.resources import actor_pool_args, model_actor_memory
from pipelines.labels.recipe import LabelsRecipe
from pipelines.labels.report import LabelsSummary, plot, track
from pipelines.labels.workers import LabelSpec, LossWorker, write_parts

log = logging.getLogger(__name__)
PART_ROWS = 1024  # rows per written part


def check_inputs(recipe: LabelsRecipe) -> str:
    """Fail early, naming the missing or unusable input; returns a local checkpoint copy."""
    try:
        local = local_checkpoint(recipe.checkpoint, parts=["meta"])
        read_components(local)
        load_config(local)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        raise ValueError(f"labels recipe: checkpoint {recipe.checkpoint!r} is not a usable MoVA "
                         f"checkpoint: {exc}") from exc
    if not storage.exists(recipe.manifest):
        raise FileNotFoundError(f"labels recipe: manifest not found: {recipe.manifest}")
    if recipe.output.rstrip("/") == recipe.manifest.rstrip("/"):
        raise ValueError("labels recipe: output must differ from manifest (the input manifest "
                         "is never overwritten)")
    if storage.exists(recipe.output):
        if not recipe.overwrite:
            what = "a finished" if is_published(recipe.output) else "an unfinished"
            raise ValueError(f"labels recipe: output {recipe.output} already holds {what} "
                             "output; choose another output or set overwrite=true")
        storage.delete(recipe.output)
    return local


def _candidates(recipe: LabelsRecipe, checkpoint: str) -> tuple[list[str], int]:
    """The experts to score (the pool, or ``only``) and the label size limit."""
    config = load_config(checkpoint)
    pool = config.expert_names
    unknown = [e for e in recipe.only if e not in pool]
    if unknown:
        raise ValueError(f"labels recipe: only={unknown} are not in the checkpoint's pool {pool}")
    max_experts = min(recipe.max_experts, config.routing.max_experts)
    if max_experts < recipe.max_experts:
        log.warning("max_experts=%d lowered to the checkpoint's routing.max_experts=%d",
                    recipe.max_experts, max_experts)
    return [e for e in pool if not recipe.only or e in recipe.only], max_experts


def run_labels(recipe: LabelsRecipe) -> LabelsSummary:
    """Run the routing-label job; returns what it did (see :class:`LabelsSummary`)."""
    start = time.perf_counter()
    recipe = recipe.validate().absolute()
    local = check_inputs(recipe)
    experts, max_experts = _candidates(recipe, local)
    recipe.start_ray()
    pool = load_config(local).expert_names
    report = recipe.report or storage.join(recipe.output, "_bad-rows")
    scan = scan_manifest(recipe.manifest, pool=pool,
                         report=report if recipe.skip_bad_rows else None)
    scan.require_ok(recipe.skip_bad_rows)
    losses = recipe.losses or f"{recipe.output.rstrip('/')}.losses"
    spec = LabelSpec(checkpoint=recipe.checkpoint, cache=recipe.cache, experts=tuple(experts),
                     max_experts=max_experts, margin=recipe.margin,
                     max_length=recipe.max_length, precision=recipe.precision,
                     output=recipe.output, input_files=tuple(manifest_files(recipe.manifest)))
    log.info("%d samples to label against %d experts (%s)", scan.valid, len(experts),
             ", ".join(experts))
    dataset = (manifest_dataset(scan, pool=pool, skip_bad_rows=recipe.skip_bad_rows)
               .map_batches(LossWorker, fn_constructor_kwargs={"spec": spec},
                            batch_size=recipe.batch_size,
                            **actor_pool_args(recipe.workers, recipe.cpus_per_worker,
                                              recipe.gpus_per_worker,
                                              model_actor_memory(recipe.checkpoint,
                                                                 recipe.batch_size)))
               .map_batches(write_parts, batch_size=PART_ROWS,
                            fn_kwargs={"spec": spec, "losses_folder": losses,
                                       "skip_bad_rows": recipe.skip_bad_rows, "report": report}))
    begin_parts(recipe.output, "mova labels")
    begin_parts(losses, "mova labels")
    totals = _Totals()
    for batch in dataset.iter_batches(batch_size=64, batch_format="numpy"):
        totals.add(batch)
    publish_parts(recipe.output, totals.parts["manifest"], totals.rows)
    publish_parts(losses, totals.parts["losses"], totals.scored)
    summary = _summarize(recipe, totals, experts, losses, scan)
    if summary.skipped:
        summary.report = report
        log.warning("skipped %d bad row(s); see %s", summary.skipped, report)
    png = plot(summary)
    storage.write_bytes_atomic(summary.plot, png)
    summary.seconds = time.perf_counter() - start
    track(recipe, summary, png)
    summary.seconds = time.perf_counter() - start
    return summary


class _Totals:
    """The counts of every written batch, added up (bounded by pool and domains)."""

    def __init__(self) -> None:
        self.parts: dict[str, list[str]] = {"manifest": [], "losses": []}
        self.counts: Counter = Counter()
        self.active: Counter = Counter()
        self.domains: Counter = Counter()
        self.loss_sum: Counter = Counter()
        self.loss_n: Counter = Counter()

    def add(self, batch: dict) -> None:
        for raw_parts, raw_stats in zip(batch["parts"], batch["stats"], strict=True):
            parts, stats = json.loads(str(raw_parts)), json.loads(str(raw_stats))
            for kind, name in parts.items():
                if name:
                    self.parts[kind].append(name)
            for key in ("samples", "scored", "labelled", "changed", "unscored", "skipped",
                        "experts_sum"):
                self.counts[key] += stats[key]
            for name in ("active", "domains", "loss_sum", "loss_n"):
                getattr(self, name).update(stats[name])

    @property
    def rows(self) -> int:
        return self.counts["samples"]

    @property
    def scored(self) -> int:
        return self.counts["scored"]


def _summarize(recipe: LabelsRecipe, totals: _Totals, experts: list[str], losses: str,
               scan) -> LabelsSummary:
    counts, scored = totals.counts, totals.counts["scored"]
    domains = sorted(totals.domains)
    by_domain = {d: {e: totals.active[f"{d}\t{e}"] / totals.domains[d] for e in experts}
                 for d in domains}
    overall = {e: sum(totals.active[f"{d}\t{e}"] for d in domains) / scored if scored else 0.0
               for e in experts}
    return LabelsSummary(
        output=recipe.output, losses=losses,
        plot=f"{recipe.output.rstrip('/')}.activation.png", experts=experts,
        samples=counts["samples"], scored=scored, labelled=counts["labelled"],
        changed=counts["changed"], passed_through=counts["samples"] - scored,
        unscored=counts["unscored"], skipped=counts["skipped"] + scan.rows - scan.valid,
        activation=overall, activation_by_domain=by_domain,
        domain_counts={d: totals.domains[d] for d in domains},
        mean_experts=counts["experts_sum"] / scored if scored else 0.0,
        mean_loss={name: (totals.loss_sum[name] / totals.loss_n[name]
                          if totals.loss_n[name] else float("nan"))
                   for name in ("base", *experts)})

