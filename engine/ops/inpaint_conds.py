"""The extra input channels of inpainting UNets (SD1.5/SD2 "inpainting" checkpoints: ``in_channels``
9 = 4 latent + 1 mask + 4 masked-image latent), built as ComfyUI's ``BaseModel.concat_cond`` builds
them. Ordinary UNets get no extra inputs."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from engine.errors import ModelError
from engine.models.handles import ModelHandle
from engine.models.latent_format import LatentFormat
from engine.ops.resample import upscale
from engine.sampling.guidance import ExtraCondsFn, prepare_denoise_mask, repeat_to_batch_size

# The SD latent of a mid-grey image: the "masked image" an inpainting UNet sees without one.
_BLANK_INPAINT_LATENT = (0.8223, -0.6876, 0.6364, 0.1380)


def _blank_inpaint_image_like(noise: Tensor) -> Tensor:
    values = torch.tensor(_BLANK_INPAINT_LATENT, dtype=noise.dtype, device=noise.device)
    return values.reshape(1, -1, 1, 1).expand(noise.shape[0], -1, *noise.shape[2:]).clone()


def _fit(t: Tensor, like: Tensor) -> Tensor:
    if t.shape[-2:] != like.shape[-2:]:
        t = upscale(t, like.shape[-1], like.shape[-2], "bilinear", "center")
    return repeat_to_batch_size(t, like.shape[0])


def inpaint_concat(
    options: Mapping[str, Any],
    noise: Tensor,
    *,
    latent_format: LatentFormat,
    latent_image: Tensor,
    denoise_mask: Tensor | None,
) -> dict[str, Tensor]:
    """``{"c_concat": [B, 5, h, w]}``: mask, then masked-image latent (sampler space).

    InpaintModelConditioning puts ``concat_mask`` and ``concat_latent_image`` in the conditioning;
    without them the latent's noise mask and the input latent stand in; without a mask either, the
    model sees "regenerate everything" (ones and a grey image).
    """
    mask = options.get("concat_mask", denoise_mask)
    image = options.get("concat_latent_image")
    if image is None:
        image = latent_image
    else:
        image = latent_format.process_in(image.to(device=noise.device, dtype=torch.float32))
    if mask is None:
        parts = [torch.ones_like(noise)[:, :1], _blank_inpaint_image_like(noise)]
    else:
        mask = mask.to(device=noise.device, dtype=torch.float32)
        if mask.ndim == noise.ndim:
            mask = mask[:, :1]
        mask = mask.reshape((-1, 1, *mask.shape[-2:]))
        parts = [_fit(mask, noise).round(), _fit(image.to(noise.device), noise)]
    return {"c_concat": torch.cat(parts, dim=1)}


def _no_extra(options: Mapping[str, Any], noise: Tensor) -> dict[str, Tensor]:
    return {}


def extra_conds_for(model: ModelHandle, latent_image: Tensor, noise_mask: Tensor | None) -> ExtraCondsFn:
    """The guidance ``extra_conds`` function for ``model``: inpainting UNets take concat channels
    (from ``latent_image``, the sampler-space input latent, and the LATENT's ``noise_mask``, prepared
    here only for them); SD1.x/SD2.x UNets take nothing besides the context (not even
    ``pooled_output``)."""
    extra_channels = model.config.in_channels - model.config.out_channels
    if extra_channels <= 0:
        return _no_extra
    if extra_channels != 1 + model.latent_format.latent_channels:
        raise ModelError(
            f"unsupported UNet: {model.config.in_channels} input channels for "
            f"{model.config.out_channels} output channels (inpainting UNets have 2 x latent + 1)"
        )
    denoise_mask = None
    if noise_mask is not None:
        denoise_mask = prepare_denoise_mask(noise_mask.to(latent_image.device), latent_image.shape)
    return functools.partial(
        inpaint_concat,
        latent_format=model.latent_format,
        latent_image=latent_image,
        denoise_mask=denoise_mask,
    )
