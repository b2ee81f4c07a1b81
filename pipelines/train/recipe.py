"""The training recipe (`mova train --config jobs/pretrain.yaml|jobs/sft.yaml`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.common.recipe import TrackedRecipe

STAGES = ("pretrain", "sft")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_param: bool = False


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class DataConfig:
    """How the manifest is read: the epoch order (see ``pipelines.train.order``)."""

    shuffle: bool = True  # a seeded shuffle per epoch (the same for the same seed)
    chunk_rows: int = 1024  # rows per manifest chunk (one ranged read each)
    window_chunks: int = 8  # chunks whose rows are shuffled together
    prepare_batch_size: int = 8  # rows per data-preparation task
    record_batches: bool = False  # write each batch's sample ids under <storage_path>/<name>/
    # Fault injection for tests: "rank:step" pairs; that rank's process exits once when it
    # reaches that optimizer step (as a killed worker would), once per run name.
    inject_faults: list[str] = field(default_factory=list)


@dataclass
class TrainRecipe(TrackedRecipe):
    """`mova train`: one pretraining or SFT run (resumed by running it again)."""

    kind = "train"
    paths = ("init_from", "manifest", "cache", "output", "storage_path")

    stage: str = "pretrain"
    init_from: str = ""
    manifest: str = ""
    cache: str | None = None
    features: str = "cached"
    output: str = ""
    name: str = ""
    storage_path: str = ""
    overwrite: bool = False
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    precision: str = "auto"
    export_dtype: str = "auto"  # the exported model's dtype; auto: the training precision
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 4
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int | None = None
    max_length: int | None = None
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 1
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    max_failures: int = 0
    seed: int = 0
    skip_bad_rows: bool = False
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> TrainRecipe:
        self.require("init_from", "manifest", "output", "name", "storage_path")
        if self.stage not in STAGES:
            raise ValueError(f"train recipe: stage={self.stage!r}; expected one of {STAGES}")
        if self.features not in ("cached", "compute"):
            raise ValueError(f"train recipe: features={self.features!r}; expected 'cached' "
                             "(read the feature cache) or 'compute' (run experts each step)")
        if self.features == "cached" and not self.cache:
            raise ValueError("train recipe: features=cached needs cache=<feature cache>")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"train recipe: precision={self.precision!r}; expected auto, fp32 "
                             "or bf16")
        if self.export_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"train recipe: export_dtype={self.export_dtype!r}; expected auto "
                             "(the training precision), float32 or bfloat16")
        if self.deepspeed.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"train recipe: deepspeed.zero_stage={self.deepspeed.zero_stage}; "
                             "expected 0, 1, 2 or 3")
        if self.deepspeed.offload_param and self.deepspeed.zero_stage != 3:
            raise ValueError("train recipe: deepspeed.offload_param needs zero_stage 3")
        if self.lora.enabled and self.stage != "sft":
            raise ValueError("train recipe: lora.enabled is for stage sft (pretrain freezes the "
                             "LLM)")
        self.at_least(1, "num_workers", "batch_size", "grad_accum", "epochs", "checkpoint_every",
                      "keep_checkpoints", "log_every")
        for key in ("chunk_rows", "window_chunks", "prepare_batch_size"):
            if getattr(self.data, key) < 1:
                raise ValueError(f"train recipe: data.{key} must be >= 1")
        for fault in self.data.inject_faults:
            rank, _, step = fault.partition(":")
            if not (rank.isdigit() and step.isdigit()):
                raise ValueError(f"train recipe: data.inject_faults entry {fault!r}; expected "
                                 "'<rank>:<step>'")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("train recipe: max_steps must be >= 1 (or null)")
        if self.max_failures < -1:
            raise ValueError("train recipe: max_failures must be >= -1 (-1: retry forever)")
        if not 0 <= self.optim.warmup_ratio < 1:
            raise ValueError("train recipe: optim.warmup_ratio must be in [0, 1)")
        if self.optim.lr <= 0:
            raise ValueError("train recipe: optim.lr must be > 0")
        return self
