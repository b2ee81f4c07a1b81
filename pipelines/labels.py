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

import argparse
import dataclasses
import io
import json
import logging
import math
import os
import re
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import storage
from pipelines.recipes import RayConfig, load_recipe
from pipelines.train_recipe import MlflowConfig

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
NO_DOMAIN = "(none)"
MANIFEST_SUFFIXES = (".jsonl", ".json", ".parquet")


def _default_mlflow() -> MlflowConfig:
    return MlflowConfig(experiment="mova-labels", run_name="labels", system_metrics=False)


@dataclass
class LabelsRecipe:
    """`mova labels`: replace each sample's routing label by the experts that lower its loss."""

    manifest: str = ""
    checkpoint: str = ""
    output: str = ""
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
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> LabelsRecipe:
        for name in ("manifest", "checkpoint", "output"):
            if not getattr(self, name):
                raise ValueError(f"labels recipe: {name} must be set")
        for name in ("manifest", "output"):
            if not str(getattr(self, name)).lower().endswith(MANIFEST_SUFFIXES):
                raise ValueError(f"labels recipe: {name}={getattr(self, name)!r} must end in "
                                 f"one of {', '.join(MANIFEST_SUFFIXES)}")
        if self.max_experts < 1:
            raise ValueError(f"labels recipe: max_experts={self.max_experts} must be >= 1")
        if not math.isfinite(self.margin) or self.margin < 0:
            raise ValueError(f"labels recipe: margin={self.margin} must be a number >= 0 "
                             "(nats of mean token loss)")
        if self.batch_size < 1 or self.workers < 1:
            raise ValueError("labels recipe: batch_size and workers must be >= 1")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError("labels recipe: max_length must be null or >= 1")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise ValueError("labels recipe: cpus_per_worker/gpus_per_worker must be >= 0")
        if self.precision not in PRECISIONS:
            raise ValueError(f"labels recipe: precision={self.precision!r}; expected one of "
                             f"{', '.join(PRECISIONS)}")
        if len(set(self.only)) != len(self.only):
            raise ValueError(f"labels recipe: only={self.only} names an expert twice")
        return self


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


def _abs(path: str) -> str:
    return path if storage.is_remote(path) else str(Path(path).resolve())


def _stem(uri: str) -> str:
    lower = uri.lower()
    for suffix in MANIFEST_SUFFIXES:
        if lower.endswith(suffix):
            return uri[: -len(suffix)]
    return uri


