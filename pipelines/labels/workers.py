"""The Ray Data actors and functions of `mova labels` (see :mod:`pipelines.labels.job`).

:class:`LossWorker` scores each answer sample with the base alone and with each candidate
expert alone and applies the label rule; :func:`write_parts` writes a batch of results as one
part of the new manifest and one part of the loss table, and returns the batch's counts, which
is all the driver sees.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from mova.device import resolve_device, resolve_precision
from mova.factory import from_pretrained
from mova.images import ImageError
from mova.labels import select_experts, single_expert_losses
from pipelines.common import storage
from pipelines.common.batches import PrepareSpec, collate, prepare_rows, unpack
from pipelines.common.checkpoint_store import local_checkpoint
from pipelines.common.manifests.parts import part_name, write_jsonl_part, write_parquet_part
from pipelines.common.manifests.scan import write_report_part
from pipelines.common.manifests.schema import Sample
from pipelines.common.manifests.stream import samples_of
from pipelines.common.manifests.validate import resolve_image
from pipelines.labels.report import NO_DOMAIN


@dataclass(frozen=True)
class LabelSpec:
    """What a loss actor needs (small and picklable)."""

    checkpoint: str  # the recipe's checkpoint (local path or s3://)
    cache: str | None
    experts: tuple[str, ...]
    max_experts: int
    margin: float
    max_length: int | None
    precision: str
    output: str
    input_files: tuple[str, ...]


def losses_schema(experts: tuple[str, ...]) -> pa.Schema:
    return pa.schema([("id", pa.string()), ("domain", pa.string()), ("base_loss", pa.float64()),
                      *((f"loss_{e}", pa.float64()) for e in experts),
                      ("experts", pa.list_(pa.string())), ("previous", pa.list_(pa.string())),
                      ("features", pa.string())])


def image_for_output(file: str, output: str, image: str | None) -> str | None:
    """Relative image paths are relative to their manifest file's folder: re-point them for the
    output folder."""
    if image is None or storage.is_remote(image) or os.path.isabs(image):
        return image
    if storage.parent(file) == output.rstrip("/"):
        return image
    resolved = resolve_image(file, image)
    if storage.is_remote(resolved) or storage.is_remote(output):
        return resolved
    return os.path.relpath(resolved, output)


class LossWorker:
    """Ray Data actor: the checkpoint loaded once; per batch, each answer sample's LM loss with
    no expert and with each candidate expert alone, and its new routing label."""

    def __init__(self, spec: LabelSpec) -> None:
        self.spec = spec
        local = local_checkpoint(spec.checkpoint)
        device = resolve_device("auto")
        self.model = from_pretrained(local, device=device)
        if spec.precision != "auto" or device.type == "cuda":
            self.model.to(resolve_precision(spec.precision, device))
        self.model.eval()
        self.cached = PrepareSpec(spec.checkpoint, spec.cache, "cached", spec.max_length) \
            if spec.cache else None
        self.compute = PrepareSpec(spec.checkpoint, None, "compute", spec.max_length)
        self._torch = torch

    def _prepare(self, rows: list[tuple[str, Sample]]) -> tuple[list[dict], str]:
        """Rows with every candidate's features (the cache) or inputs (computing them)."""
        rows = [(f, Sample(**{**vars(s), "experts": list(self.spec.experts), "kind": "answer"}))
                for f, s in rows]
        if self.cached is not None:
            try:
                return prepare_rows(rows, self.cached), "cache"
            except ValueError as exc:
                if not isinstance(exc.__cause__, KeyError):
                    raise
        return prepare_rows(rows, self.compute), "compute"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"file": [], "line": [], "sample": [], "loss": [], "error": []}
        for file, line, sample in samples_of(batch):
            loss, error = None, ""
            if sample.kind == "answer" and sample.image:
                try:
                    prepared, source = self._prepare([(file, sample)])
                    losses = self._losses(prepared, source)[0]
                    loss = {"losses": [float(x) for x in losses], "source": source}
                except (ImageError, FileNotFoundError, OSError, ValueError) as exc:
                    error = f"{type(exc).__name__}: {exc}"
            out["file"].append(file)
            out["line"].append(line)
            out["sample"].append(json.dumps(sample.to_dict(), ensure_ascii=False))
            out["loss"].append(json.dumps(loss))
            out["error"].append(error)
        return out

    def _losses(self, prepared: list[dict], source: str) -> np.ndarray:
        torch, model = self._torch, self.model
        plain = {k: [p[k] for p in prepared]
                 for k in ("input_ids", "labels", "gate_input_ids", "pixel_values", "routing")}
        plain["expert_mask"] = [np.zeros(len(model.expert_names), bool) for _ in prepared]
        inputs = collate(plain, model.expert_names, model.tokenizer.pad_token_id)
        features = {}
        for name in self.spec.experts:
            blobs = torch.stack([unpack(p[f"x_{name}"]) for p in prepared])
            features[name] = (model.expert_features(name, blobs) if source == "compute"
                              else blobs).float().cpu()
        losses = single_expert_losses(
            model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"],
            inputs["pixel_values"], inputs["gate_input_ids"], inputs["gate_attention_mask"],
            expert_features=features, experts=list(self.spec.experts))
        return losses.cpu().double().numpy()


