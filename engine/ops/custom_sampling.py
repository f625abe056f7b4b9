"""Custom-sampling building blocks: the SAMPLER, SIGMAS and NOISE values that SamplerCustom and
SamplerCustomAdvanced consume."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from engine.context import NodeContext
from engine.sampling import schedulers
from engine.sampling.noise import prepare_noise
from engine.sampling.samplers import get_sampler


@dataclass(frozen=True)
class SamplerChoice:
    """A SAMPLER: a sampler name (from ``SAMPLERS``) and extra options for it."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RandomNoiseSource:
    """A NOISE: the initial noise for a latent, seeded as ComfyUI seeds it."""

    seed: int

    def generate(self, latent: dict[str, Any]) -> torch.Tensor:
        samples = latent["samples"]
        return prepare_noise(samples.shape, self.seed, latent.get("batch_index"))


@dataclass(frozen=True)
class DisabledNoise:
    """A NOISE of zeros (for latents that already hold their noise)."""

    seed: int = 0

    def generate(self, latent: dict[str, Any]) -> torch.Tensor:
        return torch.zeros_like(latent["samples"], device="cpu")


def ksampler_select(ctx: NodeContext, sampler_name: str) -> tuple[SamplerChoice]:
    get_sampler(sampler_name)  # an unknown name fails here, with the node id
    return (SamplerChoice(sampler_name),)


def karras_scheduler(
    ctx: NodeContext, steps: int, sigma_max: float, sigma_min: float, rho: float
) -> tuple[torch.Tensor]:
    return (schedulers.get_sigmas_karras(steps, sigma_min, sigma_max, rho),)


def exponential_scheduler(
    ctx: NodeContext, steps: int, sigma_max: float, sigma_min: float
) -> tuple[torch.Tensor]:
    return (schedulers.get_sigmas_exponential(steps, sigma_min, sigma_max),)


def polyexponential_scheduler(
    ctx: NodeContext, steps: int, sigma_max: float, sigma_min: float, rho: float
) -> tuple[torch.Tensor]:
    return (schedulers.get_sigmas_polyexponential(steps, sigma_min, sigma_max, rho),)


def split_sigmas(ctx: NodeContext, sigmas: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return schedulers.split_sigmas(sigmas, step)


def flip_sigmas(ctx: NodeContext, sigmas: torch.Tensor) -> tuple[torch.Tensor]:
    return (schedulers.flip_sigmas(sigmas.clone()),)


def random_noise(ctx: NodeContext, noise_seed: int) -> tuple[RandomNoiseSource]:
    return (RandomNoiseSource(noise_seed),)


def disable_noise(ctx: NodeContext) -> tuple[DisabledNoise]:
    return (DisabledNoise(),)
