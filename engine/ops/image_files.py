"""Nodes that read input images and write output images (through the context's resolver and sink)."""

from __future__ import annotations

import random
import string
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from engine.context import NodeContext, NodeResult
from engine.imageio import iter_frames, open_image, png_bytes
from engine.io import OutputKind, OutputRequest

# Multi-picture JPEGs carry a thumbnail as a second frame; ComfyUI keeps only the first.
_SINGLE_FRAME_FORMATS = ("MPO",)


def image_fingerprint(ctx: NodeContext, image: str, **_: Any) -> str:
    """Changes when the named input file changes, so cached results are not reused."""
    return ctx.services.inputs.fingerprint(image)


def _to_float(frame: Image.Image) -> Image.Image:
    # 32-bit integer PNGs hold 16-bit values: scale them to 8 bits as ComfyUI does.
    if frame.mode == "I":
        return frame.point(lambda value: value * (1 / 255))
    if frame.mode == "I;16":
        return frame.convert("I").point(lambda value: value * (1 / 255))
    return frame


def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image).astype(np.float32) / 255.0)


def _rgb(frame: Image.Image) -> Image.Image:
    # Pillow warns when a palette with per-entry alpha goes straight to RGB; through RGBA the
    # colours are the same and nothing is lost.
    if frame.mode == "P" and "transparency" in frame.info:
        return frame.convert("RGBA").convert("RGB")
    return frame.convert("RGB")


def load_image(ctx: NodeContext, image: str) -> tuple[torch.Tensor, torch.Tensor]:
    """IMAGE [B,H,W,3] and MASK [B,H,W] (1 where the image is transparent) from an input file."""
    limits = ctx.services.decode_limits
    opened = open_image(ctx.services.inputs.read(image), limits)
    images: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    size: tuple[int, int] | None = None
    for frame in iter_frames(opened, limits):
        frame = _to_float(frame)
        rgb = _rgb(frame)
        if size is None:
            size = rgb.size
        if rgb.size != size:
            continue
        images.append(_pixels(rgb).unsqueeze(0))
        if "A" in frame.getbands():
            mask = 1.0 - _pixels(frame.getchannel("A"))
        elif frame.mode == "P" and "transparency" in frame.info:
            mask = 1.0 - _pixels(frame.convert("RGBA").getchannel("A"))
        else:
            mask = torch.zeros((64, 64), dtype=torch.float32)
        masks.append(mask.unsqueeze(0))
        if opened.format in _SINGLE_FRAME_FORMATS:
            break
    if len(images) > 1 and len({m.shape for m in masks}) == 1:
        return torch.cat(images, dim=0), torch.cat(masks, dim=0)
    return images[0], masks[0]


def load_image_mask(ctx: NodeContext, image: str, channel: str) -> tuple[torch.Tensor]:
    limits = ctx.services.decode_limits
    opened = open_image(ctx.services.inputs.read(image), limits)
    frame = next(iter_frames(opened, limits))
    if frame.getbands() != ("R", "G", "B", "A"):
        frame = _to_float(frame).convert("RGBA")
    band = channel[0].upper()
    if band in frame.getbands():
        mask = _pixels(frame.getchannel(band))
        if band == "A":
            mask = 1.0 - mask
    else:
        mask = torch.zeros((64, 64), dtype=torch.float32)
    return (mask.unsqueeze(0),)


def expand_prefix(prefix: str, width: int, height: int) -> str:
    """ComfyUI's filename variables: %width%, %height%, %year%, %month%, %day%, %hour%, ..."""
    now = time.localtime()
    values = {
        "%width%": str(width),
        "%height%": str(height),
        "%year%": str(now.tm_year),
        "%month%": f"{now.tm_mon:02}",
        "%day%": f"{now.tm_mday:02}",
        "%hour%": f"{now.tm_hour:02}",
        "%minute%": f"{now.tm_min:02}",
        "%second%": f"{now.tm_sec:02}",
    }
    for variable, value in values.items():
        prefix = prefix.replace(variable, value)
    return prefix


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[H,W,C] float 0..1 -> uint8, truncating as ComfyUI does (not rounding)."""
    return np.clip(255.0 * image.float().cpu().numpy(), 0, 255).astype(np.uint8)


def write_images(
    ctx: NodeContext,
    images: torch.Tensor,
    filename_prefix: str,
    kind: OutputKind,
    compress_level: int,
    prompt: Any,
    extra_pnginfo: Any,
) -> NodeResult:
    text: dict[str, Any] = {}
    if prompt is not None:
        text["prompt"] = prompt
    if isinstance(extra_pnginfo, dict):
        text.update(extra_pnginfo)
    prefix = expand_prefix(filename_prefix, images.shape[2], images.shape[1])
    # %batch_num% names the file, not the folder: ComfyUI substitutes it in the last component only.
    folder, slash, name = prefix.replace("\\", "/").rpartition("/")
    results = []
    for index, image in enumerate(images):
        data = png_bytes(to_uint8(image), text, compress_level)
        request = OutputRequest(
            node_id=ctx.node_id,
            index=index,
            filename_prefix=folder + slash + name.replace("%batch_num%", str(index)),
            kind=kind,
        )
        results.append(ctx.save_output(request, data).ui())
    return NodeResult(ui={"images": results})


def save_image(
    ctx: NodeContext,
    images: torch.Tensor,
    filename_prefix: str,
    prompt: Any = None,
    extra_pnginfo: Any = None,
) -> NodeResult:
    return write_images(ctx, images, filename_prefix, "output", 4, prompt, extra_pnginfo)


def preview_image(
    ctx: NodeContext, images: torch.Tensor, prompt: Any = None, extra_pnginfo: Any = None
) -> NodeResult:
    suffix = "".join(random.choice(string.ascii_lowercase) for _ in range(5))
    return write_images(ctx, images, f"ComfyUI_temp_{suffix}", "temp", 1, prompt, extra_pnginfo)
