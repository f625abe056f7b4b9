"""What every sampler shares: the model-call contract, the step callback, small tensor helpers.

The contract (k-diffusion's): a sampler gets ``model(x, sigma, **kwargs) -> denoised`` with
``x`` [B, ...] and ``sigma`` [B]. A model may also expose

- ``model_sampling`` (a ModelSampling): the schedule some samplers consult (half-log-SNR
  conversions, percent_to_sigma, noise_scaling). Without it they assume Stable Diffusion's.
- ``denoise_with_uncond(x, sigma, **kwargs) -> (denoised, uncond_denoised)``: the guided result
  and the unconditional prediction, the uncond pass forced even at cfg 1. The CFG++ samplers need
  it (ComfyUI gets the same value from a post-CFG hook). A model without it counts as unguided:
  its uncond prediction is its output.

``extra_args`` may carry ``"seed"`` (it seeds the samplers' noise, as in ComfyUI); everything else
in it is passed to the model as keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from torch import Tensor

from engine.sampling.model_sampling import ModelSampling, default_model_sampling

DenoiserFn = Callable[..., Tensor]
StepCallback = Callable[[dict[str, Any]], None]


class GuidedDenoiser(Protocol):
    """A denoiser that also reports its unconditional prediction (see the module docstring)."""

    def __call__(self, x: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor: ...

    def denoise_with_uncond(self, x: Tensor, sigma: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]: ...


def split_extra_args(extra_args: Mapping[str, Any] | None) -> tuple[dict[str, Any], int | None]:
    """(model keyword arguments, seed) from a sampler's extra_args."""
    kwargs = dict(extra_args or {})
    seed = kwargs.pop("seed", None)
    return kwargs, seed


def model_sampling_of(model: DenoiserFn) -> ModelSampling:
    ms = getattr(model, "model_sampling", None)
    return ms if isinstance(ms, ModelSampling) else default_model_sampling()


def denoise_with_uncond(
    model: DenoiserFn, x: Tensor, sigma: Tensor, kwargs: Mapping[str, Any]
) -> tuple[Tensor, Tensor]:
    fn = getattr(model, "denoise_with_uncond", None)
    if fn is None:
        denoised = model(x, sigma, **kwargs)
        return denoised, denoised
    return fn(x, sigma, **kwargs)


def report_step(
    callback: StepCallback | None, i: int, x: Tensor, sigma: Tensor, sigma_hat: Tensor, denoised: Tensor
) -> None:
    """Call the per-step callback (progress, previews, interruption: it may raise to stop)."""
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so ``v`` broadcasts against an ndim tensor."""
    missing = ndim - v.ndim
    if missing < 0:
        raise ValueError(f"input has {v.ndim} dims but target ndim is {ndim}")
    return v[(...,) + (None,) * missing]


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """The Karras ODE derivative dx/dsigma from a denoiser output."""
    return (x - denoised) / append_dims(sigma, x.ndim)
