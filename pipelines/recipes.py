"""Job recipes: one typed dataclass per job, loaded from YAML with ``key=value`` overrides.

A recipe is validated before Ray starts: an unknown key or a wrong type is an error naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mova.config import apply_overrides, from_dict

T = TypeVar("T")


@dataclass
class RayConfig:
    """Where to run: ``address`` of a cluster (or ``RAY_ADDRESS``), else a private local Ray."""

    address: str | None = None
    num_cpus: int | None = None
    object_store_memory: int | None = None
    temp_dir: str | None = None


@dataclass
class FeaturesRecipe:
    """`mova features`: cache frozen expert features for a manifest."""

    manifest: str = ""
    checkpoint: str = ""
    cache: str = ""
    experts: str = "label"
    only: list[str] = field(default_factory=list)
    dtype: str = "float16"
    batch_size: int = 16
    workers_per_expert: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    skip_bad_rows: bool = False
    report: str | None = None
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> FeaturesRecipe:
        for name in ("manifest", "checkpoint", "cache"):
            if not getattr(self, name):
                raise ValueError(f"features recipe: {name} must be set")
        if self.experts not in ("label", "all"):
            raise ValueError(f"features recipe: experts={self.experts!r}; expected 'label' "
                             "(each sample's routing label; unlabelled samples get all) or 'all'")
        if self.dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"features recipe: dtype={self.dtype!r}; expected float16, "
                             "bfloat16 or float32")
        if self.batch_size < 1 or self.workers_per_expert < 1:
            raise ValueError("features recipe: batch_size and workers_per_expert must be >= 1")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise ValueError("features recipe: cpus_per_worker/gpus_per_worker must be >= 0")
        return self


def load_recipe(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Read a recipe YAML (optional), apply overrides, build and validate ``cls``."""
    data: dict[str, Any] = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"recipe {path} must hold a mapping at the top level")
        data = loaded
    data = apply_overrides(data, overrides or [])
    recipe = from_dict(cls, data)
    validate = getattr(recipe, "validate", None)
    return validate() if validate else recipe
