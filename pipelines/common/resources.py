"""What Ray should reserve for our actors: CPUs, GPUs and the memory they really use.

An actor that holds a model uses the memory of a Python process with torch and Ray loaded, of
its weights, and of the batch it works on. Requesting that (``memory=``) lets Ray place actors
by it and keeps Ray Data's memory detector quiet; requesting nothing (Ray's default) would let
a node take more model actors than it can hold.
"""

from __future__ import annotations

import json
import math
import warnings
from typing import Any

import ray

from mova.checkpoint import llm_folder, load_config
from pipelines.common.checkpoint_store import local_checkpoint, part_bytes

MIB = 1 << 20
# Unique memory of an idle Ray worker that imported torch, transformers and our code
# (measured here: 385-510 MiB for the tiny experts' actors, including their small weights).
PROCESS_BYTES = 448 * MIB
# Ray Data warns when an actor uses more than its request minus 25 % headroom.
HEADROOM = 1.25


def actor_memory(weight_bytes: int, batch: int, item_bytes: int,
                 weight_copies: float = 1.0) -> int:
    """Bytes to request for an actor holding ``weight_bytes`` of weights (``weight_copies``
    of them alive at once, e.g. while loading) that works on ``batch`` items of about
    ``item_bytes`` of working memory each."""
    used = PROCESS_BYTES + weight_copies * weight_bytes + batch * item_bytes
    return int(math.ceil(HEADROOM * used / MIB)) * MIB


def image_item_bytes(side: int, factor: int = 8) -> int:
    """Working memory of one image of ``side`` pixels through a vision model: its float32
    pixels, times ``factor`` for the activations alive at once."""
    return 3 * side * side * 4 * factor


def model_actor_memory(checkpoint: str, batch: int, tokens: int = 512) -> int:
    """Memory for an actor holding the whole MoVA checkpoint ``checkpoint`` (a URI) and running
    ``batch`` samples of up to ``tokens`` tokens: its images and its LLM logits dominate."""
    local = local_checkpoint(checkpoint, parts=["meta"])
    config = load_config(local)
    llm = json.loads((llm_folder(local) / "config.json").read_text())
    item = image_item_bytes(config.base.image_size) + tokens * int(llm["vocab_size"]) * 4
    return actor_memory(part_bytes(checkpoint), batch, item, weight_copies=1.5)


def actor_pool_args(workers: int, cpus_per_worker: float, gpus_per_worker: float,
                    memory: int | None = None) -> dict[str, Any]:
    """``map_batches`` arguments of a fixed pool of Ray Data actors (a model loaded once each),
    each reserving ``memory`` bytes (see :func:`actor_memory`).

    Actors are not restarted (``max_restarts=0``): Ray Data hands them their constructor
    arguments through the object store, and Ray cannot always restore those for a restarted
    actor (ray-project/ray#53727, which Ray reports on every such pool). Our jobs recover by
    being run again instead: the feature job skips what is cached, and a failure names its
    cause rather than retrying it in silence. Ray Data 2.60 documents ``max_restarts=0`` as
    the way to turn restarts off while also flagging extra remote arguments as deprecated (no
    named parameter exists for it yet): that one warning is filtered.
    """
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
    args = {"compute": ray.data.ActorPoolStrategy(size=workers), "num_cpus": cpus_per_worker,
            "num_gpus": gpus_per_worker or None, "max_restarts": 0}
    if memory:
        args["memory"] = memory
    return args
