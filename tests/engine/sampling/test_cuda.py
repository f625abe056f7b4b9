"""Device handling on CUDA: every sampler runs on a CUDA latent; step noise is seeded per device."""

from __future__ import annotations

import pytest
import torch

from engine.sampling.model_sampling import default_model_sampling
from engine.sampling.noise import DefaultNoiseSampler
from engine.sampling.run import run_sampler
from engine.sampling.samplers import SAMPLER_NAMES
from engine.sampling.schedulers import ksampler_sigmas

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MS = default_model_sampling()


def shrink(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x / (1 + sigma.view(-1, 1, 1, 1) ** 2)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_sampler_runs_on_cuda(name: str) -> None:
    noise = torch.randn(1, 4, 8, 8, device="cuda")
    latent = torch.randn(1, 4, 8, 8, device="cuda")
    mask = torch.ones(1, 8, 8)
    mask[..., :4] = 0.0
    sigmas = ksampler_sigmas(MS, "karras", 4, denoise=0.8, sampler_name=name)
    out = run_sampler(name, shrink, MS, noise, latent, sigmas, seed=1, denoise_mask=mask)
    assert out.device.type == "cuda" and torch.isfinite(out).all()


def test_cuda_step_noise_uses_the_seed_itself() -> None:
    x = torch.zeros(2, 3, device="cuda")
    expected = torch.randn(2, 3, device="cuda", generator=torch.Generator("cuda").manual_seed(5))
    assert torch.equal(DefaultNoiseSampler(x, 5)(torch.tensor(1.0), torch.tensor(0.5)), expected)
