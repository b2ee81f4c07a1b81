"""The per-worker training loop run by Ray Train's TorchTrainer, with DeepSpeed inside.

:func:`train_loop` reads the recipe, builds the model and the DeepSpeed engine, resumes from
Ray Train's latest checkpoint, opens the MLflow run on rank 0, runs the epochs
(:class:`StepLoop`) and exports the trained model from rank 0.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import deepspeed
import ray
import ray.train
import torch
import yaml
from ray.train import Checkpoint
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from mova.checkpoint import write_file_list
from mova.device import place
from mova.factory import from_pretrained
from mova.training import (
    TrainableParts,
    add_lora,
    count_parameters,
    enable_gradient_checkpointing,
    merge_lora,
    routing_stats,
    set_stage,
    trainable_parameters,
)
from mova.typed_dict import from_dict
from pipelines.common import storage
from pipelines.common.batches import PrepareSpec, collate
from pipelines.common.checkpoint_store import local_checkpoint, publish
from pipelines.common.tracking import Tracker, flatten
from pipelines.train.dataset import worker_dataset
from pipelines.train.distributed import (
    broadcast_text,
    gather_text,
    mean_across_ranks,
    routed_on_any_rank,
    world_size,
)
from pipelines.train.order import EpochOrder
from pipelines.train.recipe import TrainRecipe

log = logging.getLogger(__name__)

STATE_TAG = "state"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


def _deepspeed_config(recipe: TrainRecipe, bf16: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": recipe.deepspeed.zero_stage}
    if recipe.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if recipe.deepspeed.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": recipe.batch_size,
        "gradient_accumulation_steps": recipe.grad_accum,
        "gradient_clipping": recipe.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
    }


def _skip_shm_build() -> None:
    """DeepSpeed's CPU accelerator JIT-builds a shared-memory op (~50 s) that training does
    not need; replace the builder before ``deepspeed.initialize``."""
    module = sys.modules.get("deepspeed.comm.torch")
    if module is not None and hasattr(module, "build_shm_op"):
        module.build_shm_op = lambda: None


@dataclass
class RunState:
    """Where a run is: saved with every checkpoint, restored on resume."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    mlflow_run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "batch": self.batch,
                "mlflow_run_id": self.mlflow_run_id}


@dataclass
class Engine:
    """The model, its DeepSpeed engine and LR scheduler, and what the loop reads off them."""

    model: Any
    engine: Any
    scheduler: Any
    names: list[str]
    pad_id: int
    params: tuple[int, int]  # (trainable, total)
    dtype: str = "float32"  # the training precision (``float32`` or ``bfloat16``)


def build_engine(recipe: TrainRecipe, total_steps: int) -> Engine:
    """Load the init checkpoint, apply the stage's freezing, LoRA and checkpointing rules,
    and wrap the trainable parts in DeepSpeed."""
    gpu = torch.cuda.is_available() and recipe.use_gpu
    bf16 = recipe.precision == "bf16" or (recipe.precision == "auto" and gpu)
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = from_pretrained(local_checkpoint(recipe.init_from))
    model.to(dtype)  # the engine casts what it wraps; the frozen experts follow the same dtype
    set_stage(model, recipe.stage)
    if recipe.lora.enabled:
        add_lora(model, recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout,
                 recipe.lora.target_modules)
    if recipe.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=recipe.optim.lr,
                                  betas=tuple(recipe.optim.betas),
                                  weight_decay=recipe.optim.weight_decay)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=int(round(total_steps * recipe.optim.warmup_ratio)),
        num_training_steps=total_steps, min_lr_rate=recipe.optim.min_lr_ratio)
    _skip_shm_build()
    engine, _, _, scheduler = deepspeed.initialize(
        model=TrainableParts(model), optimizer=optimizer, lr_scheduler=scheduler,
        config=_deepspeed_config(recipe, bf16))
    place(model.experts, engine.device, dtype)  # outside the engine: follow its device
    return Engine(model=model, engine=engine, scheduler=scheduler, names=model.expert_names,
                  pad_id=model.tokenizer.pad_token_id, params=count_parameters(model),
                  dtype="bfloat16" if bf16 else "float32")


def train_loop(config: dict) -> None:
    """Ray Train entry point: one worker of a pretrain or SFT run (its environment, set by the
    job's ``worker_runtime_env``, chose DeepSpeed's accelerator before this module imported
    it)."""
    recipe = from_dict(TrainRecipe, config["recipe"])
    total_steps = int(config["total_steps"])
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(recipe.seed + rank)
    parts = build_engine(recipe, total_steps)
    state, resumed = _resume(parts.engine, rank)
    tracker = _open_tracker(config, recipe, parts, state, rank, resumed)
    run_id = broadcast_text(state.mlflow_run_id or "")
    state.mlflow_run_id = run_id
    status = "FAILED"
    try:
        loop = StepLoop(recipe, parts, state, total_steps, tracker,
                        EpochData(config, recipe, rank))
        step = loop.run()
        loop.write_seen()
        _export(recipe, parts, rank, tracker, step, run_id, config)
        status = "FINISHED"
    finally:
        if tracker is not None:
            tracker.end(status)


