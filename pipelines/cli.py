"""The `mova` command line: one sub-command per stage, each defined in its stage's folder.

Stages import Ray, DeepSpeed and torch at the top of their modules, and those read their
settings from the environment when imported. So the command line first settles the environment
(:func:`prepare_env`), then imports only the stage that was asked for, by name from
:data:`STAGES`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from pipelines.common.ray_init import prepare_env

# command -> (the module whose `add_parser(sub)` registers it, its one-line help)
STAGES: dict[str, tuple[str, str]] = {
    "demo": ("pipelines.demo.cli", "the whole lifecycle on a tiny MoVA (or --real weights)"),
    "model": ("pipelines.model.cli", "create, inspect, publish or import model checkpoints"),
    "data": ("pipelines.data.cli", "synthetic data, manifest validation, converters"),
    "features": ("pipelines.features.cli", "cache frozen expert features with Ray Data"),
    "labels": ("pipelines.labels.cli", "loss-driven routing labels with Ray Data"),
    "train": ("pipelines.train.cli", "pretrain or SFT on Ray Train + DeepSpeed"),
    "eval": ("pipelines.evaluate.cli", "score a checkpoint or an endpoint on benchmarks"),
    "serve": ("pipelines.serve.cli", "serve a checkpoint (OpenAI-compatible HTTP, Ray Serve)"),
    "bench": ("pipelines.bench.cli", "benchmarks whose results go to docs/benchmarks.md"),
}
NOISY_LOGGERS = ("transformers", "urllib3", "filelock", "httpx", "httpx2")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with ``command``'s full options (its stage module imported) and the other
    commands listed by name and help only."""
    parser = argparse.ArgumentParser(
        prog="mova", description="Train, evaluate and serve MoVA multimodal LLMs on Ray."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in STAGES.items():
        if name == command:
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The sub-command named in ``argv`` (the first word that is not an option)."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in STAGES else None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prepare_env(local=not os.environ.get("RAY_ADDRESS"))  # before a stage imports Ray
    args = build_parser(_command(argv)).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"mova {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
