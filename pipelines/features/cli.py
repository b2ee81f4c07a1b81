"""`mova features --config jobs/features.yaml [key=value ...]`."""

from __future__ import annotations

import argparse

from pipelines.common.command import recipe_command
from pipelines.features import job
from pipelines.features.recipe import FeaturesRecipe


def add_parser(sub: argparse._SubParsersAction) -> None:
    recipe_command(sub, "features", recipe=FeaturesRecipe, job=job.run_features,
                   help="cache frozen expert features with Ray Data", doc=job.__doc__,
                   example="jobs/features.yaml")
