"""`mova train --config jobs/pretrain.yaml|jobs/sft.yaml [key=value ...]`."""

from __future__ import annotations

import argparse

from pipelines.common.command import recipe_command
from pipelines.train import job
from pipelines.train.recipe import TrainRecipe


def add_parser(sub: argparse._SubParsersAction) -> None:
    recipe_command(sub, "train", recipe=TrainRecipe, job=job.run_train,
                   help="pretrain or SFT on Ray Train + DeepSpeed", doc=job.__doc__,
                   example="jobs/pretrain.yaml, jobs/sft.yaml")
