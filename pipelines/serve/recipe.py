"""The serving recipe (`mova serve --config jobs/serve.yaml`).

One typed dataclass tree: the checkpoint, HTTP address, request limits, the node's cache of
expert features, and for each deployment (ingress, adapter, LLM, one per expert) its replicas or
autoscaling, resources and batching.
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mova.typed_dict import deep_merge, from_dict
from pipelines.common.local_cache import cache_dir
from pipelines.common.ray_init import CREDENTIALS
from pipelines.common.recipe import JobRecipe
from pipelines.serve.autoscale import POLICY_PATH

DEVICES = ("auto", "cpu", "cuda")


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


def _expert_default() -> DeploymentRecipe:
    return DeploymentRecipe(autoscaling=AutoscalingRecipe(min_replicas=0, max_replicas=1,
                                                          initial_replicas=1))


@dataclass
class ExpertsRecipe:
    """Every expert deployment gets ``default``; ``overrides`` maps an expert name to the keys
    that differ (e.g. ``{sam: {num_gpus: 1}}``)."""

    default: DeploymentRecipe = field(default_factory=_expert_default)
    overrides: dict[str, Any] = field(default_factory=dict)

    def for_expert(self, name: str) -> DeploymentRecipe:
        base = _as_dict(self.default)
        extra = self.overrides.get(name) or {}
        if not isinstance(extra, dict):
            raise ValueError(f"experts.overrides.{name} must be a mapping")
        merged = deep_merge(base, extra)
        recipe = from_dict(DeploymentRecipe, merged, prefix=f"experts.overrides.{name}")
        recipe.validate(f"experts.overrides.{name}")
        return recipe


@dataclass
class LimitsRecipe:
    """What one request may ask for; anything beyond is a 400 (413 for the body, 408/503 for
    time/load). ``max_image_side`` (null: what the checkpoint's encoders use, at least 1024)
    caps width and height, read from the image header before any pixel is decoded. A batch
    still running ``stall_grace_s`` after its requests' deadlines marks its replica unhealthy
    (Serve replaces it; requests waiting there get a 503)."""

    max_images: int = 1
    max_image_bytes: int = 20_000_000
    max_image_side: int | None = None
    max_body_bytes: int = 28_000_000
    max_prompt_chars: int = 100_000
    max_tokens: int = 1024
    max_inflight: int = 64
    request_timeout_s: float = 60.0
    stall_grace_s: float = 10.0
    admission: bool = True  # refuse at once what cannot finish in time (off: only max_inflight)
    allow_remote_images: bool = False
    remote_image_domains: list[str] = field(default_factory=list)
    remote_image_max_redirects: int = 0
    remote_image_timeout_s: float = 10.0
    allowed_image_dirs: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.max_images != 1:
            raise ValueError("limits.max_images must be 1: a MoVA prompt holds one image")
        for name in ("max_image_bytes", "max_body_bytes", "max_prompt_chars", "max_tokens",
                     "max_inflight"):
            if getattr(self, name) < 1:
                raise ValueError(f"limits.{name} must be >= 1")
        if self.max_image_side is not None and self.max_image_side < 8:
            raise ValueError("limits.max_image_side must be >= 8 (or null: from the pool)")
        if self.max_body_bytes < self.max_image_bytes * 4 // 3:
            raise ValueError("limits.max_body_bytes must hold a base64 image of "
                             "max_image_bytes (>= 4/3 of it)")
        for name in ("request_timeout_s", "remote_image_timeout_s", "stall_grace_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"limits.{name} must be > 0")
        if not 0 <= self.remote_image_max_redirects <= 10:
            raise ValueError("limits.remote_image_max_redirects must be in 0..10")
        if self.allow_remote_images and not self.remote_image_domains:
            raise ValueError("limits.allow_remote_images needs limits.remote_image_domains "
                             "(the hosts images may come from, e.g. [images.example.com])")


@dataclass
class FeatureCacheRecipe:
    """The node's cache of expert features (:mod:`pipelines.serve.feature_store`): an image
    seen again on a node skips the experts that already computed its features there (the
    ingress does not call them). The ingress replicas of a node share it; the least recently
    used entries go first. ``max_mb`` bounds its size on each node in MiB (0: off, the default
    here; then the ingress hashes no image and calls every routed expert); ``dir`` is its
    folder on each node, absolute or ``~/...`` (resolved on the node; null:
    ``$MOVA_CACHE/serve-features``)."""

    max_mb: int = 0
    dir: str | None = None

    def validate(self) -> None:
        if self.max_mb < 0:
            raise ValueError(f"feature_cache.max_mb={self.max_mb} must be >= 0 (0: off)")
        if self.dir is not None and not self.dir.startswith(("/", "~")):
            raise ValueError(f"feature_cache.dir={self.dir!r} must be an absolute path or "
                             "start with ~ (it is resolved on each node), or null")

    @property
    def enabled(self) -> bool:
        return self.max_mb > 0

    def root(self) -> Path:
        """The cache's folder on this node."""
        return Path(self.dir).expanduser() if self.dir else cache_dir("serve-features")


@dataclass
class ServeRecipe(JobRecipe):
    """`mova serve`: an OpenAI-compatible MoVA endpoint on Ray Serve."""

    kind = "serve"
    paths = ("checkpoint",)

    checkpoint: str = ""
    model_name: str = "mova"
    app_name: str = "mova"
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    api_key: str | None = None
    api_key_env: str = "MOVA_API_KEY"
    allow_unauthenticated: bool = False
    public_health: bool = False
    constrained_routing: bool = True
    device: str = "auto"
    limits: LimitsRecipe = field(default_factory=LimitsRecipe)
    feature_cache: FeatureCacheRecipe = field(default_factory=FeatureCacheRecipe)
    ingress: DeploymentRecipe = field(default_factory=lambda: DeploymentRecipe(
        max_ongoing_requests=256, max_queued_requests=-1))
    adapter: DeploymentRecipe = field(default_factory=DeploymentRecipe)
    llm: DeploymentRecipe = field(default_factory=lambda: DeploymentRecipe(
        max_batch_size=16, max_ongoing_requests=64, max_queued_requests=128))
    experts: ExpertsRecipe = field(default_factory=ExpertsRecipe)
    runtime_env: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> ServeRecipe:
        self.require("checkpoint")
        if not self.model_name or not self.app_name:
            raise ValueError("serve recipe: model_name and app_name must be non-empty")
        if not 0 < self.port < 65536:
            raise ValueError(f"serve recipe: port={self.port} must be in 1..65535")
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"serve recipe: route_prefix={self.route_prefix!r} must start "
                             "with '/'")
        if self.device not in DEVICES:
            raise ValueError(f"serve recipe: device={self.device!r}; expected one of "
                             f"{list(DEVICES)}")
        self.limits.validate()
        self.feature_cache.validate()
        for name in ("ingress", "adapter", "llm"):
            getattr(self, name).validate(name)
        self.experts.default.validate("experts.default")
        for name in self.experts.overrides:
            self.experts.for_expert(name)
        secret = sorted(set(self.runtime_env.get("env_vars") or {}) & set(CREDENTIALS))
        if secret:
            raise ValueError(f"serve recipe: runtime_env.env_vars holds {secret}: credentials "
                             "never travel in a runtime_env (the dashboard shows it and it is "
                             "frozen for the app's life); give each node its own (a pod "
                             "Secret, an instance role), see the README's cluster section")
        if self.llm.max_ongoing_requests < 2 * self.llm.max_batch_size:
            raise ValueError("llm.max_ongoing_requests must be >= 2 * llm.max_batch_size "
                             "(each request holds a routing row, then an answer row)")
        return self

    def resolve_api_key(self) -> str | None:
        """The API key: ``api_key``, else the environment variable ``api_key_env``."""
        return self.api_key or os.environ.get(self.api_key_env) or None

    def check_exposure(self, bind_host: str | None = None) -> None:
        """Refuse to serve beyond loopback without an API key, unless the recipe says
        ``allow_unauthenticated: true``."""
        host = bind_host or self.host
        if self.resolve_api_key() or self.allow_unauthenticated or is_loopback(host):
            return
        raise ValueError(f"serve recipe: the endpoint would listen on {host!r} (beyond "
                         f"loopback) without an API key; set {self.api_key_env} (or api_key), "
                         "or allow_unauthenticated: true to serve openly on purpose")

    def check_pool(self, pool: list[str]) -> None:
        """Overrides must name experts of the checkpoint's pool."""
        unknown = sorted(set(self.experts.overrides) - set(pool))
        if unknown:
            raise ValueError(f"serve recipe: experts.overrides names {unknown}, which are not "
                             f"in the checkpoint's pool {pool}")

    def max_cpus(self, pool: list[str]) -> float:
        """CPUs the app holds with every deployment at its maximum replica count."""
        parts = [self.ingress, self.adapter, self.llm, *(self.experts.for_expert(n)
                                                          for n in pool)]
        return sum(p.num_cpus * p.max_replicas for p in parts)


def is_loopback(host: str) -> bool:
    """Whether an HTTP bind address stays on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _as_dict(obj: Any) -> Any:
    return copy.deepcopy(dataclasses.asdict(obj))


def recipe_dict(recipe: ServeRecipe) -> dict[str, Any]:
    """The recipe as plain JSON-able data (the Serve config file's ``args``)."""
    return _as_dict(recipe)
