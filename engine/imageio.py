"""Image bytes in and out: capped decoding of PNG/JPEG/WebP only, PNG encoding with metadata."""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import numpy as np
from PIL import Image, ImageOps, ImageSequence, PngImagePlugin

from engine.errors import ImageDecodeError
from engine.limits import DecodeLimits

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
T = TypeVar("T")
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
)


def sniff_format(data: bytes) -> str | None:
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _decoding(step: Callable[..., T], *args: Any) -> T:
    """Run one Pillow decoding step on untrusted bytes.

    Pillow reports malformed data through many exception types (OSError, SyntaxError, struct.error,
    IndexError, ...) and through warnings; every failure becomes ImageDecodeError, and the warnings
    (corrupt EXIF, malformed MPO, ...) are dropped, since our own caps apply.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return step(*args)
    except (MemoryError, ImageDecodeError):
        raise
    except Exception as exc:
        raise ImageDecodeError(f"Cannot decode image: {exc}") from exc


def _check_pixels(width: int, height: int, limits: DecodeLimits) -> None:
    if width * height > limits.max_pixels:
        raise ImageDecodeError(f"Image is {width}x{height}; the limit is {limits.max_pixels} pixels")


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS))


def open_image(data: bytes, limits: DecodeLimits | None = None) -> Image.Image:
    """Open (lazily) PNG, JPEG or WebP bytes, refusing other formats and oversized images.

    Only the header is read here: the size and frame caps are checked before any pixel is decoded.
    """
    limits = limits or DecodeLimits()
    if len(data) > limits.max_bytes:
        raise ImageDecodeError(f"Image is {len(data)} bytes; the limit is {limits.max_bytes}")
    if sniff_format(data) is None:
        raise ImageDecodeError("Not a PNG, JPEG or WebP image")
    image = _decoding(_open, data)
    _check_pixels(*image.size, limits)
    if _decoding(getattr, image, "n_frames", 1) > limits.max_frames:
        raise ImageDecodeError(f"Image has more than {limits.max_frames} frames")
    return image


def _next_frame(frames: Iterator[Image.Image]) -> Image.Image | None:
    return next(frames, None)


def _upright(frame: Image.Image) -> Image.Image:
    rotated = ImageOps.exif_transpose(frame)
    rotated.load()
    return rotated


def iter_frames(image: Image.Image, limits: DecodeLimits | None = None) -> Iterator[Image.Image]:
    """Each frame, EXIF-rotated and fully decoded; decoding errors become ImageDecodeError.

    Every frame is held to the pixel cap before it is decoded (a multi-picture JPEG's later
    pictures may be larger than its first).
    """
    limits = limits or DecodeLimits()
    frames = ImageSequence.Iterator(image)
    for _ in range(limits.max_frames):
        frame = _decoding(_next_frame, frames)
        if frame is None:
            return
        _check_pixels(*frame.size, limits)
        yield _decoding(_upright, frame)
    if _decoding(_next_frame, frames) is not None:
        raise ImageDecodeError(f"Image has more than {limits.max_frames} frames")


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
