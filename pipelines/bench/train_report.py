"""The markdown section of `mova bench train` (also what the CLI prints)."""

from __future__ import annotations

from pipelines.bench.harness import markdown_table
from pipelines.bench.real import REAL_IMAGE_SIZE, TRAIN_NOTE, expert_cost, expert_cost_markdown
from pipelines.bench.train import (
    ZERO_CPUS_PER_WORKER,
    ZERO_WORKERS,
    TrainBenchResult,
    cached_over_no_experts,
    speedups,
)


def render_markdown(r: TrainBenchResult) -> str:
    """The results as the markdown section (also what the CLI prints)."""
    threads = r.machine.get("torch threads")
    env = f"OMP_NUM_THREADS={threads} " if threads else ""
    main = [z for z in r.zero if z.log_every == r.log_every]
    stages = ",".join(str(z.zero_stage) for z in main) or "none"
    extra = "" if len(main) < len(r.zero) or not r.zero or r.log_every == 1 else \
        " --no-report-check"

    if r.image_size != (REAL_IMAGE_SIZE if r.real else 128):
        extra += f" --image-size {r.image_size}"
    out = _header(r, env, stages, extra) + _in_process(r) + _zero(r)
    return "\n".join(out) + "\n"


def _header(r: TrainBenchResult, env: str, stages: str, extra: str) -> list[str]:
    return [f"## `mova bench train`: cached expert features vs computed, and ZeRO stages "
           f"({r.stage}{', real weights' if r.real else ''})", "",
           f"Reproduce: `{env}mova bench train{' --real' if r.real else ''} --steps {r.steps} "
           f"--batch-size {r.batch_size} --zero-stages {stages} --log-every {r.log_every}"
           f"{extra} --stage {r.stage}`", "",
           "Machine: " + "; ".join(f"{k}: {v}" for k, v in r.machine.items()), "",
           *([TRAIN_NOTE, ""] if r.real else []),
           f"{'MoVA (real LLM, text encoder, dinov2)' if r.real else 'Tiny MoVA (random init)'}"
           f", stage `{r.stage}` (what it trains: `set_stage`), fp32 on "
           f"CPU, {r.samples} synthetic {r.image_size}x{r.image_size} samples (4 domains, "
           "interleaved). MFU is not measured: no GPU here"
           + ("." if r.real else ", and the tiny shapes would make it meaningless."), "",
           "### In one process: cached features vs experts computed each step", "",
           f"Batch {r.batch_size}; {r.steps} timed steps per configuration after 1 warm-up "
           "step; the four configurations (own model + AdamW each) stepped in interleaved "
           "rounds. Step = `model(**batch)` + `loss.backward()` + `AdamW.step()`; rows come "
           "from `prepare_batch` (the function `build_dataset` maps: compute mode prepares "
           "each routed expert's input there), batches from `collate`; both timed apart "
           "(they run in Ray Data workers / the loop, not in the step). Tokens = "
           "`attention_mask.sum()` (text + image tokens), as the training loop counts them. "
           f"`label`: the rows' routing labels ({'`dinov2`' if r.real else 'synthetic'}); "
           "`all`: every sample routes every expert of the pool.",
           ""]


def _in_process(r: TrainBenchResult) -> list[str]:
    rows = [[c.masks, c.features, f"{c.experts_per_sample:.2f}", f"{c.median_ms:.1f}",
             f"{c.steps_per_s:.2f}", f"{c.tokens_per_s:.0f}", f"{c.prepare_ms_per_sample:.2f}",
             f"{c.collate_ms:.2f}"] for c in r.configs]
    out = [markdown_table(["masks", "features", "experts/sample", "median step ms",
                            "steps/s", "tokens/s", "prepare ms/sample", "collate ms/batch"],
                           rows), ""]
    rows = [[masks, f"{s['steps_per_s']:.2f}", f"{s['median']:.2f}"]
            for masks, s in speedups(r).items()]
    out += ["Cached / compute speed-up (goal >= 2x):", "",
            markdown_table(["masks", "steps/s ratio", "median step-time ratio"], rows), "",
            *_floor_line(r), *expert_cost_markdown(expert_cost(r))]
    return out


def _floor_line(r: TrainBenchResult) -> list[str]:
    ratio = cached_over_no_experts(r)
    if ratio is None:
        return []
    verdict = "met" if ratio <= 1.1 else "**not met**"
    return [f"A step with the label experts' cached features takes **{ratio:.2f}x** a step "
            f"routing no expert at all (median step times; goal: at most 1.1x, {verdict}). "
            "What the cache cannot remove: with no expert routed the adapter's expert path "
            "gets no gradient, so neither its backward nor the optimizer's update of its "
            "parameters runs; with one, both do (the fusion itself is MoVA's work).",
            ""]


def _zero(r: TrainBenchResult) -> list[str]:
    if not r.zero:
        return []
    out = ["### Ray Train + DeepSpeed per ZeRO stage (cached features)", "",
                f"`run_train`, {ZERO_WORKERS} workers x {ZERO_CPUS_PER_WORKER} CPU, batch "
                f"{r.batch_size} per worker, {r.steps + 1} steps, gloo, fp32, client AdamW. "
                "The loop records its metrics (MLflow on rank 0, `ray.train.report` on every "
                "rank) every `log_every` steps and at the last step, each record taken after "
                "that step's optimizer update. Steps/s = optimizer steps between the first and "
                "the last record over the time between them (the warm-up before the first "
                "record is left out; the whole loop is covered: Ray Data rows, collate, "
                "forward, backward, ZeRO reductions, the reports). Tokens/s = median of the "
                "loop's own `tokens_per_s` (all workers) over the records after the first. "
                "Wall = the whole `run_train` call (Ray, worker and DeepSpeed start-up, "
                "MLflow, export). One run per row on a 2-core VM shared with other jobs (see "
                "the load average under Machine): the same configuration has varied by up to "
                "~1.6x between runs here, so only larger differences say something.", ""]
    rows = [[z.zero_stage, z.log_every, z.steps, f"{z.steps_per_s:.2f}",
                 f"{z.tokens_per_s:.0f}", f"{z.loop_seconds:.2f}", f"{z.wall_seconds:.1f}",
             "n/a" if z.final_loss is None else f"{z.final_loss:.3f}"] for z in r.zero]
    return out + [markdown_table(["ZeRO stage", "log_every", "timed steps", "steps/s",
                                  "tokens/s", "loop s", "wall s", "final loss"], rows)]

