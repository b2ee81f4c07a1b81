"""`mova labels --config jobs/labels.yaml [key=value ...]`."""

from __future__ import annotations

import argparse

from pipelines.common.command import recipe_command
from pipelines.labels import job
from pipelines.labels.recipe import LabelsRecipe


def add_parser(sub: argparse._SubParsersAction) -> None:
    recipe_command(sub, "labels", recipe=LabelsRecipe, job=job.run_labels,
                   help="loss-driven routing labels with Ray Data", doc=job.__doc__,
                   example="jobs/labels.yaml")
