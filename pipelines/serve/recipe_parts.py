"""Recipe parts every deployment shares: replicas or autoscaling, resources, queues, batching."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipelines.serve.autoscale import POLICY_PATH


@dataclass
class AutoscalingRecipe:
    """Ray Serve autoscaling of one deployment; ``min_replicas: 0`` allows scale to zero.
    ``policy``: ``serve`` (Serve's default, by ongoing requests per replica) or ``routed``
    (experts only: by the routed-request rate and service time, :mod:`~pipelines.serve.
    autoscale`)."""

    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 0.0
    downscale_delay_s: float = 60.0
    downscale_to_zero_delay_s: float | None = None
    metrics_interval_s: float = 10.0
    look_back_period_s: float = 30.0
    policy: str = "serve"

    def validate(self, prefix: str) -> None:
        if self.policy not in ("serve", "routed"):
            raise ValueError(f"{prefix}.policy must be 'serve' or 'routed', not "
                             f"{self.policy!r}")
        if self.min_replicas < 0 or self.max_replicas < 1:
            raise ValueError(f"{prefix}.min_replicas must be >= 0 and {prefix}.max_replicas >= 1")
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"{prefix}.max_replicas={self.max_replicas} is below "
                             f"{prefix}.min_replicas={self.min_replicas}")
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError(f"{prefix}.initial_replicas={initial} must lie within "
                             f"[min_replicas, max_replicas]")
        for name in ("target_ongoing_requests", "metrics_interval_s", "look_back_period_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{prefix}.{name} must be > 0")
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError(f"{prefix}.look_back_period_s must exceed metrics_interval_s")
        for name in ("upscale_delay_s", "downscale_delay_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{prefix}.{name} must be >= 0")

    def to_serve(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in (
            "min_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s",
            "downscale_delay_s", "metrics_interval_s", "look_back_period_s")}
        if self.initial_replicas is not None:
            out["initial_replicas"] = self.initial_replicas
        if self.downscale_to_zero_delay_s is not None:
            out["downscale_to_zero_delay_s"] = self.downscale_to_zero_delay_s
        if self.policy == "routed":
            out["policy"] = {"policy_function": POLICY_PATH}
        return out


@dataclass
class DeploymentRecipe:
    """Replicas (fixed, or ``autoscaling``), resources, queue limits and batching of one
    deployment. ``max_queued_requests: -1`` means unbounded. A batch takes what queued while
    the previous one ran, and waits ``batch_wait_timeout_s`` for company only when the replica
    was idle; for the LLM, ``max_batch_size`` is the number of rows decoded together.
    ``torch_threads`` (0: one per whole CPU given) is what its model work may use."""

    num_replicas: int = 1
    autoscaling: AutoscalingRecipe | None = None
    num_cpus: float = 0.1
    num_gpus: float = 0.0
    max_ongoing_requests: int = 32
    max_queued_requests: int = 64
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.002
    torch_threads: int = 0
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 30.0

    def validate(self, prefix: str) -> None:
        if self.num_replicas < 1:
            raise ValueError(f"{prefix}.num_replicas must be >= 1 (use autoscaling with "
                             "min_replicas: 0 to scale to zero)")
        if self.autoscaling is not None:
            self.autoscaling.validate(f"{prefix}.autoscaling")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError(f"{prefix}.num_cpus and {prefix}.num_gpus must be >= 0")
        if self.max_ongoing_requests < 1:
            raise ValueError(f"{prefix}.max_ongoing_requests must be >= 1")
        if self.max_queued_requests < -1 or self.max_queued_requests == 0:
            raise ValueError(f"{prefix}.max_queued_requests must be -1 (unbounded) or >= 1")
        if self.max_batch_size < 1:
            raise ValueError(f"{prefix}.max_batch_size must be >= 1")
        if self.batch_wait_timeout_s < 0:
            raise ValueError(f"{prefix}.batch_wait_timeout_s must be >= 0")
        if self.torch_threads < 0:
            raise ValueError(f"{prefix}.torch_threads must be >= 0 (0: one per CPU given)")
        if self.health_check_period_s <= 0 or self.health_check_timeout_s <= 0:
            raise ValueError(f"{prefix}.health_check_period_s and health_check_timeout_s "
                             "must be > 0")

    @property
    def threads(self) -> int:
        """Torch threads of one replica: ``torch_threads``, or one per whole CPU it holds."""
        return self.torch_threads or max(1, math.ceil(self.num_cpus - 1e-9))

    @property
    def max_replicas(self) -> int:
        return self.autoscaling.max_replicas if self.autoscaling else self.num_replicas

    def options(self) -> dict[str, Any]:
        """Ray Serve deployment options (as ``.options(**)`` and the config file take them)."""
        actor: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            actor["num_gpus"] = self.num_gpus
        out: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": actor,
            "graceful_shutdown_wait_loop_s": 0.2,
            "graceful_shutdown_timeout_s": 5.0,  # the app sets its request deadline + grace
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "user_config": {"max_batch_size": self.max_batch_size,
                            "batch_wait_timeout_s": self.batch_wait_timeout_s,
                            "torch_threads": self.threads},
        }
        if self.autoscaling is not None:
            out["autoscaling_config"] = self.autoscaling.to_serve()
        else:
            out["num_replicas"] = self.num_replicas
        return out
