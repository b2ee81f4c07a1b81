"""Request metrics of one ingress replica, in Prometheus text format (``GET /metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pipelines.serve.deployments import process_info

_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    """Counters and histograms kept in a registry of its own (one per ingress replica)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mova_requests", "Chat completion requests by HTTP status",
                                ["status"], registry=r)
        self.latency = Histogram("mova_request_latency_seconds",
                                 "Time from request to the last byte of the answer",
                                 buckets=_BUCKETS, registry=r)
        self.first_token = Histogram("mova_time_to_first_token_seconds",
                                     "Time from request to the first answer text",
                                     buckets=_BUCKETS, registry=r)
        self.in_flight = Gauge("mova_requests_in_flight", "Requests being served", registry=r)
        self.expert_calls = Counter("mova_expert_calls", "Expert deployment calls by expert",
                                    ["expert"], registry=r)
        self.prompt_tokens = Counter("mova_prompt_tokens", "Prompt tokens", registry=r)
        self.completion_tokens = Counter("mova_completion_tokens", "Generated tokens",
                                         registry=r)
        self.memory = Gauge("mova_ingress_resident_memory_bytes",
                            "Resident memory of this ingress replica", registry=r)

    def render(self) -> bytes:
        self.memory.set(process_info("Ingress")["rss_bytes"])
        return generate_latest(self.registry)
