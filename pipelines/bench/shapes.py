"""The shapes `mova bench model` runs at: mova's tiny defaults, or every component at the
paper's shapes with random weights, and whether such a model fits the device."""

from __future__ import annotations

import torch

from mova.config import (
    AdapterConfig,
    LLMConfig,
    MoVAConfig,
    TextEncoderConfig,
    VisionEncoderConfig,
    default_experts,
)
from mova.factory import build_model
from pipelines.bench.harness import available_bytes

PRESETS = ("tiny", "full")
DTYPES = ("float32", "bfloat16")
# Llama-style LLM shapes for the full preset ("tiny" keeps mova's tiny LLM defaults).
LLM_SIZES: dict[str, dict[str, int]] = {
    "tiny": {},
    "1b": dict(hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=8,
               intermediate_size=5632),
    "7b": dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
               intermediate_size=11008),
}


def full_config(llm_size: str = "1b", dtype: str = "bfloat16") -> MoVAConfig:
    """Every component at the paper's shapes, random weights (nothing is downloaded): CLIP
    ViT-L/14-336 run at 672, the default pool's "full" presets, a 16-head adapter, bert-large and a
    Llama-style LLM of ``llm_size``. Tokenizers stay mova's small local ones."""
    if llm_size not in LLM_SIZES:
        raise ValueError(f"llm_size={llm_size!r}; expected one of {sorted(LLM_SIZES)}")
    llm = LLMConfig(preset="tiny" if llm_size == "tiny" else "full",
                    max_position_embeddings=4096, **LLM_SIZES[llm_size])
    return MoVAConfig(
        base=VisionEncoderConfig(preset="full", image_size=672, native_image_size=336,
                                 patch_size=14, hidden_size=1024, num_layers=24, num_heads=16,
                                 intermediate_size=4096, feature_layer=-2),
        experts=default_experts("full"),
        adapter=AdapterConfig(num_heads=16),
        text_encoder=TextEncoderConfig(preset="full", hidden_size=1024, num_layers=24,
                                       num_heads=16, intermediate_size=4096, max_length=512),
        llm=llm,
        dtype=dtype,
    ).validate()


def bench_config(preset: str, *, dtype: str = "float32", llm_size: str = "1b") -> MoVAConfig:
    """The config a preset benchmarks: mova's tiny defaults, or :func:`full_config`."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {list(DTYPES)}")
    if preset == "tiny":
        return MoVAConfig(dtype=dtype).validate()
    if preset == "full":
        return full_config(llm_size, dtype)
    raise ValueError(f"preset={preset!r}; expected one of {list(PRESETS)}")


def weight_bytes(config: MoVAConfig, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of all parameters at ``dtype``, counted on a meta-device build (no memory used)."""
    with torch.device("meta"):
        model = build_model(config)
    return sum(p.numel() for p in model.parameters()) * torch.finfo(dtype).bits // 8


def check_fits(config: MoVAConfig, device: torch.device) -> None:
    """Refuse a config whose fp32 weights (they are initialised in fp32, then cast) would not
    fit in 90% of the device's free memory."""
    need, free = weight_bytes(config), available_bytes(device)
    if free and need > 0.9 * free:
        raise ValueError(f"the model needs {need / 2**30:.1f} GiB for its fp32 weights but "
                         f"{device} has {free / 2**30:.1f} GiB free; choose a smaller "
                         f"--llm-size (now {config.llm.hidden_size}-wide, "
                         f"{config.llm.num_layers} layers)")