def _resume(engine: Any, rank: int) -> tuple[RunState, bool]:
    """The run state of Ray Train's latest checkpoint (engine state loaded), or a fresh one."""
    state = RunState()
    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return state, False
    with checkpoint.as_directory() as folder:
        _, client = engine.load_checkpoint(folder, tag=STATE_TAG)
    saved = {k: v for k, v in (client or {}).items() if k in RunState.__dataclass_fields__}
    state = RunState(**{**state.to_dict(), **saved})  # DeepSpeed adds keys of its own
    log.info("rank %d resumed at step %d (epoch %d, batch %d)", rank, state.step, state.epoch,
             state.batch)
    return state, True


def _open_tracker(config: dict, recipe: TrainRecipe, parts: Engine, state: RunState,
                  rank: int, resumed: bool) -> Any:
    """Rank 0's MLflow run (a resumed run continues its own); every rank joins the node
    gather, a collective."""
    nodes = gather_text(ray.get_runtime_context().get_node_id())
    if rank != 0:
        return None

    tracker = Tracker(config["tracking_uri"], recipe.mlflow.experiment,
                      config["artifact_root"], recipe.mlflow.run_name or recipe.name,
                      run_id=state.mlflow_run_id, system_metrics=recipe.mlflow.system_metrics)
    if state.mlflow_run_id is None:
        tracker.log_text(yaml.safe_dump(config["recipe"], sort_keys=False), "recipe.yaml")
    state.mlflow_run_id = tracker.run_id
    trainable, total = parts.params
    tracker.log_params({**flatten(config["recipe"]), "total_steps": str(config["total_steps"]),
                        "trainable_params": str(trainable), "total_params": str(total),
                        "world_size": str(world_size()), **_placement_params(nodes)})
    if resumed:
        tracker.log_metrics({"resumed_from_step": state.step}, state.step)
    return tracker


def _placement_params(nodes: list[str]) -> dict[str, str]:
    """MLflow params saying where the ranks ran: ``worker_nodes`` lists each rank's Ray node
    id in rank order (cut to MLflow's 6000-character limit), ``num_nodes`` counts them."""
    return {"worker_nodes": ",".join(nodes)[:MAX_PARAM_CHARS],
            "num_nodes": str(len(set(nodes)))}


class EpochData:
    """This worker's prepared batches of an epoch, in the epoch order, from a batch on."""

    def __init__(self, config: dict, recipe: TrainRecipe, rank: int) -> None:
        self.chunks = config["chunks"]
        self.batches = int(config["steps_per_epoch"]) * recipe.grad_accum
        self.recipe, self.rank = recipe, rank
        self.world = ray.train.get_context().get_world_size()
        self.spec = PrepareSpec(checkpoint=recipe.init_from, cache=recipe.cache,
                                features=recipe.features, max_length=recipe.max_length)

    def batches_from(self, epoch: int, first_batch: int, pool: list[str]) -> Any:
        """(batch index, batch) of the epoch from ``first_batch`` on; nothing before it is
        read or prepared."""
        recipe = self.recipe
        order = EpochOrder(seed=recipe.seed, epoch=epoch, world=self.world,
                           window_chunks=recipe.data.window_chunks, shuffle=recipe.data.shuffle)
        if first_batch >= self.batches:
            return
        dataset = worker_dataset(self.chunks, order, self.rank, first_batch * recipe.batch_size,
                                 self.spec, pool, skip_bad_rows=recipe.skip_bad_rows,
                                 prepare_batch_size=recipe.data.prepare_batch_size)
        for i, batch in enumerate(dataset.iter_batches(batch_size=recipe.batch_size,
                                                       batch_format="numpy"),
                                  start=first_batch):
            if i >= self.batches:
                return
            yield i, batch


@dataclass
class _Window:
    """Losses and tokens since the last logged step."""

    start: float = field(default_factory=time.perf_counter)
    tokens: int = 0
    losses: list[float] = field(default_factory=list)


