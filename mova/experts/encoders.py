"""Vision encoders built from their real ``transformers`` classes, one small class per family.

Every encoder maps its prepared input to features of shape (B, L, C) with L = grid * grid
(row-major), the expert's native output grid. Real weights load by local path or hub id.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    Pix2StructVisionConfig,
    Pix2StructVisionModel,
    SamVisionConfig,
    SamVisionModel,
    VitDetBackbone,
    VitDetConfig,
)

from mova.experts.registry import ExpertSize, ResolvedExpert

log = logging.getLogger(__name__)

HEAD_WEIGHTS = "mova_head.safetensors"


class LayerNorm2d(nn.Module):
    """LayerNorm over channels at every position of a (B, C, H, W) map."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def map_to_tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H*W, C), row-major."""
    return x.flatten(2).transpose(1, 2)


class VisionExpert(nn.Module):
    """Common surface: ``out_grid``, ``out_channels`` and ``forward(inputs) -> (B, L, C)``."""

    out_grid: int
    out_channels: int

    def check_output(self, name: str, expected: int) -> None:
        if self.out_channels != expected:
            raise ValueError(
                f"expert {name!r}: the loaded encoder emits {self.out_channels} channels but the "
                f"config expects {expected}; set experts[].preset or hidden_size/out_channels to "
                "match the checkpoint"
            )


def _select_layer(hidden_states: tuple[Tensor, ...], layer: int, prefix_tokens: int) -> Tensor:
    return hidden_states[layer][:, prefix_tokens:]


