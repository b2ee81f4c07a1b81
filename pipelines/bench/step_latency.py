"""`mova bench model`: latency of each separable MoVA step, and what routing saves.

Times preprocessing, base and text encoding, the routing pass and decode, each expert, fusion,
and end-to-end generation, for several batch sizes; then the cost of computing and fusing k
routed experts against all of them (MoVA routes to a few; a fixed mixture runs the whole pool).
Only torch and mova are used (no Ray), so the numbers are the model's own.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mova.factory import build_model
from mova.modeling import MoVAModel
from pipelines.bench.harness import (
    machine_info,
    measure_interleaved,
    median,
    peak_memory_mib,
    reset_peak_memory,
    synthetic_images,
)
from pipelines.bench.shapes import bench_config, check_fits

log = logging.getLogger(__name__)

K_VALUES = (1, 2, 3)
QUESTIONS = (
    "How many people are in the picture?",
    "What is the total shown in the bottom row of the receipt?",
    "Which bar in the chart is the highest?",
    "Is there an abnormality in this chest X-ray?",
    "Where exactly is the red car?",
)

# ---- results -------------------------------------------------------------------------------
@dataclass
class StepTiming:
    """One timed step at one batch size; ``median_ms`` is the median of ``samples_ms``."""

    step: str
    batch: int
    median_ms: float
    samples_ms: list[float]
    note: str = ""

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)


@dataclass
class ExpertCost:
    """Expert features + fusion of ``experts`` (timed as one call) and its ratio to all experts
    at the same batch size, from the medians and from the minima of the timed calls. ``order``
    says how the k experts were picked."""

    batch: int
    order: str
    k: int
    experts: list[str]
    median_ms: float
    fuse_ms: float
    ratio: float
    min_ms: float
    ratio_min: float


@dataclass
class MemoryUse:
    what: str
    batch: int
    peak_mib: float


@dataclass
class ModelBenchResult:
    preset: str
    device: str
    dtype: str
    llm_size: str | None
    batch_sizes: list[int]
    repeats: int
    warmup: int
    max_new_tokens: int
    expert_names: list[str]
    machine: dict[str, str] = field(default_factory=dict)
    params_m: dict[str, float] = field(default_factory=dict)
    steps: list[StepTiming] = field(default_factory=list)
    expert_costs: list[ExpertCost] = field(default_factory=list)
    memory: list[MemoryUse] = field(default_factory=list)

    @property
    def key(self) -> str:
        """The docs section key, ``bench:model:<preset>:<device>``."""
        return f"bench:model:{self.preset}:{self.device}"

    def step(self, name: str, batch: int) -> StepTiming:
        for s in self.steps:
            if s.step == name and s.batch == batch:
                return s
        raise ValueError(f"no timing for step {name!r} at batch {batch}")

    def cost(self, batch: int, order: str, k: int) -> ExpertCost:
        for c in self.expert_costs:
            if (c.batch, c.order, c.k) == (batch, order, k):
                return c
        raise ValueError(f"no expert cost for batch={batch}, order={order!r}, k={k}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def step_names(expert_names: Sequence[str]) -> list[str]:
    """Every step id one batch size records, in table order."""
    return (["preprocess", "preprocess:base"] + [f"preprocess:{n}" for n in expert_names]
            + ["encode_base", "encode_questions", "routing_tokens", "route"]
            + [f"expert_features:{n}" for n in expert_names]
            + ["generate:routed", "generate:forced_3", "generate:forced_all"])


# ---- the benchmark -------------------------------------------------------------------------
class _StepCounter:
    """Counts LLM forward calls: one per decode step of ``generate`` (prefill included)."""

    def __init__(self, llm: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = llm.register_forward_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.calls += 1


def _counted(counter: _StepCounter, fn: Callable[[], Any]) -> Callable[[], tuple[Any, int]]:
    """Wrap ``fn`` to also return how many LLM forward calls (decode steps) it made."""
    def call() -> tuple[Any, int]:
        counter.calls = 0
        out = fn()
        return out, counter.calls
    return call


def run_model_bench(model: MoVAModel, *, device: torch.device, batch_sizes: Sequence[int],
                    repeats: int, warmup: int, max_new_tokens: int, preset: str,
                    llm_size: str | None = None, seed: int = 0) -> ModelBenchResult:
    """Benchmark an already built ``model`` (on ``device``) at each batch size."""
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes={list(batch_sizes)} must be a non-empty list of ints >= 1")
    model.eval()
    result = ModelBenchResult(
        preset=preset, device=device.type, dtype=str(model.dtype).removeprefix("torch."),
        llm_size=llm_size, batch_sizes=list(batch_sizes), repeats=repeats, warmup=warmup,
        max_new_tokens=max_new_tokens, expert_names=model.expert_names,
        params_m=_param_counts(model))
    counter = _StepCounter(model.llm)
    try:
        with torch.inference_mode():
            for b in batch_sizes:
                log.info("batch %d: timing each step", b)
                _bench_batch(model, result, counter, b, device, seed)
    finally:
        counter.handle.remove()
    return result


def _param_counts(model: MoVAModel) -> dict[str, float]:
    def millions(m: torch.nn.Module) -> float:
        return round(sum(p.numel() for p in m.parameters()) / 1e6, 3)

    counts = {"base": millions(model.base_encoder), "adapter": millions(model.adapter),
              "text_encoder": millions(model.text_encoder), "llm": millions(model.llm)}
    counts.update({f"expert:{n}": millions(e) for n, e in model.experts.items()})
    return counts


@dataclass
class _Inputs:
    """One batch's inputs to every step, computed once so that steps are timed side by side."""

    images: list[Any]
    questions: list[str]
    pil: Any
    pixels: torch.Tensor
    inputs: dict[str, torch.Tensor]
    base: Any
    text: Any
    tokens: Any
    feats: dict[str, torch.Tensor]


