"""Shared benchmark helpers: timing, peak memory, machine facts and the results markdown file.

Every `mova bench ...` command writes its own section of ``docs/benchmarks.md``, delimited by
``<!-- bench:<name> -->`` ... ``<!-- /bench:<name> -->`` markers, so reruns replace only their own
section and leave the others intact.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RESULTS = REPO_ROOT / "docs" / "benchmarks.md"
IMAGE_SIZE = (640, 480)

INTRO = """# Benchmarks

Measured numbers for this code base, written by the `mova bench` commands. Each section below is
replaced in place when its command is rerun (the HTML comments delimit the sections; keep them).

| section | reproduce with |
|---|---|
| `bench:model:<preset>:<device>` | `mova bench model --preset <preset> --device <device>` |
| `bench:features:<device>` | `OMP_NUM_THREADS=1 mova bench features` (Ray; ~10 min) |
| `bench:train:<device>` | `OMP_NUM_THREADS=1 mova bench train` (Ray; ~12 min) |
| `bench:features:real:<device>` | `OMP_NUM_THREADS=1 mova bench features --real` (Ray; ~10 min) |
| `bench:train:real:<device>` | `OMP_NUM_THREADS=1 mova bench train --real` (~10 min) |
| `bench:serve:tiny:cpu` | `mova bench serve` (Ray Serve; ~5 min) |
| `bench:serve:real:cpu` | `mova bench serve --real` (after `mova demo --real --quick`; ~20 min) |
| `bench:serve:cache` | `mova bench serve --cache` (Ray Serve, two apps; ~2 min) |
| `bench:serve:overload` | `mova bench serve --overload` (Ray Serve, 2 CPU hogs; ~3 min) |
| `bench:serve:routing-mix` | `mova bench serve --routing-mix` (Ray Serve, two policies; ~4 min) |
| `bench:scale:cpu` | `mova bench scale` (Ray; ~20 min) |
| `bench:checkpoint` | `mova bench checkpoint` (moto S3 on loopback; ~5 min, ~10 GiB of RAM) |

Read the results as **ratios measured side by side** in one process on one machine (for example
the cost of k routed experts against the whole pool; the calls compared are timed in
interleaved rounds):
absolute milliseconds depend on the machine, its load and the thread count (torch's default;
set `OMP_NUM_THREADS` to change it; on a small shared VM one thread gives far steadier figures,
as stalled threads make a multi-threaded median wander). Random weights say nothing about a
trained model's quality, and they make routing replies and answer lengths arbitrary (the notes
give the decode steps each timing covers). Each section names its machine, software versions
and date.
"""


def resolve_device(device: str | None) -> torch.device:
    """``cuda`` when available unless a device is named; an unavailable CUDA is an error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}; expected 'cpu' or 'cuda'")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch sees no CUDA device")
    return torch.device(device)


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A no-op on CPU; ``torch.cuda.synchronize`` on GPU so timings cover the queued kernels."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def measure_interleaved(fns: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int,
                        device: torch.device) -> dict[str, tuple[list[float], Any]]:
    """Time several calls side by side: ``warmup`` untimed calls of each, then ``repeats``
    rounds in which every call runs once (each round starts one further along the list), so
    a slow spell on a shared machine hits them all alike. Returns name -> (ms list, last
    output)."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    if warmup < 0:
        raise ValueError(f"warmup={warmup} must be >= 0")
    sync = synchronizer(device)
    names = list(fns)
    if not names:
        return {}
    for name in names:
        for _ in range(warmup):
            fns[name]()
    sync()
    samples: dict[str, list[float]] = {n: [] for n in names}
    outputs: dict[str, Any] = {}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            outputs[name] = fns[name]()
            sync()
            samples[name].append((time.perf_counter() - start) * 1000.0)
    return {n: (samples[n], outputs[n]) for n in names}


def median(samples: Sequence[float]) -> float:
    return float(statistics.median(samples))


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def process_peak_mib() -> float:
    """This process's peak resident set size (``VmHWM``). Unlike ``ru_maxrss``, which Linux
    carries over from the parent through fork and exec, it counts this process alone."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def peak_memory_mib(device: torch.device) -> float:
    """CUDA: peak allocated since the last reset. CPU: the process's peak resident set size
    (a high-water mark over the whole process, never reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return process_peak_mib()


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device`` (CUDA: free device memory; CPU: MemAvailable); 0 if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def synthetic_images(count: int, seed: int = 0) -> list[Image.Image]:
    """Deterministic random RGB images of :data:`IMAGE_SIZE` (content does not change timing)."""
    gen = torch.Generator().manual_seed(seed)
    w, h = IMAGE_SIZE
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=gen,
                                          dtype=torch.uint8).numpy()) for _ in range(count)]


def fmt_ms(value: float) -> str:
    """Milliseconds with about three significant digits."""
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(device: torch.device) -> dict[str, str]:
    """The facts a reader needs to compare a result: CPU, cores, threads, versions, GPU, date."""
    info = {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none",
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if device.type == "cuda":
        info["cuda"] = str(torch.version.cuda)
    return info


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; numbers are formatted by the caller."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"table row {list(row)} has {len(row)} cells; expected "
                             f"{len(headers)} ({list(headers)})")
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def markers(key: str) -> tuple[str, str]:
    """The opening and closing markers of section ``key`` (e.g. ``bench:model:tiny:cpu``)."""
    if not key or "-->" in key or "\n" in key:
        raise ValueError(f"section key {key!r} must be a non-empty single line without '-->'")
    return f"<!-- {key} -->", f"<!-- /{key} -->"


def write_section(path: str | Path, key: str, body: str, *, intro: str = INTRO) -> Path:
    """Replace section ``key`` of the markdown file in place (append it if absent; create the
    file with ``intro`` if missing). Text outside the section is kept byte for byte."""
    path = Path(path)
    start, end = markers(key)
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text() if path.is_file() else intro.rstrip() + "\n"
    i, j = text.find(start), text.find(end)
    if i >= 0 and j > i:
        text = text[:i] + block + text[j + len(end):]
    elif i >= 0 or j >= 0:
        raise ValueError(f"{path}: section {key!r} has an unmatched marker; expected {start!r} "
                         f"followed by {end!r}")
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def emit_result(args: argparse.Namespace, key: str, markdown: str, data: dict) -> None:
    """Print a benchmark's section; write it into ``--out`` (default docs/benchmarks.md, none
    with ``--quick``) and the raw results into ``--json`` when given."""
    print(markdown)
    out = args.out if args.out is not None else (None if args.quick else DEFAULT_RESULTS)
    if out is not None:
        print(f"Wrote section <!-- {key} --> of {write_section(out, key, markdown)}")
    if getattr(args, "json", None):
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
        print(f"Wrote {args.json}")


# ---- the command lines' shared options ------------------------------------------------------
def positive_ints(text: str) -> list[int]:
    """Parse ``"1,8"`` into ``[1, 8]`` (an argparse type: batch sizes, client counts, rows)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers "
                                         ">= 1, e.g. 1,8")
    return values


def comma_list(text: str) -> list[str]:
    """Parse ``"torch,vllm"`` into ``["torch", "vllm"]`` (an argparse type)."""
    return text.split(",")


def add_result_options(p: argparse.ArgumentParser, quick_help: str) -> None:
    """``--out``, ``--json`` and ``--quick``: what :func:`emit_result` reads."""
    p.add_argument("--out", type=Path, default=None,
                   help=f"markdown file whose section is replaced (default {DEFAULT_RESULTS}; "
                        "with --quick only when given)")
    p.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    p.add_argument("--quick", action="store_true", help=quick_help)
