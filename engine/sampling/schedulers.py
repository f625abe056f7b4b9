"""Noise schedules: pure functions from a model's sigma table and a step count to a sigma tensor.

Every schedule is a descending float32 tensor of ``steps + 1`` sigmas ending in 0 (a few schedules
from ComfyUI end elsewhere; see each docstring). ``SCHEDULERS`` holds the ones ComfyUI's KSampler
accepts, in ComfyUI's order; ``get_sigmas_*`` are the parametric k-diffusion schedules the custom
scheduler nodes (KarrasScheduler, ...) expose. The arithmetic (dtypes, operation order, rounding)
follows ComfyUI so the tables match it to float precision.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from engine.errors import KilnError
from engine.sampling import names
from engine.sampling.model_sampling import ModelSampling

# Defaults of ComfyUI's parametric scheduler nodes (SD1.5's sigma range).
NODE_SIGMA_MAX = 14.614642
NODE_SIGMA_MIN = 0.0291675

SchedulerFn = Callable[[ModelSampling, int], Tensor]


class UnknownSchedulerError(KilnError, ValueError):
    """Raised when a scheduler name is not one of SCHEDULER_NAMES."""

    type_name = "unknown_scheduler"


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


# -- parametric schedules (k-diffusion) ------------------------------------------------------------


def get_sigmas_karras(
    n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device: str = "cpu"
) -> Tensor:
    """Karras et al. (2022): uniform steps in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, n, device=device)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return _append_zero(sigmas)


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float, device: str = "cpu") -> Tensor:
    """Uniform steps in log sigma."""
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, device=device).exp()
    return _append_zero(sigmas)


def get_sigmas_polyexponential(
    n: int, sigma_min: float, sigma_max: float, rho: float = 1.0, device: str = "cpu"
) -> Tensor:
    """Polynomial in log sigma (rho = 1 is the exponential schedule)."""
    ramp = torch.linspace(1, 0, n, device=device) ** rho
    sigmas = torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))
    return _append_zero(sigmas)


def get_sigmas_vp(
    n: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3, device: str = "cpu"
) -> Tensor:
    """Continuous variance-preserving schedule."""
    t = torch.linspace(1, eps_s, n, device=device)
    sigmas = torch.sqrt(torch.special.expm1(beta_d * t**2 / 2 + beta_min * t))
    return _append_zero(sigmas)


def get_sigmas_laplace(
    n: int, sigma_min: float, sigma_max: float, mu: float = 0.0, beta: float = 0.5, device: str = "cpu"
) -> Tensor:
    """Tiankai et al. (2024). Note: ComfyUI appends no final zero to this one."""
    epsilon = 1e-5  # keeps log() finite at the ends
    x = torch.linspace(0, 1, n, device=device)
    lmb = mu - beta * torch.sign(0.5 - x) * torch.log(1 - 2 * torch.abs(0.5 - x) + epsilon)
    return torch.clamp(torch.exp(lmb), min=sigma_min, max=sigma_max)


