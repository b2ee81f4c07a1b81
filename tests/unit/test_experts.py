"""Tests for the expert registry, encoders (real transformers classes), loading and inputs."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Model,
    Pix2StructVisionModel,
    SamVisionModel,
    VitDetBackbone,
)

from mova.config import ExpertConfig, VisionEncoderConfig
from mova.experts import registry
from mova.experts.encoders import HEAD_WEIGHTS, build_base_encoder, build_expert
from mova.experts.preprocess import (
    ImageProcessor,
    expert_input,
    flattened_patches,
    normalise,
    resize_pixels,
)
from mova.experts.registry import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_POOL,
    IMAGENET_MEAN,
    IMAGENET_STD,
    expert_names,
    get_expert_spec,
    register,
    resolve_expert,
)

RELEASED_ORDER = ["dinov2", "vary", "codetr", "pix2struct", "deplot", "biomedclip", "sam"]
MODEL_NAMES = ["dino", "sam", "clip", "detr", "pix2struct", "deplot", "vary"]
TRANSFORMERS_CLASS = {
    "dinov2": Dinov2Model,
    "vary": SamVisionModel,
    "codetr": VitDetBackbone,
    "pix2struct": Pix2StructVisionModel,
    "deplot": Pix2StructVisionModel,
    "biomedclip": CLIPVisionModel,
    "sam": SamVisionModel,
}
# METHOD.md's components table: (channels, output grid) at full scale.
FULL_OUTPUT = {
    "dinov2": (1536, 37),
    "codetr": (256, 37),
    "sam": (256, 64),
    "pix2struct": (1536, 45),
    "deplot": (768, 45),
    "vary": (512, 32),
    "biomedclip": (768, 14),
}


def _image(width: int = 40, height: int = 30, seed: int = 0) -> Image.Image:
    array = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(array)


def _inner(expert: torch.nn.Module) -> torch.nn.Module:
    return expert.backbone if hasattr(expert, "backbone") else expert.model


def _tiny(name: str, **overrides) -> registry.ResolvedExpert:
    return resolve_expert(ExpertConfig(name=name, **overrides))


# ---- registry --------------------------------------------------------------------------------
def test_default_pool_in_released_order() -> None:
    assert list(DEFAULT_POOL) == RELEASED_ORDER
    assert expert_names()[:7] == RELEASED_ORDER


@pytest.mark.parametrize("name", RELEASED_ORDER)
def test_entry_descriptions_and_presets(name: str) -> None:
    spec = get_expert_spec(name)
    assert spec.name == name
    assert spec.family in registry.FAMILIES
    assert len(spec.descriptions) >= 3
    assert len(set(spec.descriptions)) == len(spec.descriptions)
    for text in spec.descriptions:
        assert name.lower() not in text.lower()
        for model in MODEL_NAMES:
            assert model not in text.lower(), f"{name}: description names {model!r}: {text!r}"
    assert set(spec.presets) >= {"tiny", "full"}
    assert spec.size("tiny").image_size < spec.size("full").image_size


def test_unknown_expert_and_preset() -> None:
    with pytest.raises(ValueError, match="unknown expert 'resnet'.*dinov2"):
        get_expert_spec("resnet")
    with pytest.raises(ValueError, match="no preset 'huge'.*full"):
        get_expert_spec("sam").size("huge")


@pytest.fixture()
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> dict:
    """A copy of the registry so that registrations in a test do not leak."""
    copy = dict(registry._REGISTRY)
    monkeypatch.setattr(registry, "_REGISTRY", copy)
    return copy


def test_register_rules(scratch_registry: dict) -> None:
    sam = get_expert_spec("sam")
    with pytest.raises(ValueError, match="'sam' is already registered"):
        register(sam)
    naming = dataclasses.replace(
        sam, name="mysam2", descriptions=("a", "b", "the MySam2 model segments things"))
    with pytest.raises(ValueError, match="names the model"):
        register(naming)
    with pytest.raises(ValueError, match="at least 3"):
        register(dataclasses.replace(sam, name="mysam3", descriptions=("a", "b")))
    with pytest.raises(ValueError, match="family 'resnet'"):
        register(dataclasses.replace(sam, name="mysam4", family="resnet"))
    assert "mysam2" not in scratch_registry
    added = register(dataclasses.replace(sam, name="seg2"))
    assert get_expert_spec("seg2") is added
    assert expert_names()[-1] == "seg2"


def test_resolve_expert_overrides() -> None:
    base = _tiny("dinov2")
    assert base.channels == base.size.out_channels == 24
    wider = _tiny("dinov2", hidden_size=32)
    assert wider.size.hidden_size == 32 and wider.channels == 32
    bigger = _tiny("dinov2", image_size=112)
    assert bigger.size.out_grid == 16
    assert _tiny("vary", compress_channels=40).channels == 40
    assert _tiny("vary").channels == 24  # compress width wins over the neck width
    assert _tiny("sam", out_channels=12).channels == 12
    assert _tiny("deplot", hidden_size=32).channels == 32
    assert _tiny("dinov2", feature_layer=-1).size.feature_layer == -1
    full = resolve_expert(ExpertConfig(name="dinov2", preset="full", pretrained="/w"))
    assert full.size is get_expert_spec("dinov2").size("full")
    assert full.pretrained == "/w"


@pytest.mark.parametrize(("name", "grid"), [("sam", 16), ("vary", 8), ("biomedclip", 16)])
def test_image_size_override_updates_out_grid(name: str, grid: int) -> None:
    resolved = _tiny(name, image_size=112 if name == "biomedclip" else 128)
    assert resolved.size.out_grid == grid
    expert = build_expert(resolved)
    with torch.no_grad():
        out = expert(expert_input(_image(), resolved)[None])
    assert out.shape == (1, grid * grid, resolved.channels)
    assert expert.out_grid == grid


def test_hidden_size_override_builds_wider_dinov2() -> None:
    resolved = _tiny("dinov2", hidden_size=32)
    expert = build_expert(resolved)
    out = expert(expert_input(_image(), resolved)[None])
    assert out.shape == (1, 64, 32)


# ---- every expert at the tiny preset ------------------------------------------------------------
@pytest.mark.parametrize("name", RELEASED_ORDER)
def test_tiny_expert_builds_and_runs(name: str) -> None:
    resolved = _tiny(name)
    expert = build_expert(resolved)
    assert isinstance(_inner(expert), TRANSFORMERS_CLASS[name])
    params = list(expert.parameters())
    assert params and not any(p.requires_grad for p in params)
    assert not expert.training and not any(m.training for m in expert.modules())
    images = [_image(seed=1), _image(50, 20, seed=2)]
    inputs = torch.stack([expert_input(im, resolved) for im in images])
    with torch.no_grad():
        out = expert(inputs)
    grid = resolved.size.out_grid
    assert out.shape == (2, grid * grid, resolved.channels)
    assert expert.out_grid == grid and expert.out_channels == resolved.channels
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])


def test_build_unfrozen_keeps_grad() -> None:
    expert = build_expert(_tiny("sam"), frozen=False)
    assert all(p.requires_grad for p in expert.parameters())


@pytest.mark.parametrize("name", ["dinov2", "biomedclip"])
def test_vit_expert_reads_selected_layer_patch_tokens(name: str) -> None:
    resolved = _tiny(name)
    expert = build_expert(resolved)
    pixels = expert_input(_image(), resolved)[None]
    with torch.no_grad():
        hidden = expert.model(pixel_values=pixels, output_hidden_states=True).hidden_states
        out = expert(pixels)
    layer = resolved.size.feature_layer
    assert torch.equal(out, hidden[layer][:, 1:])


# ---- full presets, from the size fields only ----------------------------------------------------
def _native_output(name: str) -> tuple[int, int]:
    """(channels, grid) the full encoder emits, derived the way the encoders compute it."""
    spec = get_expert_spec(name)
    s = spec.size("full")
    if spec.family in ("clip", "dinov2"):
        assert s.out_channels == s.hidden_size
        return s.hidden_size, s.image_size // s.patch_size
    if spec.family == "sam":
        grid = s.image_size // s.patch_size
        if s.compress_channels:
            return s.compress_channels, (grid + 1) // 2
        return s.out_channels, grid
    if spec.family == "vitdet":  # the neck output is resized to out_grid inside the expert
        return s.out_channels, s.out_grid
    assert spec.family == "pix2struct"
    return s.hidden_size, s.out_grid


@pytest.mark.parametrize("name", RELEASED_ORDER)
def test_full_preset_matches_method_table(name: str) -> None:
    channels, grid = _native_output(name)
    assert (channels, grid) == FULL_OUTPUT[name]
    resolved = resolve_expert(ExpertConfig(name=name, preset="full"))
    assert resolved.size.out_grid == grid
    assert resolved.channels == channels


def test_full_preset_inputs() -> None:
    dino = get_expert_spec("dinov2")
    assert (dino.size("full").image_size, dino.size("full").patch_size) == (518, 14)
    assert (dino.size("full").source_size, dino.input.resample) == (672, "bilinear")
    codetr = get_expert_spec("codetr")
    assert codetr.size("full").image_size == 1280
    assert codetr.size("full").image_size // codetr.size("full").patch_size == 80
    assert (codetr.size("full").source_size, codetr.input.resample) == (1024, "nearest")
    for name in ("sam", "vary"):
        assert get_expert_spec(name).size("full").image_size == 1024
    assert get_expert_spec("sam").size("full").patch_size == 16
    bio = get_expert_spec("biomedclip")
    assert (bio.size("full").image_size, bio.input.resample) == (224, "bilinear")
    assert (bio.input.mean, bio.input.std) == (CLIP_MEAN, CLIP_STD)
    for name in ("pix2struct", "deplot"):
        spec = get_expert_spec(name)
        assert spec.input.kind == "patches"
        assert spec.size("full").out_grid ** 2 == 2025


# ---- preprocessing ---------------------------------------------------------------------------
def _pil_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def test_resize_pixels_single_step() -> None:
    image = _image(37, 23)
    out = resize_pixels(image, 16, "bicubic")
    expected = _pil_tensor(image.resize((16, 16), Image.Resampling.BICUBIC))
    assert out.shape == (3, 16, 16)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest"])
def test_resize_pixels_two_steps(mode: str) -> None:
    image = _image(37, 23)
    out = resize_pixels(image, 24, mode, source_size=40)
    source = _pil_tensor(image.resize((40, 40), Image.Resampling.BICUBIC))
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    expected = F.interpolate(source[None], size=(24, 24), mode=mode, **kwargs)[0].clamp(0, 1)
    assert torch.allclose(out, expected, atol=1e-6)
    one_step = resize_pixels(image, 24, mode)
    assert not torch.allclose(out, one_step, atol=1e-3)


def test_resize_pixels_bad_mode() -> None:
    with pytest.raises(ValueError, match="resample='area'"):
        resize_pixels(_image(), 8, "area")


def test_codetr_input_is_nearest_from_source() -> None:
    resolved = _tiny("codetr")
    image = _image(30, 20)
    src = resolved.size.source_size
    assert src == 48  # smaller than image_size: nearest upsampling, as 1024 -> 1280 at full
    source = _pil_tensor(image.resize((src, src), Image.Resampling.BICUBIC))
    size = resolved.size.image_size
    manual = F.interpolate(source[None], size=(size, size), mode="nearest")[0].clamp(0, 1)
    expected = normalise(manual, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.allclose(expert_input(image, resolved), expected, atol=1e-6)


def test_dinov2_input_normalised_with_imagenet_stats() -> None:
    resolved = _tiny("dinov2")
    image = _image()
    pixels = resize_pixels(image, 56, "bilinear", source_size=resolved.size.source_size)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(expert_input(image, resolved), (pixels - mean) / std, atol=1e-6)


def test_flattened_patches_layout() -> None:
    grid, patch = 3, 2
    image = _image(10, 7)
    out = flattened_patches(image, grid, patch)
    assert out.shape == (grid * grid, 2 + 3 * patch * patch)
    rows = [r + 1 for r in range(grid) for _ in range(grid)]
    cols = [c + 1 for _ in range(grid) for c in range(grid)]
    assert out[:, 0].tolist() == rows
    assert out[:, 1].tolist() == cols
    pixels = np.asarray(image.resize((6, 6), Image.Resampling.BILINEAR), np.float32) / 255
    pixels = (pixels - pixels.mean()) / pixels.std(ddof=1)
    for k in range(grid * grid):
        r, c = divmod(k, grid)
        block = pixels[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch, :]  # (ph, pw, 3)
        assert np.allclose(out[k, 2:].numpy(), block.reshape(-1), atol=1e-5)


def test_flattened_patches_tiny_presets() -> None:
    for name in ("pix2struct", "deplot"):
        resolved = _tiny(name)
        p = resolved.size.patch_size
        out = expert_input(_image(), resolved)
        assert out.shape == (resolved.size.out_grid ** 2, 2 + 3 * p * p)


def test_image_processor_batches() -> None:
    experts = [_tiny("sam"), _tiny("deplot")]
    proc = ImageProcessor(32, experts)
    images = [_image(seed=3), _image(seed=4)]
    assert proc.base(images).shape == (2, 3, 32, 32)
    inputs = proc.experts_inputs(["sam", "deplot"], images)
    assert inputs["sam"].shape == (2, 3, 64, 64)
    assert inputs["deplot"].shape == (2, 64, 2 + 3 * 16)
    with pytest.raises(ValueError, match="unknown expert 'vary'"):
        proc.expert("vary", images)


# ---- loading real weights by local path --------------------------------------------------------
def _save_backbone(name: str, path: Path, **overrides) -> tuple[dict, registry.ResolvedExpert]:
    """Save the backbone of a random tiny expert; return its state and the resolved entry."""
    resolved = _tiny(name, **overrides)
    expert = build_expert(resolved, frozen=False)
    inner = _inner(expert)
    inner.save_pretrained(path)
    state = {k: v.clone() for k, v in expert.state_dict().items()}
    return state, resolved


@pytest.mark.parametrize("name", ["dinov2", "biomedclip", "sam", "pix2struct", "codetr"])
def test_load_backbone_by_path(name: str, tmp_path: Path) -> None:
    state, _ = _save_backbone(name, tmp_path)
    expert = build_expert(resolve_expert(ExpertConfig(name=name, pretrained=str(tmp_path))))
    assert isinstance(_inner(expert), TRANSFORMERS_CLASS[name])
    loaded = expert.state_dict()
    prefix = "backbone." if name == "codetr" else "model."
    backbone_keys = [k for k in state if k.startswith(prefix)]
    assert backbone_keys
    for key in backbone_keys:
        assert torch.equal(loaded[key], state[key]), key
    assert not any(p.requires_grad for p in expert.parameters())


@pytest.mark.parametrize(
    ("name", "overrides"),
    [("dinov2", {"hidden_size": 32}), ("biomedclip", {"hidden_size": 24}),
     ("deplot", {"hidden_size": 24}), ("sam", {"out_channels": 8})],
)
def test_channel_mismatch_names_expert(name: str, overrides: dict, tmp_path: Path) -> None:
    _save_backbone(name, tmp_path, **overrides)
    with pytest.raises(ValueError, match=f"expert '{name}'.*channels"):
        build_expert(resolve_expert(ExpertConfig(name=name, pretrained=str(tmp_path))))


@pytest.mark.parametrize(("name", "head_key"), [("codetr", "neck."), ("vary", "compress.")])
def test_head_weights(name: str, head_key: str, tmp_path: Path,
                      caplog: pytest.LogCaptureFixture) -> None:
    state, _ = _save_backbone(name, tmp_path)
    config = ExpertConfig(name=name, pretrained=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="mova.experts.encoders"):
        build_expert(resolve_expert(config))
    assert any(HEAD_WEIGHTS in r.getMessage() and name in r.getMessage()
               for r in caplog.records)

    head = {k: v for k, v in state.items() if k.startswith(head_key)}
    assert head
    save_file(head, str(tmp_path / HEAD_WEIGHTS))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mova.experts.encoders"):
        expert = build_expert(resolve_expert(config))
    assert not caplog.records
    loaded = expert.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key

    first = sorted(head)[0]
    save_file({k: v for k, v in head.items() if k != first}, str(tmp_path / HEAD_WEIGHTS))
    with pytest.raises(ValueError, match=f"expert '{name}'.*{first}"):
        build_expert(resolve_expert(config))


# ---- base encoder ----------------------------------------------------------------------------
def _save_clip(path: Path, config: VisionEncoderConfig, hidden: int | None = None,
               patch: int | None = None) -> CLIPVisionModel:
    hidden = hidden or config.hidden_size
    model = CLIPVisionModel(CLIPVisionConfig(
        image_size=config.native_image_size, patch_size=patch or config.patch_size,
        hidden_size=hidden,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
    ))
    model.save_pretrained(path)
    return model


def _positions(model: CLIPVisionModel) -> torch.Tensor:
    state = model.state_dict()
    return next(v for k, v in state.items() if k.endswith("position_embedding.weight"))


def test_base_encoder_resizes_positions_bicubically(tmp_path: Path) -> None:
    config = VisionEncoderConfig(pretrained=str(tmp_path))
    assert (config.native_image_size // config.patch_size, config.grid_size) == (8, 16)
    original = _save_clip(tmp_path, config)
    encoder = build_base_encoder(config)
    assert encoder.grid_size == 16 and encoder.model.config.image_size == config.image_size
    old, new = _positions(original), _positions(encoder.model)
    width = config.hidden_size
    assert new.shape == (1 + 16 * 16, width)
    assert torch.equal(new[0], old[0])
    grid = old[1:].reshape(1, 8, 8, width).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False)
    expected = expected.permute(0, 2, 3, 1).reshape(256, width)
    assert torch.allclose(new[1:], expected, atol=1e-6)
    # every other weight is carried over unchanged
    resized_state = encoder.model.state_dict()
    for key, value in original.state_dict().items():
        if "position" not in key:
            assert torch.equal(resized_state[key], value), key
    pixels = torch.randn(2, 3, config.image_size, config.image_size)
    with torch.no_grad():
        out = encoder(pixels)
        hidden = encoder.model(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert out.shape == (2, 256, width)
    assert torch.equal(out, hidden[config.feature_layer][:, 1:])


def test_base_encoder_random_init_runs_at_image_size() -> None:
    config = VisionEncoderConfig()
    encoder = build_base_encoder(config)
    assert encoder.grid_size == config.grid_size
    out = encoder(torch.randn(1, 3, config.image_size, config.image_size))
    assert out.shape == (1, config.grid_size ** 2, config.hidden_size)


def test_base_encoder_native_size_from_path(tmp_path: Path) -> None:
    config = VisionEncoderConfig(pretrained=str(tmp_path), image_size=56)
    original = _save_clip(tmp_path, config)
    encoder = build_base_encoder(config)
    assert encoder.grid_size == 8
    loaded = encoder.model.state_dict()
    for key, value in original.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_base_encoder_width_mismatch(tmp_path: Path) -> None:
    config = VisionEncoderConfig(pretrained=str(tmp_path))
    _save_clip(tmp_path, config, hidden=16)
    with pytest.raises(ValueError, match="width 16.*base.hidden_size=32"):
        build_base_encoder(config)


def test_base_encoder_patch_mismatch(tmp_path: Path) -> None:
    config = VisionEncoderConfig(pretrained=str(tmp_path))
    _save_clip(tmp_path, config, patch=14)
    with pytest.raises(ValueError, match="patch size 14.*base.patch_size=7"):
        build_base_encoder(config)
