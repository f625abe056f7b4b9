"""LoadImage, LoadImageMask, SaveImage and PreviewImage against ComfyUI's file behaviour.

ComfyUI facts checked here (``nodes.py`` and ``folder_paths.get_save_image_path``): a loaded image
is RGB float in 0..1 with MASK = 1 - alpha (64x64 zeros when there is no alpha); frames of an
animated file are batched, EXIF orientation is applied; saved PNGs hold floor(clip(255 * x)) with
``prompt`` and each ``extra_pnginfo`` key as JSON text chunks, named ``prefix_00001_.png`` with the
counter continuing after files already there, compress level 4 (1 for previews).
"""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from engine.context import NodeContext, NodeResult, Services
from engine.errors import InputNotFoundError, UnsafePathError
from engine.events import NullSink
from engine.interrupt import InterruptFlag
from engine.io import LocalFolderSink, LocalInputResolver
from engine.ops.image_files import load_image, load_image_mask, preview_image, save_image
from engine.runtime import EngineRuntime

RNG = np.random.default_rng(1234)


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    paths = {name: tmp_path / name for name in ("input", "output", "temp")}
    for path in paths.values():
        path.mkdir()
    return paths


@pytest.fixture
def ctx(folders: dict[str, Path]) -> NodeContext:
    services = Services(
        outputs=LocalFolderSink(folders["output"], folders["temp"]),
        inputs=LocalInputResolver(folders["input"], folders["output"], folders["temp"]),
    )
    return NodeContext("9", "test", "p", services, NullSink(), InterruptFlag(), [])