def _inputs(model: MoVAModel, b: int, device: torch.device, seed: int) -> _Inputs:
    names = model.expert_names
    images = synthetic_images(b, seed)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(b)]
    pil = model.prepare_images(images)
    pixels = model.processor.base(pil).to(device, model.dtype)
    inputs = {n: x.to(device, model.dtype if x.is_floating_point() else x.dtype)
              for n, x in model.processor.experts_inputs(names, pil).items()}
    base = model.encode_base(pixels)
    text = model.encode_questions([[q] for q in questions])
    return _Inputs(images, questions, pil, pixels, inputs, base, text,
                   model.routing_tokens(base, text),
                   {n: model.expert_features(n, inputs[n]) for n in names})


def _bench_batch(model: MoVAModel, result: ModelBenchResult, counter: _StepCounter, b: int,
                 device: torch.device, seed: int) -> None:
    x = _inputs(model, b, device, seed)
    kw = {"repeats": result.repeats, "warmup": result.warmup, "device": device}
    _bench_steps(model, result, counter, b, x, kw)
    cost = {n: result.step(f"expert_features:{n}", b).median_ms for n in model.expert_names}
    orders = {"cheapest": sorted(model.expert_names, key=lambda n: cost[n]),
              "costliest": sorted(model.expert_names, key=lambda n: -cost[n])}
    _bench_k_experts(model, result, b, x, orders, kw)
    _bench_generate(model, result, counter, b, x, orders["costliest"][:3], kw)


def _bench_steps(model: MoVAModel, result: ModelBenchResult, counter: _StepCounter, b: int,
                 x: _Inputs, kw: dict[str, Any]) -> None:
    """Every separable step, timed side by side."""
    names = model.expert_names

    def preprocess_all() -> None:
        images_in = model.prepare_images(x.images)
        model.processor.base(images_in)
        model.processor.experts_inputs(names, images_in)

    steps: dict[str, Callable[[], Any]] = {
        "preprocess": preprocess_all, "preprocess:base": lambda: model.processor.base(x.pil)}
    steps.update({f"preprocess:{n}": (lambda n=n: model.processor.expert(n, x.pil))
                  for n in names})
    steps.update({
        "encode_base": lambda: model.encode_base(x.pixels),
        "encode_questions": lambda: model.encode_questions([[q] for q in x.questions]),
        "routing_tokens": lambda: model.routing_tokens(x.base, x.text),
        "route": _counted(counter, lambda: model.route(x.tokens, x.questions)),
    })
    steps.update({f"expert_features:{n}": (lambda n=n: model.expert_features(n, x.inputs[n]))
                  for n in names})
    reset_peak_memory(kw["device"])
    timed = measure_interleaved(steps, **kw)
    result.memory.append(MemoryUse("separable steps", b, peak_memory_mib(kw["device"])))
    for step, (samples, _) in timed.items():
        result.steps.append(StepTiming(step, b, median(samples), samples))
    routing, calls = timed["route"][1]
    picked = sorted({n for e in routing.experts for n in e}, key=names.index)
    result.step("route", b).note = (f"{calls} LLM steps (max {model.config.routing.max_new_tokens})"
                                    f"; routed: {', '.join(picked) or 'none'}")


def _bench_k_experts(model: MoVAModel, result: ModelBenchResult, b: int, x: _Inputs,
                     orders: dict[str, list[str]], kw: dict[str, Any]) -> None:
    """k routed experts vs all: features + fusion, and fusion alone, all side by side."""
    names, pool = model.expert_names, len(model.expert_names)
    choices = {("all", pool): list(names)}
    choices.update({(order, k): ranked[:k] for order, ranked in orders.items()
                    for k in K_VALUES if k < pool})
    fns: dict[str, Callable[[], Any]] = {}
    for (order, k), chosen in choices.items():
        mask = model.mask_from_names([chosen] * b).to(kw["device"])
        fns[f"{order}:{k}:both"] = lambda c=chosen, m=mask: model.fuse(
            x.base, x.text, {n: model.expert_features(n, x.inputs[n]) for n in c}, m)
        fns[f"{order}:{k}:fuse"] = lambda c=chosen, m=mask: model.fuse(
            x.base, x.text, {n: x.feats[n] for n in c}, m)
    timed = measure_interleaved(fns, **kw)
    all_both = timed[f"all:{pool}:both"][0]
    for (order, k), chosen in choices.items():
        both = timed[f"{order}:{k}:both"][0]
        result.expert_costs.append(ExpertCost(
            b, order, k, chosen, median(both), median(timed[f"{order}:{k}:fuse"][0]),
            median(both) / median(all_both), min(both), min(both) / min(all_both)))


