"""Small collectives of the training loop (no-ops in a single process)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist


def _group() -> Any:
    return dist if dist.is_initialized() and dist.get_world_size() > 1 else None


def world_size() -> int:
    dist = _group()
    return dist.get_world_size() if dist else 1


def mean_across_ranks(value: float) -> float:
    dist = _group()
    if dist is None:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item() / dist.get_world_size())


def broadcast_text(text: str) -> str:
    """Rank 0's ``text`` on every rank."""
    dist = _group()
    if dist is None:
        return text
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_text(text: str) -> list[str]:
    """Every rank's ``text``, in rank order."""
    dist = _group()
    if dist is None:
        return [text]
    box: list = [None] * dist.get_world_size()
    dist.all_gather_object(box, text)
    return [str(b) for b in box]


def routed_on_any_rank(inputs: dict, names: Sequence[str]) -> list[str]:
    """Experts routed by any sample on any rank this micro step (one small all-reduce).

    Each rank then runs the adapter branches of exactly these experts, so the backward graphs
    and the order of gradient reductions match across ranks (ZeRO-2/3 need that)."""
    mask = inputs["expert_mask"].bool()
    if "routing_rows" in inputs:
        mask = mask & ~inputs["routing_rows"].bool()[:, None]
    used = mask.any(0).to(torch.int32)
    dist = _group()
    if dist is not None:
        dist.all_reduce(used, op=dist.ReduceOp.MAX)
    return [n for n, u in zip(names, used.tolist(), strict=True) if u]