def get_sigmas_kl_optimal(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """KL-optimal schedule (AUTOMATIC1111 PR 15608): uniform steps in arctan(sigma)."""
    adj_idxs = torch.arange(n, dtype=torch.float).div_(n - 1)
    sigmas = adj_idxs.new_zeros(n + 1)
    sigmas[:-1] = (adj_idxs * math.atan(sigma_min) + (1 - adj_idxs) * math.atan(sigma_max)).tan_()
    return sigmas


# -- the KSampler schedulers: (model_sampling, steps) -> sigmas -------------------------------------


def simple_scheduler(model_sampling: ModelSampling, steps: int) -> Tensor:
    """Every len(table)/steps-th table sigma, from the top."""
    table = model_sampling.sigmas
    stride = len(table) / steps
    sigs = [float(table[-(1 + int(i * stride))]) for i in range(steps)]
    return torch.FloatTensor([*sigs, 0.0])


def ddim_uniform_scheduler(model_sampling: ModelSampling, steps: int) -> Tensor:
    """Table sigmas at timesteps 1, 1 + k, 1 + 2k, ... (k = len(table) // steps), descending, then 0."""
    table = model_sampling.sigmas
    if math.isclose(float(table[1]), 0, abs_tol=0.00001):
        steps += 1
        sigs: list[float] = []
    else:
        sigs = [0.0]
    stride = max(len(table) // steps, 1)
    sigs += [float(table[t]) for t in range(1, len(table), stride)]
    return torch.FloatTensor(sigs[::-1])


def normal_scheduler(model_sampling: ModelSampling, steps: int, sgm: bool = False) -> Tensor:
    """Uniform steps in timestep between the table's ends; sgm drops the last timestep (SGM's spacing)."""
    start = model_sampling.timestep(model_sampling.sigma_max)
    end = model_sampling.timestep(model_sampling.sigma_min)
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(model_sampling.sigma(end)), 0, abs_tol=0.00001):
            steps += 1
            append_zero = False
        timesteps = torch.linspace(start, end, steps)
    sigs = [float(model_sampling.sigma(ts)) for ts in timesteps]
    if append_zero:
        sigs.append(0.0)
    return torch.FloatTensor(sigs)


def sgm_uniform_scheduler(model_sampling: ModelSampling, steps: int) -> Tensor:
    return normal_scheduler(model_sampling, steps, sgm=True)


def karras_scheduler(model_sampling: ModelSampling, steps: int) -> Tensor:
    return get_sigmas_karras(steps, float(model_sampling.sigma_min), float(model_sampling.sigma_max))


def exponential_scheduler(model_sampling: ModelSampling, steps: int) -> Tensor:
    return get_sigmas_exponential(steps, float(model_sampling.sigma_min), float(model_sampling.sigma_max))


def kl_optimal_scheduler(model_sampling: ModelSampling, steps: int) -> Tensor:
    return get_sigmas_kl_optimal(steps, float(model_sampling.sigma_min), float(model_sampling.sigma_max))


def beta_scheduler(
    model_sampling: ModelSampling, steps: int, alpha: float = 0.6, beta: float = 0.6
) -> Tensor:
    """Timesteps at Beta(alpha, beta) quantiles (arXiv 2407.12173); repeated timesteps are dropped."""
    total_timesteps = len(model_sampling.sigmas) - 1
    quantiles = 1 - np.linspace(0, 1, steps, endpoint=False)
    # round() is round-half-even like numpy.rint, which ComfyUI uses.
    timesteps = [round(beta_ppf(float(q), alpha, beta) * total_timesteps) for q in quantiles]
    sigs: list[float] = []
    last_t = -1
    for t in timesteps:
        if t != last_t:
            sigs.append(float(model_sampling.sigmas[t]))
        last_t = t
    return torch.FloatTensor([*sigs, 0.0])


def linear_quadratic_scheduler(
    model_sampling: ModelSampling, steps: int, threshold_noise: float = 0.025, linear_steps: int | None = None
) -> Tensor:
    """Mochi's schedule: linear then quadratic in 1 - sigma/sigma_max."""
    if steps == 1:
        schedule = [1.0, 0.0]
    else:
        if linear_steps is None:
            linear_steps = steps // 2
        linear = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        threshold_noise_step_diff = linear_steps - threshold_noise * steps
        quadratic_steps = steps - linear_steps
        quadratic_coef = threshold_noise_step_diff / (linear_steps * quadratic_steps**2)
        linear_coef = threshold_noise / linear_steps - 2 * threshold_noise_step_diff / (quadratic_steps**2)
        const = quadratic_coef * (linear_steps**2)
        quadratic = [quadratic_coef * (i**2) + linear_coef * i + const for i in range(linear_steps, steps)]
        schedule = [1.0 - v for v in [*linear, *quadratic, 1.0]]
    return torch.FloatTensor(schedule) * model_sampling.sigma_max.cpu()


# ComfyUI's SCHEDULER_HANDLERS, in its order (the KSampler combo lists them so).
SCHEDULERS: dict[str, SchedulerFn] = {
    "simple": simple_scheduler,
    "sgm_uniform": sgm_uniform_scheduler,
    "karras": karras_scheduler,
    "exponential": exponential_scheduler,
    "ddim_uniform": ddim_uniform_scheduler,
    "beta": beta_scheduler,
    "normal": normal_scheduler,
    "linear_quadratic": linear_quadratic_scheduler,
    "kl_optimal": kl_optimal_scheduler,
}
SCHEDULER_NAMES: tuple[str, ...] = tuple(SCHEDULERS)
assert SCHEDULER_NAMES == names.SCHEDULER_NAMES, "engine.sampling.names must list every scheduler"

# KSampler computes steps + 1 sigmas for these and drops the penultimate one.
DISCARD_PENULTIMATE_SIGMA_SAMPLERS = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})


def calculate_sigmas(model_sampling: ModelSampling, scheduler: str, steps: int) -> Tensor:
    """The named scheduler's sigmas for ``steps`` steps."""
    try:
        fn = SCHEDULERS[scheduler]
    except KeyError:
        raise UnknownSchedulerError(f"unknown scheduler {scheduler!r}") from None
    return fn(model_sampling, steps)


