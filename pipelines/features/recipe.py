"""The feature-cache recipe (`mova features --config jobs/features.yaml`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.common.recipe import JobRecipe

CACHE_DTYPES = ("float16", "bfloat16", "float32")


@dataclass
class FeaturesRecipe(JobRecipe):
    """`mova features`: cache frozen expert features for a manifest."""

    kind = "features"
    paths = ("manifest", "checkpoint", "cache", "report")

    manifest: str = ""
    checkpoint: str = ""
    cache: str = ""
    experts: str = "label"
    only: list[str] = field(default_factory=list)
    dtype: str = "float16"
    batch_size: int = 16
    workers_per_expert: int = 1
    cpus_per_worker: float | None = None  # None: a share that lets every pool run at once
    gpus_per_worker: float = 0.0
    skip_bad_rows: bool = False
    report: str | None = None

    def validate(self) -> FeaturesRecipe:
        self.require("manifest", "checkpoint", "cache")
        if self.experts not in ("label", "all"):
            raise ValueError(f"features recipe: experts={self.experts!r}; expected 'label' "
                             "(each sample's routing label; unlabelled samples get all) or 'all'")
        if self.dtype not in CACHE_DTYPES:
            raise ValueError(f"features recipe: dtype={self.dtype!r}; expected one of "
                             f"{', '.join(CACHE_DTYPES)}")
        self.at_least(1, "batch_size", "workers_per_expert")
        self.at_least(0, "gpus_per_worker")
        if self.cpus_per_worker is not None and self.cpus_per_worker < 0:
            raise ValueError("features recipe: cpus_per_worker must be >= 0 (or null: auto)")
        return self