class ViTPatchExpert(VisionExpert):
    """CLIP- or DINOv2-style ViT: patch tokens (no CLS) of a selected hidden layer.

    ``image_size`` is the size the expert runs at when it differs from the size its position
    embeddings were trained for (DINOv2 interpolates them on the fly); the wrapped model's
    config keeps its native size, so ``save_pretrained`` writes a loadable folder.
    """

    def __init__(self, model: nn.Module, feature_layer: int, prefix_tokens: int = 1,
                 image_size: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.feature_layer = feature_layer
        self.prefix_tokens = prefix_tokens
        cfg = model.config
        self.image_size = image_size or cfg.image_size
        self.out_grid = self.image_size // cfg.patch_size
        self.out_channels = cfg.hidden_size

    def forward(self, pixel_values: Tensor) -> Tensor:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        return _select_layer(out.hidden_states, self.feature_layer, self.prefix_tokens)


class SamExpert(VisionExpert):
    """SAM's image encoder with its neck; optional stride-2 conv compression (Vary)."""

    def __init__(self, model: SamVisionModel, compress_channels: int | None = None) -> None:
        super().__init__()
        self.model = model
        cfg = model.config
        grid = cfg.image_size // cfg.patch_size
        self.compress = None
        if compress_channels:
            self.compress = nn.Conv2d(cfg.output_channels, compress_channels, 3, 2, 1, bias=False)
            grid = (grid + 1) // 2
        self.out_grid = grid
        self.out_channels = compress_channels or cfg.output_channels

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.model(pixel_values=pixel_values).last_hidden_state  # (B, C, H, W)
        if self.compress is not None:
            x = self.compress(x)
        return map_to_tokens(x)


class ViTDetExpert(VisionExpert):
    """A ViTDet backbone with one simple-feature-pyramid neck level, resized to ``out_grid``."""

    def __init__(self, backbone: VitDetBackbone, out_channels: int, out_grid: int) -> None:
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.neck = nn.Sequential(
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            LayerNorm2d(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            LayerNorm2d(out_channels),
        )
        self.out_grid = out_grid
        self.out_channels = out_channels

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.backbone(pixel_values=pixel_values).feature_maps[-1]
        x = self.neck(x)
        if x.shape[-1] != self.out_grid or x.shape[-2] != self.out_grid:
            x = F.interpolate(x.float(), size=(self.out_grid, self.out_grid), mode="bilinear",
                              align_corners=False).to(x.dtype)
        return map_to_tokens(x)


class Pix2StructExpert(VisionExpert):
    """Pix2Struct's vision encoder over flattened patches (row, column, pixels)."""

    def __init__(self, model: Pix2StructVisionModel, grid: int) -> None:
        super().__init__()
        self.model = model
        self.out_grid = grid
        self.out_channels = model.config.hidden_size

    def forward(self, flattened_patches: Tensor) -> Tensor:
        mask = (flattened_patches.abs().sum(-1) != 0).long()
        out = self.model(flattened_patches=flattened_patches, attention_mask=mask)
        return out.last_hidden_state


# ---- builders ------------------------------------------------------------------------------
def _clip_config(size: ExpertSize) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        image_size=size.image_size, patch_size=size.patch_size, hidden_size=size.hidden_size,
        num_hidden_layers=size.num_layers, num_attention_heads=size.num_heads,
        intermediate_size=size.hidden_size * 4, hidden_act="gelu",
    )


def _build_clip(r: ResolvedExpert) -> VisionExpert:
    if r.pretrained:
        model = CLIPVisionModel.from_pretrained(r.pretrained)
    else:
        model = CLIPVisionModel(_clip_config(r.size))
    return ViTPatchExpert(model, r.size.feature_layer)


def _build_dinov2(r: ResolvedExpert) -> VisionExpert:
    s = r.size
    if r.pretrained:
        # Runs at s.image_size with its position embeddings interpolated on the fly; the
        # config keeps the native size so a copied checkpoint reloads with matching shapes.
        model = Dinov2Model.from_pretrained(r.pretrained)
    else:
        model = Dinov2Model(Dinov2Config(
            image_size=s.image_size, patch_size=s.patch_size, hidden_size=s.hidden_size,
            num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
            mlp_ratio=s.extra.get("mlp_ratio", 4),
            use_swiglu_ffn=s.extra.get("use_swiglu_ffn", False),
        ))
    return ViTPatchExpert(model, s.feature_layer, image_size=s.image_size)


def _build_sam(r: ResolvedExpert) -> VisionExpert:
    s = r.size
    if r.pretrained:
        model = SamVisionModel.from_pretrained(r.pretrained)
    else:
        model = SamVisionModel(SamVisionConfig(
            image_size=s.image_size, patch_size=s.patch_size, hidden_size=s.hidden_size,
            num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
            output_channels=s.out_channels, mlp_dim=s.hidden_size * 4,
            window_size=s.extra.get("window_size", 14),
            global_attn_indexes=s.extra.get("global_attn_indexes", []),
            initializer_range=0.02,
        ))
    return SamExpert(model, s.compress_channels)


def _build_vitdet(r: ResolvedExpert) -> VisionExpert:
    s = r.size
    if r.pretrained:
        backbone = VitDetBackbone.from_pretrained(r.pretrained)
    else:
        backbone = VitDetBackbone(VitDetConfig(
            image_size=s.image_size, pretrain_image_size=s.image_size, patch_size=s.patch_size,
            hidden_size=s.hidden_size, num_hidden_layers=s.num_layers,
            num_attention_heads=s.num_heads, window_size=s.extra.get("window_size", 0),
            window_block_indices=s.extra.get("window_block_indices", []),
            use_relative_position_embeddings=bool(s.extra.get("window_size")),
            out_features=[f"stage{s.num_layers}"],
        ))
    return ViTDetExpert(backbone, s.out_channels, s.out_grid)


def _build_pix2struct(r: ResolvedExpert) -> VisionExpert:
    s = r.size
    if r.pretrained:
        model = Pix2StructVisionModel.from_pretrained(r.pretrained)
    else:
        model = Pix2StructVisionModel(Pix2StructVisionConfig(
            hidden_size=s.hidden_size, patch_embed_hidden_size=3 * s.patch_size ** 2,
            d_ff=s.hidden_size * 2, d_kv=s.hidden_size // s.num_heads,
            num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
            seq_len=max(4096, s.out_grid + 1), initializer_range=0.02,
        ))
    return Pix2StructExpert(model, s.out_grid)


_BUILDERS = {
    "clip": _build_clip,
    "dinov2": _build_dinov2,
    "sam": _build_sam,
    "vitdet": _build_vitdet,
    "pix2struct": _build_pix2struct,
}


def _load_head(expert: VisionExpert, pretrained: str, name: str) -> None:
    """Load the weights of layers MoVA adds on top of a backbone (neck, compression conv)."""
    head_path = Path(pretrained) / HEAD_WEIGHTS
    head_keys = {k for k in expert.state_dict() if not k.startswith(("model.", "backbone."))}
    if not head_keys:
        return
    if not head_path.is_file():
        log.warning("expert %s: no %s beside %s; its head layers %s stay randomly initialised",
                    name, HEAD_WEIGHTS, pretrained, sorted(head_keys))
        return
    state = load_file(str(head_path))
    missing = head_keys - set(state)
    if missing:
        raise ValueError(f"expert {name!r}: {head_path} lacks {sorted(missing)}")
    expert.load_state_dict(state, strict=False)


def build_expert(resolved: ResolvedExpert, frozen: bool = True) -> VisionExpert:
    """Build an expert encoder (random init, or real weights from ``resolved.pretrained``)."""
    expert = _BUILDERS[resolved.spec.family](resolved)
    if resolved.pretrained:
        _load_head(expert, resolved.pretrained, resolved.name)
    expert.check_output(resolved.name, resolved.channels)
    if frozen:
        expert.requires_grad_(False)
        expert.eval()
    return expert


# ---- the base encoder ---------------------------------------------------------------------
def resize_clip_positions(model: CLIPVisionModel, image_size: int) -> CLIPVisionModel:
    """A copy of ``model`` running at ``image_size``, its patch position embeddings resized
    bicubically (the CLS position is kept)."""
    cfg = model.config
    if cfg.image_size == image_size:
        return model
    old_grid = cfg.image_size // cfg.patch_size
    new_grid = image_size // cfg.patch_size
    state = model.state_dict()
    key = next(k for k in state if k.endswith("embeddings.position_embedding.weight"))
    pos = state[key]
    cls_pos, grid_pos = pos[:1], pos[1:]
    grid_pos = grid_pos.reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2).float()
    grid_pos = F.interpolate(grid_pos, size=(new_grid, new_grid), mode="bicubic",
                             align_corners=False)
    grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(new_grid * new_grid, -1).to(pos.dtype)
    state[key] = torch.cat([cls_pos, grid_pos], 0)
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    new_cfg = CLIPVisionConfig(**{**cfg.to_dict(), "image_size": image_size})
    resized = CLIPVisionModel(new_cfg)
    resized.load_state_dict(state, strict=False)
    return resized


