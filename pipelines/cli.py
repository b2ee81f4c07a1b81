"""The `mova` command line: one sub-command per stage, each defined in its stage's folder."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from pipelines.bench import cli as bench_cli
from pipelines.common.ray_init import prepare_env
from pipelines.data import cli as data_cli
from pipelines.demo import cli as demo_cli
from pipelines.evaluate import cli as eval_cli
from pipelines.features import cli as features_cli
from pipelines.labels import cli as labels_cli
from pipelines.model import cli as model_cli
from pipelines.serve import cli as serve_cli
from pipelines.train import cli as train_cli

# One line per stage: its folder's `add_parser` registers `mova <stage> ...`.
STAGES = (demo_cli, model_cli, data_cli, features_cli, labels_cli, train_cli, eval_cli,
          serve_cli, bench_cli)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mova", description="Train, evaluate and serve MoVA multimodal LLMs on Ray."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in STAGES:
        stage.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("transformers", "urllib3", "filelock", "httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    prepare_env(local=not os.environ.get("RAY_ADDRESS"))  # before anything imports Ray
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"mova {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