def _metric_name(text: str) -> str:
    """MLflow metric names allow letters, digits, ``_ - . /`` and spaces."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", text)


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

        from mova.checkpoint import from_pretrained
        from pipelines.dataset import PrepareSpec

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
        from pipelines.dataset import prepare_row

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
        from pipelines.dataset import _plain

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
        from pipelines.dataset import _unpack, collate

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
            compute=ray.data.ActorPoolStrategy(size=recipe.workers),
            num_cpus=recipe.cpus_per_worker,
            num_gpus=recipe.gpus_per_worker or None,
        )
        .take_all()
    )


def run_labels(recipe: LabelsRecipe) -> LabelsSummary:
    """Run the routing-label job; returns what it did (see :class:`LabelsSummary`)."""
    from mova.checkpoint import load_config
    from mova.labels import activation_rates, select_experts
    from pipelines.data.manifest import ManifestError, validate_manifest, write_manifest
    from pipelines.ray_utils import init_ray

    start = time.perf_counter()
    recipe = dataclasses.replace(
        recipe.validate(), manifest=_abs(recipe.manifest), checkpoint=_abs(recipe.checkpoint),
        output=_abs(recipe.output), cache=_abs(recipe.cache) if recipe.cache else None,
        losses=_abs(recipe.losses) if recipe.losses else None,
        report=_abs(recipe.report) if recipe.report else None)
    check_inputs(recipe)
    config = load_config(recipe.checkpoint)
    pool = config.expert_names
    unknown = [e for e in recipe.only if e not in pool]
    if unknown:
        raise ValueError(f"labels recipe: only={unknown} are not in the checkpoint's pool {pool}")
    experts = [e for e in pool if not recipe.only or e in recipe.only]
    max_experts = min(recipe.max_experts, config.routing.max_experts)
    if max_experts < recipe.max_experts:
        log.warning("max_experts=%d lowered to the checkpoint's routing.max_experts=%d",
                    recipe.max_experts, max_experts)

    validation = validate_manifest(recipe.manifest, pool=pool, check_images=False)
    if validation.errors and not recipe.skip_bad_rows:
        raise ManifestError(
            f"manifest {recipe.manifest}: {validation.bad_rows} bad row(s) of "
            f"{validation.total}, {len(validation.errors)} error(s) (use skip_bad_rows=true to "
            f"skip and report them):\n{validation.format()}")
    bad = [{"line": e.line, "id": e.id, "field": e.field, "message": e.message}
           for e in validation.errors]
    samples = validation.samples
    to_score = [s for s in samples if s.kind == "answer" and s.image]
    log.info("%d samples, %d to score against %d experts (%s)", len(samples), len(to_score),
             len(experts), ", ".join(experts))

    results: dict[str, dict] = {}
    if to_score:
        init_ray(recipe.ray.address, num_cpus=recipe.ray.num_cpus,
                 object_store_memory=recipe.ray.object_store_memory,
                 temp_dir=recipe.ray.temp_dir)
        results = {str(r["id"]): r for r in _score(recipe, to_score, experts)}
    failed = [s for s in to_score if results[s.id]["error"]]
    if failed and not recipe.skip_bad_rows:
        lines = "\n".join(f"  {s.id} ({s.image}): {results[s.id]['error']}" for s in failed[:20])
        more = f"\n  ... and {len(failed) - 20} more" if len(failed) > 20 else ""
        raise ValueError(f"{len(failed)} sample(s) cannot be scored (use skip_bad_rows=true to "
                         f"skip and report them):\n{lines}{more}")
    bad += [{"line": None, "id": s.id, "field": "image", "message": results[s.id]["error"]}
            for s in failed]
    failed_ids = {s.id for s in failed}

    # Labels, the new manifest and the per-sample loss report.
    out_samples, loss_rows, new_labels = [], [], {}
    unscored = 0
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
                new_labels[s.id] = label
            else:
                unscored += 1
            loss_rows.append({"id": s.id, "domain": s.domain, "base_loss": losses[0],
                              **{f"loss_{e}": v for e, v in zip(experts, losses[1:],
                                                                strict=True)},
                              "experts": label, "previous": s.experts,
                              "features": result["source"]})
        out_samples.append(dataclasses.replace(
            s, experts=label, image=_image_for_output(recipe.manifest, recipe.output, s.image)))
    stem = _stem(recipe.output)
    losses_uri = recipe.losses or f"{stem}.losses.parquet"
    plot_uri = f"{stem}.activation.png"
    write_manifest(out_samples, recipe.output)
    _write_losses(loss_rows, experts, losses_uri)
    report = None
    if bad:
        report = recipe.report or f"{stem}.bad-rows.jsonl"
        storage.write_text_atomic(report, "".join(json.dumps(b, ensure_ascii=False) + "\n"
                                                  for b in bad))
        log.warning("skipped %d bad row(s); see %s", len(bad), report)

    # Activation rates per expert, overall and per domain.
    by_id = {s.id: s for s in samples}
    labelled_samples = [by_id[i] for i in new_labels]
    domains = sorted({s.domain or NO_DOMAIN for s in labelled_samples})
    by_domain = {d: activation_rates([new_labels[s.id] for s in labelled_samples
                                      if (s.domain or NO_DOMAIN) == d], experts)
                 for d in domains}
    counts = Counter(s.domain or NO_DOMAIN for s in labelled_samples)
    summary = LabelsSummary(
        output=recipe.output, losses=losses_uri, plot=plot_uri, experts=experts,
        samples=len(out_samples), scored=len(new_labels),
        labelled=sum(1 for v in new_labels.values() if v),
        changed=sum(1 for i, v in new_labels.items() if by_id[i].experts != v),
        passed_through=len(out_samples) - len(new_labels), unscored=unscored,
        skipped=len(bad), report=report,
        activation=activation_rates(list(new_labels.values()), experts),
        activation_by_domain=by_domain, domain_counts=dict(counts),
        mean_experts=(sum(len(v) for v in new_labels.values()) / len(new_labels)
                      if new_labels else 0.0),
        mean_loss=_mean_losses(loss_rows, experts))
    png = _plot(summary)
    storage.write_bytes_atomic(plot_uri, png)
    summary.seconds = time.perf_counter() - start
    _track(recipe, summary, png)
    summary.seconds = time.perf_counter() - start
    return summary


def _mean_losses(rows: list[dict], experts: list[str]) -> dict[str, float]:
    out = {}
    for key, name in [("base_loss", "base"), *((f"loss_{e}", e) for e in experts)]:
        values = [r[key] for r in rows if math.isfinite(r[key])]
        out[name] = float(np.mean(values)) if values else math.nan
    return out


def _write_losses(rows: list[dict], experts: list[str], uri: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.string()), ("domain", pa.string()),
                        ("base_loss", pa.float64()),
                        *((f"loss_{e}", pa.float64()) for e in experts),
                        ("experts", pa.list_(pa.string())), ("previous", pa.list_(pa.string())),
                        ("features", pa.string())])
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buffer)
    storage.write_bytes_atomic(uri, buffer.getvalue())


def _plot(summary: LabelsSummary) -> bytes:
    """A heatmap of activation rates (experts x all/domains) as PNG bytes (no display)."""
    from matplotlib.figure import Figure

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


def _track(recipe: LabelsRecipe, summary: LabelsSummary, png: bytes) -> None:
    """One MLflow run: the recipe as params and artifact, rates as metrics, table and plot."""
    import yaml

    from pipelines.tracking import Tracker, flatten, resolve_tracking_uri

    output_root = storage.parent(recipe.output) if not storage.is_remote(recipe.output) \
        else str(Path("outputs").resolve())
    tracking_uri = resolve_tracking_uri(recipe.mlflow.tracking_uri, output_root)
    tracker = Tracker(tracking_uri, recipe.mlflow.experiment,
                      storage.join(output_root, "mlartifacts"), recipe.mlflow.run_name,
                      system_metrics=recipe.mlflow.system_metrics)
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
            losses = Path(folder) / "losses.parquet"
            losses.write_bytes(storage.read_bytes(summary.losses))
            tracker.log_artifact(str(losses), "labels")
        status = "FINISHED"
    finally:
        tracker.end(status)
    summary.mlflow_run_id = tracker.run_id
    summary.tracking_uri = tracking_uri


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(LabelsRecipe, args.config, args.overrides)
    summary = run_labels(recipe)
    print(summary.format())
    if args.json:
        storage.write_text_atomic(args.json, json.dumps(summary.to_dict(), indent=2) + "\n")
        print(f"Summary written to {args.json}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("labels", help="loss-driven routing labels with Ray Data",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="recipe YAML (jobs/labels.yaml)")
    p.add_argument("--json", help="also write the summary as JSON here")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    p.set_defaults(func=run)