def _bench_generate(model: MoVAModel, result: ModelBenchResult, counter: _StepCounter, b: int,
                    x: _Inputs, forced_3: list[str], kw: dict[str, Any]) -> None:
    """End to end: the model's own routing vs forced experts (no routing decode when forced)."""
    names = model.expert_names
    configs = {"generate:routed": None, "generate:forced_3": forced_3,
               "generate:forced_all": list(names)}
    gens = {step: _counted(counter, lambda e=experts: model.generate(
        x.images, x.questions, experts=e, max_new_tokens=result.max_new_tokens))
        for step, experts in configs.items()}
    timed = measure_interleaved(gens, **kw)
    for step, (samples, (out, calls)) in timed.items():
        used = sorted({n for r in out for n in r.experts}, key=names.index)
        result.steps.append(StepTiming(
            step, b, median(samples), samples,
            f"experts: {', '.join(used) or 'none'}; {calls} LLM steps; answer tokens "
            f"{[r.num_generated_tokens for r in out]}"))
        reset_peak_memory(kw["device"])  # one more untimed call for this configuration's peak
        gens[step]()
        result.memory.append(MemoryUse(step, b, peak_memory_mib(kw["device"])))


def vision_path(result: ModelBenchResult, batch: int, stat: str = "median"
                ) -> list[tuple[str, float, float]]:
    """(configuration, ms, ratio to the fixed mixture) for everything before the answer
    decode, as sums of the measured medians: the fixed mixture preprocesses and runs all
    experts without routing; MoVA adds the routing pass + decode and runs only k experts.
    ``stat`` is ``median`` or ``min`` (of each step's timed calls)."""
    if stat not in ("median", "min"):
        raise ValueError(f"stat={stat!r}; expected 'median' or 'min'")

    def ms(name: str) -> float:
        return getattr(result.step(name, batch), f"{stat}_ms")

    def cost_ms(c: ExpertCost) -> float:
        return getattr(c, f"{stat}_ms")

    names = result.expert_names
    shared = ms("preprocess:base") + ms("encode_base") + ms("encode_questions")
    fixed = shared + sum(ms(f"preprocess:{n}") for n in names) + cost_ms(result.cost(
        batch, "all", len(names)))
    rows = [(f"fixed mixture: all {len(names)} experts, no routing", fixed, 1.0)]
    for c in result.expert_costs:
        if c.batch != batch or c.order == "all":
            continue
        total = (shared + ms("routing_tokens") + ms("route") + cost_ms(c)
                 + sum(ms(f"preprocess:{n}") for n in c.experts))
        rows.append((f"MoVA: routing + {c.k} {c.order} ({', '.join(c.experts)})", total,
                     total / fixed))
    return rows


# ---- building and reporting ----------------------------------------------------------------
def build_bench_model(preset: str, device: torch.device, dtype: str, *, llm_size: str = "1b",
                      seed: int = 0) -> MoVAModel:
    """Build the preset's model directly on ``device`` (random weights, no download)."""
    config = bench_config(preset, dtype=dtype, llm_size=llm_size)
    if preset == "full":
        if device.type == "cpu":
            log.warning("the full preset on CPU is slow (billions of parameters); expect many "
                        "minutes per batch size")
        check_fits(config, device)
    with torch.device(device):
        return build_model(config, seed=seed)


def bench_model(preset: str = "tiny", *, device: torch.device, dtype: str | None = None,
                batch_sizes: Sequence[int] = (1, 8), repeats: int = 5, warmup: int = 2,
                max_new_tokens: int = 32, llm_size: str = "1b", seed: int = 0
                ) -> ModelBenchResult:
    """Build the preset's model and benchmark it; ``dtype`` defaults to bfloat16 on CUDA and
    float32 on CPU."""
    for name, value, low in (("repeats", repeats, 1), ("warmup", warmup, 0),
                             ("max_new_tokens", max_new_tokens, 1)):
        if value < low:
            raise ValueError(f"{name}={value} must be >= {low}")
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes={list(batch_sizes)} must be a non-empty list of ints >= 1")
    dtype = dtype or ("bfloat16" if device.type == "cuda" else "float32")
    model = build_bench_model(preset, device, dtype, llm_size=llm_size, seed=seed)
    result = run_model_bench(model, device=device, batch_sizes=batch_sizes, repeats=repeats,
                             warmup=warmup, max_new_tokens=max_new_tokens, preset=preset,
                             llm_size=llm_size if preset == "full" else None, seed=seed)
    result.machine = machine_info(device)
    return result
