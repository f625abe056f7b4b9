"""Latent nodes. A LATENT is a dict; nodes copy it and replace what they change, as ComfyUI does."""

from __future__ import annotations

import math
from typing import Any

import torch

from engine.context import NodeContext
from engine.ops.resample import composite, upscale

Latent = dict[str, Any]


def _repeat_masks(masks: torch.Tensor, batch: int) -> torch.Tensor:
    if masks.shape[0] < batch:
        masks = masks.repeat(math.ceil(batch / masks.shape[0]), 1, 1, 1)[:batch]
    return masks


def empty_latent_image(ctx: NodeContext, width: int, height: int, batch_size: int) -> tuple[Latent]:
    return ({"samples": torch.zeros([batch_size, 4, height // 8, width // 8])},)


def latent_upscale(
    ctx: NodeContext, samples: Latent, upscale_method: str, width: int, height: int, crop: str
) -> tuple[Latent]:
    if width == 0 and height == 0:
        return (samples,)
    latent = samples["samples"]
    if width == 0:
        height = max(64, height)
        width = max(64, round(latent.shape[-1] * height / latent.shape[-2]))
    elif height == 0:
        width = max(64, width)
        height = max(64, round(latent.shape[-2] * width / latent.shape[-1]))
    else:
        width, height = max(64, width), max(64, height)
    return ({**samples, "samples": upscale(latent, width // 8, height // 8, upscale_method, crop)},)


def latent_upscale_by(
    ctx: NodeContext, samples: Latent, upscale_method: str, scale_by: float
) -> tuple[Latent]:
    latent = samples["samples"]
    width = round(latent.shape[-1] * scale_by)
    height = round(latent.shape[-2] * scale_by)
    return ({**samples, "samples": upscale(latent, width, height, upscale_method, "disabled")},)


def latent_from_batch(ctx: NodeContext, samples: Latent, batch_index: int, length: int) -> tuple[Latent]:
    latent = samples["samples"]
    batch_index = min(latent.shape[0] - 1, batch_index)
    length = min(latent.shape[0] - batch_index, length)
    out: Latent = {**samples, "samples": latent[batch_index : batch_index + length].clone()}
    if "noise_mask" in samples:
        masks = samples["noise_mask"]
        if masks.shape[0] == 1:
            out["noise_mask"] = masks.clone()
        else:
            out["noise_mask"] = _repeat_masks(masks, latent.shape[0])[
                batch_index : batch_index + length
            ].clone()
    if "batch_index" in samples:
        out["batch_index"] = samples["batch_index"][batch_index : batch_index + length]
    else:
        out["batch_index"] = list(range(batch_index, batch_index + length))
    return (out,)


def repeat_latent_batch(ctx: NodeContext, samples: Latent, amount: int) -> tuple[Latent]:
    latent = samples["samples"]
    out: Latent = {**samples, "samples": latent.repeat((amount, 1, 1, 1))}
    if "noise_mask" in samples and samples["noise_mask"].shape[0] > 1:
        masks = _repeat_masks(samples["noise_mask"], latent.shape[0])
        out["noise_mask"] = masks.repeat((amount, 1, 1, 1))
    if "batch_index" in samples:
        indices = samples["batch_index"]
        offset = max(indices) - min(indices) + 1
        out["batch_index"] = indices + [x + i * offset for i in range(1, amount) for x in indices]
    return (out,)


def latent_composite(
    ctx: NodeContext, samples_to: Latent, samples_from: Latent, x: int, y: int, feather: int
) -> tuple[Latent]:
    x, y, feather = x // 8, y // 8, feather // 8
    target = samples_to["samples"]
    result = target.clone()
    source = samples_from["samples"][:, :, : target.shape[2] - y, : target.shape[3] - x]
    region = (slice(None), slice(None), slice(y, y + source.shape[2]), slice(x, x + source.shape[3]))
    if feather == 0:
        result[region] = source
    else:
        mask = torch.ones_like(source)
        for t in range(feather):
            weight = (1.0 / feather) * (t + 1)
            if y != 0:
                mask[:, :, t : 1 + t, :] *= weight
            if y + source.shape[2] < target.shape[2]:
                mask[:, :, mask.shape[2] - 1 - t : mask.shape[2] - t, :] *= weight
            if x != 0:
                mask[:, :, :, t : 1 + t] *= weight
            if x + source.shape[3] < target.shape[3]:
                mask[:, :, :, mask.shape[3] - 1 - t : mask.shape[3] - t] *= weight
        result[region] = source * mask + result[region] * (torch.ones_like(mask) - mask)
    return ({**samples_to, "samples": result},)


def latent_composite_masked(
    ctx: NodeContext,
    destination: Latent,
    source: Latent,
    x: int,
    y: int,
    resize_source: bool,
    mask: torch.Tensor | None = None,
) -> tuple[Latent]:
    result = composite(destination["samples"], source["samples"], x, y, mask, 8, resize_source)
    return ({**destination, "samples": result},)


def latent_blend(ctx: NodeContext, samples1: Latent, samples2: Latent, blend_factor: float) -> tuple[Latent]:
    first, second = samples1["samples"], samples2["samples"]
    if first.shape != second.shape:
        second = upscale(second, first.shape[3], first.shape[2], "bicubic", "center")
    return ({**samples1, "samples": first * blend_factor + second * (1 - blend_factor)},)


def set_latent_noise_mask(ctx: NodeContext, samples: Latent, mask: torch.Tensor) -> tuple[Latent]:
    return ({**samples, "noise_mask": mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1]))},)
