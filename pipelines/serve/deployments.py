"""The vision deployments: the adapter (preprocessing, base and text encoders, MoV-Adapter) and
one deployment per frozen expert.

Tensors travel by value in handle calls (Ray resolves large arguments before the method runs,
never in a worker thread), and every call carries its request's ``deadline`` (``time.time()``
seconds). Model work runs in a :class:`pipelines.serve.batching.Batcher` per method: batched,
in the replica's own thread, with a watchdog that turns the replica unhealthy (and so
replaced by Serve) when a batch runs far past its requests' deadlines.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from ray import serve

from mova.checkpoint import llm_folder, load_config, load_expert
from mova.device import resolve_device, torch_dtype
from mova.experts.preprocess import expert_input
from mova.factory import from_pretrained
from mova.images import load_image
from pipelines.common.checkpoint_store import local_checkpoint
from pipelines.serve.autoscale import RateMeter
from pipelines.serve.batching import Batcher, BatchSettings, faults_enabled
from pipelines.serve.metrics import metric

log = logging.getLogger(__name__)


# what a replica keeps -> (the checkpoint parts it fetches, the model parts it reads)
KEEP = {"llm": ("llm", "llm"), "base": ("base_encoder", "base_encoder"),
        "text": ("text_encoder", "text_encoder")}


def load_serving_model(checkpoint: str, device: str, keep: Sequence[str]):
    """Load from a checkpoint (local or s3://) only the parts this replica runs (``keep``
    among ``llm``, ``base``, ``text``; the adapter always: it defines the model's device and
    dtype): only those are fetched to the node, read, and moved to ``device``. Expert weights
    are never read (expert deployments load their own)."""
    fetch = ["adapter", *(KEEP[k][0] for k in keep)]
    skip = ["experts", *(part for k, (_, part) in KEEP.items() if k not in keep)]
    model = from_pretrained(local_checkpoint(checkpoint, parts=fetch), device=device, skip=skip)
    model.eval()
    return model


def load_for_engine(checkpoint: str, device: str) -> tuple[Any, str]:
    """For an LLM engine that reads the LLM folder itself (vLLM): the model without any
    network weights (tokenizer, template, routing settings, adapter) and the node-local path
    of the checkpoint's ``llm/`` folder (a plain Hugging Face folder)."""
    root = local_checkpoint(checkpoint, parts=["adapter", "llm"])
    model = from_pretrained(root, device=device, skip=["experts", *(p for _, p in KEEP.values())])
    model.eval()
    return model, str(llm_folder(root))


def process_info(deployment: str) -> dict[str, Any]:
    """PID and resident memory of this replica's process (for tests, benchmarks, metrics)."""
    rss = 0
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"deployment": deployment, "pid": os.getpid(), "rss_bytes": rss}


def apply_threads(config: dict[str, Any]) -> None:
    """Let the replica use the CPUs it was given (Ray sets one thread for fractional CPUs)."""
    threads = int(config.get("torch_threads") or 0)
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


class BatchedReplica:
    """What every batched model replica shares: settings, health, info, fault injection."""

    name = "replica"
    batchers: dict[str, Batcher]

    def reconfigure(self, config: dict[str, Any]) -> None:
        apply_threads(config)
        settings = BatchSettings.from_config(config)
        for batcher in self.batchers.values():
            batcher.settings = settings

    async def check_health(self) -> None:
        """Serve calls this periodically: a stuck batch makes it fail (the replica is then
        replaced)."""
        for batcher in self.batchers.values():
            batcher.check()

    def __del__(self) -> None:
        """Serve stops this replica (scaled down, redeployed, or replaced as unhealthy): say
        which, and what it still held, so an operator can tell downscaling from the
        watchdog."""
        batchers = getattr(self, "batchers", {})
        why = "; ".join(b.unhealthy for b in batchers.values() if b.unhealthy) or \
            "healthy (scaled down or redeployed)"
        held = {n: {"queued": len(b.queue), "running": b.running is not None}
                for n, b in batchers.items()}
        log.warning("%s replica stopping: %s; held %s", self.name, why, held)

    def info(self) -> dict[str, Any]:
        data = process_info(self.name)
        metric("resident_memory_bytes").set(data["rss_bytes"])
        return {**data, "batches": {n: b.summary() for n, b in self.batchers.items()}}

    def inject_stall(self, seconds: float) -> None:
        """Test-only (``MOVA_SERVE_FAULT_INJECTION=1``): the next batch blocks its thread."""
        if not faults_enabled():
            raise RuntimeError("fault injection is disabled on this server")
        for batcher in self.batchers.values():
            batcher.stall_next_s = seconds