class StepLoop:
    """The epochs of one worker: micro steps, optimizer steps, metrics and checkpoints."""

    def __init__(self, recipe: TrainRecipe, parts: Engine, state: RunState, total_steps: int,
                 tracker: Any, data: EpochData) -> None:
        self.recipe = recipe
        self.parts = parts
        self.state = state
        self.total_steps = total_steps
        self.tracker = tracker
        self.data = data
        self.window = _Window()
        self.seen: list[dict] = []  # batch records not yet written (data.record_batches)

    def run(self) -> int:
        """Train until ``total_steps`` optimizer steps; returns the last step. A resumed run
        starts at the batch after its checkpoint's, in the same epoch order."""
        state = self.state
        start_epoch, start_batch = state.epoch, state.batch
        for epoch in range(start_epoch, self.recipe.epochs + self.total_steps):
            if state.step >= self.total_steps:
                break
            first = start_batch if epoch == start_epoch else 0
            for i, batch in self.data.batches_from(epoch, first, self.parts.names):
                if self.micro_step(batch, epoch, i) and state.step >= self.total_steps:
                    return state.step
        return state.step

    def micro_step(self, batch: dict, epoch: int, index: int) -> bool:
        """Forward and backward of one batch; True when it completed an optimizer step."""
        engine, names = self.parts.engine, self.parts.names
        if self.recipe.data.record_batches:
            self.seen.append({"epoch": epoch, "batch": index,
                              "ids": [str(i) for i in batch["id"]]})
        inputs = collate(batch, names, self.parts.pad_id, self.recipe.features)
        inputs["sync_experts"] = routed_on_any_rank(inputs, names)
        engine.train()
        out = engine(**inputs)
        engine.backward(out.loss)
        engine.step()
        self.window.losses.append(float(out.loss.detach()))
        self.window.tokens += int(inputs["attention_mask"].sum())
        if engine.global_steps == self.state.step:
            return False  # still accumulating gradients
        self.state.step = engine.global_steps
        self.after_step(inputs, epoch, index)
        self._injected_fault()
        return True

    def _injected_fault(self) -> None:
        """Test-only (``data.inject_faults``): this rank's process exits at a listed step the
        first time the run reaches it (a marker under ``storage_path`` remembers), as a killed
        worker would: the run restarts from its last checkpoint or fails."""
        where = f"{self.data.rank}:{self.state.step}"
        if where not in self.recipe.data.inject_faults:
            return
        marker = storage.join(self.recipe.storage_path, self.recipe.name, "faults",
                              where.replace(":", "-"))
        if storage.exists(marker):
            return
        storage.write_text_atomic(marker, "injected\n")
        log.warning("injected fault: rank %d exits at step %d", self.data.rank, self.state.step)
        os._exit(17)

    def after_step(self, inputs: dict, epoch: int, index: int) -> None:
        """Log (every ``log_every``) and checkpoint (every ``checkpoint_every``, and last)."""
        step, recipe = self.state.step, self.recipe
        last = step >= self.total_steps
        if step % recipe.log_every and step % recipe.checkpoint_every and not last:
            return
        metrics = self._metrics(inputs, epoch)
        if self.tracker is not None:
            self.tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step)
        if step % recipe.checkpoint_every == 0 or last:
            self.state.epoch, self.state.batch = epoch, index + 1
            self._save(metrics)
        else:
            ray.train.report(metrics)

    def write_seen(self) -> None:
        """Record the sample ids of the batches since the last call (one small file)."""
        if not self.seen:
            return

        path = storage.join(self.recipe.storage_path, self.recipe.name, "batches",
                            f"rank{self.data.rank}-{uuid.uuid4().hex}.jsonl")
        storage.write_text_atomic(path, "".join(json.dumps({"rank": self.data.rank, **r}) + "\n"
                                                for r in self.seen))
        self.seen = []

    def _metrics(self, inputs: dict, epoch: int) -> dict[str, float]:
        window, engine = self.window, self.parts.engine
        elapsed = time.perf_counter() - window.start
        grad_norm = engine.get_global_grad_norm()
        metrics = {
            "step": self.state.step, "epoch": epoch,
            "loss": mean_across_ranks(sum(window.losses) / len(window.losses)),
            "lr": self.parts.scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
            "tokens_per_s": mean_across_ranks(window.tokens / elapsed) * world_size(),
            **routing_stats(inputs["expert_mask"], self.parts.names),
        }
        self.window = _Window()
        return metrics

    def _save(self, metrics: dict[str, float]) -> None:
        if self.tracker is not None:
            self.tracker.flush()
        self.write_seen()
        with tempfile.TemporaryDirectory(prefix="mova-ckpt-") as folder:
            self.parts.engine.save_checkpoint(folder, tag=STATE_TAG,
                                              client_state=self.state.to_dict())
            ray.train.report({**metrics, "mlflow_run_id": self.state.mlflow_run_id},
                             checkpoint=Checkpoint.from_directory(folder))


def _export(recipe: TrainRecipe, parts: Engine, rank: int, tracker: Any, step: int,
            run_id: str, config: dict) -> None:
    """Write the self-describing model checkpoint (LoRA merged) from rank 0."""
    engine, model = parts.engine, parts.model
    gather = (deepspeed.zero.GatheredParameters(list(engine.module.parameters()),
                                                modifier_rank=0)
              if recipe.deepspeed.zero_stage == 3 else contextlib.nullcontext())
    with gather:
        if rank != 0:
            return
        merge_lora(model)
        dtype = parts.dtype if recipe.export_dtype == "auto" else recipe.export_dtype
        model.config.dtype = dtype
        place(model, "cpu", dtype)
        with tempfile.TemporaryDirectory(prefix="mova-export-") as tmp:
            folder = model.save_pretrained(os.path.join(tmp, "model"))
            (folder / "training.json").write_text(json.dumps({
                "stage": recipe.stage, "steps": step, "init_from": recipe.init_from,
                "mlflow_run_id": run_id, "tracking_uri": config["tracking_uri"],
                "recipe": config["recipe"]}, indent=2) + "\n")
            write_file_list(folder)  # training.json belongs to the checkpoint too
            if tracker is not None:
                tracker.log_artifacts(str(folder), "model")
            publish(folder, recipe.output)
