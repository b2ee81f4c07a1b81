"""The evaluation recipe (`mova eval --config jobs/eval.yaml`).

One recipe evaluates either a checkpoint (batch inference with Ray Data) or a running
OpenAI-compatible endpoint (HTTP), on a list of benchmark files in the manifest format that
`mova data convert` and `mova data synth` write.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from mova.metrics import METRICS
from pipelines.common import storage
from pipelines.common.llm_engine import LLMEngineRecipe
from pipelines.common.recipe import MlflowConfig, TrackedRecipe

ROUTING_MODES = ("model", "label", "forced")
ON_ERROR = ("empty", "skip", "fail")
# Benchmark names become MLflow metric prefixes and file names: keep them plain.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class BenchmarkSpec:
    """One benchmark file: a manifest (JSONL or Parquet, local or s3://) with references."""

    name: str = ""
    path: str = ""
    limit: int | None = None  # evaluate the first N questions only
    metric: str | None = None  # for rows that name no metric of their own


@dataclass
class EvalRecipe(TrackedRecipe):
    """`mova eval`: score a model (checkpoint or endpoint) on benchmark files."""

    kind = "eval"
    paths = ("checkpoint", "output")

    checkpoint: str = ""
    endpoint: str | None = None
    model_name: str = "mova"
    api_key: str | None = None
    api_key_env: str = "MOVA_API_KEY"
    concurrency: int = 8
    request_timeout_s: float = 120.0
    max_retries: int = 3
    benchmarks: list[BenchmarkSpec] = field(default_factory=list)
    max_new_tokens: int = 64
    batch_size: int = 8
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    routing: str = "model"
    constrained_routing: bool = True  # the routing decode as served (mova.routing_constraint)
    # which engine decodes the LLM's passes (checkpoint only): torch | vllm | auto
    llm: LLMEngineRecipe = field(default_factory=LLMEngineRecipe)
    experts: list[str] = field(default_factory=list)
    on_error: str = "empty"
    output: str = ""
    mlflow: MlflowConfig = field(default_factory=lambda: MlflowConfig(system_metrics=False))

    def absolute(self) -> EvalRecipe:
        """Local paths made absolute, the benchmark files' included."""
        out = super().absolute()
        out.benchmarks = [dataclasses.replace(b, path=storage.absolute(b.path) if b.path else "")
                          for b in self.benchmarks]
        return out

    def validate(self) -> EvalRecipe:
        if bool(self.checkpoint) == bool(self.endpoint):
            raise ValueError("eval recipe: set exactly one of checkpoint (batch inference on "
                             "Ray) and endpoint (a running server over HTTP); on the command "
                             "line: checkpoint= endpoint=http://host:port")
        if self.endpoint and not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"eval recipe: endpoint={self.endpoint!r}; expected an http:// or "
                             "https:// URL (the server root, without /v1)")
        if not self.output:
            raise ValueError("eval recipe: output must be set (a folder, local or s3://)")
        if not self.benchmarks:
            raise ValueError("eval recipe: benchmarks is empty; list at least one "
                             "{name, path} entry")
        seen: set[str] = set()
        for i, spec in enumerate(self.benchmarks):
            where = f"eval recipe: benchmarks[{i}]"
            if not spec.name or not _NAME.fullmatch(spec.name):
                raise ValueError(f"{where}.name={spec.name!r}; expected letters, digits, "
                                 "'_', '.' or '-'")
            if spec.name in seen:
                raise ValueError(f"{where}.name={spec.name!r} appears twice")
            seen.add(spec.name)
            if not spec.path:
                raise ValueError(f"{where}.path must be set")
            if spec.limit is not None and spec.limit < 1:
                raise ValueError(f"{where}.limit must be >= 1 (or null)")
            if spec.metric is not None and spec.metric not in METRICS:
                raise ValueError(f"{where}.metric={spec.metric!r}; expected one of "
                                 f"{sorted(METRICS)}")
        if self.routing not in ROUTING_MODES:
            raise ValueError(f"eval recipe: routing={self.routing!r}; expected model (the LLM "
                             "routes), label (each row's routing label) or forced (experts)")
        if self.experts and self.routing != "forced":
            raise ValueError("eval recipe: experts is for routing=forced")
        if len(set(self.experts)) != len(self.experts):
            raise ValueError(f"eval recipe: experts={self.experts} has duplicates")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"eval recipe: on_error={self.on_error!r}; expected empty (score "
                             "an empty answer), skip (leave the question out) or fail")
        for key in ("max_new_tokens", "batch_size", "workers", "concurrency"):
            if getattr(self, key) < 1:
                raise ValueError(f"eval recipe: {key} must be >= 1")
        if self.max_retries < 0 or self.request_timeout_s <= 0:
            raise ValueError("eval recipe: max_retries must be >= 0 and request_timeout_s > 0")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise ValueError("eval recipe: cpus_per_worker/gpus_per_worker must be >= 0")
        self.llm.validate_engine("eval recipe: llm")
        return self
