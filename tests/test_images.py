"""Untrusted images are refused with a 400 before they cost time or memory (``images.py``)."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from mlxserve.errors import InvalidRequestError
from mlxserve.images import MAX_IMAGE_BYTES, open_image


def png(width: int = 8, height: int = 8, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width`` x ``height`` with a tiny (wrong) IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def test_a_small_png_opens_as_rgb():
    image = open_image(png(5, 7))
    assert image.size == (5, 7) and image.mode == "RGB"


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", png()[:40], b"%PDF-1.4\n" + b"0" * 100],
    ids=["empty", "text", "truncated", "pdf"],
)
def test_bad_images_are_refused(data):
    with pytest.raises(InvalidRequestError):
        open_image(data, 1)


def test_a_decompression_bomb_is_refused_from_its_header():
    with pytest.raises(InvalidRequestError, match="pixels"):
        open_image(bomb_png(100_000, 100_000))


def test_oversized_images_are_refused_before_decoding():
    with pytest.raises(InvalidRequestError, match="MiB"):
        open_image(b"\x00" * (MAX_IMAGE_BYTES + 1))


def encoded(image: Image.Image, kind: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind)
    return buffer.getvalue()


def test_transparency_is_laid_over_white():
    """A logo: black lettering on a transparent background, whose transparent pixels are black
    too; dropping the alpha channel would leave the model a black square."""
    logo = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    logo.putpixel((3, 3), (0, 0, 0, 255))
    opened = open_image(encoded(logo))
    assert opened.getpixel((10, 10)) == (255, 255, 255)
    assert opened.getpixel((3, 3)) == (0, 0, 0)
    half = open_image(encoded(Image.new("LA", (8, 8), (0, 128))))
    assert half.getpixel((1, 1)) == (127, 127, 127)
    palette = Image.new("P", (8, 8), 0)
    palette.info["transparency"] = 0
    assert open_image(encoded(palette, "GIF")).getpixel((1, 1)) == (255, 255, 255)


def test_a_sixteen_bit_png_is_scaled_to_eight_bits_not_clipped():
    import numpy as np

    samples = np.array([[0, 5200, 32768, 65535]], dtype=np.uint16)
    opened = open_image(encoded(Image.fromarray(samples)))
    assert [opened.getpixel((x, 0)) for x in range(4)] == [
        (0, 0, 0),
        (20, 20, 20),
        (128, 128, 128),
        (255, 255, 255),
    ]


def test_a_photo_is_turned_upright_by_its_exif_orientation():
    """A phone stores a portrait photo as landscape pixels with EXIF orientation 6."""
    stored = Image.new("RGB", (40, 20), (0, 0, 0))
    stored.paste((255, 0, 0), (0, 0, 20, 20))  # the left half of the stored pixels is red
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", exif=exif.tobytes(), quality=95)
    upright = open_image(buffer.getvalue())
    assert upright.size == (20, 40)
    red, green, blue = upright.getpixel((10, 5))  # the top half of the upright photo
    assert red > 200 and green < 60 and blue < 60
