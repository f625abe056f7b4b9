"""Decoding untrusted image bytes: PNG, JPEG and WebP only, capped before decoding, and every
failure reported as ImageDecodeError (pytest turns stray warnings into errors, so none leak)."""

from __future__ import annotations

import io
import json
import random
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile

from engine.context import NodeContext, Services
from engine.errors import ImageDecodeError
from engine.events import NullSink
from engine.imageio import ACCEPTED_FORMATS, iter_frames, open_image, png_bytes, sniff_format
from engine.interrupt import InterruptFlag
from engine.io import LocalFolderSink, LocalInputResolver
from engine.limits import DecodeLimits
from engine.ops.image_files import load_image, load_image_mask

PIXELS = np.random.default_rng(5).integers(0, 256, (24, 32, 3), dtype=np.uint8)


def encode(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def decode_all(data: bytes, limits: DecodeLimits | None = None) -> list[Image.Image]:
    return list(iter_frames(open_image(data, limits), limits))


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming ``width`` x ``height``, with no pixel data at all."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IEND", b"")


def exif_orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


def samples() -> dict[str, bytes]:
    image = Image.fromarray(PIXELS)
    rgba = Image.fromarray(np.dstack([PIXELS, PIXELS[..., :1]]))
    turned = image.rotate(90, expand=True).resize(image.size)
    return {
        "png": encode(image, "PNG"),
        "rgba_png": encode(rgba, "PNG"),
        "palette_png": encode(image.convert("P"), "PNG", transparency=bytes(range(256))),
        "grey16_png": encode(Image.fromarray(PIXELS[..., 0].astype(np.uint16) * 257), "PNG"),
        "exif_png": encode(image, "PNG", exif=exif_orientation(6)),
        "jpeg": encode(image, "JPEG", exif=exif_orientation(8)),
        "progressive_jpeg": encode(image, "JPEG", progressive=True),
        "mpo": encode(image, "MPO", save_all=True, append_images=[turned]),
        "webp": encode(image, "WEBP"),
        "webp_lossless": encode(rgba, "WEBP", lossless=True),
        "apng": encode(image, "PNG", save_all=True, append_images=[turned]),
        "animated_webp": encode(image, "WEBP", save_all=True, append_images=[turned]),
    }


SAMPLES = samples()


# -- formats -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SAMPLES))
def test_accepted_samples_decode(name: str):
    frames = decode_all(SAMPLES[name])
    assert frames and all(frame.size in ((32, 24), (24, 32)) for frame in frames)


@pytest.mark.parametrize(("fmt", "expected"), [("PNG", "PNG"), ("JPEG", "JPEG"), ("WEBP", "WEBP")])
def test_sniffed_and_opened_format(fmt: str, expected: str):
    data = encode(Image.fromarray(PIXELS), fmt)
    assert sniff_format(data) == expected
    assert open_image(data).format == expected
    assert ACCEPTED_FORMATS == ("PNG", "JPEG", "WEBP")


@pytest.mark.parametrize(
    "data",
    [
        encode(Image.fromarray(PIXELS), "GIF"),
        encode(Image.fromarray(PIXELS), "BMP"),
        encode(Image.fromarray(PIXELS), "TIFF"),
        encode(Image.fromarray(PIXELS), "ICO"),
        encode(Image.fromarray(PIXELS), "PPM"),
        random.Random(0).randbytes(4096),
        b"",
        b"\x89PNG",
        b"RIFF\x00\x00\x00\x00WAVEfmt ",
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
    ],
    ids=["gif", "bmp", "tiff", "ico", "ppm", "random", "empty", "short", "wave", "svg"],
)
def test_other_formats_are_refused(data: bytes):
    assert sniff_format(data) is None
    with pytest.raises(ImageDecodeError, match="Not a PNG, JPEG or WebP"):
        open_image(data)


@pytest.mark.parametrize(
    "data",
    [
        b"\x89PNG\r\n\x1a\n" + encode(Image.fromarray(PIXELS), "GIF"),
        b"\xff\xd8\xff" + encode(Image.fromarray(PIXELS), "BMP"),
        b"RIFF\x10\x00\x00\x00WEBP" + encode(Image.fromarray(PIXELS), "TIFF"),
    ],
    ids=["gif-as-png", "bmp-as-jpeg", "tiff-as-webp"],
)
def test_a_disguised_format_is_refused(data: bytes):
    with pytest.raises(ImageDecodeError):
        decode_all(data)


# -- caps --------------------------------------------------------------------------------------