@serve.deployment(name="Adapter")
class AdapterServer(BatchedReplica):
    """Preprocess + base encoder + text encoder + routing pass; later, the MoV-Adapter fusion."""

    name = "Adapter"

    def __init__(self, checkpoint: str, device: str = "auto") -> None:
        self.model = load_serving_model(checkpoint, device, keep=("base", "text"))
        self.batchers = {"encode": Batcher("encode", self._encode),
                         "fuse": Batcher("fuse", self._fuse)}

    async def encode(self, item: dict[str, Any]) -> dict[str, Any]:
        """``{"image", "questions", "deadline"}`` -> routing tokens ``(1, R, D)`` and the base
        and text features (returned to the caller, which hands them to :meth:`fuse`)."""
        return await self.batchers["encode"].submit(item, item["deadline"])

    def _encode(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        model = self.model
        with torch.no_grad():
            images = model.prepare_images([item["image"] for item in items])
            base = model.encode_base(model.processor.base(images))
            text = model.encode_questions([item["questions"] for item in items])
            routing = model.routing_tokens(base, text)
        return [{"routing_tokens": routing[i:i + 1].cpu().clone(),
                 "base": base[i:i + 1].cpu().clone(), "text": text[i:i + 1].cpu().clone()}
                for i in range(len(items))]

    async def fuse(self, item: dict[str, Any]) -> dict[str, Any]:
        """``{"base", "text", "experts": {name: native features}, "deadline"}`` -> the image
        tokens ``(1, L, D)`` and the gate weights ``(blocks, N)``."""
        return await self.batchers["fuse"].submit(item, item["deadline"])

    def _fuse(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        model = self.model
        base = torch.cat([item["base"] for item in items]).to(model.device)
        text = torch.cat([item["text"] for item in items]).to(model.device)
        mask = model.mask_from_names([list(item["experts"]) for item in items])
        feats: dict[str, torch.Tensor] = {}
        for i, item in enumerate(items):
            for name, value in item["experts"].items():
                if name not in feats:
                    feats[name] = value.new_zeros((len(items), *value.shape[1:]))
                feats[name][i] = value[0]
        debug = any(item.get("debug") for item in items)
        with torch.no_grad():
            out = model.fuse(base, text, feats, mask, debug=debug)
        gates = out.gate_weights
        results = [{"image_tokens": out.image_tokens[i:i + 1].cpu().clone(),
                    "gate_weights": gates[i].tolist() if gates is not None else []}
                   for i in range(len(items))]
        for i, item in enumerate(items):
            if item.get("debug") and out.router_logits is not None:
                results[i]["debug"] = {"router_logits": out.router_logits[i].tolist(),
                                       "top_k": out.top_k[i].tolist()}
        return results


@serve.deployment(name="Expert")
class ExpertServer(BatchedReplica):
    """One frozen vision expert: preprocesses the request image itself (so only routed experts
    preprocess) and returns its native feature map ``(1, L_j, C_j)``."""

    def __init__(self, checkpoint: str, expert: str, device: str = "auto") -> None:
        local = local_checkpoint(checkpoint, parts=[f"expert:{expert}"])
        self.name = f"Expert:{expert}"
        self.device = resolve_device(device)
        self.dtype = torch_dtype(load_config(local).dtype)
        module, self.resolved, _ = load_expert(local, expert)
        self.expert = module.to(self.device, self.dtype).eval().requires_grad_(False)
        self.batchers = {"features": Batcher(f"features:{expert}", self._features)}
        self.meter = RateMeter()

    async def features(self, item: dict[str, Any]) -> Any:
        """``{"image", "deadline"}`` -> the expert's native features ``(1, L_j, C_j)``."""
        self.meter.arrivals += 1
        return await self.batchers["features"].submit(item, item["deadline"])

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve calls this for the routed-rate policy (:mod:`pipelines.serve.autoscale`)."""
        batcher = self.batchers["features"]
        in_flight = len(batcher.queue) + (batcher.running[2] if batcher.running else 0)
        return self.meter.stats(batcher.items, batcher.busy_s, in_flight)

    def _features(self, items: list[dict[str, Any]]) -> list[Any]:
        pil = [load_image(item["image"]) for item in items]
        inputs = torch.stack([expert_input(im, self.resolved) for im in pil])
        dtype = self.dtype if inputs.is_floating_point() else inputs.dtype
        with torch.no_grad():
            out = self.expert(inputs.to(self.device, dtype))
        return [out[i:i + 1].cpu().clone() for i in range(len(items))]
