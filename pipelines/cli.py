"""The `mova` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pipelines import demo, evaluate, features, labels, model_cli, train
from pipelines.bench import cli as bench_cli
from pipelines.data import cli as data_cli
from pipelines.data.synth import add_synth_parser
from pipelines.serve import cli as serve_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mova", description="Train, evaluate and serve MoVA multimodal LLMs on Ray."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo.add_parser(sub)
    model_cli.add_parser(sub)
    add_synth_parser(data_cli.add_parser(sub))
    features.add_parser(sub)
    labels.add_parser(sub)
    train.add_parser(sub)
    bench_cli.add_parser(sub)
    serve_cli.add_parser(sub)
    evaluate.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("transformers", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"mova {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
