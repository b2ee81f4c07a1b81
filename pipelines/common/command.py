"""How every stage becomes a ``mova`` sub-command: ``mova <stage> --config R.yaml key=value``.

:func:`recipe_command` registers a stage whose job takes a recipe and returns a summary with
``format()`` and ``to_dict()``; :func:`command_line` builds the same command as an argument
list (for ``ray job submit``, subprocesses and tests).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from pipelines.common import storage
from pipelines.common.recipe import load_recipe


class Summary(Protocol):
    def format(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


def recipe_command(sub: argparse._SubParsersAction, name: str, *, recipe: type,
                   job: Callable[[Any], Summary], help: str, doc: str | None,
                   example: str) -> argparse.ArgumentParser:
    """Add ``name`` to ``sub``: load the recipe (``--config`` + overrides), run ``job``, print
    its summary, and with ``--json`` also write the summary there."""
    parser = sub.add_parser(name, help=help, description=doc,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"recipe YAML ({example})")
    parser.add_argument("--json", help="also write the summary as JSON here (local or s3://)")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides")

    def run(args: argparse.Namespace) -> int:
        summary = job(load_recipe(recipe, args.config, args.overrides))
        print(summary.format())
        if args.json:
            storage.write_text_atomic(args.json, json.dumps(summary.to_dict(), indent=2) + "\n")
            print(f"Summary written to {args.json}")
        return 0

    parser.set_defaults(func=run)
    return parser


def command_line(stage: str | Sequence[str], config: str | None = None,
                 overrides: Mapping[str, Any] | Sequence[str] = (),
                 program: Sequence[str] = ("mova",)) -> list[str]:
    """``mova <stage> --config <config> key=value ...`` as an argument list. ``overrides``
    may be a mapping (values written as YAML scalars/flow collections) or ready strings."""
    argv = [*program, *([stage] if isinstance(stage, str) else stage)]
    if config:
        argv += ["--config", str(config)]
    if isinstance(overrides, Mapping):
        argv += format_overrides(overrides)
    else:
        argv += [str(item) for item in overrides]
    return argv


def format_overrides(values: Mapping[str, Any]) -> list[str]:
    """``key=value`` overrides, each value a YAML scalar or flow collection."""
    return [f"{key}={_scalar(value)}" for key, value in values.items()]


def _scalar(value: Any) -> str:
    if isinstance(value, str | os.PathLike):
        return str(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)
