"""Every recipe under jobs/ loads and validates, so a recipe can't rot."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.common.recipe import load_recipe
from pipelines.data.synth import SynthRecipe
from pipelines.evaluate.recipe import EvalRecipe
from pipelines.features.recipe import FeaturesRecipe
from pipelines.labels.recipe import LabelsRecipe
from pipelines.serve.recipe import ServeRecipe
from pipelines.train.recipe import TrainRecipe

JOBS = Path(__file__).resolve().parents[2] / "jobs"
RECIPES = {"features.yaml": FeaturesRecipe, "pretrain.yaml": TrainRecipe,
           "sft.yaml": TrainRecipe, "serve.yaml": ServeRecipe,
           "labels.yaml": LabelsRecipe, "eval.yaml": EvalRecipe, "synth.yaml": SynthRecipe}


def test_every_recipe_file_has_a_schema():
    assert {p.name for p in JOBS.glob("*.yaml")} <= set(RECIPES) | {"model-tiny.yaml"}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_loads(name):
    recipe = load_recipe(RECIPES[name], JOBS / name)
    assert recipe is not None


def test_overrides_and_errors():
    recipe = load_recipe(FeaturesRecipe, JOBS / "features.yaml",
                         ["batch_size=4", "only=[sam,vary]", "ray.num_cpus=2"])
    assert recipe.batch_size == 4 and recipe.only == ["sam", "vary"]
    assert recipe.ray.num_cpus == 2
    with pytest.raises(ValueError, match="unknown config key.*batchsize"):
        load_recipe(FeaturesRecipe, JOBS / "features.yaml", ["batchsize=4"])
    with pytest.raises(ValueError, match="batch_size must be an integer"):
        load_recipe(FeaturesRecipe, JOBS / "features.yaml", ["batch_size=four"])
    with pytest.raises(ValueError, match="experts='some'"):
        load_recipe(FeaturesRecipe, JOBS / "features.yaml", ["experts=some"])
    with pytest.raises(FileNotFoundError, match="recipe not found"):
        load_recipe(FeaturesRecipe, JOBS / "nope.yaml")


def test_train_recipes_agree_on_stage_and_chain():
    pre = load_recipe(TrainRecipe, JOBS / "pretrain.yaml")
    sft = load_recipe(TrainRecipe, JOBS / "sft.yaml")
    assert (pre.stage, sft.stage) == ("pretrain", "sft")
    assert sft.init_from == pre.output
    assert sft.optim.lr < pre.optim.lr


@pytest.mark.parametrize("override, message", [
    ("stage=finetune", "stage='finetune'"),
    ("deepspeed.zero_stage=4", "zero_stage=4"),
    ("lora.enabled=true", "lora.enabled is for stage sft"),
    ("features=cached", None),
    ("optim.lr=-1", "optim.lr must be > 0"),
    ("deepspeed.offload_param=true", "offload_param needs zero_stage 3"),
    ("optim.betas=0.9", "optim.betas must be a list"),
])
def test_train_recipe_errors(override, message):
    if message is None:
        load_recipe(TrainRecipe, JOBS / "pretrain.yaml", [override])
        return
    with pytest.raises(ValueError, match=message):
        load_recipe(TrainRecipe, JOBS / "pretrain.yaml", [override])


def test_credentials_never_travel_in_a_runtime_env(monkeypatch):
    from pipelines.common.ray_init import CREDENTIALS, worker_env
    from pipelines.serve.recipe import ServeRecipe

    for key in CREDENTIALS:
        monkeypatch.setenv(key, "secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3.example:9000")
    env = worker_env()
    assert env["AWS_ENDPOINT_URL_S3"] == "http://s3.example:9000"
    assert not set(env) & set(CREDENTIALS) and "secret" not in env.values()
    recipe = ServeRecipe(checkpoint="ckpt",
                         runtime_env={"env_vars": {"AWS_SECRET_ACCESS_KEY": "x", "A": "b"}})
    with pytest.raises(ValueError, match=r"\['AWS_SECRET_ACCESS_KEY'\]: credentials never"):
        recipe.validate()
