"""The LLM deployment's recipe: a deployment (replicas, queues) plus the engine that decodes
(``llm.engine``, :class:`pipelines.common.llm_engine.LLMEngineRecipe`)."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.common.llm_engine import LLMEngineRecipe
from pipelines.serve.recipe_parts import DeploymentRecipe


@dataclass
class LLMRecipe(DeploymentRecipe, LLMEngineRecipe):
    """The LLM deployment: replicas and queues as every deployment, plus its engine."""

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        self.validate_engine(prefix)
