"""Discrete-time noise schedules and the eps / v-prediction denoiser wrapper.

A discrete diffusion model (SD1.x, SD2.x, SDXL) is trained on timesteps ``t = 0 .. T-1`` with noise
levels ``sigma_t = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t])``. Samplers work in sigma
space (k-diffusion's variance-exploding view), so the model is wrapped into a denoiser
``D(x, sigma)`` that predicts the clean latent. This module reproduces ComfyUI's
``ModelSamplingDiscrete`` with its ``EPS`` and ``V_PREDICTION`` parameterisations:

- the sigma table is built in float64 and stored as float32 (so are its logs);
- ``timestep(sigma)`` is the index of the nearest log-sigma (an integer, not an interpolation);
- ``sigma(timestep)`` interpolates linearly in log-sigma between table entries.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import torch
from torch import Tensor

# Stable Diffusion's training schedule (ComfyUI's ModelSamplingDiscrete defaults).
SD_BETA_SCHEDULE = "linear"
SD_LINEAR_START = 0.00085
SD_LINEAR_END = 0.012
SD_TIMESTEPS = 1000

# ComfyUI's percent_to_sigma answer for percent <= 0: "above every sigma".
SIGMA_ABOVE_ALL = 999999999.9


class Parameterization(StrEnum):
    """What the network predicts."""

    EPS = "eps"
    V_PREDICTION = "v_prediction"


def make_beta_schedule(
    schedule: str,
    timesteps: int,
    linear_start: float = SD_LINEAR_START,
    linear_end: float = SD_LINEAR_END,
    cosine_s: float = 8e-3,
) -> Tensor:
    """Betas of a named training schedule, float64 (ComfyUI's / LDM's ``make_beta_schedule``)."""
    if schedule == "linear":
        # "linear" in LDM is linear in sqrt(beta).
        return torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
    if schedule == "cosine":
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * math.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        return torch.clamp(1 - alphas[1:] / alphas[:-1], min=0.0, max=0.999)
    if schedule == "squaredcos_cap_v2":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [
            min(1 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), 0.999)
            for i in range(timesteps)
        ]
        return torch.tensor(betas, dtype=torch.float64)
    if schedule == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64)
    if schedule == "sqrt":
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64) ** 0.5
    raise ValueError(f"unknown beta schedule {schedule!r}")


def _per_sample(sigma: Tensor, ndim: int) -> Tensor:
    """Shape a per-sample sigma [B] as [B, 1, ...] to broadcast over an ndim tensor (0-dim stays)."""
    if sigma.ndim == 0:
        return sigma
    return sigma.view(sigma.shape[:1] + (1,) * (ndim - 1))


@dataclass(frozen=True, eq=False)
class ModelSampling:
    """A discrete model's sigma table and output parameterisation.

    ``sigmas[t]`` is the noise level of training timestep ``t`` (ascending, float32).
    """

    sigmas: Tensor  # [T] float32
    log_sigmas: Tensor  # [T] float32, log of the float64 sigmas
    parameterization: Parameterization = Parameterization.EPS
    sigma_data: float = 1.0

    @classmethod
    def from_alphas_cumprod(
        cls, alphas_cumprod: Tensor, parameterization: Parameterization = Parameterization.EPS
    ) -> ModelSampling:
        """Build the table from a model's ``alphas_cumprod`` (computed in float64, stored float32)."""
        acp = alphas_cumprod.detach().to(device="cpu", dtype=torch.float64)
        sigmas = ((1 - acp) / acp) ** 0.5
        return cls(sigmas=sigmas.float(), log_sigmas=sigmas.log().float(), parameterization=parameterization)

    @classmethod
    def from_beta_schedule(
        cls,
        beta_schedule: str = SD_BETA_SCHEDULE,
        linear_start: float = SD_LINEAR_START,
        linear_end: float = SD_LINEAR_END,
        timesteps: int = SD_TIMESTEPS,
        parameterization: Parameterization = Parameterization.EPS,
    ) -> ModelSampling:
        """Build the table from a training beta schedule; the defaults are Stable Diffusion's."""
        betas = make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end)
        return cls.from_alphas_cumprod(torch.cumprod(1.0 - betas, dim=0), parameterization)

    # -- the table -------------------------------------------------------------------------------

    @property
    def sigma_min(self) -> Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> Tensor:
        return self.sigmas[-1]

    @property
    def num_timesteps(self) -> int:
        return int(self.sigmas.shape[0])

    def timestep(self, sigma: Tensor) -> Tensor:
        """Index (int64) of the table entry nearest to ``sigma`` in log space; same shape as sigma."""
        log_sigma = sigma.log().to(self.log_sigmas.device)
        dists = log_sigma.reshape(-1)[None, :] - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def sigma(self, timestep: Tensor) -> Tensor:
        """Sigma at a (possibly fractional) timestep: linear interpolation of log-sigma."""
        t = torch.clamp(timestep.float().to(self.log_sigmas.device), min=0, max=self.num_timesteps - 1)
        low = t.floor().long()
        high = t.ceil().long()
        w = t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]
        return log_sigma.exp().to(timestep.device)

    def percent_to_sigma(self, percent: float) -> float:
        """Sigma reached after ``percent`` of the schedule (0 -> above every sigma, 1 -> 0)."""
        if percent <= 0.0:
            return SIGMA_ABOVE_ALL
        if percent >= 1.0:
            return 0.0
        return float(self.sigma(torch.tensor((1.0 - percent) * 999.0)).item())

    def is_max_denoise(self, sigmas: Tensor) -> bool:
        """Whether sampling starts at (or above) the top of the table: txt2img-style noise scaling."""
        max_sigma = float(self.sigma_max)
        sigma = float(sigmas[0])
        return math.isclose(max_sigma, sigma, rel_tol=1e-05) or sigma > max_sigma

    # -- input / output scalings -----------------------------------------------------------------

    def calculate_input(self, sigma: Tensor, x: Tensor) -> Tensor:
        """The network input: x scaled to unit variance, x / sqrt(sigma^2 + sigma_data^2)."""
        sigma = _per_sample(sigma, x.ndim)
        return x / (sigma**2 + self.sigma_data**2) ** 0.5

    def calculate_denoised(self, sigma: Tensor, model_output: Tensor, model_input: Tensor) -> Tensor:
        """The clean-latent estimate from the network output (eps or v)."""
        sigma = _per_sample(sigma, model_output.ndim)
        if self.parameterization is Parameterization.EPS:
            return model_input - model_output * sigma
        sd2 = self.sigma_data**2
        return (
            model_input * sd2 / (sigma**2 + sd2)
            - model_output * sigma * self.sigma_data / (sigma**2 + sd2) ** 0.5
        )

    def noise_scaling(
        self, sigma: Tensor, noise: Tensor, latent_image: Tensor, max_denoise: bool = False
    ) -> Tensor:
        """Noised starting latent. At max denoise the noise gets the variance 1 + sigma^2 (ComfyUI)."""
        if max_denoise:
            return noise * torch.sqrt(1.0 + sigma**2.0) + latent_image
        return noise * _per_sample(sigma, noise.ndim) + latent_image

    def inverse_noise_scaling(self, sigma: Tensor, latent: Tensor) -> Tensor:
        """Undo noise_scaling on the sampler output; the identity for eps / v models."""
        return latent

    # -- half-log-SNR (lambda = log(alpha / sigma)), used by the exponential-integrator samplers ---

    def half_log_snr(self, sigma: Tensor) -> Tensor:
        return sigma.log().neg()

    def sigma_from_half_log_snr(self, half_log_snr: Tensor) -> Tensor:
        return half_log_snr.neg().exp()


