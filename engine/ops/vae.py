"""VAE nodes: images [B,H,W,C] in 0..1 <-> LATENT dicts of raw VAE latents (ComfyUI's semantics)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from engine.context import NodeContext
from engine.models.handles import VAEHandle
from engine.ops.models import manager_of, require_vae

Latent = dict[str, Any]


def vae_decode(ctx: NodeContext, samples: Latent, vae: VAEHandle) -> tuple[torch.Tensor]:
    vae = require_vae(vae)
    with manager_of(ctx).use(vae) as model:
        return (model.decode(samples["samples"]),)


def vae_encode(ctx: NodeContext, pixels: torch.Tensor, vae: VAEHandle) -> tuple[Latent]:
    """Extra channels are dropped and sides centre-cropped to multiples of 8 (ComfyUI's VAE.encode)."""
    vae = require_vae(vae)
    with manager_of(ctx).use(vae) as model:
        return ({"samples": model.encode(pixels[:, :, :, :3])},)


def _progress(ctx: NodeContext) -> Any:
    return lambda done, total: ctx.progress(done, total)


def vae_decode_tiled(
    ctx: NodeContext,
    samples: Latent,
    vae: VAEHandle,
    tile_size: int,
    overlap: int = 64,
    temporal_size: int = 64,
    temporal_overlap: int = 8,
) -> tuple[torch.Tensor]:
    """Tiles of ``tile_size`` pixels with ``overlap`` (at most a quarter tile), three tilings
    averaged. ``temporal_*`` only matter for video VAEs."""
    vae = require_vae(vae)
    if tile_size < overlap * 4:
        overlap = tile_size // 4
    with manager_of(ctx).use(vae) as model:
        ratio = model.downscale_ratio
        images = model.decode_tiled(
            samples["samples"],
            tile_x=tile_size // ratio,
            tile_y=tile_size // ratio,
            overlap=overlap // ratio,
            progress=_progress(ctx),
        )
    return (images,)


def vae_encode_tiled(
    ctx: NodeContext,
    pixels: torch.Tensor,
    vae: VAEHandle,
    tile_size: int,
    overlap: int = 64,
    temporal_size: int = 64,
    temporal_overlap: int = 8,
) -> tuple[Latent]:
    vae = require_vae(vae)
    with manager_of(ctx).use(vae) as model:
        latent = model.encode_tiled(
            pixels[:, :, :, :3], tile_x=tile_size, tile_y=tile_size, overlap=overlap, progress=_progress(ctx)
        )
    return ({"samples": latent},)


def _crop_with_mask(
    pixels: torch.Tensor, mask: torch.Tensor, ratio: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(original pixels, pixels and [B,1,H,W] mask centre-cropped to multiples of ``ratio``)."""
    x = (pixels.shape[1] // ratio) * ratio
    y = (pixels.shape[2] // ratio) * ratio
    mask = F.interpolate(
        mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])).to(torch.float32),
        size=(pixels.shape[1], pixels.shape[2]),
        mode="bilinear",
    )
    original = pixels
    pixels = pixels.clone()
    if pixels.shape[1] != x or pixels.shape[2] != y:
        x_offset = (pixels.shape[1] % ratio) // 2
        y_offset = (pixels.shape[2] % ratio) // 2
        pixels = pixels[:, x_offset : x + x_offset, y_offset : y + y_offset, :]
        mask = mask[:, :, x_offset : x + x_offset, y_offset : y + y_offset]
    return original, pixels, mask


def _grey_out(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked pixels (mask rounds to 1) set to 0.5 grey, in place on the RGB channels."""
    keep = (1.0 - mask.round()).squeeze(1)
    for channel in range(3):
        pixels[:, :, :, channel] -= 0.5
        pixels[:, :, :, channel] *= keep
        pixels[:, :, :, channel] += 0.5
    return pixels


def vae_encode_for_inpaint(
    ctx: NodeContext, pixels: torch.Tensor, vae: VAEHandle, mask: torch.Tensor, grow_mask_by: int = 6
) -> tuple[Latent]:
    """Grey out the masked pixels (0.5), encode, and set ``noise_mask`` to the mask grown by
    ``grow_mask_by`` pixels (rounded to 0/1), all cropped to multiples of 8 like the pixels."""
    vae = require_vae(vae)
    _, pixels, mask = _crop_with_mask(pixels, mask, vae.downscale_ratio)
    x, y = pixels.shape[1], pixels.shape[2]

    # Grow the mask a little to keep the seam smooth in latent space.
    if grow_mask_by == 0:
        mask_erosion = mask
    else:
        kernel = torch.ones((1, 1, grow_mask_by, grow_mask_by))
        padding = math.ceil((grow_mask_by - 1) / 2)
        mask_erosion = torch.clamp(F.conv2d(mask.round(), kernel, padding=padding), 0, 1)

    _grey_out(pixels, mask)
    with manager_of(ctx).use(vae) as model:
        latent = model.encode(pixels)
    return ({"samples": latent, "noise_mask": mask_erosion[:, :, :x, :y].round()},)


def _set_values(conditioning: list[list[Any]], values: dict[str, Any]) -> list[list[Any]]:
    return [[item[0], {**item[1], **values}] for item in conditioning]


def inpaint_model_conditioning(
    ctx: NodeContext,
    positive: list[list[Any]],
    negative: list[list[Any]],
    vae: VAEHandle,
    pixels: torch.Tensor,
    mask: torch.Tensor,
    noise_mask: bool = True,
) -> tuple[list[list[Any]], list[list[Any]], Latent]:
    """ComfyUI's InpaintModelConditioning: the latent of the whole image (optionally with the mask as
    its noise mask) and, on both conditionings, the masked-out image's latent and the mask, which an
    inpainting UNet takes as extra input channels (other UNets ignore them)."""
    vae = require_vae(vae)
    original, pixels, mask = _crop_with_mask(pixels, mask, vae.downscale_ratio)
    _grey_out(pixels, mask)
    with manager_of(ctx).use(vae) as model:
        concat_latent = model.encode(pixels[:, :, :, :3])
        original_latent = model.encode(original[:, :, :, :3])
    latent: Latent = {"samples": original_latent}
    if noise_mask:
        latent["noise_mask"] = mask
    values = {"concat_latent_image": concat_latent, "concat_mask": mask}
    return _set_values(positive, values), _set_values(negative, values), latent
