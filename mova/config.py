"""Typed configuration for a MoVA model, with YAML/JSON round trip and validation: a
checkpoint stores one :class:`MoVAConfig`; nothing about a model is inferred from paths."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mova.conversation import TEMPLATES
from mova.experts.registry import DEFAULT_POOL, expert_names, get_expert_spec
from mova.routing import ROUTING_PROMPT_STYLES
from mova.typed_dict import from_dict

PRESETS = ("tiny", "full")
DTYPES = ("float32", "bfloat16", "float16")


def _check_choice(name: str, value: Any, allowed: typing.Iterable[Any]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; expected one of {list(allowed)}")


def _check_positive(name: str, value: int | float) -> None:
    if not value > 0:
        raise ValueError(f"{name}={value!r} must be > 0")


@dataclass
class VisionEncoderConfig:
    """The base encoder (CLIP ViT): its features feed routing and fusion.

    ``image_size`` is the size the encoder runs at; ``native_image_size`` the size its position
    embeddings were trained for (they are bicubically resized when the two differ).
    """

    family: str = "clip"
    preset: str = "tiny"
    pretrained: str | None = None
    image_size: int = 112
    native_image_size: int = 56
    patch_size: int = 7
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 64
    feature_layer: int = -2
    trainable: bool = True

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    def validate(self, prefix: str = "base") -> None:
        _check_choice(f"{prefix}.family", self.family, ("clip",))
        _check_choice(f"{prefix}.preset", self.preset, PRESETS)
        for name in ("image_size", "native_image_size", "patch_size", "hidden_size", "num_layers",
                     "num_heads", "intermediate_size"):
            _check_positive(f"{prefix}.{name}", getattr(self, name))
        for name in ("image_size", "native_image_size"):
            if getattr(self, name) % self.patch_size:
                raise ValueError(
                    f"{prefix}.{name}={getattr(self, name)} must be a multiple of "
                    f"{prefix}.patch_size={self.patch_size}"
                )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"{prefix}.hidden_size must be divisible by {prefix}.num_heads")
        if not -self.num_layers <= self.feature_layer <= self.num_layers or self.feature_layer == 0:
            raise ValueError(
                f"{prefix}.feature_layer={self.feature_layer} must index a layer in "
                f"[-{self.num_layers}, {self.num_layers}] other than 0"
            )


@dataclass
class ExpertConfig:
    """One frozen vision expert: a registry entry name plus size overrides.

    Size fields left at ``None`` take the registry preset's values (``preset`` = tiny/full).
    """

    name: str = "dinov2"
    preset: str = "tiny"
    pretrained: str | None = None
    image_size: int | None = None
    patch_size: int | None = None
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    out_channels: int | None = None
    feature_layer: int | None = None
    compress_channels: int | None = None

    def validate(self, prefix: str = "expert") -> None:
        _check_choice(f"{prefix}.name", self.name, expert_names())
        _check_choice(f"{prefix}.preset", self.preset, PRESETS)
        for f in ("image_size", "patch_size", "hidden_size", "num_layers", "num_heads",
                  "out_channels", "compress_channels"):
            value = getattr(self, f)
            if value is not None:
                _check_positive(f"{prefix}.{f}", value)


@dataclass
class AdapterConfig:
    """The MoV-Adapter: width C equals the base encoder width (METHOD.md, stage 2)."""

    num_heads: int = 2
    num_blocks: int = 3
    top_k: int = 3
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    mlp_ratio: float = 8.0 / 3.0
    downsample: int = 2
    routing_pool: int = 2

    def validate(self, prefix: str = "adapter") -> None:
        for name in ("num_heads", "num_blocks", "top_k", "rope_theta", "layer_norm_eps",
                     "mlp_ratio", "downsample", "routing_pool"):
            _check_positive(f"{prefix}.{name}", getattr(self, name))


@dataclass
class TextEncoderConfig:
    """The BERT text encoder that summarises the questions for the adapter's gate."""

    family: str = "bert"
    preset: str = "tiny"
    pretrained: str | None = None
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 64
    max_length: int = 512
    trainable: bool = True

    def validate(self, prefix: str = "text_encoder") -> None:
        _check_choice(f"{prefix}.family", self.family, ("bert",))
        _check_choice(f"{prefix}.preset", self.preset, PRESETS)
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_length"):
            _check_positive(f"{prefix}.{name}", getattr(self, name))


