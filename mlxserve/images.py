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

from mlxserve.errors import InvalidRequestError, RequestLimitError

MAX_IMAGE_BYTES = 20 << 20
"""Encoded size of one image (OpenAI's own limit is 20 MB)."""
MAX_IMAGE_PIXELS = 36_000_000
"""Width x height of one image: 6000 x 6000. Vision processors resize to well under 2 MP, so
this only refuses images whose decoding alone would cost hundreds of MB."""
MAX_REQUEST_IMAGES = 100
"""Images of one request, all its messages together (Anthropic's own bound)."""
MAX_REQUEST_PIXELS = 4 * MAX_IMAGE_PIXELS
"""Pixels of all of a request's images together. A runner decodes a request's images before the
model's processor scales them, so this bounds that memory (432 MB of RGB): a lossless WebP of
6000 x 6000 pixels of one colour is 1.4 KB, so the body limit alone would let one request
decode thousands of them."""
IMAGE_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP"})
PARAM = "images"


def _refuse(message: str, index: int | None) -> InvalidRequestError:
    where = "" if index is None else f"image {index}: "
    return InvalidRequestError(where + message, param=PARAM, index=index)


def check_request_images(images: list[bytes]) -> None:
    """A request's images, within their count and their pixels together (read from each one's
    header: nothing is decoded), each a readable image within its own limits."""
    if len(images) > MAX_REQUEST_IMAGES:
        raise RequestLimitError(
            f"'{PARAM}' is over the limit of {MAX_REQUEST_IMAGES} images in one request "
            "(docs/API.md, Request limits)",
            param=PARAM,
            limit=MAX_REQUEST_IMAGES,
        )
    pixels = 0
    for index, data in enumerate(images):
        width, height = _opened(data, index).size
        pixels += width * height
        if pixels > MAX_REQUEST_PIXELS:
            raise RequestLimitError(
                f"'{PARAM}' is over the limit of {MAX_REQUEST_PIXELS:,} pixels in one "
                f"request's images, at image {index} (docs/API.md, Request limits)",
                param=PARAM,
                limit=MAX_REQUEST_PIXELS,
                index=index,
            )


def open_image(data: bytes, index: int | None = None) -> Any:
    """A decoded RGB ``PIL.Image`` (first frame), after the size and pixel checks."""
    from PIL import Image, ImageOps

    image = _opened(data, index)
    try:
        image.load()
        # Upright as the sender sees it: a phone's photo is stored sideways with an EXIF
        # orientation (transformers' ``load_image`` and mlx-vlm turn it too).
        return _rgb(ImageOps.exif_transpose(image))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise _refuse(f"the image data is damaged ({exc})", index) from None


SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
"""Pillow's modes for a 16-bit grey PNG (``I`` in older Pillow): its ``convert("RGB")`` clips
such samples at 255 instead of scaling them, which turns most of the image white."""


def _rgb(image: Any) -> Any:
    """``image`` in RGB as a model's processor expects it: 16-bit samples scaled to 8 bits (as
    llama.cpp's image loader does), and what is transparent laid over white (as transformers'
    ``convert_to_rgb`` and Ollama do; dropping the alpha channel would show a logo's
    transparent background as black, its black lettering with it)."""
    from PIL import Image

    if image.mode in SIXTEEN_BIT_MODES:
        import numpy as np

        samples = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
        image = Image.fromarray(samples.astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        layer = image.convert("RGBA")
        white = Image.new("RGBA", layer.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, layer).convert("RGB")
    return image.convert("RGB")


def _opened(data: bytes, index: int | None) -> Any:
    """``data`` opened by Pillow (its header read, no pixels), after the size, format and
    pixel-count checks."""
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
    return image
