"""Image bytes in and out: capped decoding of PNG/JPEG/WebP only, PNG encoding with metadata."""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, ImageSequence, PngImagePlugin

from engine.errors import ImageDecodeError

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
)


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 8192 * 8192
    max_frames: int = 64


def sniff_format(data: bytes) -> str | None:
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def open_image(data: bytes, limits: DecodeLimits | None = None) -> Image.Image:
    """Open (lazily) PNG, JPEG or WebP bytes, refusing other formats and oversized images."""
    limits = limits or DecodeLimits()
    if len(data) > limits.max_bytes:
        raise ImageDecodeError(f"Image is {len(data)} bytes; the limit is {limits.max_bytes}")
    if sniff_format(data) is None:
        raise ImageDecodeError("Not a PNG, JPEG or WebP image")
    try:
        with warnings.catch_warnings():
            # Our own pixel cap applies below; PIL's bomb warning would only duplicate it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"Cannot decode image: {exc}") from exc
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageDecodeError(f"Image is {width}x{height}; the limit is {limits.max_pixels} pixels")
    if getattr(image, "n_frames", 1) > limits.max_frames:
        raise ImageDecodeError(f"Image has more than {limits.max_frames} frames")
    return image


def iter_frames(image: Image.Image) -> Iterator[Image.Image]:
    """Each frame, EXIF-rotated and fully decoded; decoding errors become ImageDecodeError."""
    try:
        for frame in ImageSequence.Iterator(image):
            rotated = ImageOps.exif_transpose(frame)
            rotated.load()
            yield rotated
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"Cannot decode image: {exc}") from exc


def png_bytes(pixels: np.ndarray, text: Mapping[str, Any] | None = None, compress_level: int = 4) -> bytes:
    """Encode an HxWx3 (or HxW) uint8 array as PNG; ``text`` values are written as JSON tEXt chunks."""
    image = Image.fromarray(pixels)
    info = None
    if text:
        info = PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_text(key, json.dumps(value))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=compress_level)
    return buffer.getvalue()
