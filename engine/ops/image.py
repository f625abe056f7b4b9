"""Image nodes. Images are float [B,H,W,C] in 0..1, masks [B,H,W], as in ComfyUI."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.context import NodeContext
from engine.ops.resample import composite, upscale


def empty_image(
    ctx: NodeContext, width: int, height: int, batch_size: int, color: int
) -> tuple[torch.Tensor]:
    channels = [((color >> shift) & 0xFF) / 0xFF for shift in (16, 8, 0)]
    image = torch.tensor(channels, dtype=torch.float32).expand(batch_size, height, width, 3)
    return (image.contiguous(),)


def scale_image(image: torch.Tensor, width: int, height: int, method: str, crop: str) -> torch.Tensor:
    return upscale(image.movedim(-1, 1), width, height, method, crop).movedim(1, -1)


def image_scale(
    ctx: NodeContext, image: torch.Tensor, upscale_method: str, width: int, height: int, crop: str
) -> tuple[torch.Tensor]:
    if width == 0 and height == 0:
        return (image,)
    if width == 0:
        width = max(1, round(image.shape[2] * height / image.shape[1]))
    elif height == 0:
        height = max(1, round(image.shape[1] * width / image.shape[2]))
    return (scale_image(image, width, height, upscale_method, crop),)


def image_scale_by(
    ctx: NodeContext, image: torch.Tensor, upscale_method: str, scale_by: float
) -> tuple[torch.Tensor]:
    width = round(image.shape[2] * scale_by)
    height = round(image.shape[1] * scale_by)
    return (scale_image(image, width, height, upscale_method, "disabled"),)


def image_invert(ctx: NodeContext, image: torch.Tensor) -> tuple[torch.Tensor]:
    return (1.0 - image,)


def image_batch(ctx: NodeContext, image1: torch.Tensor, image2: torch.Tensor) -> tuple[torch.Tensor]:
    # An RGB image batched with an RGBA one gets an opaque alpha channel (ComfyUI pads with 1.0).
    if image1.shape[-1] < image2.shape[-1]:
        image1 = F.pad(image1, (0, 1), value=1.0)
    elif image1.shape[-1] > image2.shape[-1]:
        image2 = F.pad(image2, (0, 1), value=1.0)
    if image1.shape[1:] != image2.shape[1:]:
        image2 = scale_image(image2, image1.shape[2], image1.shape[1], "bilinear", "center")
    return (torch.cat((image1, image2), dim=0),)


def image_crop(
    ctx: NodeContext, image: torch.Tensor, width: int, height: int, x: int, y: int
) -> tuple[torch.Tensor]:
    x = min(x, image.shape[2] - 1)
    y = min(y, image.shape[1] - 1)
    return (image[:, y : y + height, x : x + width, :],)


def image_pad_for_outpaint(
    ctx: NodeContext, image: torch.Tensor, left: int, top: int, right: int, bottom: int, feathering: int
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, height, width, channels = image.shape
    padded = torch.full(
        (batch, height + top + bottom, width + left + right, channels), 0.5, dtype=torch.float32
    )
    padded[:, top : top + height, left : left + width, :] = image
    mask = torch.ones((height + top + bottom, width + left + right), dtype=torch.float32)
    inner = torch.zeros((height, width), dtype=torch.float32)
    if feathering > 0 and feathering * 2 < height and feathering * 2 < width:
        # Distance of each pixel to the nearest padded edge; unpadded sides never count. Computed
        # in float64 and rounded once to float32, as ComfyUI's per-pixel Python arithmetic is.
        rows = torch.arange(height, dtype=torch.float64).unsqueeze(1)
        cols = torch.arange(width, dtype=torch.float64).unsqueeze(0)
        far_rows = torch.full_like(rows, float(height))
        far_cols = torch.full_like(cols, float(width))
        distance = torch.minimum(
            torch.minimum(rows if top else far_rows, (height - rows) if bottom else far_rows),
            torch.minimum(cols if left else far_cols, (width - cols) if right else far_cols),
        )
        ramp = (feathering - distance) / feathering
        inner = torch.where(distance < feathering, ramp * ramp, 0.0).to(torch.float32)
    mask[top : top + height, left : left + width] = inner
    return padded, mask.unsqueeze(0)


def match_channels(destination: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's alpha fix for [..., C] images: drop the source's extra channels, or give an RGB
    source an opaque alpha channel when the destination has one."""
    if destination.shape[-1] < source.shape[-1]:
        source = source[..., : destination.shape[-1]]
    elif destination.shape[-1] > source.shape[-1]:
        source = F.pad(source, (0, 1), value=1.0)
    return destination, source


def image_composite_masked(
    ctx: NodeContext,
    destination: torch.Tensor,
    source: torch.Tensor,
    x: int,
    y: int,
    resize_source: bool,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor]:
    destination, source = match_channels(destination, source)
    result = composite(destination.movedim(-1, 1), source.movedim(-1, 1), x, y, mask, 1, resize_source)
    return (result.movedim(1, -1),)
