"""Job recipes: one typed dataclass per job, loaded from YAML with ``key=value`` overrides.

Every job recipe derives from :class:`JobRecipe` (the shared ``ray:`` section) and, when the
job is tracked, from :class:`TrackedRecipe` (plus the ``mlflow:`` section). A recipe is
validated before Ray starts: an unknown key or a wrong type is an error naming it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from mova.typed_dict import apply_overrides, deep_merge, from_dict
from pipelines.common import storage
from pipelines.common.ray_init import init_ray

T = TypeVar("T")


@dataclass
class RayConfig:
    """Where to run: ``address`` of a cluster (or ``RAY_ADDRESS``), else a private local Ray."""

    address: str | None = None
    num_cpus: int | None = None
    object_store_memory: int | None = None
    temp_dir: str | None = None


@dataclass
class MlflowConfig:
    """Where a job's MLflow run goes (default: a sqlite file beside the job's output)."""

    tracking_uri: str | None = None
    experiment: str = "mova"
    run_name: str | None = None
    system_metrics: bool = True


@dataclass
class JobRecipe:
    """What every job recipe has: the ``ray:`` section, and the checks they share."""

    kind: ClassVar[str] = "job"
    paths: ClassVar[tuple[str, ...]] = ()  # fields holding local paths or s3:// URIs

    ray: RayConfig = field(default_factory=RayConfig)

    def require(self, *names: str) -> None:
        """Each named field must be set (non-empty)."""
        for name in names:
            if not getattr(self, name):
                raise ValueError(f"{self.kind} recipe: {name} must be set")

    def at_least(self, minimum: float, *names: str) -> None:
        for name in names:
            if getattr(self, name) < minimum:
                raise ValueError(f"{self.kind} recipe: {name} must be >= {minimum}")

    def absolute(self: T) -> T:
        """A copy with every local path of :attr:`paths` made absolute (Ray workers run in
        other folders); s3:// URIs stay as they are."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        for name in self.paths:
            if values.get(name):
                values[name] = storage.absolute(values[name])
        return type(self)(**values)

    def joins_cluster(self) -> bool:
        """Whether the job joins a Ray cluster (``ray.address`` or ``RAY_ADDRESS``) rather
        than starting a private local Ray."""
        address = self.ray.address or os.environ.get("RAY_ADDRESS")
        return bool(address and address != "local")

    def start_ray(self, runtime_env: dict[str, Any] | None = None) -> None:
        """Join the recipe's cluster (or ``RAY_ADDRESS``), else start a private local Ray;
        ``runtime_env`` applies to every worker of this driver's job."""
        init_ray(self.ray.address, num_cpus=self.ray.num_cpus,
                 object_store_memory=self.ray.object_store_memory, temp_dir=self.ray.temp_dir,
                 runtime_env=runtime_env)


@dataclass
class TrackedRecipe(JobRecipe):
    """A job that records an MLflow run: adds the ``mlflow:`` section."""

    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


def load_recipe(cls: type[T], path: str | Path | None, overrides: list[str] | None = None,
                fields: dict[str, Any] | None = None) -> T:
    """Read a recipe YAML (optional), lay ``fields`` over it, apply ``key=value`` overrides,
    build and validate ``cls``."""
    data: dict[str, Any] = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe not found: {path.resolve()}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"recipe {path} must hold a mapping at the top level")
        data = loaded
    data = apply_overrides(deep_merge(data, fields or {}), overrides or [])
    recipe = from_dict(cls, data)
    validate = getattr(recipe, "validate", None)
    return validate() if validate else recipe
