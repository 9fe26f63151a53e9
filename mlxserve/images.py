"""Images from requests, checked before anything decodes them.

An image is untrusted input: a request may carry a decompression bomb (a small PNG that
inflates to gigabytes), a truncated or mislabelled file, or a URL the daemon would have to
fetch. Each is a 400 here, in bounded time and memory: the encoded size is capped before the
base64 is decoded, the pixel count is read from the header (Pillow's ``open`` reads no pixel
data) and capped before the pixels are decoded, and only ``data:`` URLs are accepted (the
daemon never downloads). The API translators turn every image form (native ``images``, OpenAI
``image_url``, Anthropic ``image`` blocks, Responses ``input_image``) into bytes here, and a
vision runner opens them with ``open_image``.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from mlxserve.errors import InvalidRequestError

MAX_IMAGE_BYTES = 20 << 20
"""Encoded size of one image (OpenAI's own limit is 20 MB)."""
MAX_IMAGE_PIXELS = 36_000_000
"""Width x height of one image: 6000 x 6000. Vision processors resize to well under 2 MP, so
this only refuses images whose decoding alone would cost hundreds of MB."""
IMAGE_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP"})
PARAM = "images"


def _refuse(message: str, index: int | None) -> InvalidRequestError:
    where = "" if index is None else f"image {index}: "
    return InvalidRequestError(where + message, param=PARAM, index=index)


def image_from_base64(text: Any, index: int | None = None) -> bytes:
    """The bytes of a base64 image, its size bounded before it is decoded."""
    if not isinstance(text, str) or not text:
        raise _refuse("expected a base64 string", index)
    if len(text) > (MAX_IMAGE_BYTES * 4) // 3 + 4:
        raise _refuse(f"larger than {MAX_IMAGE_BYTES >> 20} MiB", index)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _refuse("not valid base64", index) from None


def image_from_url(url: Any, index: int | None = None) -> bytes:
    """An image URL as bytes: ``data:image/...;base64,...`` only; a remote URL is refused."""
    if not isinstance(url, str):
        raise _refuse("expected a URL string", index)
    if not url.startswith("data:"):
        raise _refuse(
            "only data: URLs are accepted; this server never downloads images (send the image "
            "inline as base64)",
            index,
        )
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64") or not header[5:].startswith("image/"):
        raise _refuse("expected data:image/<type>;base64,<data>", index)
    return image_from_base64(payload, index)


def open_image(data: bytes, index: int | None = None) -> Any:
    """A decoded RGB ``PIL.Image`` (first frame), after the size and pixel checks."""
    from PIL import Image

    if len(data) > MAX_IMAGE_BYTES:
        raise _refuse(f"larger than {MAX_IMAGE_BYTES >> 20} MiB", index)
    try:
        image = Image.open(io.BytesIO(data))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise _refuse(f"not a readable image ({exc})", index) from None
    if image.format not in IMAGE_FORMATS:
        raise _refuse(f"format {image.format} is not one of {sorted(IMAGE_FORMATS)}", index)
    width, height = image.size
    if width < 1 or height < 1 or width * height > MAX_IMAGE_PIXELS:
        raise _refuse(
            f"{width}x{height} pixels; at most {MAX_IMAGE_PIXELS:,} pixels are accepted", index
        )
    try:
        image.load()
        return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise _refuse(f"the image data is damaged ({exc})", index) from None
