"""The sigma table's conversions and the eps / v denoiser wrappers, against hand-computed values."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from engine.sampling.model_sampling import Denoiser, ModelSampling, Parameterization, default_model_sampling


class RecordingNet:
    """A fake network: remembers its inputs, returns a fixed output."""

    def __init__(self, output: torch.Tensor) -> None:
        self.output = output
        self.calls: list[dict[str, Any]] = []

    def __call__(
        self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor | None = None, **kw: Any
    ):
        self.calls.append({"x": x, "t": timestep, "context": context, **kw})
        return self.output


def test_timestep_is_nearest_table_index_and_sigma_interpolates() -> None:
    ms = default_model_sampling()
    table = ms.sigmas
    assert ms.timestep(table[500]).item() == 500
    assert ms.timestep(torch.tensor([table[10], table[998]])).tolist() == [10, 998]
    # Just above sigma[500] in log space, closer to 500 than to 501.
    between = torch.exp(0.3 * table[500].log() + 0.7 * table[501].log())
    assert ms.timestep(between).item() == 501
    mid = ms.sigma(torch.tensor(250.25))
    expected = math.exp(0.75 * math.log(float(table[250])) + 0.25 * math.log(float(table[251])))
    assert float(mid) == pytest.approx(expected, rel=1e-6)
    assert float(ms.sigma(torch.tensor(-5.0))) == pytest.approx(float(table[0]))  # clamped


def test_percent_to_sigma() -> None:
    ms = default_model_sampling()
    assert ms.percent_to_sigma(0.0) == 999999999.9
    assert ms.percent_to_sigma(1.0) == 0.0
    assert ms.percent_to_sigma(0.5) == pytest.approx(float(ms.sigma(torch.tensor(499.5))), rel=1e-6)


def test_table_from_checkpoint_alphas_cumprod() -> None:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    acp = torch.cumprod(1 - betas, 0)
    ms = ModelSampling.from_alphas_cumprod(acp.float())
    # A float32 alphas_cumprod (as checkpoints store it) loses ~1e-5 at the low end: 1 - acp is tiny.
    torch.testing.assert_close(ms.sigmas, default_model_sampling().sigmas, rtol=2e-5, atol=0)


def test_noise_scaling() -> None:
    ms = default_model_sampling()
    noise, latent = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    sigma = torch.tensor(3.0)
    torch.testing.assert_close(ms.noise_scaling(sigma, noise, latent), noise * 3.0 + latent)
    torch.testing.assert_close(
        ms.noise_scaling(sigma, noise, latent, max_denoise=True), noise * math.sqrt(10) + latent
    )
    per_sample = ms.noise_scaling(torch.tensor([1.0, 2.0]), noise, latent)
    torch.testing.assert_close(per_sample[1], noise[1] * 2.0 + latent[1])
    assert ms.inverse_noise_scaling(sigma, latent) is latent
    assert ms.is_max_denoise(torch.tensor([float(ms.sigma_max), 0.0]))
    assert not ms.is_max_denoise(torch.tensor([10.0, 0.0]))


@pytest.mark.parametrize("parameterization", [Parameterization.EPS, Parameterization.V_PREDICTION])
def test_denoiser_wrapper(parameterization: Parameterization) -> None:
    ms = ModelSampling.from_beta_schedule(parameterization=parameterization)
    x = torch.tensor([[[[2.0, -1.0]]], [[[0.5, 4.0]]]])  # [2, 1, 1, 2]
    out = torch.tensor([[[[0.3, 0.7]]], [[[-0.2, 1.1]]]])
    sigma = torch.stack([ms.sigmas[999], ms.sigmas[400]])
    context = torch.ones(1, 3, 5)
    net = RecordingNet(out)
    denoised = Denoiser(net, ms)(x, sigma, context=context, extra={"y": torch.zeros(2, 2)})

    (call,) = net.calls
    s = sigma.view(2, 1, 1, 1)
    torch.testing.assert_close(call["x"], x / torch.sqrt(s**2 + 1))
    assert call["t"].dtype == torch.float32 and call["t"].tolist() == [999.0, 400.0]
    assert call["context"] is not None and torch.equal(call["context"], context)
    assert call["y"].shape == (2, 2)
    if parameterization is Parameterization.EPS:
        expected = x - out * s
    else:
        expected = x / (s**2 + 1) - out * s / torch.sqrt(s**2 + 1)
    torch.testing.assert_close(denoised, expected)
    # Hand-computed, one element: eps at sigma_999 = 14.6146...
    s0 = float(ms.sigmas[999])
    hand = (
        2.0 - 0.3 * s0
        if parameterization is Parameterization.EPS
        else 2.0 / (s0**2 + 1) - 0.3 * s0 / math.sqrt(s0**2 + 1)
    )
    assert float(denoised[0, 0, 0, 0]) == pytest.approx(hand, rel=1e-6)


def test_denoiser_casts_to_model_dtype_and_back() -> None:
    ms = default_model_sampling()
    net = RecordingNet(torch.zeros(1, 1, 2, 2, dtype=torch.bfloat16))
    x = torch.ones(1, 1, 2, 2)
    denoised = Denoiser(net, ms, dtype=torch.bfloat16)(x, torch.tensor([1.0]), context=torch.ones(1, 2, 3))
    assert net.calls[0]["x"].dtype == torch.bfloat16
    assert net.calls[0]["context"].dtype == torch.bfloat16
    assert denoised.dtype == torch.float32
    torch.testing.assert_close(denoised, x)
