"""Tensor resizing and compositing shared by image, mask and latent nodes (ComfyUI's semantics)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def center_crop_to_aspect(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Crop [B,C,H,W] symmetrically to the aspect ratio of ``width`` x ``height``."""
    old_height, old_width = samples.shape[-2], samples.shape[-1]
    old_aspect = old_width / old_height
    new_aspect = width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_width - old_width * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_height - old_height * (old_aspect / new_aspect)) / 2)
    return samples.narrow(-2, y, old_height - y * 2).narrow(-1, x, old_width - x * 2)


def lanczos(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Lanczos through PIL on 8-bit images, as ComfyUI does. ``samples`` is [B,C,H,W]."""
    resized = []
    for image in samples:
        pixels = np.clip(255.0 * image.movedim(0, -1).float().cpu().numpy(), 0, 255).astype(np.uint8)
        if pixels.shape[-1] == 1:
            pixels = pixels[..., 0]
        out = Image.fromarray(pixels).resize((width, height), resample=Image.Resampling.LANCZOS)
        array = torch.from_numpy(np.array(out).astype(np.float32) / 255.0)
        if array.ndim == 2:
            array = array.unsqueeze(-1)
        resized.append(array.movedim(-1, 0))
    return torch.stack(resized).to(samples.device, samples.dtype)


def _slerp(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of rows of ``a`` and ``b`` ([N,C]) by ``ratio`` ([N,1]); the norm is
    interpolated linearly. Equal directions keep ``a``; opposite ones fall back to lerp."""
    channels = a.shape[-1]
    a_norm = torch.norm(a, dim=-1, keepdim=True)
    b_norm = torch.norm(b, dim=-1, keepdim=True)
    a_unit = torch.where(a_norm == 0, torch.zeros_like(a), a / a_norm)
    b_unit = torch.where(b_norm == 0, torch.zeros_like(b), b / b_norm)
    dot = (a_unit * b_unit).sum(1)
    omega = torch.acos(dot)
    sin_omega = torch.sin(omega)
    r = ratio.squeeze(1)
    result = (torch.sin((1.0 - r) * omega) / sin_omega).unsqueeze(1) * a_unit + (
        torch.sin(r * omega) / sin_omega
    ).unsqueeze(1) * b_unit
    result = result * (a_norm * (1.0 - ratio) + b_norm * ratio).expand(-1, channels)
    same = dot > 1 - 1e-5
    opposite = dot < 1e-5 - 1
    result[same] = a[same]
    result[opposite] = (a * (1.0 - ratio) + b * ratio)[opposite]
    return result


def _bilinear_sources(
    old: int, new: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each of ``new`` positions: the two source indices and the weight of the second, placed
    as bilinear interpolation (half-pixel centres) places them."""
    positions = torch.arange(old, dtype=torch.float32, device=device).reshape(1, 1, 1, -1)
    positions = F.interpolate(positions, size=(1, new), mode="bilinear")
    ratios = positions - positions.floor()
    first = positions.to(torch.int64)
    following = torch.arange(old, dtype=torch.float32, device=device).reshape(1, 1, 1, -1) + 1
    following[:, :, :, -1] -= 1
    second = F.interpolate(following, size=(1, new), mode="bilinear").to(torch.int64)
    return ratios, first, second


def bislerp(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """ComfyUI's "bislerp" latent resize: bilinear placement, spherical interpolation of the channel
    vectors (first along width, then along height)."""
    dtype = samples.dtype
    x = samples.float()
    n, c, h, w = x.shape
    ratios, first, second = _bilinear_sources(w, width, x.device)
    rows_a = x.gather(-1, first.expand(n, c, h, -1)).movedim(1, -1).reshape(-1, c)
    rows_b = x.gather(-1, second.expand(n, c, h, -1)).movedim(1, -1).reshape(-1, c)
    weight = ratios.expand(n, 1, h, -1).movedim(1, -1).reshape(-1, 1)
    x = _slerp(rows_a, rows_b, weight).reshape(n, h, width, c).movedim(-1, 1)
    ratios, first, second = _bilinear_sources(h, height, x.device)
    first = first.reshape(1, 1, -1, 1).expand(n, c, -1, width)
    second = second.reshape(1, 1, -1, 1).expand(n, c, -1, width)
    weight = ratios.reshape(1, 1, -1, 1).expand(n, 1, -1, width).movedim(1, -1).reshape(-1, 1)
    rows_a = x.gather(-2, first).movedim(1, -1).reshape(-1, c)
    rows_b = x.gather(-2, second).movedim(1, -1).reshape(-1, c)
    x = _slerp(rows_a, rows_b, weight).reshape(n, height, width, c).movedim(-1, 1)
    return x.to(dtype)


def upscale(
    samples: torch.Tensor, width: int, height: int, method: str, crop: str = "disabled"
) -> torch.Tensor:
    """Resize [B,C,H,W] to ``height`` x ``width`` (ComfyUI's ``common_upscale``)."""
    if crop == "center":
        samples = center_crop_to_aspect(samples, width, height)
    if method == "bislerp":
        return bislerp(samples, width, height)
    if method == "lanczos":
        return lanczos(samples, width, height)
    return F.interpolate(samples, size=(height, width), mode=method)


def repeat_to_batch_size(tensor: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Trim or tile along dim 0 to exactly ``batch_size`` items."""
    if tensor.shape[0] > batch_size:
        return tensor[:batch_size]
    if tensor.shape[0] < batch_size:
        repeats = math.ceil(batch_size / tensor.shape[0])
        return tensor.repeat([repeats] + [1] * (tensor.ndim - 1))[:batch_size]
    return tensor


def composite(
    destination: torch.Tensor,
    source: torch.Tensor,
    x: int,
    y: int,
    mask: torch.Tensor | None = None,
    multiplier: int = 1,
    resize_source: bool = False,
) -> torch.Tensor:
    """Paste ``source`` onto ``destination`` (both [B,C,H,W]) at (x, y) / multiplier through ``mask``.

    Returns a new tensor. ``multiplier`` is 8 for latents, whose offsets are given in pixels.
    """
    destination = destination.clone()
    source = source.to(destination.device, destination.dtype)
    if resize_source:
        source = F.interpolate(source, size=destination.shape[2:], mode="bilinear")
    source = repeat_to_batch_size(source, destination.shape[0])
    left, top = x // multiplier, y // multiplier
    if left >= destination.shape[3] or top >= destination.shape[2]:
        return destination
    visible_width = min(source.shape[3], destination.shape[3] - left)
    visible_height = min(source.shape[2], destination.shape[2] - top)
    if mask is None:
        weight = torch.ones_like(source)
    else:
        weight = mask.to(destination.device, destination.dtype).reshape(
            (-1, 1, mask.shape[-2], mask.shape[-1])
        )
        weight = F.interpolate(weight, size=source.shape[2:], mode="bilinear")
        weight = repeat_to_batch_size(weight, source.shape[0])
    weight = weight[:, :, :visible_height, :visible_width]
    region = destination[:, :, top : top + visible_height, left : left + visible_width]
    patch = source[:, :, :visible_height, :visible_width]
    destination[:, :, top : top + visible_height, left : left + visible_width] = (
        weight * patch + (1 - weight) * region
    )
    return destination