@dataclass
class LLMConfig:
    """The decoder-only LLM that routes and answers."""

    family: str = "llama"
    preset: str = "tiny"
    pretrained: str | None = None
    hidden_size: int = 64
    num_layers: int = 2
    # head_dim 32: the smallest head vLLM's CPU attention takes (32, 64, 80, ...)
    num_heads: int = 2
    num_kv_heads: int = 1
    intermediate_size: int = 128
    max_position_embeddings: int = 2048
    chat_template: str = "chatml"
    attn_implementation: str = "sdpa"

    def validate(self, prefix: str = "llm") -> None:
        _check_choice(f"{prefix}.family", self.family, ("llama",))
        _check_choice(f"{prefix}.preset", self.preset, PRESETS)
        _check_choice(f"{prefix}.chat_template", self.chat_template, TEMPLATES)
        _check_choice(f"{prefix}.attn_implementation", self.attn_implementation,
                      ("sdpa", "eager", "flash_attention_2"))
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size", "max_position_embeddings"):
            _check_positive(f"{prefix}.{name}", getattr(self, name))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{prefix}.num_heads must be divisible by {prefix}.num_kv_heads")


@dataclass
class RoutingConfig:
    """Coarse routing: how many experts the LLM may pick and how its reply is decoded.
    ``prompt``: ``mova`` (our wording; ``description_index`` picks each expert's description)
    or ``released`` (the authors' verbatim prompt, for imported released checkpoints)."""

    max_experts: int = 3
    max_new_tokens: int = 16
    description_index: int = 0
    prompt: str = "mova"

    def validate(self, prefix: str = "routing") -> None:
        _check_choice(f"{prefix}.prompt", self.prompt, ROUTING_PROMPT_STYLES)
        _check_positive(f"{prefix}.max_experts", self.max_experts)
        _check_positive(f"{prefix}.max_new_tokens", self.max_new_tokens)
        if self.description_index < 0:
            raise ValueError(f"{prefix}.description_index must be >= 0")


@dataclass
class GenerationConfig:
    """Answer decoding defaults (overridable per call)."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0

    def validate(self, prefix: str = "generation") -> None:
        _check_positive(f"{prefix}.max_new_tokens", self.max_new_tokens)
        _check_positive(f"{prefix}.temperature", self.temperature)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"{prefix}.top_p={self.top_p} must be in (0, 1]")


def default_experts(preset: str = "tiny") -> list[ExpertConfig]:
    """The default pool in the released code's order."""
    return [ExpertConfig(name=n, preset=preset) for n in DEFAULT_POOL]


@dataclass
class MoVAConfig:
    """Everything that defines a MoVA model; saved as ``config.json`` in every checkpoint."""

    base: VisionEncoderConfig = field(default_factory=VisionEncoderConfig)
    experts: list[ExpertConfig] = field(default_factory=default_experts)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    dtype: str = "float32"

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    @property
    def num_image_tokens(self) -> int:
        return (self.base.grid_size // self.adapter.downsample) ** 2

    @property
    def num_routing_tokens(self) -> int:
        side = self.base.grid_size // self.adapter.downsample // self.adapter.routing_pool
        return side * side

    def validate(self) -> MoVAConfig:
        self.base.validate("base")
        if not self.experts:
            raise ValueError("experts must list at least one expert")
        names = self.expert_names
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"experts lists {dupes} more than once")
        for i, expert in enumerate(self.experts):
            expert.validate(f"experts[{i}]")
        self.adapter.validate("adapter")
        if self.base.hidden_size % self.adapter.num_heads:
            raise ValueError("base.hidden_size must be divisible by adapter.num_heads")
        if (self.base.hidden_size // self.adapter.num_heads) % 4:
            raise ValueError("adapter head size (base.hidden_size / adapter.num_heads) must be "
                             "a multiple of 4 for the 2D rotary encoding")
        grid = self.base.grid_size
        if grid % (self.adapter.downsample * self.adapter.routing_pool):
            raise ValueError(
                f"base grid {grid} must be divisible by adapter.downsample * adapter.routing_pool"
            )
        self.text_encoder.validate("text_encoder")
        self.llm.validate("llm")
        self.routing.validate("routing")
        if self.routing.prompt == "released":
            if lacking := [n for n in names if not get_expert_spec(n).reference_description]:
                raise ValueError(f"routing.prompt='released': experts {lacking} have no "
                                 "released description")
        if self.routing.max_experts > len(self.experts):
            raise ValueError(
                f"routing.max_experts={self.routing.max_experts} exceeds the pool size "
                f"{len(self.experts)}"
            )
        self.generation.validate("generation")
        _check_choice("dtype", self.dtype, DTYPES)
        return self

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoVAConfig:
        return from_dict(cls, data).validate()

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> MoVAConfig:
        """Read a config from a ``.json``, ``.yaml`` or ``.yml`` file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise ValueError(f"cannot parse config file {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping at the top level")
        return cls.from_dict(data)
