"""The sampler nodes: KSampler, KSamplerAdvanced, SamplerCustom, SamplerCustomAdvanced, the
model-bound schedulers and the guiders.

They all end in ``sample_with_guider``: borrow the UNet from the model manager, build the guided
denoiser (CFG over the CONDITIONING lists), scale the latent into the model's space, run the
sampler with ComfyUI's framing (``engine.sampling.run.run_sampler``), scale back. The initial
noise is drawn on the CPU from the seed, as ComfyUI draws it, so a seed gives ComfyUI's image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from engine.context import NodeContext
from engine.errors import ModelError
from engine.models.handles import ModelHandle
from engine.ops.custom_sampling import DisabledNoise, RandomNoiseSource, SamplerChoice
from engine.ops.inpaint_conds import extra_conds_for
from engine.ops.models import manager_of
from engine.ops.step_progress import StepReporter
from engine.sampling.guidance import CFGGuider, Conditioning
from engine.sampling.model_sampling import Denoiser
from engine.sampling.run import run_sampler
from engine.sampling.schedulers import (
    basic_scheduler_sigmas,
    ksampler_sigmas,
    sd_turbo_sigmas,
    slice_sigmas,
)

Latent = dict[str, Any]


class NoiseSource(Protocol):
    """A NOISE value (RandomNoise / DisableNoise): the initial noise for a latent."""

    seed: int

    def generate(self, latent: Latent) -> Tensor: ...


@dataclass(frozen=True, eq=False)
class Guider:
    """A GUIDER: the model and the conditioning lists it is guided by (negative None: BasicGuider)."""

    model: ModelHandle
    positive: Conditioning
    negative: Conditioning | None
    cfg: float = 1.0


def _require_model(model: ModelHandle | None) -> ModelHandle:
    if not isinstance(model, ModelHandle):
        raise ModelError(f"model input is invalid: {model!r}")
    return model


def sample_with_guider(
    ctx: NodeContext,
    guider: Guider,
    sampler: SamplerChoice,
    sigmas: Tensor,
    noise: Tensor,
    latent: Latent,
    seed: int | None,
) -> tuple[Tensor, Tensor | None]:
    """(samples, last denoised estimate or None), both raw VAE latents on the CPU.

    An empty schedule hands back the input latent untouched (ComfyUI's behaviour).
    """
    latent_image = latent["samples"]
    if sigmas.shape[-1] == 0:
        return latent_image, None
    model = _require_model(guider.model)
    latent_format = model.latent_format
    reporter = StepReporter(ctx, int(sigmas.shape[-1]) - 1, latent_format)
    noise_mask = latent.get("noise_mask")
    with manager_of(ctx).use(model) as net:
        device = net.device
        x = latent_image.to(device=device, dtype=torch.float32)
        # ComfyUI scales the input latent only when it holds something (txt2img starts from zeros).
        if torch.count_nonzero(x) > 0:
            x = latent_format.process_in(x)
        denoiser = Denoiser(net, model.model_sampling, dtype=net.dtype)
        guided = CFGGuider(
            denoiser,
            guider.positive,
            guider.negative,
            guider.cfg,
            model.model_sampling,
            extra_conds=extra_conds_for(model, x, noise_mask),
        )
        samples = run_sampler(
            sampler.name,
            guided,
            model.model_sampling,
            noise.to(device),
            x,
            sigmas,
            seed=seed,
            denoise_mask=noise_mask,
            callback=reporter,
            options=sampler.options,
        )
        out = latent_format.process_out(samples.to(torch.float32)).cpu()
        x0 = None if reporter.x0 is None else latent_format.process_out(reporter.x0.float()).cpu()
    return out, x0


def _with_samples(latent: Latent, samples: Tensor) -> Latent:
    out = dict(latent)
    out["samples"] = samples
    return out


def ksampler(
    ctx: NodeContext,
    model: ModelHandle,
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    positive: Conditioning,
    negative: Conditioning,
    latent_image: Latent,
    denoise: float = 1.0,
    *,
    disable_noise: bool = False,
    start_step: int | None = None,
    last_step: int | None = None,
    force_full_denoise: bool = False,
) -> tuple[Latent]:
    """KSampler, and ComfyUI's common_ksampler behind KSamplerAdvanced (the keyword-only window):
    schedule from steps/denoise, the step window, noise, sample."""
    model = _require_model(model)
    sigmas = ksampler_sigmas(model.model_sampling, scheduler, steps, denoise, sampler_name)
    sigmas = slice_sigmas(sigmas, start_step, last_step, force_full_denoise)
    noise_source: NoiseSource = DisabledNoise() if disable_noise else RandomNoiseSource(seed)
    samples, _ = sample_with_guider(
        ctx,
        Guider(model, positive, negative, cfg),
        SamplerChoice(sampler_name),
        sigmas,
        noise_source.generate(latent_image),
        latent_image,
        seed,
    )
    return (_with_samples(latent_image, samples),)


def ksampler_advanced(
    ctx: NodeContext,
    model: ModelHandle,
    add_noise: str,
    noise_seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    positive: Conditioning,
    negative: Conditioning,
    latent_image: Latent,
    start_at_step: int,
    end_at_step: int,
    return_with_leftover_noise: str,
    denoise: float = 1.0,
) -> tuple[Latent]:
    return ksampler(
        ctx,
        model,
        noise_seed,
        steps,
        cfg,
        sampler_name,
        scheduler,
        positive,
        negative,
        latent_image,
        denoise=denoise,
        disable_noise=add_noise == "disable",
        start_step=start_at_step,
        last_step=end_at_step,
        force_full_denoise=return_with_leftover_noise != "enable",
    )


def _custom_outputs(latent: Latent, samples: Tensor, x0: Tensor | None) -> tuple[Latent, Latent]:
    out = _with_samples(latent, samples)
    return out, (out if x0 is None else _with_samples(latent, x0))


def sampler_custom(
    ctx: NodeContext,
    model: ModelHandle,
    add_noise: bool,
    noise_seed: int,
    cfg: float,
    positive: Conditioning,
    negative: Conditioning,
    sampler: SamplerChoice,
    sigmas: Tensor,
    latent_image: Latent,
) -> tuple[Latent, Latent]:
    noise_source: NoiseSource = RandomNoiseSource(noise_seed) if add_noise else DisabledNoise()
    samples, x0 = sample_with_guider(
        ctx,
        Guider(_require_model(model), positive, negative, cfg),
        sampler,
        sigmas,
        noise_source.generate(latent_image),
        latent_image,
        noise_seed,
    )
    return _custom_outputs(latent_image, samples, x0)


def sampler_custom_advanced(
    ctx: NodeContext,
    noise: NoiseSource,
    guider: Guider,
    sampler: SamplerChoice,
    sigmas: Tensor,
    latent_image: Latent,
) -> tuple[Latent, Latent]:
    samples, x0 = sample_with_guider(
        ctx, guider, sampler, sigmas, noise.generate(latent_image), latent_image, noise.seed
    )
    return _custom_outputs(latent_image, samples, x0)


def basic_scheduler(
    ctx: NodeContext, model: ModelHandle, scheduler: str, steps: int, denoise: float
) -> tuple[Tensor]:
    return (basic_scheduler_sigmas(_require_model(model).model_sampling, scheduler, steps, denoise),)


def sd_turbo_scheduler(ctx: NodeContext, model: ModelHandle, steps: int, denoise: float) -> tuple[Tensor]:
    return (sd_turbo_sigmas(_require_model(model).model_sampling, steps, denoise),)


def basic_guider(ctx: NodeContext, model: ModelHandle, conditioning: Conditioning) -> tuple[Guider]:
    return (Guider(_require_model(model), conditioning, None, 1.0),)


def cfg_guider(
    ctx: NodeContext, model: ModelHandle, positive: Conditioning, negative: Conditioning, cfg: float
) -> tuple[Guider]:
    return (Guider(_require_model(model), positive, negative, cfg),)