def write_parts(batch: dict[str, np.ndarray], spec: LabelSpec, losses_folder: str,
                skip_bad_rows: bool, report: str) -> dict[str, list]:
    """Apply the label rule, write this batch's manifest part and loss part, and return its
    counts (one row) for the driver to add up."""
    stats = _Stats(spec.experts)
    rows, loss_rows, bad = [], [], []
    for file, line, raw, loss, error in zip(batch["file"], batch["line"], batch["sample"],
                                            batch["loss"], batch["error"], strict=True):
        sample = Sample.from_dict(json.loads(str(raw)))
        if error:
            if not skip_bad_rows:
                raise ValueError(f"sample {sample.id!r} ({sample.image}) cannot be scored: "
                                 f"{error} (use skip_bad_rows=true to skip and report it)")
            bad.append({"file": str(file), "line": int(line), "id": sample.id,
                        "field": "image", "message": str(error)})
            continue
        label, result = sample.experts, json.loads(str(loss))
        if result is not None:
            values = result["losses"]
            if math.isfinite(values[0]):
                label = select_experts(values[0], dict(zip(spec.experts, values[1:],
                                                           strict=True)),
                                       max_experts=spec.max_experts, margin=spec.margin)
            stats.scored_row(sample, label, values)
            loss_rows.append({"id": sample.id, "domain": sample.domain, "base_loss": values[0],
                              **{f"loss_{e}": v for e, v in zip(spec.experts, values[1:],
                                                                strict=True)},
                              "experts": label, "previous": sample.experts,
                              "features": result["source"]})
        stats.samples += 1
        rows.append({**sample.to_dict(), "experts": label,
                     "image": image_for_output(str(file), spec.output, sample.image)})
    name = part_name(spec.input_files.index(str(batch["file"][0])), int(batch["line"][0]), "")
    parts = {"manifest": "", "losses": ""}
    if rows:
        write_jsonl_part(spec.output, f"{name}.jsonl", rows)
        parts["manifest"] = f"{name}.jsonl"
    if loss_rows:
        write_parquet_part(losses_folder, f"{name}.parquet", loss_rows,
                           losses_schema(spec.experts))
        parts["losses"] = f"{name}.parquet"
    if bad:
        write_report_part(report, "rows", bad)
    stats.skipped = len(bad)
    return {"parts": [json.dumps(parts)], "stats": [json.dumps(stats.to_dict())]}


class _Stats:
    """Counts of one batch of results (added up by the driver)."""

    def __init__(self, experts: tuple[str, ...]) -> None:
        self.experts = experts
        self.samples = self.scored = self.labelled = self.changed = self.unscored = 0
        self.skipped = 0
        self.experts_sum = 0
        self.active: Counter = Counter()  # (domain, expert) -> labels holding it
        self.domains: Counter = Counter()  # domain -> scored samples
        self.loss_sum: Counter = Counter()
        self.loss_n: Counter = Counter()

    def scored_row(self, sample: Sample, label: list[str] | None, values: list[float]) -> None:
        if not math.isfinite(values[0]):
            self.unscored += 1
            return
        label = label or []
        domain = sample.domain or NO_DOMAIN
        self.scored += 1
        self.labelled += bool(label)
        self.changed += sample.experts != label
        self.experts_sum += len(label)
        self.domains[domain] += 1
        for name in set(label):
            self.active[f"{domain}\t{name}"] += 1
        for name, v in zip(("base", *self.experts), values, strict=True):
            if math.isfinite(v):
                self.loss_sum[name] += v
                self.loss_n[name] += 1

    def to_dict(self) -> dict:
        return {k: (dict(v) if isinstance(v, Counter) else v) for k, v in vars(self).items()
                if k != "experts"}
