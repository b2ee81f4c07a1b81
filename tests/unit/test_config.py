"""Tests for MoVAConfig: defaults, YAML/JSON round trip, strict parsing, validation, overrides."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from mova.config import (
    AdapterConfig,
    ExpertConfig,
    MoVAConfig,
    default_experts,
)
from mova.experts.registry import DEFAULT_POOL
from mova.typed_dict import apply_overrides, from_dict


def _non_default() -> MoVAConfig:
    """A valid config with a non-default value in every section."""
    config = MoVAConfig()
    config.base.feature_layer = -1
    config.base.trainable = False
    config.experts = [
        ExpertConfig(name="sam", hidden_size=48),
        ExpertConfig(name="vary", pretrained="/models/vary", compress_channels=32),
    ]
    config.adapter.top_k = 2
    config.adapter.rope_theta = 500.0
    config.text_encoder.max_length = 128
    config.llm.chat_template = "llama3"
    config.routing.max_experts = 2
    config.generation.temperature = 0.7
    config.dtype = "bfloat16"
    return config.validate()


def test_default_validates() -> None:
    config = MoVAConfig()
    assert config.validate() is config
    assert config.expert_names == list(DEFAULT_POOL)
    assert config.num_image_tokens == (config.base.grid_size // 2) ** 2
    assert config.num_routing_tokens == (config.base.grid_size // 4) ** 2
    assert [e.name for e in default_experts("full")] == list(DEFAULT_POOL)
    assert all(e.preset == "full" for e in default_experts("full"))


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_file_round_trip(tmp_path: Path, suffix: str) -> None:
    config = _non_default()
    path = tmp_path / f"config{suffix}"
    if suffix == ".json":
        config.to_json(path)
        assert json.loads(path.read_text())["dtype"] == "bfloat16"
    else:
        config.to_yaml(path)
        assert yaml.safe_load(path.read_text())["llm"]["chat_template"] == "llama3"
    loaded = MoVAConfig.load(path)
    assert loaded == config
    assert loaded.to_dict() == config.to_dict()
    assert loaded.to_dict() != MoVAConfig().to_dict()


def test_dict_round_trip_of_default() -> None:
    config = MoVAConfig()
    assert MoVAConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    # a partial mapping keeps defaults for the missing fields
    partial = MoVAConfig.from_dict({"adapter": {"top_k": 1}})
    assert partial.adapter == AdapterConfig(top_k=1)
    assert partial.llm == MoVAConfig().llm


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"adaptor": {}}, "adaptor"),
        ({"adapter": {"topk": 3}}, "topk"),
        ({"experts": [{"name": "sam", "size": 3}]}, "size"),
        ({"llm": {"hidden": 64}}, "hidden"),
    ],
)
def test_unknown_keys_rejected(data: dict, key: str) -> None:
    with pytest.raises(ValueError, match=f"unknown config key.*'{key}'"):
        MoVAConfig.from_dict(data)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"adapter": {"num_blocks": "3"}}, "adapter.num_blocks"),
        ({"base": {"trainable": 1}}, "base.trainable"),
        ({"experts": {}}, "experts"),
        ({"adapter": {"top_k": 2.0}}, "adapter.top_k"),
        ({"adapter": {"num_blocks": True}}, "adapter.num_blocks"),
        ({"generation": {"temperature": "hot"}}, "generation.temperature"),
        ({"llm": {"chat_template": 3}}, "llm.chat_template"),
        ({"base": []}, "base"),
        ({"experts": [{"name": "sam", "hidden_size": "x"}]}, r"experts\[0\].hidden_size"),
        ({"dtype": None}, "dtype"),
    ],
)
def test_wrong_types_rejected(data: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        MoVAConfig.from_dict(data)


def test_int_is_accepted_for_float_fields() -> None:
    config = MoVAConfig.from_dict({"adapter": {"rope_theta": 10}})
    assert isinstance(config.adapter.rope_theta, float)
    assert config.adapter.rope_theta == 10.0


@pytest.mark.parametrize(
    ("data", "field", "allowed"),
    [
        ({"llm": {"chat_template": "foo"}}, "llm.chat_template", "chatml"),
        ({"dtype": "int8"}, "dtype", "bfloat16"),
        ({"experts": [{"name": "resnet"}]}, r"experts\[0\].name", "dinov2"),
        ({"experts": [{"name": "sam", "preset": "huge"}]}, r"experts\[0\].preset", "tiny"),
        ({"base": {"family": "siglip"}}, "base.family", "clip"),
        ({"llm": {"attn_implementation": "flex"}}, "llm.attn_implementation", "sdpa"),
    ],
)
def test_invalid_choices_list_allowed(data: dict, field: str, allowed: str) -> None:
    with pytest.raises(ValueError, match=f"{field}=.*expected one of .*{allowed}"):
        MoVAConfig.from_dict(data)


def test_duplicate_and_empty_experts() -> None:
    with pytest.raises(ValueError, match="sam"):
        MoVAConfig.from_dict({"experts": [{"name": "sam"}, {"name": "vary"}, {"name": "sam"}]})
    with pytest.raises(ValueError, match="at least one expert"):
        MoVAConfig.from_dict({"experts": []})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        # head size 36 / 2 = 18 is not a multiple of 4 (2D rotary needs 4 | head size)
        ({"base": {"hidden_size": 36}}, "multiple of 4"),
        ({"adapter": {"num_heads": 3}}, "divisible by adapter.num_heads"),
        # grid 14 is not divisible by downsample * routing_pool = 4
        ({"base": {"image_size": 98}}, "base grid 14"),
        ({"base": {"image_size": 100}}, "multiple of base.patch_size"),
        ({"base": {"feature_layer": 0}}, "base.feature_layer"),
        ({"base": {"feature_layer": -3}}, "base.feature_layer"),
        ({"adapter": {"top_k": 0}}, "adapter.top_k"),
        ({"llm": {"num_kv_heads": 3}}, "llm.num_heads"),
        ({"routing": {"max_experts": 8}}, "routing.max_experts"),
        ({"generation": {"top_p": 1.5}}, "generation.top_p"),
        ({"experts": [{"name": "sam", "image_size": 0}]}, r"experts\[0\].image_size"),
    ],
)
def test_geometry_and_range_checks(data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MoVAConfig.from_dict(data)


def test_geometry_that_fits_is_accepted() -> None:
    config = MoVAConfig.from_dict({"base": {"hidden_size": 40}, "adapter": {"num_heads": 2}})
    assert config.base.hidden_size // config.adapter.num_heads == 20


def test_apply_overrides_nested_and_indexed() -> None:
    base = MoVAConfig().to_dict()
    out = apply_overrides(base, [
        "adapter.top_k=2",
        "experts.0.preset=full",
        "experts.1.pretrained=/weights/vary",
        "llm.chat_template=vicuna_v1",
        "base.trainable=false",
        "generation.top_p=0.5",
        "base.pretrained=null",
    ])
    assert base["adapter"]["top_k"] == 3  # input untouched
    assert out["adapter"]["top_k"] == 2
    assert out["experts"][0]["preset"] == "full"
    assert out["experts"][1]["pretrained"] == "/weights/vary"
    assert out["llm"]["chat_template"] == "vicuna_v1"
    assert out["base"]["trainable"] is False
    assert out["generation"]["top_p"] == 0.5
    assert out["base"]["pretrained"] is None
    config = MoVAConfig.from_dict(out)
    assert config.experts[0].preset == "full"
    assert config.adapter.top_k == 2


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("true", True), ("3", 3), ("0.5", 0.5), ("abc", "abc"), ("'3'", "3"), ("", ""),
     ("[1, 2]", [1, 2])],
)
def test_apply_overrides_yaml_scalars(raw: str, expected: object) -> None:
    out = apply_overrides({"a": {}}, [f"a.b={raw}"])
    assert out["a"]["b"] == expected
    assert type(out["a"]["b"]) is type(expected)


def test_apply_overrides_value_may_contain_equals() -> None:
    assert apply_overrides({}, ["x=a=b"]) == {"x": "a=b"}


@dataclasses.dataclass
class _Inner:
    a: int = 1
    b: int = 2


@dataclasses.dataclass
class _Outer:
    inner: _Inner = dataclasses.field(default_factory=lambda: _Inner(a=10, b=20))
    nested: list[_Inner] = dataclasses.field(default_factory=list)


def test_a_partial_section_keeps_the_defaults_its_parent_gives() -> None:
    # (an `llm.engine=vllm` override once reset the LLM deployment's queue limits to the
    # class defaults)
    assert from_dict(_Outer, {"inner": {"b": 3}}).inner == _Inner(a=10, b=3)
    assert from_dict(_Outer, {}).inner == _Inner(a=10, b=20)
    assert from_dict(_Outer, {"nested": [{"b": 5}]}).nested == [_Inner(a=1, b=5)]
    with pytest.raises(ValueError, match="unknown config key"):
        from_dict(_Outer, {"inner": {"c": 1}})


def test_apply_overrides_creates_missing_sections() -> None:
    assert apply_overrides({}, ["adapter.top_k=1"]) == {"adapter": {"top_k": 1}}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("adapter.top_k", "key.path=value"),
        ("experts.9.preset=full", "'9' is not an index"),
        ("experts.x.preset=full", "'x' is not an index"),
        ("experts.7=full", "'7' is not an index"),
        ("dtype.x=1", "'dtype' is not a mapping"),
        ("dtype.x.y=1", "'dtype' is not a mapping"),
        ("adapter.top_k=[1, 2", "cannot parse"),
    ],
)
def test_apply_overrides_malformed(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        apply_overrides(MoVAConfig().to_dict(), [override])


def test_override_of_unknown_key_fails_on_parse() -> None:
    out = apply_overrides(MoVAConfig().to_dict(), ["adapter.topk=2"])
    with pytest.raises(ValueError, match="topk"):
        MoVAConfig.from_dict(out)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        MoVAConfig.load(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("name", "text"),
    [("list.yaml", "- a\n- b\n"), ("scalar.json", "3"), ("empty.yaml", "")],
)
def test_load_non_mapping(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match="mapping at the top level"):
        MoVAConfig.load(path)


@pytest.mark.parametrize(
    ("name", "text"), [("bad.yaml", "adapter: {top_k: [1,\n"), ("bad.json", "{\"dtype\": ")]
)
def test_load_unparsable(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=f"cannot parse config file .*{name}"):
        MoVAConfig.load(path)


def test_load_invalid_content_names_field(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("adapter:\n  num_blocks: '3'\n")
    with pytest.raises(ValueError, match="adapter.num_blocks"):
        MoVAConfig.load(path)


def test_yaml_exponent_without_dot_is_a_number():
    import yaml

    config = MoVAConfig.from_dict(yaml.safe_load("adapter: {layer_norm_eps: 1e-5}"))
    assert config.adapter.layer_norm_eps == 1e-5
    with pytest.raises(ValueError, match="adapter.layer_norm_eps"):
        MoVAConfig.from_dict({"adapter": {"layer_norm_eps": "small"}})