def test_byte_cap():
    data = SAMPLES["png"]
    assert decode_all(data, DecodeLimits(max_bytes=len(data)))
    with pytest.raises(ImageDecodeError, match="bytes"):
        open_image(data, DecodeLimits(max_bytes=len(data) - 1))


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any pixel data is decoded."""

    def refuse(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.mark.usefixtures("no_decoding")
def test_pixel_cap_is_checked_from_the_header_alone():
    # 9000 x 9000 is over the default cap (8192 x 8192) and under Pillow's own bomb warning.
    data = png_header_only(9000, 9000)
    assert len(data) < 100
    with pytest.raises(ImageDecodeError, match="9000x9000; the limit is 67108864 pixels"):
        open_image(data)


@pytest.mark.usefixtures("no_decoding")
@pytest.mark.parametrize(("width", "height"), [(100_000, 100_000), (2**31 - 1, 2**31 - 1), (1, 2**30)])
def test_absurd_header_sizes_are_refused(width: int, height: int):
    with pytest.raises(ImageDecodeError):
        open_image(png_header_only(width, height))


def _patched(data: bytes, marker: bytes, offset: int, fmt: str, *values: int) -> bytes:
    patched = bytearray(data)
    at = patched.index(marker) + offset
    packed = struct.pack(fmt, *values)
    patched[at : at + len(packed)] = packed
    return bytes(patched)


@pytest.mark.usefixtures("no_decoding")
def test_pixel_cap_applies_to_jpeg_and_webp_headers():
    jpeg = _patched(encode(Image.fromarray(PIXELS), "JPEG"), b"\xff\xc0", 5, ">HH", 9000, 9000)
    with pytest.raises(ImageDecodeError, match="9000x9000"):
        open_image(jpeg)
    webp = _patched(encode(Image.fromarray(PIXELS), "WEBP"), b"\x9d\x01\x2a", 3, "<HH", 9000, 9000)
    with pytest.raises(ImageDecodeError, match="9000x9000"):
        open_image(webp)


def test_configured_pixel_cap():
    data = encode(Image.new("RGB", (11, 9)), "PNG")
    assert decode_all(data, DecodeLimits(max_pixels=99))
    with pytest.raises(ImageDecodeError, match="11x9"):
        open_image(data, DecodeLimits(max_pixels=98))


def test_frame_cap():
    frames = [Image.new("RGB", (4, 4), (i * 40, 0, 0)) for i in range(5)]
    data = encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
    assert len(decode_all(data, DecodeLimits(max_frames=5))) == 5
    with pytest.raises(ImageDecodeError, match="frames"):
        open_image(data, DecodeLimits(max_frames=4))


def test_each_frame_is_held_to_the_pixel_cap():
    # A multi-picture JPEG whose second picture is larger than its first.
    data = encode(Image.new("RGB", (8, 8)), "MPO", save_all=True, append_images=[Image.new("RGB", (64, 64))])
    frames = iter_frames(open_image(data, DecodeLimits(max_pixels=100)), DecodeLimits(max_pixels=100))
    assert next(frames).size == (8, 8)
    with pytest.raises(ImageDecodeError, match="64x64"):
        next(frames)


# -- broken files ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SAMPLES))
@pytest.mark.parametrize("fraction", [0.02, 0.3, 0.6, 0.95])
def test_truncated_files_are_decode_errors(name: str, fraction: float):
    data = SAMPLES[name]
    with pytest.raises(ImageDecodeError):
        decode_all(data[: int(len(data) * fraction)])


@pytest.mark.parametrize("name", list(SAMPLES))
def test_corrupted_files_decode_or_fail_cleanly(name: str):
    generator = random.Random(name)
    data = SAMPLES[name]
    failures = 0
    for trial in range(60):
        mutated = bytearray(data)
        for _ in range(1 + trial % 6):
            mutated[generator.randrange(len(mutated))] = generator.randrange(256)
        try:
            for frame in decode_all(bytes(mutated)):
                frame.convert("RGBA")
        except ImageDecodeError:
            failures += 1
    assert failures > 0, "some corruption must be detected"


def test_a_broken_input_fails_the_load_nodes_with_decode_errors(tmp_path: Path):
    (tmp_path / "broken.png").write_bytes(SAMPLES["png"][:300])
    (tmp_path / "fake.png").write_bytes(SAMPLES["png"][:8] + b"GIF89a" * 20)
    services = Services(outputs=LocalFolderSink(tmp_path, tmp_path), inputs=LocalInputResolver(tmp_path))
    ctx = NodeContext("1", "LoadImage", "p", services, NullSink(), InterruptFlag(), [])
    for name in ("broken.png", "fake.png"):
        with pytest.raises(ImageDecodeError):
            load_image(ctx, name)
        with pytest.raises(ImageDecodeError):
            load_image_mask(ctx, name, "alpha")


def test_load_image_honours_the_configured_limits(tmp_path: Path):
    (tmp_path / "big.png").write_bytes(encode(Image.new("RGB", (20, 20)), "PNG"))
    services = Services(
        outputs=LocalFolderSink(tmp_path, tmp_path),
        inputs=LocalInputResolver(tmp_path),
        decode_limits=DecodeLimits(max_pixels=399),
    )
    ctx = NodeContext("1", "LoadImage", "p", services, NullSink(), InterruptFlag(), [])
    with pytest.raises(ImageDecodeError, match="20x20"):
        load_image(ctx, "big.png")


# -- encoding ----------------------------------------------------------------------------------


def test_png_bytes_round_trip_with_json_text():
    text = {"prompt": {"1": {"inputs": {"s": "ünï"}}}, "workflow": [1, 2.5, None]}
    data = png_bytes(PIXELS, text)
    decoded = Image.open(io.BytesIO(data))
    assert np.array_equal(np.asarray(decoded), PIXELS)
    assert {key: json.loads(value) for key, value in decoded.text.items()} == text
    grey = png_bytes(PIXELS[..., 0])
    assert Image.open(io.BytesIO(grey)).mode == "L"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(grey))), PIXELS[..., 0])
