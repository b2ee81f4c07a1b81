"""The routed-rate autoscaling policy: what a replica reports, what the policy asks for, and
that Serve takes the recipe's policy (no Ray cluster needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from ray.serve.config import AutoscalingConfig

from pipelines.serve.autoscale import POLICY_PATH, RateMeter, replicas_for, routed_rate_policy
from pipelines.serve.recipe import AutoscalingRecipe


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_replica_reports_its_routed_rate_and_service_time_over_a_window():
    clock = Clock()
    meter = RateMeter(window_s=10, clock=clock)
    assert meter.stats(items=0, busy_s=0.0, in_flight=0) == {
        "routed_per_s": 0.0, "service_s": 0.0, "in_flight": 0.0}
    for second in range(1, 21):  # 4 requests a second, batched: 0.05 busy s per request
        clock.now += 1
        meter.arrivals += 4
        stats = meter.stats(items=4 * second, busy_s=0.2 * second, in_flight=3)
    assert stats["routed_per_s"] == pytest.approx(4.0)
    assert stats["service_s"] == pytest.approx(0.05) and stats["in_flight"] == 3.0
    for _ in range(12):  # nobody routes to it any more: the rate falls to 0 within the window
        clock.now += 1
        stats = meter.stats(items=80, busy_s=4.0, in_flight=0)
    assert stats["routed_per_s"] == 0.0 and stats["service_s"] == pytest.approx(0.05)


def test_replicas_follow_the_load_not_the_queue():
    assert replicas_for(rate=4.0, service_s=0.05, busy_replicas=1) == 1  # 20% of one replica
    assert replicas_for(rate=30.0, service_s=0.05, busy_replicas=1) == 3  # 1.5 / 0.6
    assert replicas_for(rate=0.0, service_s=0.05, busy_replicas=0) == 0  # cold: to zero
    assert replicas_for(rate=0.0, service_s=0.05, busy_replicas=2) == 2  # never below busy
    assert replicas_for(rate=1.0, service_s=0.0, busy_replicas=0) == 1  # nothing measured


def _ctx(metrics, total=0.0, state=None):
    return SimpleNamespace(aggregated_metrics=metrics, total_num_requests=total,
                           policy_state=state or {},
                           config=SimpleNamespace(target_ongoing_requests=2.0))


def test_the_policy_sums_replicas_reports():
    hot = {"routed_per_s": {"a": 12.0, "b": 12.0}, "service_s": {"a": 0.05, "b": 0.07},
           "in_flight": {"a": 9.0, "b": 0.0}}
    replicas, state = routed_rate_policy(_ctx(hot, total=9.0))
    assert replicas == 3  # 24/s x 0.06 s / 0.6; Serve's default would ask ceil(9 / 2) = 5
    assert state == {"service_s": pytest.approx(0.06), "routed_per_s": 24.0}
    cold = {"routed_per_s": {"a": 0.0}, "service_s": {"a": 0.0}, "in_flight": {"a": 0.0}}
    assert routed_rate_policy(_ctx(cold, state=state))[0] == 0
    assert routed_rate_policy(_ctx({}, total=3.0))[0] == 2  # no report yet: by the queue


def test_the_recipe_selects_the_policy_and_serve_accepts_it():
    routed = AutoscalingRecipe(min_replicas=0, max_replicas=4, policy="routed")
    routed.validate("experts.default.autoscaling")
    config = AutoscalingConfig(**routed.to_serve())
    assert config.policy.policy_function == POLICY_PATH
    assert "policy" not in AutoscalingRecipe().to_serve()  # Serve's default
    with pytest.raises(ValueError, match="policy must be"):
        AutoscalingRecipe(policy="fastest").validate("x")
