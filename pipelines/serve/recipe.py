"""The serving recipe (`mova serve --config jobs/serve.yaml`).

One typed dataclass tree: the checkpoint, HTTP address, request limits, the node's cache of
expert features, and for each deployment (ingress, adapter, LLM, one per expert) its replicas or
autoscaling, resources and batching.
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mova.typed_dict import deep_merge, from_dict
from pipelines.common.local_cache import cache_dir
from pipelines.common.ray_init import CREDENTIALS
from pipelines.common.recipe import JobRecipe
from pipelines.serve.llm_recipe import LLMRecipe
from pipelines.serve.recipe_parts import AutoscalingRecipe, DeploymentRecipe

DEVICES = ("auto", "cpu", "cuda")
__all__ = ["AutoscalingRecipe", "DeploymentRecipe", "LLMRecipe", "ServeRecipe"]


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
    llm: LLMRecipe = field(default_factory=lambda: LLMRecipe(
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
