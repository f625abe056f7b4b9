"""Mask nodes. Masks are float [B,H,W] in 0..1."""

from __future__ import annotations

import torch

from engine.context import NodeContext

CHANNELS = ("red", "green", "blue", "alpha")


def solid_mask(ctx: NodeContext, value: float, width: int, height: int) -> tuple[torch.Tensor]:
    return (torch.full((1, height, width), value, dtype=torch.float32),)


def invert_mask(ctx: NodeContext, mask: torch.Tensor) -> tuple[torch.Tensor]:
    return (1.0 - mask,)


def mask_to_image(ctx: NodeContext, mask: torch.Tensor) -> tuple[torch.Tensor]:
    image = mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])).movedim(1, -1).expand(-1, -1, -1, 3)
    return (image,)


def image_to_mask(ctx: NodeContext, image: torch.Tensor, channel: str) -> tuple[torch.Tensor]:
    index = CHANNELS.index(channel)
    if index >= image.shape[-1]:
        raise ValueError(f"Image has {image.shape[-1]} channels; it has no {channel} channel")
    return (image[:, :, :, index],)
