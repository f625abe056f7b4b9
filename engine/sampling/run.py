"""Running a sampler over a latent the way ComfyUI's KSAMPLER does.

The caller (a KSampler node) brings the guided denoiser, the schedule and the initial noise; this
adds ComfyUI's framing around the sampler function:

1. nothing to do for an empty schedule (the latent comes back unchanged);
2. with a noise mask, the denoiser is wrapped so the masked-off area stays the input latent;
3. the start latent is ``noise * sigmas[0] + latent`` (``noise * sqrt(1 + sigma^2) + latent`` when
   the schedule starts at the model's top sigma: txt2img);
4. the sampler runs with ``extra_args={"seed": seed}`` (seeding its step noise);
5. the model's inverse noise scaling (the identity for eps / v models) is applied.

Latent format scaling is the caller's job, as in ComfyUI: ``process_latent_in`` on the input latent
(only when it is not all zeros) before, ``process_latent_out`` on the result after; with an empty
schedule ComfyUI hands back the caller's latent untouched, without either.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from engine.sampling.common import DenoiserFn, StepCallback, denoise_with_uncond
from engine.sampling.guidance import InpaintDenoiser, prepare_denoise_mask
from engine.sampling.model_sampling import ModelSampling
from engine.sampling.noise import inpaint_noise
from engine.sampling.samplers import INPAINT_RANDOM_NOISE_SAMPLERS, SamplerFn, get_sampler


class _WithModelSampling:
    """Expose a schedule to the samplers on a denoiser that does not carry one."""

    def __init__(self, model: DenoiserFn, model_sampling: ModelSampling) -> None:
        self.model = model
        self.model_sampling = model_sampling

    def __call__(self, x: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        return self.model(x, sigma, **kwargs)

    def denoise_with_uncond(self, x: Tensor, sigma: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        return denoise_with_uncond(self.model, x, sigma, kwargs)


def run_sampler(
    sampler: str | SamplerFn,
    model: DenoiserFn,
    model_sampling: ModelSampling,
    noise: Tensor,
    latent_image: Tensor,
    sigmas: Tensor,
    *,
    seed: int | None,
    denoise_mask: Tensor | None = None,
    callback: StepCallback | None = None,
    options: Mapping[str, Any] | None = None,
) -> Tensor:
    """Sample from ``noise`` around ``latent_image`` along ``sigmas``; returns the final latent.

    ``sampler`` is a ComfyUI sampler_name or a sampler function; ``options`` are its keyword options
    (eta, s_noise, ...). ``denoise_mask`` is a LATENT's noise_mask, any resolution. Everything runs
    on ``noise``'s device: put it on the model's (ComfyUI draws the initial noise on CPU, then moves
    it), since ancestral step noise comes from a generator on that device.
    """
    if sigmas.shape[-1] == 0:
        return latent_image
    fn = get_sampler(sampler) if isinstance(sampler, str) else sampler
    device = noise.device
    noise = noise.to(dtype=torch.float32)
    latent_image = latent_image.to(device=device, dtype=torch.float32)
    sigmas = sigmas.to(device)

    denoiser: DenoiserFn = model
    if getattr(model, "model_sampling", None) is not model_sampling:
        denoiser = _WithModelSampling(model, model_sampling)
    if denoise_mask is not None:
        mask = prepare_denoise_mask(denoise_mask.to(device), latent_image.shape)
        blend_noise = noise
        if isinstance(sampler, str) and sampler in INPAINT_RANDOM_NOISE_SAMPLERS:
            blend_noise = inpaint_noise(seed, noise.shape, noise.dtype, device)
        denoiser = InpaintDenoiser(denoiser, model_sampling, latent_image, blend_noise, mask)

    x = model_sampling.noise_scaling(sigmas[0], noise, latent_image, model_sampling.is_max_denoise(sigmas))
    samples = fn(denoiser, x, sigmas, extra_args={"seed": seed}, callback=callback, **dict(options or {}))
    return model_sampling.inverse_noise_scaling(sigmas[-1], samples)