def default_model_sampling(parameterization: Parameterization = Parameterization.EPS) -> ModelSampling:
    """Stable Diffusion's schedule: linear-in-sqrt betas 0.00085..0.012 over 1000 steps."""
    return ModelSampling.from_beta_schedule(parameterization=parameterization)


class NetFunction(Protocol):
    """A diffusion network: scaled latent and (integer-valued, float) timestep in, eps or v out."""

    def __call__(
        self, x: Tensor, timestep: Tensor, context: Tensor | None = None, **kwargs: Any
    ) -> Tensor: ...


class Denoiser:
    """``D(x, sigma, context, extra)`` for a discrete eps / v network (ComfyUI's apply_model).

    The network sees ``calculate_input(sigma, x)`` cast to ``dtype`` (with ``extra["c_concat"]``
    appended as channels), the nearest table timestep as float, the cross-attention ``context`` and
    any other extra tensors as keyword arguments; its output is
    read back in float32 and turned into the clean-latent estimate.
    """

    def __init__(
        self, net: NetFunction, model_sampling: ModelSampling, dtype: torch.dtype | None = None
    ) -> None:
        self.net = net
        self.model_sampling = model_sampling
        self.dtype = dtype

    def __call__(
        self,
        x: Tensor,  # [B, C, H, W]
        sigma: Tensor,  # [B]
        context: Tensor | None = None,  # [B, tokens, features]
        extra: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        ms = self.model_sampling
        dtype = self.dtype or x.dtype
        x_in = ms.calculate_input(sigma, x).to(dtype)
        t = ms.timestep(sigma).float()
        if context is not None:
            context = context.to(device=x.device, dtype=dtype)
        kwargs: dict[str, Any] = {}
        extra = dict(extra or {})
        concat = extra.pop("c_concat", None)
        if concat is not None:
            # Inpainting models take mask + masked-image latent as extra input channels, appended
            # after the input scaling (ComfyUI's apply_model).
            x_in = torch.cat([x_in, concat.to(device=x.device, dtype=dtype)], dim=1)
        for name, value in extra.items():
            # Integer tensors (ids, sizes) keep their dtype; float ones follow the model's.
            if value.is_floating_point():
                value = value.to(device=x.device, dtype=dtype)
            else:
                value = value.to(device=x.device)
            kwargs[name] = value
        out = self.net(x_in, t, context=context, **kwargs)
        return ms.calculate_denoised(sigma, out.float(), x)
