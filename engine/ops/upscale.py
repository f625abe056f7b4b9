"""Upscale-model nodes: load an ESRGAN file as an UPSCALE_MODEL handle, upscale IMAGEs with it tile by tile.

ComfyUI's semantics (``comfy_extras/nodes_upscale_model.py``): 512-pixel tiles overlapping by 32,
blended with feathered masks (``engine.models.vae.tiled_scale``, ComfyUI's ``tiled_scale``), the tile
halved after a CUDA out-of-memory error until it would drop below 128, output clamped to 0..1, and an
alpha channel upscaled bilinearly beside the model's RGB.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from engine.context import NodeContext
from engine.errors import ModelError
from engine.models.esrgan import UpscaleModelHandle
from engine.models.vae import count_tiles, tiled_scale
from engine.ops.models import manager_of
from engine.ops.resample import upscale

log = logging.getLogger(__name__)

TILE = 512
OVERLAP = 32
MIN_TILE = 128


def upscale_model_fingerprint(ctx: NodeContext, model_name: str, **_: Any) -> str:
    return manager_of(ctx).fingerprint("upscale_models", model_name)


def upscale_model_loader(ctx: NodeContext, model_name: str) -> tuple[UpscaleModelHandle]:
    manager = manager_of(ctx)
    return (manager.load_upscale_model(manager.resolve("upscale_models", model_name)),)


@torch.no_grad()
def upscale_tiled(
    model: Callable[[torch.Tensor], torch.Tensor],
    pixels: torch.Tensor,
    scale: int,
    *,
    out_channels: int = 3,
    tile: int = TILE,
    overlap: int = OVERLAP,
    min_tile: int = MIN_TILE,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """``model`` applied to ``pixels`` [B, C, H, W] in overlapping square tiles, one image at a time.

    Returns [B, out_channels, H*scale, W*scale] float32 on the CPU (not clamped). ``progress(done,
    total)`` is called after every tile (total = images x tiles); it may raise to stop. On a CUDA
    out-of-memory error the tile is halved and the work starts again, until it would be below
    ``min_tile``, when the error is raised.
    """
    height, width = pixels.shape[-2:]
    while True:
        total = pixels.shape[0] * count_tiles(height, width, (tile, tile), overlap)
        done = 0

        def step(count: int, total: int = total) -> None:
            nonlocal done
            done += count
            if progress is not None:
                progress(done, total)

        try:
            images = [
                tiled_scale(pixels[i : i + 1], model, (tile, tile), overlap, scale, out_channels, "cpu", step)
                for i in range(pixels.shape[0])
            ]
            return torch.cat(images)
        except torch.cuda.OutOfMemoryError:
            if tile // 2 < min_tile:
                raise
        tile //= 2  # outside the except block: the failed attempt's tensors are freed by now
        log.warning("Out of memory while upscaling: retrying with %d-pixel tiles", tile)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def image_upscale_with_model(
    ctx: NodeContext, upscale_model: UpscaleModelHandle, image: torch.Tensor
) -> tuple[torch.Tensor]:
    """IMAGE [B, H, W, C] -> [B, H*s, W*s, C] float32 in 0..1; a fourth (alpha) channel is resized
    bilinearly instead of going through the model."""
    alpha = None
    if image.shape[-1] == 4:
        image, alpha = image[..., :3], image[..., 3:4]
    channels = upscale_model.config.in_channels
    if image.shape[-1] != channels:
        raise ModelError(f"the upscale model takes {channels}-channel images, got {image.shape[-1]} channels")
    with manager_of(ctx).use(upscale_model) as net:
        out = upscale_tiled(
            lambda tile: net(tile.to(net.device)),
            image.movedim(-1, 1),
            net.scale,
            out_channels=net.config.out_channels,
            progress=ctx.progress,
        )
    out = out.clamp(0.0, 1.0).movedim(1, -1)
    if alpha is not None:
        resized = upscale(alpha.movedim(-1, 1).float(), out.shape[2], out.shape[1], "bilinear")
        out = torch.cat((out, resized.movedim(1, -1)), dim=-1)
    return (out,)
