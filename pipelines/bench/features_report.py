"""The markdown section of `mova bench features` (also what the CLI prints)."""

from __future__ import annotations

from pipelines.bench.features import RATIOS, FeaturesBenchResult, ratios, throughput
from pipelines.bench.harness import markdown_table
from pipelines.bench.real import FEATURES_NOTE, REAL_IMAGE_SIZE, goal_verdict


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def render_markdown(r: FeaturesBenchResult) -> str:
    """The results as the markdown section (also what the CLI prints)."""
    tp, rt = throughput(r), ratios(r)
    threads = r.machine.get("torch threads")
    env = f"OMP_NUM_THREADS={threads} " if threads else ""
    flags = " --real" if r.real else ""
    if r.image_size != (REAL_IMAGE_SIZE if r.real else 128):
        flags += f" --image-size {r.image_size}"
    kind = "real DINOv2-S/14" if r.real else "tiny"
    out = [f"## `mova bench features`: Ray Data job vs a plain loop, expert {r.expert}"
           + (" (real weights)" if r.real else ""), "",
           f"Reproduce: `{env}mova bench features{flags} --images {r.images} --expert "
           f"{r.expert} --batch-size {r.batch_size} --workers {r.workers} --repeats "
           f"{r.repeats}`", "",
           "Machine: " + "; ".join(f"{k}: {v}" for k, v in r.machine.items()), "",
           *([FEATURES_NOTE, ""] if r.real else []),
           f"{r.images} synthetic {r.image_size}x{r.image_size} images (4 domains), the {kind} "
           f"`{r.expert}` expert, batches of {r.batch_size}, {r.dtype} cache shards. Plain loop: "
           "one process (torch threads as above), per batch decode + hash, `expert_input`, the "
           "expert, `FeatureCache.write_shard`. Ray Data: `run_features` (`experts=all`, "
           f"`only=[{r.expert}]`, {r.workers} actor(s) x 1 CPU, which Ray runs with "
           "OMP_NUM_THREADS=1 unless set) on a fresh cache each run: manifest read, a hashing "
           "stage (Ray tasks), then the expert's actor pool. Medians of "
           f"{r.repeats} run(s), interleaved (plain, Ray full, Ray small). Run it with "
           "OMP_NUM_THREADS=1: the actor runs one thread, and on a busy 2-core VM torch's "
           "default of 2 threads made the plain loop about 10x slower (thread "
           "oversubscription), which would flatter Ray.", "",
           "### Throughput", ""]
    small = f"{r.small_images} images"
    rows = [
        ["plain loop, whole run (manifest, expert load, batches)", _fmt(tp["plain"])],
        ["plain loop, batches only", _fmt(tp["plain_batches"])],
        ["Ray job, whole run, Ray started by the job", _fmt(tp["ray_cold"])],
        ["Ray job, whole run, Ray already running", _fmt(tp["ray"])],
        ["Ray job, expert stage only (actor start + batches)", _fmt(tp["ray_stage"])],
        [f"Ray job, whole run on the small manifest ({small})", _fmt(tp["ray_small"])],
        [f"Ray job, steady state: marginal rate between {r.images} and {small}",
         _fmt(tp["ray_steady"])],
    ]
    out += [markdown_table(["measurement", "images/s"], rows), "",
            f"Fixed cost of the expert stage (intercept of the two sizes: actor start, expert "
            f"load, scheduling): {_fmt(tp['ray_fixed_s'], '.2f')} s.", "",
            "### Ray Data / plain loop", ""]
    rows = [[what, f"`{ray}` / `{plain}`", _fmt(rt[f"{ray}/{plain}"], ".2f")]
            for ray, plain, what in RATIOS]
    out += [markdown_table(["comparison", "throughputs", "ratio"], rows), "",
            "A ratio >= 0.9 meets the goal for that comparison. "
            + goal_verdict(rt["ray_steady/plain_batches"], 0.9,
                           "Ray Data steady state / plain batched loop"), "",
            "### Runs", ""]
    rows = [[x.kind, x.images, x.computed, f"{x.seconds:.2f}", f"{x.stage_seconds:.2f}"]
            for x in r.runs]
    out += [markdown_table(["run", "images", "computed", "seconds", "stage seconds"], rows), "",
            f"The cached re-run (`ray_cached`, nothing computed) took "
            f"{_fmt(rt['cached_vs_compute'], '.2f')}x the time of a computing run with Ray "
            "running: its cost is reading the manifest, hashing every image and the cache "
            "index."]
    return "\n".join(out) + "\n"
