"""Drawing helpers for the synthetic data set: pages of text, bar charts, shapes and scans.

Every function draws exactly what its arguments say (positions, values, colours), so the
answers written from those arguments can be re-checked later. Randomness lives with the
caller; only :func:`scan_image` takes a seed, for its pixel noise.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 200),
    "yellow": (235, 190, 20),
}
SHAPES = ("circle", "square", "triangle")

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@functools.lru_cache(maxsize=32)
def load_font(size: int) -> Font:
    """DejaVu Sans at ``size`` pixels (matplotlib ships it), else PIL's built-in font."""
    if size < 1:
        raise ValueError(f"font size must be >= 1, got {size}")
    try:
        path = font_manager.findfont("DejaVu Sans", fallback_to_default=True)
        return ImageFont.truetype(path, size)
    except (ImportError, OSError, ValueError) as exc:
        logger.debug("DejaVu Sans unavailable (%s); using PIL's default font", exc)
        return ImageFont.load_default(size=size)


def text_width(text: str, font: Font) -> float:
    """Rendered width of ``text`` in pixels."""
    left, _, right, _ = font.getbbox(text)
    return right - left


def document_image(
    size: int,
    title: str,
    fields: Sequence[tuple[str, int]],
    *,
    margin: int,
    top: int,
    title_size: int,
    line_size: int,
    line_gap: int,
    ink: int = 20,
) -> Image.Image:
    """A white page with a title, a rule under it and one ``label: value`` line per field."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    colour = (ink, ink, ink)
    title_font = load_font(title_size)
    draw.text((margin, top), title, fill=colour, font=title_font)
    y = top + title_size + max(2, line_gap // 2)
    draw.line([(margin, y), (size - margin, y)], fill=(120, 120, 120), width=1)
    y += line_gap
    line_font = load_font(line_size)
    for label, value in fields:
        draw.text((margin, y), f"{label}: {value}", fill=colour, font=line_font)
        y += line_size + line_gap
    return image


def bar_chart_image(
    size: int,
    values: Sequence[int],
    labels: Sequence[str],
    *,
    colour: tuple[int, int, int],
    max_value: int = 9,
) -> Image.Image:
    """A bar chart with a baseline, light grid lines, bar letters below and values on top."""
    if len(values) != len(labels):
        raise ValueError(f"got {len(values)} values but {len(labels)} labels")
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    font_size = max(8, size // 12)
    font = load_font(font_size)
    left, right = round(size * 0.08), round(size * 0.95)
    top, bottom = round(size * 0.14), round(size * 0.85)
    unit = (bottom - top) / max_value
    for v in range(1, max_value + 1):
        y = round(bottom - v * unit)
        draw.line([(left, y), (right, y)], fill=(225, 225, 225), width=1)
    slot = (right - left) / len(values)
    bar = slot * 0.6
    for i, (value, label) in enumerate(zip(values, labels, strict=True)):
        x0 = round(left + i * slot + (slot - bar) / 2)
        x1 = round(x0 + bar)
        y0 = round(bottom - value * unit)
        draw.rectangle([x0, y0, x1, bottom], fill=colour)
        centre = (x0 + x1) / 2
        text = str(value)
        draw.text((centre - text_width(text, font) / 2, y0 - font_size - 2), text,
                  fill=(30, 30, 30), font=font)
        draw.text((centre - text_width(label, font) / 2, bottom + 2), label,
                  fill=(30, 30, 30), font=font)
    draw.line([(left, bottom), (right, bottom)], fill=(40, 40, 40), width=1)
    draw.line([(left, top), (left, bottom)], fill=(40, 40, 40), width=1)
    return image


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float,
               colour: tuple[int, int, int]) -> None:
    """One filled shape centred on (x, y) with half-size ``r``."""
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    elif shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=colour)
    elif shape == "triangle":
        h = r * math.sqrt(3) / 2
        draw.polygon([(x, y - r), (x - r, y + h), (x + r, y + h)], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def scene_image(size: int, shapes: Sequence[Mapping[str, Any]],
                background: tuple[int, int, int]) -> Image.Image:
    """Shapes (dicts with shape, colour, x, y, r) drawn on a plain light background."""
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for item in shapes:
        if item["colour"] not in COLOURS:
            raise ValueError(f"unknown colour {item['colour']!r}; expected one of {list(COLOURS)}")
        draw_shape(draw, item["shape"], item["x"], item["y"], item["r"], COLOURS[item["colour"]])
    return image


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    coarse = (rng.random((cells, cells)) * 255).astype(np.uint8)
    up = Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(up, dtype=np.float32) / 255.0


def scan_image(
    size: int,
    body: Mapping[str, float],
    lesion: Mapping[str, float] | None,
    *,
    noise_seed: int,
) -> Image.Image:
    """A grayscale "scan": a textured elliptical body on a dark field, plus an optional lesion.

    ``body`` has cx, cy, rx, ry (pixels) and level (0-255); ``lesion`` has x, y, r and level.
    The lesion is a bright disc with a soft rim, always clearly brighter than the body.
    """
    rng = np.random.default_rng(noise_seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    inside = ((xx - body["cx"]) / body["rx"]) ** 2 + ((yy - body["cy"]) / body["ry"]) ** 2
    texture = 0.6 * _smooth_noise(rng, size, 6) + 0.4 * _smooth_noise(rng, size, 16)
    pixels = np.full((size, size), 12.0, dtype=np.float32)
    tissue = body["level"] * (0.75 + 0.5 * texture)
    edge = np.clip((1.0 - inside) * 8.0, 0.0, 1.0)
    pixels = pixels * (1 - edge) + tissue * edge
    if lesion is not None:
        dist = np.hypot(xx - lesion["x"], yy - lesion["y"]) / lesion["r"]
        blob = np.clip((1.2 - dist) / 0.4, 0.0, 1.0)
        pixels = pixels * (1 - blob) + lesion["level"] * blob
    pixels += rng.normal(0.0, 6.0, size=(size, size)).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))
