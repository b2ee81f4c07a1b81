"""`mova demo`: the whole lifecycle (see :mod:`pipelines.demo.lifecycle`); ``--tour`` only builds a
tiny MoVA and shows two-stage generation (route, then answer) on two drawn images."""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

from PIL import Image, ImageDraw

from mova.factory import build_tiny_mova
from pipelines.bench.harness import write_section
from pipelines.demo.expert_value import run_expert_value
from pipelines.demo.expert_value_report import SECTION, docs_benchmarks, render_section
from pipelines.demo.lifecycle import run_demo
from pipelines.demo.plans import EXPERT_VALUE, EXPERT_VALUE_QUICK, FULL, QUICK, REAL, REAL_QUICK
from pipelines.demo.real import run_real_demo
from pipelines.model.real_assets import MissingPackagesError

DEFAULT_OUT = "outputs/demo"

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}


def shapes_image(seed: int = 0, size: int = 160) -> tuple[Image.Image, str, str]:
    """A white canvas with a few coloured squares; returns (image, question, answer)."""
    rng = random.Random(seed)
    colour = rng.choice(sorted(COLOURS))
    count = rng.randint(1, 4)
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for i in range(count):
        x = 10 + i * (size // 4)
        y = rng.randint(10, size - 40)
        draw.rectangle([x, y, x + 28, y + 28], fill=COLOURS[colour])
    return image, f"How many {colour} squares are there?", str(count)


def chart_image(seed: int = 1, size: int = 160) -> tuple[Image.Image, str, str]:
    """A small bar chart; returns (image, question, answer)."""
    rng = random.Random(seed)
    values = [rng.randint(1, 9) for _ in range(4)]
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for i, v in enumerate(values):
        x = 15 + i * 35
        draw.rectangle([x, size - 15 - v * 14, x + 25, size - 15], fill=(60, 90, 200))
        draw.text((x + 8, size - 13), "ABCD"[i], fill="black")
    best = "ABCD"[values.index(max(values))]
    return image, "Which bar is the highest?", best


def run(args: argparse.Namespace) -> int:
    if args.tour:
        return run_tour(args)
    if args.real or args.expert_value:
        return run_real(args)

    try:
        result = run_demo(args.out, QUICK if args.quick else FULL, seed=args.seed,
                          serve=not args.no_serve)
    except KeyboardInterrupt:
        print("mova demo: interrupted (everything it started was stopped, see above)")
        return 130
    if args.json:
        Path(args.json).write_text(json.dumps(dataclasses.asdict(result), indent=2,
                                              default=str))
    return 0


def run_real(args: argparse.Namespace) -> int:
    """``--real`` (easy-VQA) or ``--expert-value`` (the experiment): both on the real weights."""
    flag = "--expert-value" if args.expert_value else "--real"
    suffix = "-expert-value" if args.expert_value else "-real"
    out = args.out if args.out != DEFAULT_OUT else DEFAULT_OUT + suffix
    try:
        if args.expert_value:
            result = run_expert_value(out, EXPERT_VALUE_QUICK if args.quick else EXPERT_VALUE,
                                      seed=args.seed, cache=args.cache)
            if args.write_docs:
                path = write_section(docs_benchmarks(), SECTION, render_section(result))
                print(f"Wrote section <!-- {SECTION} --> of {path}")
        else:
            result = run_real_demo(out, REAL_QUICK if args.quick else REAL, seed=args.seed,
                                   cache=args.cache)
    except MissingPackagesError as exc:
        print(f"mova demo {flag}: {exc}")
        return 2
    except KeyboardInterrupt:
        print(f"mova demo {flag}: interrupted (its local Ray was stopped, see above)")
        return 130
    if args.json:
        Path(args.json).write_text(json.dumps(dataclasses.asdict(result), indent=2,
                                              default=str))
    return 0


def run_tour(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    print("Building a tiny MoVA (CLIP base, the default expert pool, MoV-Adapter, BERT, "
          "Llama) ...")
    model = build_tiny_mova(seed=args.seed)
    params = sum(p.numel() for p in model.parameters())
    print(f"  built in {time.perf_counter() - start:.1f} s: {params / 1e6:.2f}M parameters, "
          f"pool = {', '.join(model.expert_names)}")
    samples = [shapes_image(args.seed), chart_image(args.seed + 1)]
    images = [s[0] for s in samples]
    questions = [s[1] for s in samples]

    print("\nTwo-stage generation (the LLM routes, then answers) on a batch of 2:")
    routed = model.generate(images, questions, max_new_tokens=args.max_new_tokens)
    pool = model.expert_names
    suited = [("codetr", "dinov2"), ("deplot", "pix2struct", "vary")]  # shapes, then a chart
    forced_names = [[n for n in names if n in pool] or pool[:1] for names in suited]
    forced = model.generate(images, questions, experts=forced_names,
                            max_new_tokens=args.max_new_tokens)
    for (_image, question, truth), r, f in zip(samples, routed, forced, strict=True):
        print(f"\n  question       : {question}   (true answer: {truth})")
        print(f"  routing reply  : {r.routing_reply!r} -> experts {r.experts or 'none'}")
        print(f"  answer         : {r.answer!r}")
        print(f"  forced experts : {f.experts}")
        print("  gate weights   : " + "; ".join(
            f"block {b}: " + ", ".join(f"{n}={w:.2f}" for n, w in
                                        zip(model.expert_names, row, strict=True) if w > 0)
            for b, row in enumerate(f.gate_weights)))
        print(f"  answer         : {f.answer!r}")
    print("\nThe model is randomly initialised, so its routing and answers are noise until it is "
          "trained; the gate weights show the MoV-Adapter fusing only the routed experts.")
    if args.save:
        path = model.save_pretrained(args.save)
        print(f"\nSaved the checkpoint to {path} "
              f"({sum(f.stat().st_size for f in Path(path).rglob('*') if f.is_file()) / 1e6:.1f}"
              " MB); reload it with mova.from_pretrained.")
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{"question": q, "routed": r.experts, "routing_reply": r.routing_reply,
              "answer": r.answer, "forced": f.experts, "gate_weights": f.gate_weights}
             for q, r, f in zip(questions, routed, forced, strict=True)], indent=2))
        print(f"Wrote the results to {args.json}")
    print(f"\nDone in {time.perf_counter() - start:.1f} s.")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole lifecycle on a tiny MoVA: data, features, "
                       "pretrain, labels, SFT, eval, serve", description=__doc__)
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (an earlier demo's "
                   "folder is replaced; any other non-empty folder is refused)")
    p.add_argument("--quick", action="store_true",
                   help="smaller data and fewer steps (the end-to-end test's mode)")
    p.add_argument("--no-serve", action="store_true", help="stop after the evaluation")
    p.add_argument("--real", action="store_true",
                   help="the longer variant on real pretrained weights from packages (SmolLM2-"
                        "135M, MiniLM, DINOv2-S) on easy-VQA: MoVA vs a base-only model; "
                        "output defaults to outputs/demo-real")
    p.add_argument("--expert-value", action="store_true",
                   help="the experiment on the real weights whether training makes experts "
                        "matter: colour questions the base answers, a small tag's 1-pixel "
                        "pattern only DINOv2 resolves; base-only vs MoVA routed, right and "
                        "wrong expert forced (~45 min; --quick: its stages on tiny random "
                        "models in minutes); output defaults to outputs/demo-expert-value")
    p.add_argument("--write-docs", action="store_true", help="--expert-value: write the "
                   "result into docs/benchmarks.md (section bench:expert-value)")
    p.add_argument("--cache", default=None, help="--real: the prepared weights' folder "
                                                 "(default $MOVA_CACHE/real or "
                                                 "~/.cache/mova/real)")
    p.add_argument("--tour", action="store_true", help="only build a tiny untrained MoVA and "
                   "show two-stage generation (seconds, no Ray)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=12, help="--tour's answer length")
    p.add_argument("--save", metavar="DIR", help="--tour: also save the model")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.set_defaults(func=run)
