"""The per-worker training loop run by Ray Train's TorchTrainer, with DeepSpeed inside."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from typing import Any

log = logging.getLogger(__name__)

STATE_TAG = "state"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


def _deepspeed_config(recipe, bf16: bool) -> dict[str, Any]:
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


def _mean_across_ranks(value: float) -> float:
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item() / dist.get_world_size())


def train_loop(config: dict) -> None:
    """Ray Train entry point: one worker of a pretrain or SFT run."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import ray.train
    from ray.train import Checkpoint

    from mova.checkpoint import from_pretrained
    from mova.config import from_dict
    from mova.training import (
        add_lora,
        count_parameters,
        enable_gradient_checkpointing,
        routing_stats,
        set_stage,
        trainable_parameters,
        warmup_cosine,
    )
    from pipelines.dataset import collate
    from pipelines.train_recipe import TrainRecipe

    recipe = from_dict(TrainRecipe, config["recipe"])
    total_steps = int(config["total_steps"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(recipe.seed + rank)
    gpu = torch.cuda.is_available() and recipe.use_gpu
    bf16 = recipe.precision == "bf16" or (recipe.precision == "auto" and gpu)

    model = from_pretrained(recipe.init_from)
    set_stage(model, recipe.stage)
    if recipe.lora.enabled:
        add_lora(model, recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout,
                 recipe.lora.target_modules)
    if recipe.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    names, pad_id = model.expert_names, model.tokenizer.pad_token_id
    trainable, total = count_parameters(model)
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=recipe.optim.lr, betas=tuple(recipe.optim.betas),
                                  weight_decay=recipe.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, recipe.optim.warmup_ratio,
                                 recipe.optim.min_lr_ratio))
    _skip_shm_build()
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=_without_experts(model), optimizer=optimizer, lr_scheduler=scheduler,
        config=_deepspeed_config(recipe, bf16))

    state = {"step": 0, "epoch": 0, "batch": 0, "mlflow_run_id": None}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            _, client = engine.load_checkpoint(folder, tag=STATE_TAG)
        state.update(client or {})
        log.info("rank %d resumed at step %d (epoch %d, batch %d)", rank, state["step"],
                 state["epoch"], state["batch"])

    nodes = _gather_text(ray.get_runtime_context().get_node_id())  # collective: all ranks
    tracker = None
    if rank == 0:
        from pipelines.tracking import Tracker, flatten

        tracker = Tracker(config["tracking_uri"], recipe.mlflow.experiment,
                          config["artifact_root"], recipe.mlflow.run_name or recipe.name,
                          run_id=state["mlflow_run_id"],
                          system_metrics=recipe.mlflow.system_metrics)
        if state["mlflow_run_id"] is None:
            import yaml

            tracker.log_text(yaml.safe_dump(config["recipe"], sort_keys=False), "recipe.yaml")
        state["mlflow_run_id"] = tracker.run_id
        tracker.log_params({**flatten(config["recipe"]), "total_steps": str(total_steps),
                            "trainable_params": str(trainable), "total_params": str(total),
                            "world_size": str(ctx.get_world_size()),
                            **_placement_params(nodes)})
    run_id = _broadcast_text(state["mlflow_run_id"] or "")
    if tracker is not None and checkpoint:
        tracker.log_metrics({"resumed_from_step": state["step"]}, state["step"])

    shard = ray.train.get_dataset_shard("train")
    step = state["step"]
    status = "FAILED"
    try:
        step = _epochs(recipe, engine, scheduler, shard, state, total_steps, names, pad_id,
                       tracker, run_id, collate, routing_stats, Checkpoint)
        _export(recipe, engine, model, rank, tracker, step, run_id, config)
        status = "FINISHED"
    finally:
        if tracker is not None:
            tracker.end(status)


