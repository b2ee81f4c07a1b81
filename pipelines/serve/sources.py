"""Where a request's image may come from: ``data:`` URIs always; http(s) URLs only when the
recipe allows them; local files never, unless they lie inside an allowed folder."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

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


async def fetch_remote(url: str, *, max_bytes: int, timeout_s: float) -> bytes:
    """Download an http(s) image, at most ``max_bytes``, within ``timeout_s``."""
    import httpx

    try:
        async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=True) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise bad_request(f"fetching the image gave HTTP {response.status_code}",
                                      code="invalid_image_url")
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise bad_request(f"the image is larger than {max_bytes} bytes",
                                          code="image_too_large")
                    chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise bad_request(f"the image URL cannot be fetched: {type(exc).__name__}",
                          code="invalid_image_url") from None
    return b"".join(chunks)


def decode_image(data: bytes) -> Image.Image:
    """Decode exactly as :func:`mova.images.load_image` does (so served answers equal the
    library's); an undecodable image is a 400."""
    try:
        return load_image(data)
    except ImageError as exc:
        raise bad_request(str(exc), code="invalid_image") from None

