"""Where a request's image may come from: ``data:`` URIs always; http(s) URLs only when the
recipe allows them (:mod:`pipelines.serve.remote`); local files never, unless they lie inside an
allowed folder. Every image's width and height are checked from its header before any pixel is
decoded."""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from mova.images import ImageError, decode_data_uri, load_image
from pipelines.serve.errors import bad_request

log = logging.getLogger(__name__)


def classify(url: str) -> str:
    """``data``, ``remote`` or ``file`` for an image URL; anything else is a 400."""
    if url.startswith("data:"):
        return "data"
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        return "remote"
    if scheme == "file" or url.startswith("/"):
        return "file"
    raise bad_request(f"image URL scheme {scheme or '(none)'!r} is not supported; send a "
                      "data:image/...;base64 URI", code="invalid_image_url")


def local_path(url: str, allowed_dirs: Sequence[str]) -> Path:
    """The file an image URL names, if it lies inside one of ``allowed_dirs`` (after resolving
    symlinks and ``..``); otherwise a 400."""
    raw = unquote(urlparse(url).path) if url.startswith("file:") else url
    path = Path(raw).resolve()
    for folder in allowed_dirs:
        root = Path(folder).resolve()
        if path.is_relative_to(root):
            return path
    raise bad_request("local image files are not allowed here" if not allowed_dirs else
                      "the image file lies outside the allowed image folders",
                      code="image_not_allowed")


def image_bytes(url: str, *, max_bytes: int, allowed_dirs: Sequence[str]) -> bytes:
    """Bytes of a ``data:`` URI or an allowed local file (remote URLs are fetched by
    :func:`fetch_remote`)."""
    kind = classify(url)
    if kind == "data":
        if len(url) * 3 // 4 > max_bytes + 4:
            raise bad_request(f"the image is larger than {max_bytes} bytes",
                              code="image_too_large")
        try:
            data = decode_data_uri(url)
        except ImageError as exc:
            raise bad_request(str(exc), code="invalid_image") from None
    elif kind == "file":
        path = local_path(url, allowed_dirs)
        if not path.is_file():
            raise bad_request(f"image file not found: {path}", code="invalid_image")
        if path.stat().st_size > max_bytes:
            raise bad_request(f"the image is larger than {max_bytes} bytes",
                              code="image_too_large")
        data = path.read_bytes()
    else:
        raise bad_request("remote image URLs are disabled on this server (limits."
                          "allow_remote_images)", code="image_not_allowed")
    if len(data) > max_bytes:
        raise bad_request(f"the image is larger than {max_bytes} bytes", code="image_too_large")
    return data


def image_size(data: bytes, max_side: int) -> tuple[int, int]:
    """Width and height from the image header alone (``Image.open`` reads only the header);
    a 400 when either exceeds ``max_side`` or the header is not an image's."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise bad_request(f"the image is too large; at most {max_side} pixels a side are "
                          "accepted", code="image_too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise bad_request(f"the image cannot be decoded: {exc}", code="invalid_image") from None
    if width > max_side or height > max_side:
        raise bad_request(f"the image is {width}x{height} pixels; at most {max_side} pixels a "
                          "side are accepted", code="image_too_large")
    return width, height


def decode_image(data: bytes, max_side: int | None = None) -> Image.Image:
    """Check the header (when ``max_side`` is given), then decode exactly as
    :func:`mova.images.load_image` does (so served answers equal the library's); an
    undecodable image is a 400."""
    if max_side is not None:
        image_size(data, max_side)
    try:
        return load_image(data)
    except ImageError as exc:
        raise bad_request(str(exc), code="invalid_image") from None

