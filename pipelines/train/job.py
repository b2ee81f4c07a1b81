"""`mova train`: pretraining and SFT on Ray Train + DeepSpeed, tracked in MLflow.

The recipe is validated and every input checked before Ray starts. Running the same command
again resumes from the latest checkpoint of the run (same ``name`` and ``storage_path``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pipelines.common import storage
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


def check_inputs(recipe: TrainRecipe) -> None:
    """Fail early, naming the problem, and never overwrite a finished model."""
    from mova.checkpoint import CheckpointError, load_config, read_components

    try:
        read_components(recipe.init_from)
        load_config(recipe.init_from)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
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


def steps_per_epoch(num_samples: int, recipe: TrainRecipe) -> int:
    per_worker = num_samples // recipe.num_workers
    if per_worker == 0:
        raise ValueError(f"{num_samples} samples cannot feed {recipe.num_workers} workers")
    return max(1, math.ceil(per_worker / recipe.batch_size) // recipe.grad_accum)


def run_train(recipe: TrainRecipe) -> TrainResult:
    """Run (or resume) one training run on Ray Train; returns what it did."""
    from pipelines.common.tracking import tracking_target
    from pipelines.train.dataset import build_dataset

    start = time.perf_counter()
    recipe = recipe.absolute()
    check_inputs(recipe)
    tracking_uri, artifact_root = tracking_target(recipe.mlflow.tracking_uri, recipe.output)
    recipe.start_ray()
    dataset, num_samples = build_dataset(
        recipe.manifest, recipe.init_from, cache=recipe.cache, features=recipe.features,
        max_length=recipe.max_length, skip_bad_rows=recipe.skip_bad_rows)
    total = recipe.max_steps or recipe.epochs * steps_per_epoch(num_samples, recipe)
    log.info("%s: %d samples, %d workers x batch %d x accum %d -> %d optimizer steps",
             recipe.stage, num_samples, recipe.num_workers, recipe.batch_size, recipe.grad_accum,
             total)
    trainer = _trainer(recipe, dataset, {"recipe": dataclasses.asdict(recipe),
                                         "total_steps": total, "tracking_uri": tracking_uri,
                                         "artifact_root": artifact_root})
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


def _trainer(recipe: TrainRecipe, dataset: Any, loop_config: dict[str, Any]) -> Any:
    """The TorchTrainer of a run: workers, storage, failures, checkpoints, environment."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.common.ray_init import worker_env
    from pipelines.train.loop import train_loop

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
        datasets={"train": dataset},
        torch_config=TorchConfig(backend="nccl" if recipe.use_gpu else "gloo"),
    )