def encode(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def put(folders: dict[str, Path], name: str, data: bytes, folder: str = "input") -> str:
    path = folders[folder] / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return name


def as_float(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.astype(np.float32) / 255.0)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def raw_png(width: int, height: int, depth: int, color_type: int, rows: list[bytes]) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB)."""
    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    data = zlib.compress(b"".join(b"\x00" + row for row in rows))
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")
    )


def png_text_chunks(data: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """(chunk type, keyword, text) of every tEXt/zTXt/iTXt chunk, in file order."""
    found, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        payload = data[offset + 8 : offset + 8 + length]
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            keyword, _, text = payload.partition(b"\0")
            found.append((kind, keyword, text))
        offset += 12 + length
    return found


# -- LoadImage ---------------------------------------------------------------------------------


def test_load_rgb_png(ctx: NodeContext, folders):
    pixels = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    put(folders, "rgb.png", encode(Image.fromarray(pixels), "PNG"))
    image, mask = load_image(ctx, "rgb.png")
    assert image.shape == (1, 5, 7, 3) and image.dtype == torch.float32
    assert torch.equal(image[0], as_float(pixels))
    assert torch.equal(mask, torch.zeros((1, 64, 64)))


def test_load_rgba_png_mask_is_one_minus_alpha(ctx: NodeContext, folders):
    pixels = RNG.integers(0, 256, (6, 4, 4), dtype=np.uint8)
    put(folders, "rgba.png", encode(Image.fromarray(pixels), "PNG"))
    image, mask = load_image(ctx, "rgba.png")
    assert torch.equal(image[0], as_float(pixels[..., :3]))
    assert mask.shape == (1, 6, 4)
    assert torch.equal(mask[0], 1.0 - as_float(pixels[..., 3]))


def test_load_grey_alpha_png(ctx: NodeContext, folders):
    pixels = RNG.integers(0, 256, (3, 5, 2), dtype=np.uint8)
    put(folders, "la.png", encode(Image.fromarray(pixels, "LA"), "PNG"))
    image, mask = load_image(ctx, "la.png")
    for channel in range(3):
        assert torch.equal(image[0, ..., channel], as_float(pixels[..., 0]))
    assert torch.equal(mask[0], 1.0 - as_float(pixels[..., 1]))


@pytest.mark.parametrize("per_entry_alpha", [True, False])
def test_load_palette_png_with_transparency(ctx: NodeContext, folders, per_entry_alpha: bool):
    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    indices = RNG.integers(0, 4, (4, 6), dtype=np.uint8)
    picture = Image.fromarray(indices, "P")
    picture.putpalette(palette.flatten().tolist())
    alpha_table = np.array([0, 90, 255, 200] if per_entry_alpha else [255, 0, 255, 255], dtype=np.uint8)
    transparency: bytes | int = bytes(alpha_table) if per_entry_alpha else 1
    put(folders, "p.png", encode(picture, "PNG", transparency=transparency))
    image, mask = load_image(ctx, "p.png")
    assert torch.equal(image[0], as_float(palette[indices]))
    assert torch.equal(mask[0], 1.0 - as_float(alpha_table[indices]))


def test_load_16_bit_grey_png_scales_to_8_bits(ctx: NodeContext, folders):
    # ComfyUI divides 32-bit integer pixels by 255 (Pillow's "I" mode, truncating) and clips at 255.
    values = np.array([[0, 254, 255, 511, 12700], [30000, 65279, 65535, 1000, 777]], dtype=np.uint16)
    put(folders, "grey16.png", encode(Image.fromarray(values), "PNG"))
    image, mask = load_image(ctx, "grey16.png")
    expected = np.minimum(values // 255, 255).astype(np.uint8)
    for channel in range(3):
        assert torch.equal(image[0, ..., channel], as_float(expected))
    assert torch.equal(mask, torch.zeros((1, 64, 64)))


def test_load_16_bit_rgb_png_keeps_the_high_byte(ctx: NodeContext, folders):
    values = RNG.integers(0, 65536, (3, 4, 3)).astype(">u2")
    put(folders, "rgb16.png", raw_png(4, 3, 16, 2, [row.tobytes() for row in values]))
    image, _ = load_image(ctx, "rgb16.png")
    assert torch.equal(image[0], as_float((values >> 8).astype(np.uint8)))


def test_load_jpeg(ctx: NodeContext, folders):
    pixels = RNG.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    data = encode(Image.fromarray(pixels), "JPEG", quality=90)
    put(folders, "photo.jpg", data)
    image, mask = load_image(ctx, "photo.jpg")
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert torch.equal(image[0], as_float(decoded))
    assert torch.equal(mask, torch.zeros((1, 64, 64)))


def test_load_webp_lossless_with_alpha(ctx: NodeContext, folders):
    pixels = RNG.integers(1, 256, (5, 6, 4), dtype=np.uint8)
    put(folders, "pic.webp", encode(Image.fromarray(pixels), "WEBP", lossless=True))
    image, mask = load_image(ctx, "pic.webp")
    assert torch.equal(image[0], as_float(pixels[..., :3]))
    assert torch.equal(mask[0], 1.0 - as_float(pixels[..., 3]))


@pytest.mark.parametrize(("fmt", "options"), [("PNG", {}), ("WEBP", {"lossless": True})])
@pytest.mark.parametrize("channels", [3, 4])
def test_animated_frames_are_batched(ctx: NodeContext, folders, fmt: str, options: dict, channels: int):
    frames = [RNG.integers(1, 256, (6, 5, channels), dtype=np.uint8) for _ in range(3)]
    pictures = [Image.fromarray(frame) for frame in frames]
    put(folders, "anim", encode(pictures[0], fmt, save_all=True, append_images=pictures[1:], **options))
    image, mask = load_image(ctx, "anim")
    assert image.shape == (3, 6, 5, 3)
    for index, frame in enumerate(frames):
        assert torch.equal(image[index], as_float(frame[..., :3]))
    if channels == 4:
        assert torch.equal(mask, 1.0 - as_float(np.stack([frame[..., 3] for frame in frames])))
    else:
        assert torch.equal(mask, torch.zeros((3, 64, 64)))


def test_multi_picture_jpeg_keeps_the_first_picture(ctx: NodeContext, folders):
    first, second = Image.new("RGB", (8, 6), (250, 0, 0)), Image.new("RGB", (8, 6), (0, 0, 250))
    put(folders, "stereo.jpg", encode(first, "MPO", save_all=True, append_images=[second]))
    image, mask = load_image(ctx, "stereo.jpg")
    assert image.shape == (1, 6, 8, 3) and mask.shape == (1, 64, 64)
    assert image[0, ..., 0].mean() > 0.9 and image[0, ..., 2].mean() < 0.1


@pytest.mark.parametrize(("orientation", "turns"), [(1, 0), (3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(ctx: NodeContext, folders, orientation: int, turns: int):
    pixels = RNG.integers(0, 256, (4, 6, 4), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    put(folders, "turned.png", encode(Image.fromarray(pixels), "PNG", exif=exif))
    upright = np.rot90(pixels, turns)
    image, mask = load_image(ctx, "turned.png")
    assert torch.equal(image[0], as_float(upright[..., :3]))
    assert torch.equal(mask[0], 1.0 - as_float(upright[..., 3]))
    (alpha,) = load_image_mask(ctx, "turned.png", "alpha")
    assert torch.equal(alpha[0], 1.0 - as_float(upright[..., 3]))


def test_exif_orientation_of_a_jpeg(ctx: NodeContext, folders):
    exif = Image.Exif()
    exif[0x0112] = 6
    put(folders, "phone.jpg", encode(Image.new("RGB", (12, 4), "white"), "JPEG", exif=exif))
    image, _ = load_image(ctx, "phone.jpg")
    assert image.shape == (1, 12, 4, 3)


# -- LoadImageMask -----------------------------------------------------------------------------


@pytest.mark.parametrize(("channel", "index"), [("red", 0), ("green", 1), ("blue", 2)])
def test_load_image_mask_colour_channels(ctx: NodeContext, folders, channel: str, index: int):
    pixels = RNG.integers(0, 256, (5, 3, 4), dtype=np.uint8)
    put(folders, "m.png", encode(Image.fromarray(pixels), "PNG"))
    (mask,) = load_image_mask(ctx, "m.png", channel)
    assert mask.shape == (1, 5, 3)
    assert torch.equal(mask[0], as_float(pixels[..., index]))


def test_load_image_mask_alpha(ctx: NodeContext, folders):
    pixels = RNG.integers(0, 256, (5, 3, 4), dtype=np.uint8)
    put(folders, "m.png", encode(Image.fromarray(pixels), "PNG"))
    (mask,) = load_image_mask(ctx, "m.png", "alpha")
    assert torch.equal(mask[0], 1.0 - as_float(pixels[..., 3]))


def test_load_image_mask_of_an_opaque_image(ctx: NodeContext, folders):
    # ComfyUI converts to RGBA first: alpha is 255 everywhere, so the mask is zeros of the image size.
    pixels = RNG.integers(0, 256, (5, 3), dtype=np.uint8)
    put(folders, "grey.png", encode(Image.fromarray(pixels), "PNG"))
    (alpha,) = load_image_mask(ctx, "grey.png", "alpha")
    assert torch.equal(alpha, torch.zeros((1, 5, 3)))
    (red,) = load_image_mask(ctx, "grey.png", "red")
    assert torch.equal(red[0], as_float(pixels))


def test_load_image_mask_16_bit(ctx: NodeContext, folders):
    values = np.array([[0, 300, 65535]], dtype=np.uint16)
    put(folders, "grey16.png", encode(Image.fromarray(values), "PNG"))
    (mask,) = load_image_mask(ctx, "grey16.png", "green")
    assert torch.equal(mask[0], as_float(np.array([[0, 1, 255]], dtype=np.uint8)))


# -- input names -------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", ["input", "output", "temp"])
def test_annotated_input_names(ctx: NodeContext, folders, folder: str):
    for index, name in enumerate(("input", "output", "temp")):
        put(folders, "sub/x.png", encode(Image.new("RGB", (2, 2), (index * 100, 0, 0)), "PNG"), name)
    image, _ = load_image(ctx, f"sub/x.png [{folder}]")
    expected = ("input", "output", "temp").index(folder) * 100
    assert torch.equal(image[0, 0, 0], torch.tensor([expected / 255.0, 0.0, 0.0]))
    if folder == "input":
        plain, _ = load_image(ctx, "sub/x.png")
        assert torch.equal(plain, image)


@pytest.mark.parametrize("name", ["../secret.png", "/etc/passwd", "a/../../x.png", "../x.png [output]"])
def test_input_names_cannot_escape_their_folder(ctx: NodeContext, name: str):
    with pytest.raises(UnsafePathError):
        load_image(ctx, name)


def test_missing_input(ctx: NodeContext):
    with pytest.raises(InputNotFoundError):
        load_image(ctx, "nope.png")


# -- SaveImage ---------------------------------------------------------------------------------


def saved(result: NodeResult) -> list[dict[str, str]]:
    assert result.ui is not None and result.result == ()
    return result.ui["images"]


def test_save_image_truncates_like_comfyui(ctx: NodeContext, folders):
    # 200.9 / 255 must become 200 (ComfyUI casts, it does not round); out-of-range values clip.
    values = np.array([[0.0, 200.9, 100.5, 254.99], [255.0, 300.0, -20.0, 1.2]], dtype=np.float32) / 255.0
    image = torch.from_numpy(np.stack([values, values[::-1], values * 0.5], axis=-1))[None]
    (entry,) = saved(save_image(ctx, image, "trunc"))
    written = np.asarray(Image.open(folders["output"] / entry["filename"]))
    expected = np.floor(np.clip(np.float32(255.0) * image[0].numpy(), 0, 255)).astype(np.uint8)
    assert np.array_equal(written, expected)
    assert written[0, 1, 0] == 200 and written[0, 3, 0] == 254 and written[1, 1, 0] == 255


def test_save_image_file_is_the_png_comfyui_writes(ctx: NodeContext, folders):
    image = torch.rand((1, 9, 11, 3), generator=torch.Generator().manual_seed(0))
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"text": "café 🔥"}}}
    extra = {"workflow": {"nodes": [1, 2]}, "note": "x"}
    (entry,) = saved(save_image(ctx, image, "same", prompt=prompt, extra_pnginfo=extra))
    data = (folders["output"] / entry["filename"]).read_bytes()
    # What ComfyUI's SaveImage produces with the same Pillow: identical bytes.
    reference = Image.fromarray(np.clip(255.0 * image[0].numpy(), 0, 255).astype(np.uint8))
    info = PngInfo()
    info.add_text("prompt", json.dumps(prompt))
    for key, value in extra.items():
        info.add_text(key, json.dumps(value))
    assert data == encode(reference, "PNG", pnginfo=info, compress_level=4)
    chunks = png_text_chunks(data)
    assert [(kind, key) for kind, key, _ in chunks] == [
        (b"tEXt", b"prompt"),
        (b"tEXt", b"workflow"),
        (b"tEXt", b"note"),
    ]
    assert json.loads(chunks[0][2]) == prompt
    assert json.loads(chunks[1][2]) == extra["workflow"]
    assert json.loads(chunks[2][2]) == "x"


def test_save_image_without_metadata_writes_no_text(ctx: NodeContext, folders):
    (entry,) = saved(save_image(ctx, torch.zeros((1, 2, 2, 3)), "bare"))
    assert png_text_chunks((folders["output"] / entry["filename"]).read_bytes()) == []


def test_save_image_counter_continues_after_existing_files(ctx: NodeContext, folders):
    for name in (
        "ComfyUI_00007_.png",
        "ComfyUI_00003_.png",
        "Other_00099_.png",
        "ComfyUI_00050.png",
        "ComfyUIx_00080_.png",
    ):
        (folders["output"] / name).write_bytes(b"")
    entries = saved(save_image(ctx, torch.zeros((2, 2, 2, 3)), "ComfyUI"))
    assert entries == [
        {"filename": "ComfyUI_00008_.png", "subfolder": "", "type": "output"},
        {"filename": "ComfyUI_00009_.png", "subfolder": "", "type": "output"},
    ]
    (again,) = saved(save_image(ctx, torch.zeros((1, 2, 2, 3)), "ComfyUI"))
    assert again["filename"] == "ComfyUI_00010_.png"
    assert [entry.location for entry in ctx.saved] == [
        str((folders["output"] / f"ComfyUI_{n:05}_.png").resolve()) for n in (8, 9, 10)
    ]


def test_save_image_subfolders(ctx: NodeContext, folders):
    (first,) = saved(save_image(ctx, torch.zeros((1, 2, 2, 3)), "a/b/shot"))
    (second,) = saved(save_image(ctx, torch.zeros((1, 2, 2, 3)), "a/b/shot"))
    assert first == {"filename": "shot_00001_.png", "subfolder": "a/b", "type": "output"}
    assert second["filename"] == "shot_00002_.png"
    assert (folders["output"] / "a" / "b" / "shot_00002_.png").is_file()


def test_save_image_size_variables(ctx: NodeContext, folders):
    (entry,) = saved(save_image(ctx, torch.zeros((1, 7, 12, 3)), "%width%x%height%/img_%width%"))
    assert entry == {"filename": "img_12_00001_.png", "subfolder": "12x7", "type": "output"}


def test_save_image_date_variables(ctx: NodeContext):
    (entry,) = saved(save_image(ctx, torch.zeros((1, 2, 2, 3)), "%year%-%month%-%day%"))
    assert re.fullmatch(r"20\d\d-\d\d-\d\d_00001_\.png", entry["filename"])


def test_save_image_batch_number_names_files_not_folders(ctx: NodeContext, folders):
    entries = saved(save_image(ctx, torch.zeros((2, 2, 2, 3)), "run_%batch_num%/f_%batch_num%"))
    assert [entry["subfolder"] for entry in entries] == ["run_%batch_num%", "run_%batch_num%"]
    assert [entry["filename"][:4] for entry in entries] == ["f_0_", "f_1_"]


@pytest.mark.parametrize("prefix", ["../evil", "/tmp/abs", "a/../../x", "C:/x", "~/x", "..\\x", ""])
def test_save_image_refuses_unsafe_prefixes(ctx: NodeContext, folders, prefix: str):
    with pytest.raises(UnsafePathError):
        save_image(ctx, torch.zeros((1, 2, 2, 3)), prefix)
    # Nothing was written, inside the test folders or next to them.
    assert [path for path in folders["output"].parent.rglob("*") if path.is_file()] == []
    assert not list(folders["output"].parent.parent.glob("*_00001_.png"))
    assert ctx.saved == []


def test_preview_image_writes_to_temp(ctx: NodeContext, folders):
    image = torch.rand((2, 8, 8, 3), generator=torch.Generator().manual_seed(1))
    entries = saved(preview_image(ctx, image, prompt={"a": 1}))
    assert [entry["type"] for entry in entries] == ["temp", "temp"]
    assert all(re.fullmatch(r"ComfyUI_temp_[a-z]{5}_0000[12]_\.png", entry["filename"]) for entry in entries)
    assert not any(folders["output"].iterdir())
    data = (folders["temp"] / entries[0]["filename"]).read_bytes()
    info = PngInfo()
    info.add_text("prompt", json.dumps({"a": 1}))
    reference = Image.fromarray(np.clip(255.0 * image[0].numpy(), 0, 255).astype(np.uint8))
    assert data == encode(reference, "PNG", pnginfo=info, compress_level=1)


def test_save_and_preview_through_the_executor(runtime: EngineRuntime, engine_settings):
    prompt = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 5, "height": 3, "batch_size": 2, "color": 0x80FF01},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x/%width%"}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    extra = {"extra_pnginfo": {"workflow": {"links": []}}}
    result = runtime.execute(prompt, extra_data=extra)
    assert result.outputs["2"]["images"] == [
        {"filename": "5_00001_.png", "subfolder": "x", "type": "output"},
        {"filename": "5_00002_.png", "subfolder": "x", "type": "output"},
    ]
    assert [entry["type"] for entry in result.outputs["3"]["images"]] == ["temp", "temp"]
    written = Image.open(engine_settings.output_dir / "x" / "5_00002_.png")
    assert np.array_equal(
        np.asarray(written), np.broadcast_to(np.array([128, 255, 1], dtype=np.uint8), (3, 5, 3))
    )
    assert json.loads(written.text["prompt"]) == prompt
    assert json.loads(written.text["workflow"]) == {"links": []}