def ksampler_sigmas(
    model_sampling: ModelSampling,
    scheduler: str,
    steps: int,
    denoise: float = 1.0,
    sampler_name: str | None = None,
) -> Tensor:
    """Sigmas of ComfyUI's KSampler / KSamplerAdvanced for steps, denoise and sampler.

    ``denoise < 1`` schedules ``int(steps / denoise)`` steps and keeps the last ``steps + 1`` sigmas
    (an empty tensor for ``denoise <= 0``: nothing to sample).
    """

    def for_steps(n: int) -> Tensor:
        if sampler_name in DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
            sigmas = calculate_sigmas(model_sampling, scheduler, n + 1)
            return torch.cat([sigmas[:-2], sigmas[-1:]])
        return calculate_sigmas(model_sampling, scheduler, n)

    if denoise > 0.9999:
        return for_steps(steps)
    if denoise <= 0.0:
        return torch.FloatTensor([])
    return for_steps(int(steps / denoise))[-(steps + 1) :]


def slice_sigmas(
    sigmas: Tensor,
    start_step: int | None = None,
    last_step: int | None = None,
    force_full_denoise: bool = False,
) -> Tensor:
    """KSamplerAdvanced's step window over a schedule.

    Returns an empty tensor when ``start_step`` is at or past the last step: ComfyUI then returns the
    input latent unchanged.
    """
    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[: last_step + 1].clone()
        if force_full_denoise:
            sigmas[-1] = 0
    if start_step is not None:
        if start_step < len(sigmas) - 1:
            sigmas = sigmas[start_step:]
        else:
            return sigmas.new_zeros([0])
    return sigmas


# -- the custom-sampler scheduler nodes ----------------------------------------------------------


def basic_scheduler_sigmas(
    model_sampling: ModelSampling, scheduler: str, steps: int, denoise: float = 1.0
) -> Tensor:
    """BasicScheduler: like ksampler_sigmas but never drops a penultimate sigma."""
    total_steps = steps
    if denoise < 1.0:
        if denoise <= 0.0:
            return torch.FloatTensor([])
        total_steps = int(steps / denoise)
    return calculate_sigmas(model_sampling, scheduler, total_steps).cpu()[-(steps + 1) :]


def sd_turbo_sigmas(model_sampling: ModelSampling, steps: int, denoise: float = 1.0) -> Tensor:
    """SDTurboScheduler: table sigmas at timesteps 999, 899, ..., 99 from 10 - int(10 * denoise)."""
    start_step = 10 - int(10 * denoise)
    timesteps = torch.flip(torch.arange(1, 11) * 100 - 1, (0,))[start_step : start_step + steps]
    return _append_zero(model_sampling.sigma(timesteps))


def split_sigmas(sigmas: Tensor, step: int) -> tuple[Tensor, Tensor]:
    """SplitSigmas: (high, low) sharing the sigma at ``step``."""
    return sigmas[: step + 1], sigmas[step:]


def split_sigmas_denoise(sigmas: Tensor, denoise: float) -> tuple[Tensor, Tensor]:
    """SplitSigmasDenoise: the low part keeps round(steps * denoise) steps."""
    steps = max(sigmas.shape[-1] - 1, 0)
    total_steps = round(steps * denoise)
    return sigmas[:-total_steps], sigmas[-(total_steps + 1) :]


def flip_sigmas(sigmas: Tensor) -> Tensor:
    """FlipSigmas: reversed; a leading 0 becomes 0.0001."""
    if len(sigmas) == 0:
        return sigmas
    sigmas = sigmas.flip(0)
    if sigmas[0] == 0:
        sigmas[0] = 0.0001
    return sigmas


def set_first_sigma(sigmas: Tensor, sigma: float) -> Tensor:
    """SetFirstSigma."""
    sigmas = sigmas.clone()
    sigmas[0] = sigma
    return sigmas


# -- Beta distribution quantile, without scipy ------------------------------------------------------


def _betainc_cf(a: float, b: float, x: float) -> float:
    """Continued fraction for the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-16:
            break
    return h


def beta_cdf(x: float, a: float, b: float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    # The continued fraction converges fast below the mean; use the symmetry above it.
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betainc_cf(a, b, x) / a
    return 1.0 - front * _betainc_cf(b, a, 1.0 - x) / b


def beta_ppf(q: float, a: float, b: float) -> float:
    """Quantile of Beta(a, b): bisection safeguarded Newton on beta_cdf, to ~1e-15."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    if a == b and q == 0.5:
        # The exact median of a symmetric Beta. It matters: beta_scheduler rounds 0.5 * 999 = 499.5,
        # and an answer an ulp low would pick timestep 499 where scipy's picks 500.
        return 0.5
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    lo, hi = 0.0, 1.0
    x = 0.5
    for _ in range(200):
        f = beta_cdf(x, a, b) - q
        if f == 0.0:
            return x
        if f > 0:
            hi = x
        else:
            lo = x
        pdf = math.exp(log_norm + (a - 1) * math.log(x) + (b - 1) * math.log1p(-x))
        newton = x - f / pdf if pdf > 0 else -1.0
        new_x = newton if lo < newton < hi else 0.5 * (lo + hi)
        if abs(new_x - x) < 1e-15:
            return new_x
        x = new_x
    return x
