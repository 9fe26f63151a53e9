"""Images from requests, checked before their pixels are decoded.

An image is untrusted input: a decompression bomb (a small PNG that inflates to gigabytes), a
truncated or mislabelled file. Each is a 400 here, in bounded time and memory: the byte size is
capped, the pixel count is read from the header (Pillow's ``open`` reads no pixel data) and
capped before the pixels are decoded, and only common still-image formats are opened. The API
translators turn every image form into bytes (``server/validate.py``: base64 and ``data:`` URLs
only, never a download); a vision runner opens them here.
"""

from __future__ import annotations

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