class BaseEncoder(nn.Module):
    """CLIP ViT base encoder: patch tokens of the selected layer on the G x G grid."""

    def __init__(self, model: CLIPVisionModel, feature_layer: int) -> None:
        super().__init__()
        self.model = model
        self.feature_layer = feature_layer
        cfg = model.config
        self.grid_size = cfg.image_size // cfg.patch_size
        self.hidden_size = cfg.hidden_size

    def forward(self, pixel_values: Tensor) -> Tensor:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        return out.hidden_states[self.feature_layer][:, 1:]


def build_base_encoder(config) -> BaseEncoder:
    """Build the base encoder of a :class:`mova.config.VisionEncoderConfig`."""
    if config.pretrained:
        model = CLIPVisionModel.from_pretrained(config.pretrained)
    else:
        model = CLIPVisionModel(CLIPVisionConfig(
            image_size=config.native_image_size, patch_size=config.patch_size,
            hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads, intermediate_size=config.intermediate_size,
        ))
    model = resize_clip_positions(model, config.image_size)
    encoder = BaseEncoder(model, config.feature_layer)
    if encoder.hidden_size != config.hidden_size:
        raise ValueError(
            f"base encoder {config.pretrained!r} has width {encoder.hidden_size}, the config says "
            f"base.hidden_size={config.hidden_size}"
        )
    if model.config.patch_size != config.patch_size:
        raise ValueError(
            f"base encoder {config.pretrained!r} has patch size {model.config.patch_size}, the "
            f"config says base.patch_size={config.patch_size}"
        )
    return encoder
