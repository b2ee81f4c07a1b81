"""What a demo changes in the `jobs/` recipes: one small, visible override set per plan.

Every step of a demo loads its recipe from ``jobs/<job>.yaml`` exactly as the separate
commands do (``mova train --config jobs/pretrain.yaml ...``). A plan only sizes the run for a
2-core machine and a few minutes; the session adds where the run's files go
(:mod:`pipelines.demo.session`). The overrides are printed with each step, so what the demo ran
can be re-run by hand.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# Training a 0.9M-parameter, randomly initialised MoVA for tens of steps: ten times the
# recipes' learning rate (written for pretrained LLMs), a longer warm-up, and half a CPU per
# worker so that two workers and the Ray Data tasks feeding them fit on 2 cores.
TINY_TRAINING = ("optim.lr=2.0e-3", "optim.warmup_ratio=0.1", "optim.min_lr_ratio=0.1",
                 "cpus_per_worker=0.5", "keep_checkpoints=1")
# The real small weights: LoRA on the pretrained LLM plus the adapter, on 2 cores.
REAL_TRAINING = ("optim.lr=3.0e-4", "optim.warmup_ratio=0.05", "optim.min_lr_ratio=0.1",
                 "cpus_per_worker=0.5", "keep_checkpoints=1", "lora.enabled=true")


# The quick plans check the stages' wiring on tiny models in a few minutes: their LLM passes
# stay on the torch loop, where a vLLM engine's start (about 25 s per eval actor or Serve
# replica on 2 cores) would cost more than the whole pass. The full plans use the recipes'
# default (``llm.engine: auto``: vLLM where it is installed).
TORCH_LLM = ("llm.engine=torch",)


def _train(steps: int, batch_size: int, base: tuple[str, ...], log_every: int) -> tuple[str, ...]:
    return (f"max_steps={steps}", f"batch_size={batch_size}", f"checkpoint_every={steps}",
            f"log_every={log_every}", *base)


def _one_worker(overrides: tuple[str, ...]) -> tuple[str, ...]:
    kept = tuple(o for o in overrides if not o.startswith("cpus_per_worker="))
    return (*kept, "num_workers=1", "cpus_per_worker=1")


@dataclass(frozen=True)
class Plan:
    """One demo size: ``jobs`` maps a recipe (``jobs/<name>.yaml``) to its overrides;
    ``sizes`` holds the few numbers that are no recipe field (sampled data, image size)."""

    name: str
    jobs: Mapping[str, tuple[str, ...]]
    sizes: Mapping[str, int] = field(default_factory=dict)

    def overrides(self, job: str) -> tuple[str, ...]:
        return tuple(self.jobs.get(job, ()))

    def value(self, job: str, key: str) -> str:
        """The plan's value of ``key`` in ``job`` (e.g. the step count a progress line shows)."""
        for item in self.overrides(job):
            name, _, value = item.partition("=")
            if name == key:
                return value
        raise KeyError(f"plan {self.name!r} sets no {key} for {job}")


FULL = Plan("full", {
    "synth": ("per_domain=40", "test_per_domain=10", "routing_samples=32", "image_size=64"),
    "features": ("experts=all", "dtype=float32", "batch_size=32"),
    "pretrain": _train(40, 8, TINY_TRAINING, 4),
    "labels": ("batch_size=16",),
    "sft": _train(160, 8, TINY_TRAINING, 16),
    "eval": ("max_new_tokens=12", "batch_size=16"),
})
QUICK = Plan("quick", {
    **FULL.jobs,
    "synth": ("per_domain=12", "test_per_domain=10", "routing_samples=8", "image_size=64"),
    "pretrain": _train(8, 8, TINY_TRAINING, 1),
    "sft": _train(100, 8, TINY_TRAINING, 10),
    "eval": ("max_new_tokens=8", "batch_size=16", *TORCH_LLM),
    "serve": TORCH_LLM,
})
REAL = Plan("real", {
    "synth": ("per_domain=16", "test_per_domain=1", "routing_samples=32", "image_size=64"),
    "features": ("experts=label", "dtype=float32", "batch_size=16"),
    "sft": _train(80, 4, REAL_TRAINING, 6),
    "eval": ("max_new_tokens=4", "batch_size=16"),
}, sizes={"train_questions": 480, "test_questions": 200, "image_size": 224})
REAL_QUICK = Plan("real-quick", {
    **REAL.jobs,
    "synth": ("per_domain=2", "test_per_domain=1", "routing_samples=4", "image_size=64"),
    "sft": _train(2, 2, REAL_TRAINING, 1),
}, sizes={"train_questions": 16, "test_questions": 8, "image_size": 224})
# `mova demo --expert-value` (pipelines/demo/expert_value.py): the adapter and text encoder
# learn at a higher rate in pretraining (the LLM is frozen there, nothing pretrained moves).
EXPERT_VALUE_PRETRAIN = ("optim.lr=1.0e-3", "optim.warmup_ratio=0.05", "optim.min_lr_ratio=0.1",
                         "cpus_per_worker=0.5", "keep_checkpoints=1")
EXPERT_VALUE = Plan("expert-value", {
    "features": ("experts=label", "dtype=float32", "batch_size=16"),
    "pretrain": _train(120, 8, EXPERT_VALUE_PRETRAIN, 10),
    "labels": ("batch_size=16", "margin=0.05"),
    "sft": _train(100, 8, REAL_TRAINING, 10),
    "eval": ("max_new_tokens=4", "batch_size=16"),
}, sizes={"train_per_kind": 240, "test_per_kind": 100, "routing_rows": 120,
          "base_image_size": 28, "real_weights": 1})
EXPERT_VALUE_QUICK = Plan("expert-value-quick", {
    **EXPERT_VALUE.jobs,
    # one training worker on a whole CPU: the quick run checks the stages, not the speed
    "pretrain": _one_worker(_train(2, 4, EXPERT_VALUE_PRETRAIN, 1)),
    "sft": _one_worker(_train(2, 4, REAL_TRAINING, 1)),
    "eval": (*EXPERT_VALUE.jobs["eval"], *TORCH_LLM),
}, sizes={"train_per_kind": 6, "test_per_kind": 3, "routing_rows": 4, "base_image_size": 28,
          "real_weights": 0})  # the stages' wiring on tiny random models: what the test checks
PLANS = {p.name: p for p in (FULL, QUICK, REAL, REAL_QUICK, EXPERT_VALUE, EXPERT_VALUE_QUICK)}
