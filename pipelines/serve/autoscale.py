"""Experts sized by the routed requests they receive, not only by their queues.

Serve's default policy sizes a deployment from its ongoing requests (``target_ongoing_requests``
per replica). A batched expert holds many requests at once while it is far from busy, so that
rule keeps replicas it does not need; and it reacts only once requests pile up. Here each
expert replica reports (``record_autoscaling_stats``) the rate of routed requests it receives
and the busy seconds one of them costs (a batch's time over its items), and
:func:`routed_rate_policy` asks for the replicas that load needs at
``TARGET_UTILIZATION``: ``ceil(rate x service time / utilization)``. A rising routed rate
scales the expert before its queue builds; an expert nobody routes to goes to
``min_replicas`` (zero if allowed; a request that then arrives starts one, Serve's cold-start
path). Never fewer replicas than those with requests in flight. Serve applies the recipe's
bounds and up/down-scale delays around the policy.

``experts.default.autoscaling.policy: routed`` selects it (``serve``: Serve's default).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

TARGET_UTILIZATION = 0.6  # of each replica's time, what the routed load may use
RATE_WINDOW_S = 10.0  # the rate and service time are measured over this long
POLICY_PATH = "pipelines.serve.autoscale:routed_rate_policy"


class RateMeter:
    """A replica's routed-request rate and per-request service time over a sliding window,
    from cumulative counters sampled at each report."""

    def __init__(self, window_s: float = RATE_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s, self.clock = window_s, clock
        self.arrivals = 0  # requests received (cumulative)
        self._marks: deque[tuple[float, int, int, float]] = deque()  # (t, arr, items, busy)
        self._service_s = 0.0  # the last service time measured

    def stats(self, items: int, busy_s: float, in_flight: int) -> dict[str, float]:
        """The report: ``routed_per_s``, ``service_s`` (busy seconds per item) and
        ``in_flight``; ``items``/``busy_s``: the batcher's cumulative counts."""
        now = self.clock()
        self._marks.append((now, self.arrivals, items, busy_s))
        while len(self._marks) > 2 and now - self._marks[1][0] >= self.window_s:
            self._marks.popleft()
        t0, arrivals0, items0, busy0 = self._marks[0]
        span = now - t0
        rate = (self.arrivals - arrivals0) / span if span > 0 else 0.0
        if items > items0:
            self._service_s = (busy_s - busy0) / (items - items0)
        return {"routed_per_s": rate, "service_s": self._service_s,
                "in_flight": float(in_flight)}


def replicas_for(rate: float, service_s: float, busy_replicas: int,
                 utilization: float = TARGET_UTILIZATION) -> int:
    """Replicas that serve ``rate`` requests/s of ``service_s`` each at ``utilization``, and
    no fewer than ``busy_replicas``."""
    need = math.ceil(rate * service_s / utilization - 1e-9) if rate > 0 else 0
    if rate > 0 and service_s <= 0:
        need = 1  # requests arrive, none measured yet: keep one
    return max(need, busy_replicas)


def routed_rate_policy(ctx: Any) -> tuple[int, dict[str, Any]]:
    """A Ray Serve custom autoscaling policy (``AutoscalingContext`` -> replicas, state)."""
    metrics = ctx.aggregated_metrics or {}
    state = dict(ctx.policy_state or {})
    rates = metrics.get("routed_per_s") or {}
    if not rates:  # no replica has reported yet: size by the requests Serve sees
        target = getattr(ctx.config, "target_ongoing_requests", 2.0) or 2.0
        return math.ceil(ctx.total_num_requests / target), state
    services = [v for v in (metrics.get("service_s") or {}).values() if v > 0]
    service = sum(services) / len(services) if services else state.get("service_s", 0.0)
    busy = sum(1 for v in (metrics.get("in_flight") or {}).values() if v > 0)
    rate = sum(rates.values())
    state.update(service_s=service, routed_per_s=rate)
    return replicas_for(rate, service, busy), state