def _without_experts(model):
    """The module DeepSpeed manages: every part of ``model`` but the frozen experts.

    Experts only run inference, on the samples routed to them; under ZeRO-3 their
    parameters would be partitioned and gathered collectively, and ranks whose batches route
    different experts would then disagree on the collectives. The wrapper's forward is the
    model's forward; the parts are the same module objects, so hooks and weights are shared.
    """
    import torch

    class TrainableParts(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.llm = model.llm
            self.text_encoder = model.text_encoder
            self.base_encoder = model.base_encoder
            self.adapter = model.adapter
            self.__dict__["mova"] = model  # not registered: experts stay outside

        def forward(self, **kwargs):
            return self.mova(**kwargs)

        def train(self, mode: bool = True):
            super().train(mode)
            self.mova.train(mode)
            return self

    return TrainableParts()


def _broadcast_text(text: str) -> str:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return text
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _epochs(recipe, engine, scheduler, shard, state, total_steps, names, pad_id, tracker,
            run_id, collate, routing_stats, Checkpoint) -> int:
    import ray.train

    step = state["step"]
    window_start, window_tokens, losses = time.perf_counter(), 0, []
    for epoch in range(state["epoch"], recipe.epochs + total_steps):
        if step >= total_steps:
            break
        skip = state["batch"] if epoch == state["epoch"] else 0
        for i, batch in enumerate(shard.iter_batches(batch_size=recipe.batch_size,
                                                     batch_format="numpy")):
            if i < skip:
                continue
            inputs = collate(batch, names, pad_id, recipe.features)
            inputs["sync_experts"] = _routed_on_any_rank(inputs, names)
            engine.train()
            out = engine(**inputs)
            engine.backward(out.loss)
            engine.step()
            losses.append(float(out.loss.detach()))
            window_tokens += int(inputs["attention_mask"].sum())
            if engine.global_steps == step:
                continue  # still accumulating gradients
            step = engine.global_steps
            if step % recipe.log_every and step % recipe.checkpoint_every and step < total_steps:
                continue
            elapsed = time.perf_counter() - window_start
            grad_norm = engine.get_global_grad_norm()
            metrics = {
                "step": step, "epoch": epoch,
                "loss": _mean_across_ranks(sum(losses) / len(losses)),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
                "tokens_per_s": _mean_across_ranks(window_tokens / elapsed) * _world(),
                **routing_stats(inputs["expert_mask"], names),
            }
            window_start, window_tokens, losses = time.perf_counter(), 0, []
            if tracker is not None:
                tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step)
            if step % recipe.checkpoint_every == 0 or step >= total_steps:
                _save(engine, metrics, {"step": step, "epoch": epoch, "batch": i + 1,
                                        "mlflow_run_id": run_id}, tracker, run_id, Checkpoint)
            else:
                ray.train.report(metrics)
            if step >= total_steps:
                return step
    return step


def _gather_text(text: str) -> list[str]:
    """Every rank's ``text``, in rank order (one all-gather; a single process: ``[text]``)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [text]
    box: list = [None] * dist.get_world_size()
    dist.all_gather_object(box, text)
    return [str(b) for b in box]


def _placement_params(nodes: list[str]) -> dict[str, str]:
    """MLflow params saying where the ranks ran: ``worker_nodes`` lists each rank's Ray node
    id in rank order (cut to MLflow's 6000-character limit), ``num_nodes`` counts them."""
    return {"worker_nodes": ",".join(nodes)[:MAX_PARAM_CHARS],
            "num_nodes": str(len(set(nodes)))}


def _routed_on_any_rank(inputs: dict, names: list[str]) -> list[str]:
    """Experts routed by any sample on any rank this micro step (one small all-reduce).

    Each rank then runs the adapter branches of exactly these experts, so the backward graphs
    and the order of gradient reductions match across ranks (ZeRO-2/3 need that)."""
    import torch
    import torch.distributed as dist

    mask = inputs["expert_mask"].bool()
    if "routing_rows" in inputs:
        mask = mask & ~inputs["routing_rows"].bool()[:, None]
    used = mask.any(0).to(torch.int32)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(used, op=dist.ReduceOp.MAX)
    return [n for n, u in zip(names, used.tolist(), strict=True) if u]


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def _save(engine, metrics, client_state, tracker, run_id, Checkpoint) -> None:
    import ray.train

    if tracker is not None:
        tracker.flush()
    with tempfile.TemporaryDirectory(prefix="mova-ckpt-") as folder:
        engine.save_checkpoint(folder, tag=STATE_TAG, client_state=client_state)
        ray.train.report({**metrics, "mlflow_run_id": run_id},
                         checkpoint=Checkpoint.from_directory(folder))


def _export(recipe, engine, model, rank, tracker, step, run_id, config) -> None:
    """Write the self-describing model checkpoint (LoRA merged) from rank 0."""
    import contextlib

    import deepspeed

    from mova.training import merge_lora
    from pipelines import storage

    gather = (deepspeed.zero.GatheredParameters(list(engine.module.parameters()),
                                                modifier_rank=0)
              if recipe.deepspeed.zero_stage == 3 else contextlib.nullcontext())
    with gather:
        if rank != 0:
            return
        merge_lora(model)
        model.config.dtype = "float32"
        model.float()
        with tempfile.TemporaryDirectory(prefix="mova-export-") as tmp:
            folder = model.save_pretrained(os.path.join(tmp, "model"))
            (folder / "training.json").write_text(json.dumps({
                "stage": recipe.stage, "steps": step, "init_from": recipe.init_from,
                "mlflow_run_id": run_id, "tracking_uri": config["tracking_uri"],
                "recipe": config["recipe"]}, indent=2) + "\n")
            if tracker is not None:
                tracker.log_artifacts(str(folder), "model")
            storage.upload_folder(str(folder), recipe.output)
