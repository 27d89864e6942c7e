"""Image normalisation for stored samples: decode, RGB, bounded size, JPEG at a fixed quality."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageOps


class BadImage(ValueError):
    """The bytes are not a decodable image (corrupt, truncated, too small, not an image)."""


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    width: int
    height: int


def decode(data: bytes, min_side: int = 8) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # raises on truncated data rather than padding with grey
            img = ImageOps.exif_transpose(img)
            rgb = img.convert("RGB")
    except Image.UnidentifiedImageError:
        raise BadImage("not a recognised image format") from None  # PIL's text holds an address
    except Exception as e:  # PIL raises many types for bad input
        raise BadImage(f"{type(e).__name__}: {e}") from None
    if min(rgb.size) < min_side:
        raise BadImage(f"too small: {rgb.size[0]}x{rgb.size[1]}")
    return rgb


def encode_jpeg(img: Image.Image, max_side: int, quality: int) -> EncodedImage:
    if max(img.size) > max_side:
        scale = max_side / max(img.size)
        size = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
    return EncodedImage(buf.getvalue(), img.size[0], img.size[1])


def reencode(data: bytes, max_side: int, quality: int) -> EncodedImage:
    return encode_jpeg(decode(data), max_side, quality)
