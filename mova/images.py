"""Loading and validating request images (paths, bytes, data URIs, PIL images, arrays)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MIN_SIDE = 8
MAX_PIXELS = 64_000_000
# Images larger than this are shrunk on load (every encoder runs at <= 1280 px).
WORKING_SIDE = 2048


class ImageError(ValueError):
    """An input image that cannot be used; the message names the input."""


def _describe(source: Any) -> str:
    if isinstance(source, (str, Path)):
        text = str(source)
        return text if len(text) < 80 else text[:60] + "...(data URI)"
    return type(source).__name__


def _open_bytes(data: bytes, name: str) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            image.draft("RGB", (WORKING_SIDE, WORKING_SIDE))
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(f"image {name} is too large to decode safely: {exc}") from exc
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise ImageError(f"image {name} cannot be decoded: {exc}") from exc
    return image


def decode_data_uri(uri: str) -> bytes:
    """Bytes of a ``data:image/...;base64,...`` URI."""
    header, sep, payload = uri.partition(",")
    if not sep or not header.startswith("data:") or ";base64" not in header:
        raise ImageError("image data URI must look like data:image/<type>;base64,<payload>")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"image data URI has invalid base64: {exc}") from exc


def load_image(source: Any) -> Image.Image:
    """Return an RGB PIL image from a path, bytes, data URI, PIL image or HxW[xC] array.

    Grayscale, palette and RGBA images become RGB (transparency over white); images smaller
    than ``MIN_SIDE`` or over ``MAX_PIXELS`` raise :class:`ImageError`; very large images are
    shrunk to ``WORKING_SIDE`` on their longer side.
    """
    name = _describe(source)
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        array = source
        if array.dtype != np.uint8:
            if array.size and (array.min() < 0 or array.max() > 1.0 + 1e-6):
                raise ImageError(f"image array of dtype {array.dtype} must hold values in [0, 1]")
            array = (array * 255).round().astype(np.uint8)
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
            raise ImageError(f"image array has shape {source.shape}; expected HxW or HxWx1/3/4")
        image = Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[2] == 1
                                else array)
    elif isinstance(source, (bytes, bytearray)):
        image = _open_bytes(bytes(source), name)
    elif isinstance(source, str) and source.startswith("data:"):
        image = _open_bytes(decode_data_uri(source), "(data URI)")
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"image file not found: {path}")
        image = _open_bytes(path.read_bytes(), str(path))
    else:
        raise ImageError(f"unsupported image input of type {type(source).__name__}")
    return normalise_image(image, name)


def normalise_image(image: Image.Image, name: str = "image") -> Image.Image:
    """Apply EXIF orientation, check the size of a PIL image and convert it to RGB."""
    image = ImageOps.exif_transpose(image)
    width, height = image.size
    if min(width, height) < MIN_SIDE:
        raise ImageError(
            f"image {name} is {width}x{height} pixels; at least {MIN_SIDE}x{MIN_SIDE} expected"
        )
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"image {name} is {width}x{height} pixels; at most {MAX_PIXELS} pixels are accepted"
        )
    if max(width, height) > WORKING_SIDE:
        image = image.copy()
        image.thumbnail((WORKING_SIDE, WORKING_SIDE), Image.Resampling.BICUBIC)
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit grayscale: scale to 8 bits (a plain convert clips everything above 255 to white)
        array = np.asarray(image, dtype=np.float64)
        if image.mode != "I" or array.max() > 255:
            array = array / 257.0
        image = Image.fromarray(np.clip(array.round(), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def image_hash(image: Image.Image) -> str:
    """Content hash of an RGB image (size + pixels): the feature-cache key."""
    digest = hashlib.sha256(f"{image.width}x{image.height}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()
