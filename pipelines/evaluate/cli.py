"""`mova eval --config jobs/eval.yaml [key=value ...]`."""

from __future__ import annotations

import argparse

from pipelines.common.command import recipe_command
from pipelines.evaluate import job
from pipelines.evaluate.recipe import EvalRecipe


def add_parser(sub: argparse._SubParsersAction) -> None:
    recipe_command(sub, "eval", recipe=EvalRecipe, job=job.run_eval,
                   help="evaluate a checkpoint (Ray Data) or an endpoint (HTTP) on benchmark "
                        "files", doc=job.__doc__, example="jobs/eval.yaml")
