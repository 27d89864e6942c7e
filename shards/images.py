"""Image normalisation for stored samples: decode, RGB, bounded size, JPEG at a fixed quality."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import simplejpeg
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


RESIZE_MODES = ("keep_ratio", "keep_ratio_largest", "center_crop", "border", "no")


@dataclass(frozen=True)
class ImagePolicy:
    """How the downloader stores an image (img2dataset's resize modes and names):
    keep_ratio: the smaller side becomes image_size; keep_ratio_largest: the larger side;
    center_crop: smaller side to image_size, then the centre square; border: fit inside a
    white image_size square; no: as decoded. Never enlarges unless ``upscale``."""

    resize_mode: str = "keep_ratio_largest"
    image_size: int = 512
    jpeg_quality: int = 95
    max_pixels: int = 64_000_000  # above this a header alone refuses it (decompression bomb)
    min_side: int = 8
    upscale: bool = False


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int


def store_image(data: bytes, policy: ImagePolicy) -> StoredImage:
    """Decode (at reduced scale where the target is smaller: JPEG DCT scaling), check, orient
    by EXIF, flatten to RGB (CMYK, palette, 16-bit, alpha on white), resize, encode as JPEG.
    Raises BadImage with the reason."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size  # the header only: nothing decoded yet
            if width * height > policy.max_pixels:
                raise BadImage(f"decompression bomb: {width}x{height} pixels over {policy.max_pixels}")  # fmt: skip
            if min(width, height) < policy.min_side:
                raise BadImage(f"too small: {width}x{height}")
            target = _target_size(width, height, policy)
            orientation = img.getexif().get(0x0112, 1)  # the header's EXIF: still nothing decoded
            if img.format == "JPEG" and img.mode in ("RGB", "L") and target != (width, height):
                img = _decode_scaled(data, img.mode, target)
            else:
                img.load()  # raises on truncated data rather than padding with grey
            turned = orientation in (5, 6, 7, 8)  # a quarter turn: width and height swap
            if orientation in _TURNS:  # by the header's tag: a scaled decode has no EXIF left
                img = img.transpose(_TURNS[orientation])
            rgb = _flatten(img)
    except BadImage:
        raise
    except Image.UnidentifiedImageError:
        raise BadImage("not a recognised image format") from None
    except Image.DecompressionBombError as e:
        raise BadImage(f"decompression bomb: {e}") from None
    except Exception as e:  # noqa: BLE001  PIL and libjpeg raise many types for bad input
        raise BadImage(f"{type(e).__name__}: {e}") from None
    orig = (height, width) if turned else (width, height)  # as a viewer shows it
    out = _resize(rgb, orig, policy)
    # libjpeg-turbo through simplejpeg lets go of the interpreter lock while it encodes (Pillow's
    # encoder holds it), so encoding threads run in parallel; 4:2:0 chroma as Pillow and cv2
    data = simplejpeg.encode_jpeg(np.asarray(out), policy.jpeg_quality, "RGB", "420")
    return StoredImage(data, out.size[0], out.size[1], orig[0], orig[1])


_T = Image.Transpose
_TURNS = {2: _T.FLIP_LEFT_RIGHT, 3: _T.ROTATE_180, 4: _T.FLIP_TOP_BOTTOM, 5: _T.TRANSPOSE,
          6: _T.ROTATE_270, 7: _T.TRANSVERSE, 8: _T.ROTATE_90}  # as ImageOps.exif_transpose  # fmt: skip


def _decode_scaled(data: bytes, mode: str, target: tuple[int, int]) -> Image.Image:
    """libjpeg-turbo's DCT-domain scaling in eighths (7/8 .. 1/8, the smallest at least
    ``target``): 500x375 to 256 px decodes at 5/8, where Pillow's draft has only halvings and
    would decode at full size. Strict: a truncated or corrupt stream raises."""
    colorspace = "GRAY" if mode == "L" else "RGB"
    arr = simplejpeg.decode_jpeg(data, colorspace, min_width=target[0], min_height=target[1])
    return Image.fromarray(arr[..., 0] if mode == "L" else arr, mode)


def _target_size(width: int, height: int, policy: ImagePolicy) -> tuple[int, int]:
    """The decoded size the resize needs (an upper bound for JPEG draft)."""
    if policy.resize_mode == "no":
        return width, height
    side = max(width, height) if policy.resize_mode in ("keep_ratio_largest", "border") else min(width, height)  # fmt: skip
    scale = policy.image_size / side
    if scale >= 1.0:
        return width, height
    return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))


def _flatten(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.uint32)
        top = 65535 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255
        img = Image.fromarray((arr * 255 // max(top, 1)).astype(np.uint8), "L")
    if img.mode in ("P", "PA"):  # a palette may carry transparency: via RGBA, onto white
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _resize(img: Image.Image, orig: tuple[int, int], policy: ImagePolicy) -> Image.Image:
    mode, size = policy.resize_mode, policy.image_size
    if mode == "no":
        return img
    w, h = orig  # scale from the original size: a draft-decoded image is already smaller
    side = max(w, h) if mode in ("keep_ratio_largest", "border") else min(w, h)
    scale = size / side
    if scale > 1.0 and not policy.upscale:
        scale = 1.0
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    if new != img.size:  # shrinking: an area average, as img2dataset's INTER_AREA
        kind = Image.Resampling.BOX if new[0] <= img.size[0] else Image.Resampling.BILINEAR
        img = img.resize(new, kind, reducing_gap=3.0)
    if mode == "center_crop" and min(new) >= size:
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        img = img.crop((left, top, left + size, top + size))
    elif mode == "border":
        canvas = Image.new("RGB", (size, size), (255, 255, 255))
        canvas.paste(img, ((size - img.size[0]) // 2, (size - img.size[1]) // 2))
        img = canvas
    return img


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    m = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n)) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m


_DCT32 = _dct_matrix(32)


def perceptual_hash(data: bytes) -> bytes:
    """64-bit DCT perceptual hash (the pHash of imagehash): grey 32x32, the 8x8 lowest
    frequencies, each bit above their median. Near-duplicates (re-encoded, resized, slightly
    cropped) differ in a few bits; Hamming distance compares them."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("L", (64, 64))  # JPEG: decode at 1/2..1/8 scale, far less work
            grey = img.convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    except Exception as e:  # PIL raises many types for bad input
        raise BadImage(f"{type(e).__name__}: {e}") from None
    pixels = np.asarray(grey, np.float64)
    low = (_DCT32 @ pixels @ _DCT32.T)[:8, :8]
    return np.packbits((low > np.median(low)).ravel()).tobytes()
