"""Tests for request-image loading: every input kind, mode conversion, size limits, errors."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mova import images
from mova.images import (
    MIN_SIDE,
    WORKING_SIDE,
    ImageError,
    decode_data_uri,
    image_hash,
    load_image,
)


def _rgb(width: int = 24, height: int = 16, seed: int = 0) -> Image.Image:
    array = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(array)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


# ---- input kinds -----------------------------------------------------------------------------
def test_from_path_str_and_pathlib(tmp_path: Path) -> None:
    image = _rgb()
    path = tmp_path / "x.png"
    image.save(path)
    for source in (path, str(path)):
        out = load_image(source)
        assert out.mode == "RGB" and _same_pixels(out, image)


def test_from_bytes_and_bytearray() -> None:
    image = _rgb()
    for source in (_png(image), bytearray(_png(image))):
        assert _same_pixels(load_image(source), image)


def test_from_jpeg_bytes() -> None:
    buffer = io.BytesIO()
    _rgb(32, 32).save(buffer, format="JPEG")
    out = load_image(buffer.getvalue())
    assert out.mode == "RGB" and out.size == (32, 32)


def test_from_data_uri() -> None:
    image = _rgb()
    uri = "data:image/png;base64," + base64.b64encode(_png(image)).decode()
    assert _same_pixels(load_image(uri), image)
    assert decode_data_uri(uri) == _png(image)


def test_from_pil() -> None:
    image = _rgb()
    out = load_image(image)
    assert _same_pixels(out, image)


def test_from_uint8_arrays() -> None:
    rgb = np.random.RandomState(1).randint(0, 256, (12, 20, 3), dtype=np.uint8)
    out = load_image(rgb)
    assert out.size == (20, 12) and np.array_equal(np.asarray(out), rgb)

    gray = rgb[..., 0]
    out = load_image(gray)
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.repeat(gray[..., None], 3, axis=2))
    assert np.array_equal(np.asarray(load_image(gray[..., None])), np.asarray(out))

    rgba = np.concatenate([rgb, np.full((12, 20, 1), 255, np.uint8)], axis=2)
    rgba[0, 0, 3] = 0
    out = np.asarray(load_image(rgba))
    assert out.shape == (12, 20, 3)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert np.array_equal(out[1:], rgb[1:])


def test_from_float_array() -> None:
    array = np.random.RandomState(2).rand(10, 9, 3)
    out = load_image(array)
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out), (array * 255).round().astype(np.uint8))
    assert np.asarray(load_image(np.ones((8, 8), np.float32))).min() == 255


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.full((8, 8, 3), 2.0), r"\[0, 1\]"),
        (np.full((8, 8, 3), -0.5), r"\[0, 1\]"),
        (np.zeros((8, 8, 2), np.uint8), "HxW or HxWx1/3/4"),
        (np.zeros((2, 8, 8, 3), np.uint8), "HxW or HxWx1/3/4"),
    ],
)
def test_bad_arrays(array: np.ndarray, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        load_image(array)


def test_unsupported_type() -> None:
    with pytest.raises(ImageError, match="unsupported image input of type int"):
        load_image(3)


# ---- modes -----------------------------------------------------------------------------------
def test_grayscale_and_palette_become_rgb() -> None:
    gray = Image.fromarray(np.arange(160, dtype=np.uint8).reshape(10, 16), mode="L")
    for image in (gray, Image.open(io.BytesIO(_png(gray)))):
        out = load_image(image)
        assert out.mode == "RGB"
        assert np.array_equal(np.asarray(out)[..., 1], np.asarray(gray))
    palette = _rgb().convert("P")
    out = load_image(_png(palette))
    assert out.mode == "RGB"
    assert _same_pixels(out, palette.convert("RGB"))


def test_rgba_transparent_pixel_becomes_white() -> None:
    array = np.zeros((10, 10, 4), np.uint8)
    array[..., 0] = 200
    array[..., 3] = 255
    array[2, 3, 3] = 0
    out = np.asarray(load_image(_png(Image.fromarray(array, mode="RGBA"))))
    assert out[2, 3].tolist() == [255, 255, 255]
    assert out[0, 0].tolist() == [200, 0, 0]


def test_palette_with_transparency() -> None:
    image = Image.new("P", (10, 10), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((4, 4), 0)
    image.info["transparency"] = 0
    out = np.asarray(load_image(_png(image)))
    assert out[4, 4].tolist() == [255, 255, 255]
    assert out[0, 0].tolist() == [255, 0, 0]


def test_la_image() -> None:
    image = Image.new("LA", (10, 10), (50, 255))
    image.putpixel((1, 1), (50, 0))
    out = np.asarray(load_image(image))
    assert out[1, 1].tolist() == [255, 255, 255]
    assert out[0, 0].tolist() == [50, 50, 50]


def test_16_bit_image_keeps_its_range() -> None:
    values = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    for source in (image, _png(image)):
        out = load_image(source)
        assert out.mode == "RGB"
        channel = np.asarray(out)[..., 0].astype(int)
        assert channel[0, 0] == 0 and channel[-1, -1] == 255
        assert np.abs(channel - np.round(values / 257)).max() <= 1


def test_cmyk_becomes_rgb() -> None:
    out = load_image(Image.new("CMYK", (10, 10), (0, 255, 255, 0)))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 0, 0)


# ---- sizes -----------------------------------------------------------------------------------
def test_too_small() -> None:
    with pytest.raises(ImageError, match="4x4 pixels.*at least"):
        load_image(_rgb(4, 4))
    with pytest.raises(ImageError, match="100x5"):
        load_image(np.zeros((5, 100, 3), np.uint8))
    assert load_image(_rgb(MIN_SIDE, MIN_SIDE)).size == (MIN_SIDE, MIN_SIDE)


def test_huge_image_is_shrunk() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (9000, 3000), (10, 200, 30)).save(buffer, format="PNG", compress_level=1)
    out = load_image(buffer.getvalue())
    assert out.mode == "RGB"
    assert max(out.size) == WORKING_SIDE
    assert abs(out.size[1] - round(3000 * WORKING_SIDE / 9000)) <= 1
    assert out.getpixel((100, 100)) == (10, 200, 30)


def test_over_max_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "MAX_PIXELS", 400)
    with pytest.raises(ImageError, match="30x20 pixels; at most 400"):
        load_image(_png(_rgb(30, 20)))
    assert load_image(_rgb(20, 20)).size == (20, 20)


def test_shrink_does_not_modify_caller_image() -> None:
    image = Image.new("RGB", (WORKING_SIDE + 100, 10), (1, 2, 3))
    out = load_image(image)
    assert out.size[0] == WORKING_SIDE
    assert image.size == (WORKING_SIDE + 100, 10)


# ---- errors ----------------------------------------------------------------------------------
def test_corrupt_bytes() -> None:
    with pytest.raises(ImageError, match="cannot be decoded"):
        load_image(b"\x00\x01 definitely not an image")


def test_truncated_png() -> None:
    data = _png(_rgb(64, 64))
    with pytest.raises(ImageError, match="cannot be decoded"):
        load_image(data[: len(data) // 2])


def test_not_an_image_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ImageError, match=f"{path}.*cannot be decoded"):
        load_image(path)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="image file not found: .*missing.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="not found"):
        load_image(str(tmp_path))


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("data:image/png,abcd", "must look like data:image"),
        ("data:image/png;base64", "must look like data:image"),
        ("data:image/png;base64,@@@!", "invalid base64"),
        ("data:image/png;base64,abc", "invalid base64"),
        ("data:image/png;base64," + base64.b64encode(b"plain text").decode(),
         r"\(data URI\) cannot be decoded"),
    ],
)
def test_bad_data_uri(uri: str, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        load_image(uri)


def test_image_error_is_value_error() -> None:
    assert issubclass(ImageError, ValueError)


# ---- hashing ---------------------------------------------------------------------------------
def test_image_hash() -> None:
    a = _rgb(seed=5)
    b = Image.fromarray(np.asarray(a).copy())
    assert a is not b and image_hash(a) == image_hash(b)
    assert image_hash(load_image(_png(a))) == image_hash(a)
    changed = np.asarray(a).copy()
    changed[3, 4, 1] ^= 1
    assert image_hash(Image.fromarray(changed)) != image_hash(a)
    # same bytes, different shape
    flat = np.asarray(a).reshape(a.width, a.height, 3)
    assert image_hash(Image.fromarray(flat)) != image_hash(a)


def test_exif_orientation_is_applied():
    import io

    from PIL import Image

    image = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (20, 40)
