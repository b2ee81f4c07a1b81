"""The markdown section of `mova bench model` (also what the CLI prints)."""

from __future__ import annotations

from pipelines.bench.harness import IMAGE_SIZE, fmt_ms, markdown_table
from pipelines.bench.step_latency import ModelBenchResult, step_names, vision_path


def step_label(step: str, pool_size: int) -> str:
    """A readable table label for a step id."""
    fixed = {"preprocess": f"preprocess: images -> tensors, base + {pool_size} experts",
             "route": "route (LLM routing decode)", "generate:routed": "generate, routed",
             "generate:forced_3": "generate, 3 costliest experts forced",
             "generate:forced_all": f"generate, all {pool_size} experts forced"}
    if step in fixed:
        return fixed[step]
    kind, _, name = step.partition(":")
    if kind == "preprocess":
        return f"preprocess: {name} only"
    return f"{kind}({name})" if name else step


def render_markdown(result: ModelBenchResult) -> str:
    """The results as the markdown section (also what the CLI prints)."""
    r, names, bs = result, result.expert_names, result.batch_sizes
    cols = [f"b={b} ms: median (min)" for b in bs]
    llm = f", LLM {r.llm_size}" if r.llm_size else ""
    llm_flag = f" --llm-size {r.llm_size}" if r.llm_size else ""
    cpu_threads = r.machine.get("torch threads") if r.device == "cpu" else None
    threads = f"OMP_NUM_THREADS={cpu_threads} " if cpu_threads else ""
    out = [f"## `mova bench model`: preset {r.preset}{llm} on {r.device} ({r.dtype})", "",
           f"Reproduce: `{threads}mova bench model --preset {r.preset} --device {r.device} "
           f"--dtype {r.dtype} --batch-sizes {','.join(map(str, bs))} --repeats {r.repeats} "
           f"--warmup {r.warmup} --max-new-tokens {r.max_new_tokens}{llm_flag}`", "",
           "Machine: " + "; ".join(f"{k}: {v}" for k, v in r.machine.items()), "",
           "Parameters (M): " + ", ".join(f"{k} {v:g}" for k, v in r.params_m.items()), "",
           f"Median (and minimum) of {r.repeats} timed calls after {r.warmup} warm-up calls, "
           "the calls of each table timed in interleaved rounds (`time.perf_counter`, "
           "`torch.inference_mode`, CUDA synchronised); inputs: "
           f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} random RGB images and one question each. A median "
           "far above its minimum means the machine was busy; the minima are then the steadier "
           "figures. The weights are random, so the routing replies and answer lengths are "
           "arbitrary; the notes give the LLM decode steps each timing covers.", "",
           "### Separable steps", ""]
    rows = []
    for step in step_names(names):
        timings = [r.step(step, b) for b in bs]
        notes = "; ".join(f"b={t.batch}: {t.note}" for t in timings if t.note)
        rows.append([step_label(step, len(names))]
                    + [f"{fmt_ms(t.median_ms)} ({fmt_ms(t.min_ms)})" for t in timings]
                    + [notes])
    out += [markdown_table(["step", *cols, "notes"], rows), ""]
    out += [f"### Expert cost: k of {len(names)} routed vs all {len(names)}", "",
            "Expert features + fusion (`expert_features` of each routed expert, then `fuse`) "
            "timed as one call; `fuse only` reuses precomputed features. The k experts are the "
            "cheapest or the costliest by their measured `expert_features` time at that batch "
            "size, bounding what a routing of k experts costs. Ratio = time / time of all "
            f"{len(names)}.", ""]
    rows = [[c.batch, c.order, c.k, ", ".join(c.experts) if c.order != "all" else "all",
             f"{fmt_ms(c.median_ms)} ({fmt_ms(c.min_ms)})", fmt_ms(c.fuse_ms), f"{c.ratio:.3f}",
             f"{c.ratio_min:.3f}"] for c in r.expert_costs]
    out += [markdown_table(["batch", "order", "k", "experts", "features + fuse ms",
                            "fuse only ms", "ratio to all", "ratio of minima"], rows), ""]
    out += ["### Vision path before the answer decode (sums of the medians above)", "",
            "Fixed mixture = preprocessing of base and all experts + base and text encoding + "
            "all experts + fusion; MoVA adds the routing pass and decode but preprocesses and "
            "runs only the k routed experts.", ""]
    rows = [[b, name, fmt_ms(ms), f"{ratio:.3f}", fmt_ms(ms_min), f"{ratio_min:.3f}"]
            for b in bs for (name, ms, ratio), (_, ms_min, ratio_min) in
            zip(vision_path(r, b), vision_path(r, b, "min"), strict=True)]
    out += [markdown_table(["batch", "configuration", "ms (medians)", "ratio to fixed",
                            "ms (minima)", "ratio to fixed (minima)"], rows), ""]
    mem = "CUDA peak allocated since the step began" if r.device == "cuda" else \
        "process peak RSS (a high-water mark over the whole run, never reset)"
    out += ["### Peak memory", "", f"MiB, {mem}.", "",
            markdown_table(["measured after", "batch", "peak MiB"],
                           [[step_label(m.what, len(names)), m.batch, f"{m.peak_mib:.0f}"]
                            for m in r.memory])]
    return "\n".join(out) + "\n"
