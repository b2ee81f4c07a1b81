"""Per-encoder image preprocessing: resize, normalise, or Pix2Struct flattened patches."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from mova.experts.registry import CLIP_MEAN, CLIP_STD, ImageInput, ResolvedExpert

_PIL_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


def _to_tensor(image: Image.Image) -> Tensor:
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def resize_pixels(image: Image.Image, size: int, resample: str = "bicubic",
                  source_size: int | None = None) -> Tensor:
    """A (3, size, size) float tensor in [0, 1].

    With ``source_size`` the image is first resized (bicubic) to that square, then to ``size``
    with ``resample`` on the tensor, as the released code derives some expert inputs from an
    already-resized image.
    """
    if resample not in _PIL_RESAMPLE:
        raise ValueError(f"resample={resample!r}; expected one of {sorted(_PIL_RESAMPLE)}")
    if source_size is None or source_size == size:
        return _to_tensor(image.resize((size, size), _PIL_RESAMPLE[resample]))
    source = _to_tensor(image.resize((source_size, source_size), Image.Resampling.BICUBIC))
    kwargs = {} if resample == "nearest" else {"align_corners": False}
    out = F.interpolate(source[None], size=(size, size), mode=resample, **kwargs)[0]
    return out.clamp_(0.0, 1.0)


def normalise(pixels: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    mean_t = torch.tensor(mean, dtype=pixels.dtype).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=pixels.dtype).view(3, 1, 1)
    return (pixels - mean_t) / std_t


def flattened_patches(image: Image.Image, grid: int, patch: int) -> Tensor:
    """Pix2Struct input: exactly grid*grid patches of (row id, col id, patch pixels).

    The image is resized to a (grid*patch) square so the processor always emits grid*grid
    patches, then standardised per image (mean 0, std >= 1/sqrt(N)) as Pix2Struct does.
    """
    side = grid * patch
    pixels = _to_tensor(image.resize((side, side), Image.Resampling.BILINEAR))
    std = pixels.std().clamp_min(1.0 / np.sqrt(pixels.numel()))
    pixels = (pixels - pixels.mean()) / std
    # (3, side, side) -> (grid, grid, patch, patch, 3) -> (grid*grid, patch*patch*3)
    patches = pixels.permute(1, 2, 0).reshape(grid, patch, grid, patch, 3)
    patches = patches.permute(0, 2, 1, 3, 4).reshape(grid * grid, patch * patch * 3)
    rows = torch.arange(grid).repeat_interleave(grid).float() + 1
    cols = torch.arange(grid).repeat(grid).float() + 1
    return torch.cat([rows[:, None], cols[:, None], patches], dim=1)


def expert_input(image: Image.Image, resolved: ResolvedExpert) -> Tensor:
    """The prepared input of one expert for one RGB image."""
    spec: ImageInput = resolved.spec.input
    size = resolved.size
    if spec.kind == "patches":
        return flattened_patches(image, size.out_grid, size.patch_size)
    pixels = resize_pixels(image, size.image_size, spec.resample, size.source_size)
    return normalise(pixels, spec.mean, spec.std)


def base_input(image: Image.Image, image_size: int) -> Tensor:
    """The base (CLIP) encoder's input."""
    return normalise(resize_pixels(image, image_size, "bicubic"), CLIP_MEAN, CLIP_STD)


class ImageProcessor:
    """Prepares images for the base encoder and any subset of the configured experts."""

    def __init__(self, base_image_size: int, experts: Iterable[ResolvedExpert]) -> None:
        self.base_image_size = base_image_size
        self.experts = {e.name: e for e in experts}

    def base(self, images: Sequence[Image.Image]) -> Tensor:
        return torch.stack([base_input(im, self.base_image_size) for im in images])

    def expert(self, name: str, images: Sequence[Image.Image]) -> Tensor:
        if name not in self.experts:
            raise ValueError(f"unknown expert {name!r}; configured: {list(self.experts)}")
        return torch.stack([expert_input(im, self.experts[name]) for im in images])

    def experts_inputs(self, names: Iterable[str], images: Sequence[Image.Image]
                       ) -> dict[str, Tensor]:
        return {name: self.expert(name, images) for name in names}
