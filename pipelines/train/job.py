"""`mova train`: pretraining and SFT on Ray Train + DeepSpeed, tracked in MLflow.

The recipe is validated and every input checked before Ray starts. Running the same command
again resumes from the latest checkpoint of the run (same ``name`` and ``storage_path``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from mova.checkpoint import CheckpointError, load_config, read_components
from pipelines.common import storage
from pipelines.common.checkpoint_store import local_checkpoint
from pipelines.common.manifests.scan import scan_manifest
from pipelines.common.ray_init import worker_env
from pipelines.common.tracking import tracking_target
from pipelines.train.loop import train_loop
from pipelines.train.order import batches_per_epoch
from pipelines.train.recipe import TrainRecipe

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output: str
    steps: int
    final_loss: float | None
    mlflow_run_id: str | None
    tracking_uri: str
    checkpoint: str | None
    seconds: float

    def format(self) -> str:
        lines = [f"Trained {self.steps} steps in {self.seconds:.0f} s"
                 + (f" (final loss {self.final_loss:.4f})" if self.final_loss is not None else ""),
                 f"Model checkpoint : {self.output}",
                 f"Resume state     : {self.checkpoint}",
                 f"MLflow run       : {self.mlflow_run_id} at {self.tracking_uri}"]
        if self.tracking_uri.startswith("sqlite:///"):
            lines.append(f"Open the MLflow UI: mlflow ui --backend-store-uri {self.tracking_uri}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_inputs(recipe: TrainRecipe) -> str:
    """Fail early, naming the problem, and never overwrite a finished model; returns a local
    folder holding ``init_from``'s configs (each worker fetches the weights on its own node)."""
    try:
        local = local_checkpoint(recipe.init_from, parts=["meta"])
        read_components(local)
        load_config(local)
    except (CheckpointError, FileNotFoundError, ValueError, OSError) as exc:
        raise ValueError(f"train recipe: init_from={recipe.init_from!r} is not a usable MoVA "
                         f"checkpoint: {exc}") from exc
    if not storage.exists(recipe.manifest):
        raise ValueError(f"train recipe: manifest {recipe.manifest!r} not found")
    if storage.exists(storage.join(recipe.output, "components.json")) and not recipe.overwrite:
        raise ValueError(f"train recipe: output {recipe.output!r} already holds a model; choose "
                         "another output or set overwrite=true")
    probe = storage.join(recipe.storage_path, f".mova-probe-{uuid.uuid4().hex}")
    try:
        storage.write_text_atomic(probe, "ok")
        storage.delete(probe)
    except OSError as exc:
        raise ValueError(f"train recipe: storage_path {recipe.storage_path!r} is not writable: "
                         f"{exc}") from exc
    return local


def optimizer_steps(valid_rows: int, recipe: TrainRecipe) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) for ``valid_rows`` manifest rows."""
    if valid_rows < recipe.num_workers:
        raise ValueError(f"{valid_rows} valid rows cannot feed {recipe.num_workers} workers")
    per_epoch = max(1, batches_per_epoch(valid_rows, recipe.num_workers, recipe.batch_size)
                    // recipe.grad_accum)
    return per_epoch, recipe.max_steps or recipe.epochs * per_epoch


def run_train(recipe: TrainRecipe) -> TrainResult:
    """Run (or resume) one training run on Ray Train; returns what it did."""
    start = time.perf_counter()
    recipe = recipe.absolute()
    local = check_inputs(recipe)
    tracking_uri, artifact_root = tracking_target(recipe.mlflow.tracking_uri, recipe.output,
                                                  recipe.joins_cluster())
    recipe.start_ray()
    report = storage.join(recipe.storage_path, recipe.name, "bad-rows")
    scan = scan_manifest(recipe.manifest, pool=load_config(local).expert_names,
                         chunk_rows=recipe.data.chunk_rows,
                         report=report if recipe.skip_bad_rows else None)
    scan.require_ok(recipe.skip_bad_rows)
    if scan.error_count:
        log.warning("skipping %d bad row(s) of %s; see %s", scan.rows - scan.valid,
                    recipe.manifest, report)
    per_epoch, total = optimizer_steps(scan.valid, recipe)
    log.info("%s: %d rows, %d workers x batch %d x accum %d -> %d optimizer steps "
             "(%d per epoch)", recipe.stage, scan.valid, recipe.num_workers, recipe.batch_size,
             recipe.grad_accum, total, per_epoch)
    trainer = _trainer(recipe, {"recipe": dataclasses.asdict(recipe), "total_steps": total,
                                "steps_per_epoch": per_epoch,
                                "chunks": [c.to_dict() for c in scan.chunks if c.valid],
                                "tracking_uri": tracking_uri, "artifact_root": artifact_root})
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray Train raises its WorkerGroupError from fit()
        raise RuntimeError(f"training failed: {exc}") from exc
    if result.error:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    metrics = result.metrics or {}
    return TrainResult(
        output=recipe.output, steps=int(metrics.get("step", total)),
        final_loss=metrics.get("loss"), mlflow_run_id=metrics.get("mlflow_run_id"),
        tracking_uri=tracking_uri,
        checkpoint=result.checkpoint.path if result.checkpoint else None,
        seconds=time.perf_counter() - start)


def _trainer(recipe: TrainRecipe, loop_config: dict[str, Any]) -> Any:
    """The TorchTrainer of a run: workers, storage, failures, checkpoints, environment (each
    worker reads its own rows of the manifest; see ``pipelines.train.loop.EpochData``)."""
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=recipe.num_workers, use_gpu=recipe.use_gpu,
                                     resources_per_worker={"CPU": recipe.cpus_per_worker}),
        run_config=RunConfig(
            name=recipe.name, storage_path=recipe.storage_path,
            failure_config=FailureConfig(max_failures=recipe.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=recipe.keep_checkpoints),
            worker_runtime_env={"env_vars": worker_env(gpu=recipe.use_gpu)}),
        torch_config=TorchConfig(backend="nccl" if recipe.use_gpu else "gloo"),
    )
