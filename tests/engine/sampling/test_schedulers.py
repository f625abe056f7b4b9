"""Sigma tables of every KSampler scheduler for SD1.5, against ComfyUI's formulas written out here in
float64 (numpy / mpmath), independently of the code under test."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch

from engine.sampling.model_sampling import default_model_sampling
from engine.sampling.schedulers import (
    DISCARD_PENULTIMATE_SIGMA_SAMPLERS,
    SCHEDULER_NAMES,
    SCHEDULERS,
    UnknownSchedulerError,
    basic_scheduler_sigmas,
    beta_ppf,
    calculate_sigmas,
    flip_sigmas,
    get_sigmas_karras,
    get_sigmas_polyexponential,
    ksampler_sigmas,
    sd_turbo_sigmas,
    slice_sigmas,
    split_sigmas,
    split_sigmas_denoise,
)

STEPS = 20

# -- reference: SD1.5's table and ComfyUI's schedulers in float64 ------------------------------------

_BETAS = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
_ACP = np.cumprod(1.0 - _BETAS)
TABLE = np.sqrt((1.0 - _ACP) / _ACP)  # sigma of timestep t, ascending
LOG_TABLE = np.log(TABLE)
SMIN, SMAX = TABLE[0], TABLE[-1]


def ref_sigma_at(t: float) -> float:
    """Log-linear interpolation of the table at a fractional timestep."""
    t = min(max(t, 0.0), 999.0)
    lo, hi = math.floor(t), math.ceil(t)
    w = t - lo
    return math.exp((1 - w) * LOG_TABLE[lo] + w * LOG_TABLE[hi])


def ref_karras(n: int) -> list[float]:
    ramp = np.linspace(0, 1, n)
    a, b = SMAX ** (1 / 7), SMIN ** (1 / 7)
    return [*((a + ramp * (b - a)) ** 7), 0.0]


def ref_exponential(n: int) -> list[float]:
    return [*np.exp(np.linspace(math.log(SMAX), math.log(SMIN), n)), 0.0]


def ref_normal(n: int) -> list[float]:
    return [*(ref_sigma_at(t) for t in np.linspace(999, 0, n)), 0.0]


def ref_sgm_uniform(n: int) -> list[float]:
    return [*(ref_sigma_at(t) for t in np.linspace(999, 0, n + 1)[:-1]), 0.0]


def ref_simple(n: int) -> list[float]:
    return [*(TABLE[-(1 + int(i * 1000 / n))] for i in range(n)), 0.0]


def ref_ddim_uniform(n: int) -> list[float]:
    picked = [TABLE[t] for t in range(1, 1000, 1000 // n)]
    return [*reversed(picked), 0.0]


def ref_beta(n: int) -> list[float]:
    def ppf(q: float) -> float:
        if q >= 1:
            return 1.0
        with mpmath.workdps(40):
            root = mpmath.findroot(
                lambda x: mpmath.betainc(0.6, 0.6, 0, x, regularized=True) - q,
                (1e-30, 1 - 1e-30),
                solver="anderson",
            )
        return float(root)

    out, last = [], -1
    for q in 1 - np.linspace(0, 1, n, endpoint=False):
        t = int(np.rint(ppf(float(q)) * 999))
        if t != last:
            out.append(TABLE[t])
        last = t
    return [*out, 0.0]


def ref_linear_quadratic(n: int) -> list[float]:
    threshold, linear_steps = 0.025, n // 2
    linear = [i * threshold / linear_steps for i in range(linear_steps)]
    diff = linear_steps - threshold * n
    quad_steps = n - linear_steps
    qc = diff / (linear_steps * quad_steps**2)
    lc = threshold / linear_steps - 2 * diff / quad_steps**2
    const = qc * linear_steps**2
    quadratic = [qc * i * i + lc * i + const for i in range(linear_steps, n)]
    return [(1.0 - v) * SMAX for v in [*linear, *quadratic, 1.0]]


def ref_kl_optimal(n: int) -> list[float]:
    return [
        *(math.tan(i / (n - 1) * math.atan(SMIN) + (1 - i / (n - 1)) * math.atan(SMAX)) for i in range(n)),
        0.0,
    ]


REFERENCE = {
    "simple": ref_simple,
    "sgm_uniform": ref_sgm_uniform,
    "karras": ref_karras,
    "exponential": ref_exponential,
    "ddim_uniform": ref_ddim_uniform,
    "beta": ref_beta,
    "normal": ref_normal,
    "linear_quadratic": ref_linear_quadratic,
    "kl_optimal": ref_kl_optimal,
}


def assert_sigmas_close(actual: torch.Tensor, expected: list[float], rel: float = 1e-5) -> None:
    assert actual.dtype == torch.float32
    assert list(actual.shape) == [len(expected)], (actual, expected)
    np.testing.assert_allclose(actual.double().numpy(), np.array(expected), rtol=rel, atol=0)


def test_scheduler_names_in_comfyui_order() -> None:
    assert SCHEDULER_NAMES == (
        "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
        "linear_quadratic", "kl_optimal",
    )  # fmt: skip
    assert set(SCHEDULERS) == set(REFERENCE)


def test_sd15_sigma_table() -> None:
    ms = default_model_sampling()
    np.testing.assert_allclose(ms.sigmas.double().numpy(), TABLE, rtol=1e-6)
    # Built in float64 like ComfyUI: 0.0291671 (k-diffusion's float32 table, and the scheduler nodes'
    # defaults, say 0.0291675).
    assert float(ms.sigma_min) == pytest.approx(0.02916716, rel=1e-6)
    assert float(ms.sigma_max) == pytest.approx(14.614642, rel=1e-6)


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
@pytest.mark.parametrize("denoise", [1.0, 0.5])
def test_scheduler_tables(scheduler: str, denoise: float) -> None:
    ms = default_model_sampling()
    sigmas = ksampler_sigmas(ms, scheduler, STEPS, denoise=denoise)
    total = STEPS if denoise == 1.0 else int(STEPS / denoise)
    expected = REFERENCE[scheduler](total)[-(STEPS + 1) :]
    assert_sigmas_close(sigmas, expected)


def test_discard_penultimate_sigma_samplers() -> None:
    ms = default_model_sampling()
    assert {"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"} == DISCARD_PENULTIMATE_SIGMA_SAMPLERS
    full = ref_karras(STEPS + 1)
    assert_sigmas_close(ksampler_sigmas(ms, "karras", STEPS, sampler_name="uni_pc"), full[:-2] + full[-1:])
    assert_sigmas_close(ksampler_sigmas(ms, "karras", STEPS, sampler_name="euler"), ref_karras(STEPS))
    # denoise < 1 schedules int(steps / denoise) (+1 for these samplers) and keeps the tail.
    full = ref_karras(int(STEPS / 0.5) + 1)
    assert_sigmas_close(
        ksampler_sigmas(ms, "karras", STEPS, denoise=0.5, sampler_name="dpm_2"), (full[:-2] + full[-1:])[-21:]
    )


def test_zero_denoise_and_unknown_scheduler() -> None:
    ms = default_model_sampling()
    assert ksampler_sigmas(ms, "normal", STEPS, denoise=0.0).numel() == 0
    with pytest.raises(UnknownSchedulerError):
        calculate_sigmas(ms, "nope", STEPS)


def test_slice_sigmas_advanced_steps() -> None:
    sigmas = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    assert slice_sigmas(sigmas, start_step=2).tolist() == [3.0, 2.0, 1.0, 0.0]
    assert slice_sigmas(sigmas, last_step=3).tolist() == [5.0, 4.0, 3.0, 2.0]
    assert slice_sigmas(sigmas, last_step=3, force_full_denoise=True).tolist() == [5.0, 4.0, 3.0, 0.0]
    assert slice_sigmas(sigmas, start_step=1, last_step=3).tolist() == [4.0, 3.0, 2.0]
    assert slice_sigmas(sigmas, start_step=5).numel() == 0  # nothing to sample
    assert sigmas.tolist() == [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]  # input untouched


def test_custom_scheduler_nodes() -> None:
    ms = default_model_sampling()
    ramp = np.linspace(0, 1, 10)
    karras = (14.614642 ** (1 / 7) + ramp * (0.0291675 ** (1 / 7) - 14.614642 ** (1 / 7))) ** 7
    assert_sigmas_close(get_sigmas_karras(10, 0.0291675, 14.614642, rho=7.0), [*karras, 0.0])
    poly = get_sigmas_polyexponential(10, 0.0291675, 14.614642, rho=1.0)
    expected = np.exp(
        np.linspace(1, 0, 10) * (math.log(14.614642) - math.log(0.0291675)) + math.log(0.0291675)
    )
    assert_sigmas_close(poly, [*expected, 0.0])
    # SDTurboScheduler: timesteps 999, 899, ... from 10 - int(10 * denoise).
    assert_sigmas_close(sd_turbo_sigmas(ms, 2, denoise=1.0), [TABLE[999], TABLE[899], 0.0])
    assert_sigmas_close(sd_turbo_sigmas(ms, 1, denoise=0.5), [TABLE[499], 0.0])
    # BasicScheduler never drops a penultimate sigma.
    assert_sigmas_close(basic_scheduler_sigmas(ms, "karras", 10, denoise=0.5), ref_karras(20)[-11:])


def test_split_and_flip_sigmas() -> None:
    sigmas = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    high, low = split_sigmas(sigmas, 2)
    assert high.tolist() == [4.0, 3.0, 2.0] and low.tolist() == [2.0, 1.0, 0.0]
    high, low = split_sigmas_denoise(sigmas, 0.5)
    assert high.tolist() == [4.0, 3.0, 2.0] and low.tolist() == [2.0, 1.0, 0.0]
    assert flip_sigmas(sigmas.clone()).tolist() == pytest.approx([0.0001, 1.0, 2.0, 3.0, 4.0])


@pytest.mark.parametrize(("a", "b"), [(0.6, 0.6), (0.5, 2.0), (3.0, 0.7)])
def test_beta_ppf_matches_mpmath(a: float, b: float) -> None:
    for q in (1e-6, 0.01, 0.3, 0.5, 0.77, 0.999):
        x = beta_ppf(q, a, b)
        assert float(mpmath.betainc(a, b, 0, x, regularized=True)) == pytest.approx(q, rel=1e-9, abs=1e-12)
