"""Serve metrics through ``ray.serve.metrics``: every replica records into Ray's metrics
pipeline, which tags each series with its deployment, replica and application, so Prometheus
(scraping each node's Ray metrics port) aggregates them across replicas and nodes.

Families (Ray exports them with its ``ray_`` prefix): ``mova_requests`` by HTTP status,
``mova_expert_routed`` by expert and source (routed or forced), ``mova_queue_depth`` and
``mova_batch_size`` per stage (encode, fuse, features:<expert>, decode), ``mova_step_seconds``
per stage (one batch or one decode step), ``mova_request_seconds``,
``mova_time_to_first_token_seconds``, ``mova_requests_in_flight``, token counters,
``mova_deadline_expired`` and ``mova_replica_unhealthy`` per stage,
``mova_feature_cache_lookups`` by expert and result (hit or miss) and
``mova_feature_cache_bytes`` (the node's expert feature cache, as a replica last saw it); on
the vLLM engine also ``mova_engine_kv_cache_usage``, ``mova_engine_prefix_cache_tokens`` by
result and ``mova_engine_time_to_first_token_seconds`` (vLLM's own statistics).

``GET /metrics`` on the ingress returns those families as the local node's metrics agent
exports them (one node's view; a cluster scrapes every node's Ray metrics port instead).
Outside a Ray worker (unit tests, the library) every recorder is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import ray
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from ray.serve import metrics as sm

log = logging.getLogger(__name__)

PREFIX = "mova_"
_LATENCY = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
_SIZES = [1, 2, 4, 8, 16, 32, 64]
_SPECS: dict[str, tuple[str, str, tuple[str, ...], list[float] | None]] = {
    "requests": ("counter", "Chat completion requests by HTTP status", ("status",), None),
    "expert_routed": ("counter", "Requests sent to each expert (routed or forced)",
                      ("expert", "source"), None),
    "queue_depth": ("gauge", "Items waiting for a batch or a decode slot", ("stage",), None),
    "batch_size": ("histogram", "Items per batch (rows per decode step)", ("stage",), _SIZES),
    "step_seconds": ("histogram", "Duration of one batch or one decode step", ("stage",),
                     _LATENCY),
    "request_seconds": ("histogram", "Time from request to the last byte of the answer", (),
                        _LATENCY),
    "time_to_first_token_seconds": ("histogram", "Time from request to the first answer text",
                                    (), _LATENCY),
    "requests_in_flight": ("gauge", "Requests being served by the ingress", (), None),
    "prompt_tokens": ("counter", "Prompt tokens of answered requests", (), None),
    "completion_tokens": ("counter", "Generated tokens of answered requests", (), None),
    "deadline_expired": ("counter", "Items dropped because their deadline passed",
                         ("stage",), None),
    "replica_unhealthy": ("counter", "Times a replica found itself stuck", ("stage",), None),
    "resident_memory_bytes": ("gauge", "Resident memory of the replica's process", (), None),
    "feature_cache_lookups": ("counter", "Expert feature cache lookups by expert and result "
                              "(hit or miss)", ("expert", "result"), None),
    "feature_cache_bytes": ("gauge", "Bytes the node's expert feature cache holds, as this "
                            "replica last saw them", (), None),
    # vLLM's own statistics (pipelines/serve/vllm_engine.py)
    "engine_kv_cache_usage": ("gauge", "Share of the LLM engine's KV cache in use (vLLM)", (),
                              None),
    "engine_prefix_cache_tokens": ("counter", "Prompt tokens looked up in the LLM engine's "
                                   "prefix cache, by result (hit or miss; vLLM)", ("result",),
                                   None),
    "engine_time_to_first_token_seconds": ("histogram", "Time from a request reaching the LLM "
                                           "engine to its first token (vLLM)", (), _LATENCY),
}
_made: dict[str, Any] = {}


class _Null:
    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        pass

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        pass

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        pass


def metric(name: str) -> Any:
    """The ``ray.serve.metrics`` object of family ``mova_<name>`` (a no-op outside Ray)."""
    if name in _made:
        return _made[name]
    kind, description, tags, boundaries = _SPECS[name]
    try:
        if not ray.is_initialized():
            return _Null()

        full = PREFIX + name
        if kind == "counter":
            made = sm.Counter(full, description=description, tag_keys=tags)
        elif kind == "gauge":
            made = sm.Gauge(full, description=description, tag_keys=tags)
        else:
            made = sm.Histogram(full, description=description, boundaries=boundaries,
                                tag_keys=tags)
    except Exception as exc:  # metrics must never break serving
        log.warning("metric %s unavailable: %r", name, exc)
        made = _Null()
    _made[name] = made
    return made


class StageMetrics:
    """The recorders of one batching stage of a replica."""

    def __init__(self, stage: str) -> None:
        self.tags = {"stage": stage}

    def queue(self, depth: int) -> None:
        metric("queue_depth").set(depth, tags=self.tags)

    def batch(self, size: int, seconds: float) -> None:
        metric("batch_size").observe(size, tags=self.tags)
        metric("step_seconds").observe(seconds, tags=self.tags)

    def expired(self, count: int = 1) -> None:
        metric("deadline_expired").inc(count, tags=self.tags)

    def unhealthy(self) -> None:
        metric("replica_unhealthy").inc(tags=self.tags)


def stage_metrics(stage: str) -> StageMetrics:
    return StageMetrics(stage)


class _Families:
    """A collector that yields already-parsed metric families (to print them again)."""

    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> Any:
        return iter(self.families)


def filter_families(text: str, prefixes: tuple[str, ...] = ("ray_" + PREFIX, PREFIX)) -> str:
    """The families of a Prometheus exposition whose names start with ``prefixes``, as
    Prometheus text again (parsed and written by ``prometheus_client``)."""
    kept = [f for f in text_string_to_metric_families(text) if f.name.startswith(prefixes)]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(kept))
    return generate_latest(registry).decode()


def node_metrics_url() -> str | None:
    """The Prometheus endpoint of this node's Ray metrics agent (what a scraper reads)."""
    node_id = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n.get("NodeID") == node_id), None)
    if node is None or not node.get("MetricsExportPort"):
        return None
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


async def node_metrics_text(timeout_s: float = 5.0) -> str:
    """Our families as this node's Ray metrics agent exports them (Prometheus text)."""
    async with asyncio.timeout(timeout_s):
        url = await asyncio.to_thread(node_metrics_url)
        if url is None:
            return ""
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            response = await client.get(url)
    # parsing the node's whole export takes CPU: not on the replica's event loop
    return await asyncio.to_thread(filter_families, response.text)
