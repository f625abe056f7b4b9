"""run_sampler: ComfyUI's framing around a sampler (noise scaling, inpainting, seeding)."""

from __future__ import annotations

import math

import torch

from engine.sampling.model_sampling import default_model_sampling
from engine.sampling.noise import inpaint_noise, prepare_noise
from engine.sampling.run import run_sampler
from engine.sampling.samplers import sample_euler_ancestral
from engine.sampling.schedulers import ksampler_sigmas

MS = default_model_sampling()
SHAPE = (1, 4, 8, 8)


class FirstInput:
    """A denoiser predicting zeros that keeps the inputs it was called with."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        return torch.zeros_like(x)


def test_empty_schedule_returns_the_latent() -> None:
    latent = torch.randn(SHAPE)
    out = run_sampler("euler", FirstInput(), MS, torch.randn(SHAPE), latent, torch.zeros(0), seed=1)
    assert out is latent


def test_txt2img_start_uses_sqrt_one_plus_sigma_squared() -> None:
    noise, latent = prepare_noise(SHAPE, 1), torch.zeros(SHAPE)
    sigmas = ksampler_sigmas(MS, "karras", 4)
    model = FirstInput()
    run_sampler("euler", model, MS, noise, latent, sigmas, seed=1)
    torch.testing.assert_close(model.inputs[0], noise * math.sqrt(1 + float(sigmas[0]) ** 2))


def test_img2img_start_is_noise_times_sigma_plus_latent() -> None:
    noise, latent = prepare_noise(SHAPE, 1), torch.randn(SHAPE)
    sigmas = ksampler_sigmas(MS, "karras", 4, denoise=0.5)
    model = FirstInput()
    run_sampler("euler", model, MS, noise, latent, sigmas, seed=1)
    torch.testing.assert_close(model.inputs[0], noise * sigmas[0] + latent)


def shrink(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x / (1 + sigma.view(-1, 1, 1, 1) ** 2)


def test_seed_reaches_the_step_noise() -> None:
    noise, latent = prepare_noise(SHAPE, 9), torch.zeros(SHAPE)
    sigmas = ksampler_sigmas(MS, "normal", 5)
    out = run_sampler("euler_ancestral", shrink, MS, noise, latent, sigmas, seed=9)
    x = MS.noise_scaling(sigmas[0], noise, latent, max_denoise=True)
    direct = sample_euler_ancestral(shrink, x, sigmas, extra_args={"seed": 9})
    assert torch.equal(out, direct)
    other = run_sampler("euler_ancestral", shrink, MS, noise, latent, sigmas, seed=10)
    assert not torch.equal(out, other)


def test_ddim_blends_fresh_inpaint_noise_and_euler_the_initial_noise() -> None:
    noise, latent = prepare_noise(SHAPE, 3), torch.randn(SHAPE)
    mask = torch.zeros(1, 8, 8)
    mask[:, :, :4] = 1.0
    sigmas = ksampler_sigmas(MS, "karras", 3, denoise=0.6)
    for name, blend in (
        ("euler", noise),
        ("ddim", inpaint_noise(3, SHAPE, torch.float32, torch.device("cpu"))),
    ):
        model = FirstInput()
        out = run_sampler(name, model, MS, noise, latent, sigmas, seed=3, denoise_mask=mask)
        torch.testing.assert_close(model.inputs[0][..., 4:], latent[..., 4:] + blend[..., 4:] * sigmas[0])
        torch.testing.assert_close(out[..., 4:], latent[..., 4:])


def test_sampler_options_are_passed() -> None:
    noise, latent = prepare_noise(SHAPE, 2), torch.zeros(SHAPE)
    sigmas = ksampler_sigmas(MS, "karras", 4)
    deterministic = run_sampler(
        "euler_ancestral", shrink, MS, noise, latent, sigmas, seed=2, options={"eta": 0.0}
    )
    plain = run_sampler("euler", shrink, MS, noise, latent, sigmas, seed=2)
    torch.testing.assert_close(deterministic, plain)
