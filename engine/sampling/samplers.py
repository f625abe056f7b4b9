"""Samplers: plain functions ``sample_x(model, x, sigmas, extra_args=None, callback=None, disable=None,
**options) -> x``, registered in ``SAMPLERS`` under ComfyUI's ``sampler_name``.

``model`` is a denoiser (see ``engine.sampling.common`` for the contract), ``x`` the noised start
latent at ``sigmas[0]``, ``sigmas`` a descending schedule (usually ending in 0). ``callback`` gets
``{"i", "x", "sigma", "sigma_hat", "denoised"}`` once per step; raising from it stops sampling.
``disable`` (a progress-bar switch in k-diffusion) is accepted for signature compatibility.

The update rules follow ComfyUI's ``comfy/k_diffusion/sampling.py`` (itself k-diffusion plus many
additions) for eps / v models, including its noise seeding: ancestral and SDE noise comes from a
generator seeded with ``extra_args["seed"]`` (see ``engine.sampling.noise``). ComfyUI's rectified-
flow (CONST) branches are not implemented: eps / v models only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from engine.errors import KilnError
from engine.sampling.coefficients import (
    deis_coefficients,
    lms_coefficient,
    stochastic_adams_coefficients,
    tau_interval,
)
from engine.sampling.common import (
    DenoiserFn,
    StepCallback,
    denoise_with_uncond,
    model_sampling_of,
    report_step,
    split_extra_args,
    to_d,
)
from engine.sampling.names import KSAMPLER_NAMES, SAMPLER_NAMES
from engine.sampling.noise import BrownianTreeNoiseSampler, DefaultNoiseSampler, NoiseSampler
from engine.sampling.uni_pc import sample_unipc, sample_unipc_bh2

ExtraArgs = Mapping[str, Any] | None
SamplerFn = Callable[..., Tensor]


class UnknownSamplerError(KilnError, ValueError):
    """Raised when a sampler name is not one of SAMPLER_NAMES."""

    type_name = "unknown_sampler"


def get_ancestral_step(
    sigma_from: Tensor, sigma_to: Tensor, eta: float = 1.0
) -> tuple[Tensor, Tensor | float]:
    """(sigma_down, sigma_up): step deterministically down to sigma_down, then add sigma_up of noise."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _churn(
    x: Tensor,
    sigmas: Tensor,
    i: int,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
    noise: NoiseSampler,
) -> tuple[Tensor, Tensor]:
    """Karras' stochastic churn: raise sigma to sigma_hat by adding noise (off when s_churn is 0).

    ComfyUI draws this noise from torch's global RNG; no stock node sets s_churn. Here it comes from
    the seeded default noise sampler.
    """
    gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
    sigma_hat = sigmas[i] * (gamma + 1)
    if gamma > 0:
        x = x + noise(sigmas[i], sigma_hat) * s_noise * (sigma_hat**2 - sigmas[i] ** 2) ** 0.5
    return sigma_hat, x


def _or_default(noise_sampler: NoiseSampler | None, x: Tensor, seed: int | None) -> NoiseSampler:
    return DefaultNoiseSampler(x, seed) if noise_sampler is None else noise_sampler


# -- Karras et al. / k-diffusion ODE samplers --------------------------------------------------------


@torch.no_grad()
def sample_euler(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Euler steps (Karras et al. 2022, algorithm 2)."""
    kwargs, seed = split_extra_args(extra_args)
    noise = _or_default(noise_sampler, x, seed)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma_hat = sigmas[i]
        if s_churn > 0:
            sigma_hat, x = _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, noise)
        denoised = model(x, sigma_hat * s_in, **kwargs)
        d = to_d(x, sigma_hat, denoised)
        report_step(callback, i, x, sigmas[i], sigma_hat, denoised)
        x = x + d * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_heun(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Heun's second-order method (Karras et al. 2022); Euler on the step to 0."""
    kwargs, seed = split_extra_args(extra_args)
    noise = _or_default(noise_sampler, x, seed)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma_hat = sigmas[i]
        if s_churn > 0:
            sigma_hat, x = _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, noise)
        denoised = model(x, sigma_hat * s_in, **kwargs)
        d = to_d(x, sigma_hat, denoised)
        report_step(callback, i, x, sigmas[i], sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in, **kwargs)
            d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_heunpp2(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Heun++ (sd-webui-samplers-scheduler): up to three evaluations per step, weighted by sigma."""
    kwargs, seed = split_extra_args(extra_args)
    noise = _or_default(noise_sampler, x, seed)
    s_in = x.new_ones([x.shape[0]])
    s_end = sigmas[-1]
    for i in range(len(sigmas) - 1):
        sigma_hat, x = _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, noise)
        denoised = model(x, sigma_hat * s_in, **kwargs)
        d = to_d(x, sigma_hat, denoised)
        report_step(callback, i, x, sigmas[i], sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == s_end:
            x = x + d * dt
        elif sigmas[i + 2] == s_end:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **kwargs))
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            w1 = 1 - w2
            x = x + (d * w1 + d_2 * w2) * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **kwargs))
            x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
            d_3 = to_d(x_3, sigmas[i + 2], model(x_3, sigmas[i + 2] * s_in, **kwargs))
            w = 3 * sigmas[0]
            w2 = sigmas[i + 1] / w
            w3 = sigmas[i + 2] / w
            w1 = 1 - w2 - w3
            x = x + (w1 * d + w2 * d_2 + w3 * d_3) * dt
    return x


@torch.no_grad()
def sample_dpm_2(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DPM-Solver-2-like midpoint steps in log sigma (Karras et al. 2022)."""
    kwargs, seed = split_extra_args(extra_args)
    noise = _or_default(noise_sampler, x, seed)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma_hat = sigmas[i]
        if s_churn > 0:
            sigma_hat, x = _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, noise)
        denoised = model(x, sigma_hat * s_in, **kwargs)
        d = to_d(x, sigma_hat, denoised)
        report_step(callback, i, x, sigmas[i], sigma_hat, denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            sigma_mid = sigma_hat.log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigma_hat)
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **kwargs))
            x = x + d_2 * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Ancestral sampling with Euler steps."""
    kwargs, seed = split_extra_args(extra_args)
    noise_sampler = _or_default(noise_sampler, x, seed)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        report_step(callback, i, x, sigmas[i], sigmas[i], denoised)
        if sigma_down == 0:
            x = denoised
        else:
            d = to_d(x, sigmas[i], denoised)
            x = (
                x
                + d * (sigma_down - sigmas[i])
                + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
            )
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Ancestral sampling with DPM-Solver-2 steps."""
    kwargs, seed = split_extra_args(extra_args)
    noise_sampler = _or_default(noise_sampler, x, seed)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        report_step(callback, i, x, sigmas[i], sigmas[i], denoised)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **kwargs))
            x = x + d_2 * (sigma_down - sigmas[i])
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_lms(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    order: int = 4,
) -> Tensor:
    """Linear multistep in sigma (up to ``order`` past derivatives)."""
    kwargs, _seed = split_extra_args(extra_args)
    s_in = x.new_ones([x.shape[0]])
    t = [float(s) for s in sigmas.detach().cpu()]
    ds: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        ds.append(to_d(x, sigmas[i], denoised))
        if len(ds) > order:
            ds.pop(0)
        report_step(callback, i, x, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            cur_order = min(i + 1, order)
            coeffs = [lms_coefficient(cur_order, t, i, j) for j in range(cur_order)]
            x = x + sum(c * d for c, d in zip(coeffs, reversed(ds), strict=False))
    return x


# -- DPM-Solver (fast and adaptive) ------------------------------------------------------------------


class _DPMSolver:
    """DPM-Solver (arXiv 2206.00927) in t = -log(sigma), eps prediction."""

    def __init__(
        self,
        model: DenoiserFn,
        kwargs: Mapping[str, Any],
        info_callback: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        self.model = model
        self.kwargs = kwargs
        self.info_callback = info_callback

    @staticmethod
    def t(sigma: Tensor) -> Tensor:
        return -sigma.log()

    @staticmethod
    def sigma(t: Tensor) -> Tensor:
        return t.neg().exp()

    def eps(self, cache: dict[str, Tensor], key: str, x: Tensor, t: Tensor) -> Tensor:
        if key not in cache:
            sigma = self.sigma(t) * x.new_ones([x.shape[0]])
            cache[key] = (x - self.model(x, sigma, **self.kwargs)) / self.sigma(t)
        return cache[key]

    def step_1(self, x: Tensor, t: Tensor, t_next: Tensor, cache: dict[str, Tensor]) -> Tensor:
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        return x - self.sigma(t_next) * h.expm1() * eps

    def step_2(
        self, x: Tensor, t: Tensor, t_next: Tensor, cache: dict[str, Tensor], r1: float = 1 / 2
    ) -> Tensor:
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        return (
            x
            - self.sigma(t_next) * h.expm1() * eps
            - self.sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)
        )

    def step_3(
        self,
        x: Tensor,
        t: Tensor,
        t_next: Tensor,
        cache: dict[str, Tensor],
        r1: float = 1 / 3,
        r2: float = 2 / 3,
    ) -> Tensor:
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        s2 = t + r2 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        u2 = (
            x
            - self.sigma(s2) * (r2 * h).expm1() * eps
            - self.sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps)
        )
        eps_r2 = self.eps(cache, "eps_r2", u2, s2)
        return (
            x
            - self.sigma(t_next) * h.expm1() * eps
            - self.sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)
        )

    def _info(self, info: dict[str, Any]) -> None:
        if self.info_callback is not None:
            self.info_callback(info)

    def fast(
        self,
        x: Tensor,
        t_start: Tensor,
        t_end: Tensor,
        nfe: int,
        eta: float,
        s_noise: float,
        noise: NoiseSampler,
    ) -> Tensor:
        """Fixed steps uniform in t, orders 3, 3, ..., spending exactly ``nfe`` evaluations."""
        if not t_end > t_start and eta:
            raise ValueError("eta must be 0 for reverse sampling")
        m = math.floor(nfe / 3) + 1
        ts = torch.linspace(t_start, t_end, m + 1, device=x.device)
        orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
        for i, order in enumerate(orders):
            cache: dict[str, Tensor] = {}
            t, t_next = ts[i], ts[i + 1]
            if eta:
                sd, su = get_ancestral_step(self.sigma(t), self.sigma(t_next), eta)
                t_next_ = torch.minimum(t_end, self.t(sd))
                su = (self.sigma(t_next) ** 2 - self.sigma(t_next_) ** 2) ** 0.5
            else:
                t_next_, su = t_next, 0.0
            eps = self.eps(cache, "eps", x, t)
            self._info({"x": x, "i": i, "t": ts[i], "t_up": t, "denoised": x - self.sigma(t) * eps})
            if order == 1:
                x = self.step_1(x, t, t_next_, cache)
            elif order == 2:
                x = self.step_2(x, t, t_next_, cache)
            else:
                x = self.step_3(x, t, t_next_, cache)
            x = x + su * s_noise * noise(self.sigma(t), self.sigma(t_next))
        return x

    def adaptive(
        self,
        x: Tensor,
        t_start: Tensor,
        t_end: Tensor,
        order: int,
        rtol: float,
        atol: float,
        h_init: float,
        pcoeff: float,
        icoeff: float,
        dcoeff: float,
        accept_safety: float,
        eta: float,
        s_noise: float,
        noise: NoiseSampler,
    ) -> Tensor:
        """Embedded (order-1 / order) pairs with a PID step-size controller."""
        if order not in {2, 3}:
            raise ValueError("order should be 2 or 3")
        forward = t_end > t_start
        if not forward and eta:
            raise ValueError("eta must be 0 for reverse sampling")
        h_init = abs(h_init) * (1 if forward else -1)
        atol_t = torch.tensor(atol)
        rtol_t = torch.tensor(rtol)
        s = t_start
        x_prev = x
        pid = _PIDStepSizeController(h_init, pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
        info = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}
        while s < t_end - 1e-5 if forward else s > t_end + 1e-5:
            cache: dict[str, Tensor] = {}
            t = torch.minimum(t_end, s + pid.h) if forward else torch.maximum(t_end, s + pid.h)
            if eta:
                sd, su = get_ancestral_step(self.sigma(s), self.sigma(t), eta)
                t_ = torch.minimum(t_end, self.t(sd))
                su = (self.sigma(t) ** 2 - self.sigma(t_) ** 2) ** 0.5
            else:
                t_, su = t, 0.0
            eps = self.eps(cache, "eps", x, s)
            denoised = x - self.sigma(s) * eps
            if order == 2:
                x_low = self.step_1(x, s, t_, cache)
                x_high = self.step_2(x, s, t_, cache)
            else:
                x_low = self.step_2(x, s, t_, cache, r1=1 / 3)
                x_high = self.step_3(x, s, t_, cache)
            delta = torch.maximum(atol_t, rtol_t * torch.maximum(x_low.abs(), x_prev.abs()))
            error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
            accept = pid.propose_step(float(error))
            if accept:
                x_prev = x_low
                x = x_high + su * s_noise * noise(self.sigma(s), self.sigma(t))
                s = t
                info["n_accept"] += 1
            else:
                info["n_reject"] += 1
            info["nfe"] += order
            info["steps"] += 1
            self._info(
                {
                    "x": x,
                    "i": info["steps"] - 1,
                    "t": s,
                    "t_up": s,
                    "denoised": denoised,
                    "error": error,
                    "h": pid.h,
                    **info,
                }
            )
        return x


class _PIDStepSizeController:
    """A PID controller for ODE adaptive step size control."""

    def __init__(
        self,
        h: float,
        pcoeff: float,
        icoeff: float,
        dcoeff: float,
        order: float = 1,
        accept_safety: float = 0.81,
        eps: float = 1e-8,
    ) -> None:
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs: list[float] = []

    def propose_step(self, error: float) -> bool:
        inv_error = 1 / (error + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)  # soft limiter
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2] = self.errs[1]
            self.errs[1] = self.errs[0]
        self.h *= factor
        return accept


def _dpm_solver_callback(callback: StepCallback | None) -> Callable[[dict[str, Any]], None] | None:
    if callback is None:
        return None

    def info_callback(info: dict[str, Any]) -> None:
        callback({"sigma": _DPMSolver.sigma(info["t"]), "sigma_hat": _DPMSolver.sigma(info["t_up"]), **info})

    return info_callback


def _end_sigma(sigmas: Tensor) -> Tensor:
    """ComfyUI runs dpm_fast / dpm_adaptive down to the last non-zero sigma (not to 0)."""
    return sigmas[-2] if sigmas[-1] == 0 else sigmas[-1]


@torch.no_grad()
def sample_dpm_fast(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    eta: float = 0.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DPM-Solver-Fast from sigmas[0] to the last non-zero sigma in len(sigmas) - 1 evaluations.

    Only the ends and the count of ``sigmas`` matter: the solver spaces its own steps in log sigma.
    """
    if len(sigmas) <= 1:
        return x
    kwargs, seed = split_extra_args(extra_args)
    sigma_min, sigma_max = _end_sigma(sigmas), sigmas[0]
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("sigma_min and sigma_max must not be 0")
    noise_sampler = _or_default(noise_sampler, x, seed)
    solver = _DPMSolver(model, kwargs, _dpm_solver_callback(callback))
    return solver.fast(
        x, solver.t(sigma_max), solver.t(sigma_min), len(sigmas) - 1, eta, s_noise, noise_sampler
    )


@torch.no_grad()
def sample_dpm_adaptive(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    order: int = 3,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.05,
    pcoeff: float = 0.0,
    icoeff: float = 1.0,
    dcoeff: float = 0.0,
    accept_safety: float = 0.81,
    eta: float = 0.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DPM-Solver-12 / 23 with adaptive steps from sigmas[0] to the last non-zero sigma."""
    if len(sigmas) <= 1:
        return x
    kwargs, seed = split_extra_args(extra_args)
    sigma_min, sigma_max = _end_sigma(sigmas), sigmas[0]
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("sigma_min and sigma_max must not be 0")
    noise_sampler = _or_default(noise_sampler, x, seed)
    solver = _DPMSolver(model, kwargs, _dpm_solver_callback(callback))
    return solver.adaptive(
        x,
        solver.t(sigma_max),
        solver.t(sigma_min),
        order,
        rtol,
        atol,
        h_init,
        pcoeff,
        icoeff,
        dcoeff,
        accept_safety,
        eta,
        s_noise,
        noise_sampler,
    )


# -- DPM-Solver++ family ------------------------------------------------------------------------


def _t_fn(sigma: Tensor) -> Tensor:
    return sigma.log().neg()


def _sigma_fn(t: Tensor) -> Tensor:
    return t.neg().exp()


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Ancestral sampling with DPM-Solver++(2S) steps."""
    kwargs, seed = split_extra_args(extra_args)
    noise_sampler = _or_default(noise_sampler, x, seed)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        report_step(callback, i, x, sigmas[i], sigmas[i], denoised)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = _t_fn(sigmas[i]), _t_fn(sigma_down)
            r = 1 / 2
            h = t_next - t
            s = t + r * h
            x_2 = (_sigma_fn(s) / _sigma_fn(t)) * x - (-h * r).expm1() * denoised
            denoised_2 = model(x_2, _sigma_fn(s) * s_in, **kwargs)
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def _brownian(x: Tensor, sigmas: Tensor, seed: int | None, cpu: bool) -> BrownianTreeNoiseSampler:
    return BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seed, cpu=cpu)


@torch.no_grad()
def sample_dpmpp_sde(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    r: float = 1 / 2,
    cpu_noise: bool = True,
) -> Tensor:
    """DPM-Solver++ (stochastic), two evaluations per step; Brownian-tree noise."""
    if len(sigmas) <= 1:
        return x
    kwargs, seed = split_extra_args(extra_args)
    noise_sampler = noise_sampler if noise_sampler is not None else _brownian(x, sigmas, seed, cpu_noise)
    ms = model_sampling_of(model)
    s_in = x.new_ones([x.shape[0]])
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        report_step(callback, i, x, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = ms.half_log_snr(sigmas[i]), ms.half_log_snr(sigmas[i + 1])
        h = lambda_t - lambda_s
        lambda_s_1 = lambda_s + r * h
        sigma_s_1 = ms.sigma_from_half_log_snr(lambda_s_1)
        alpha_s = sigmas[i] * lambda_s.exp()
        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()

        # Step 1: to the intermediate point.
        sd, su = get_ancestral_step(lambda_s.neg().exp(), lambda_s_1.neg().exp(), eta)
        h_ = sd.log().neg() - lambda_s
        x_2 = (alpha_s_1 / alpha_s) * (-h_).exp() * x - alpha_s_1 * (-h_).expm1() * denoised
        if eta > 0 and s_noise > 0:
            x_2 = x_2 + alpha_s_1 * noise_sampler(sigmas[i], sigma_s_1) * s_noise * su
        denoised_2 = model(x_2, sigma_s_1 * s_in, **kwargs)

        # Step 2: the full step with the blended prediction.
        sd, su = get_ancestral_step(lambda_s.neg().exp(), lambda_t.neg().exp(), eta)
        h_ = sd.log().neg() - lambda_s
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (alpha_t / alpha_s) * (-h_).exp() * x - alpha_t * (-h_).expm1() * denoised_d
        if eta > 0 and s_noise > 0:
            x = x + alpha_t * noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * su
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
) -> Tensor:
    """DPM-Solver++(2M)."""
    kwargs, _seed = split_extra_args(extra_args)
    s_in = x.new_ones([x.shape[0]])
    old_denoised: Tensor | None = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        report_step(callback, i, x, sigmas[i], sigmas[i], denoised)
        t, t_next = _t_fn(sigmas[i]), _t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            r = (t - _t_fn(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    solver_type: str = "midpoint",
    cpu_noise: bool = True,
) -> Tensor:
    """DPM-Solver++(2M) SDE; ``solver_type`` "midpoint" or "heun"; Brownian-tree noise."""
    if len(sigmas) <= 1:
        return x
    if solver_type not in {"heun", "midpoint"}:
        raise ValueError("solver_type must be 'heun' or 'midpoint'")
    kwargs, seed = split_extra_args(extra_args)
    noise_sampler = noise_sampler if noise_sampler is not None else _brownian(x, sigmas, seed, cpu_noise)
    ms = model_sampling_of(model)
    s_in = x.new_ones([x.shape[0]])
    old_denoised: Tensor | None = None
    h: Tensor | None = None
    h_last: Tensor | None = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        report_step(callback, i, x, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lambda_s, lambda_t = ms.half_log_snr(sigmas[i]), ms.half_log_snr(sigmas[i + 1])
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lambda_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if old_denoised is not None and h_last is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + alpha_t * ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * (
                        denoised - old_denoised
                    )
                else:
                    x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta > 0 and s_noise > 0:
                x = (
                    x
                    + noise_sampler(sigmas[i], sigmas[i + 1])
                    * sigmas[i + 1]
                    * (-2 * h * eta).expm1().neg().sqrt()
                    * s_noise
                )
        old_denoised = denoised
        h_last = h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    cpu_noise: bool = True,
) -> Tensor:
    """DPM-Solver++(3M) SDE; Brownian-tree noise."""
    if len(sigmas) <= 1:
        return x
    kwargs, seed = split_extra_args(extra_args)
    noise_sampler = noise_sampler if noise_sampler is not None else _brownian(x, sigmas, seed, cpu_noise)
    ms = model_sampling_of(model)
    s_in = x.new_ones([x.shape[0]])
    denoised_1: Tensor | None = None
    denoised_2: Tensor | None = None
    h: Tensor | None = None
    h_1: Tensor | None = None
    h_2: Tensor | None = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        report_step(callback, i, x, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lambda_s, lambda_t = ms.half_log_snr(sigmas[i]), ms.half_log_snr(sigmas[i + 1])
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lambda_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if h_2 is not None and h_1 is not None and denoised_1 is not None and denoised_2 is not None:
                r0 = h_1 / h
                r1 = h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
            elif h_1 is not None and denoised_1 is not None:
                r = h_1 / h
                d = (denoised - denoised_1) / r
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + (alpha_t * phi_2) * d
            if eta > 0 and s_noise > 0:
                x = (
                    x
                    + noise_sampler(sigmas[i], sigmas[i + 1])
                    * sigmas[i + 1]
                    * (-2 * h * eta).expm1().neg().sqrt()
                    * s_noise
                )
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


@torch.no_grad()
def sample_dpmpp_sde_gpu(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    r: float = 1 / 2,
) -> Tensor:
    """dpmpp_sde with the Brownian tree on the latent's device (ComfyUI's "_gpu" variants)."""
    return sample_dpmpp_sde(
        model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, r, False
    )


@torch.no_grad()
def sample_dpmpp_2m_sde_gpu(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    solver_type: str = "midpoint",
) -> Tensor:
    return sample_dpmpp_2m_sde(
        model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, solver_type, False
    )


@torch.no_grad()
def sample_dpmpp_2m_sde_heun(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    solver_type: str = "heun",
) -> Tensor:
    return sample_dpmpp_2m_sde(
        model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, solver_type, True
    )


@torch.no_grad()
def sample_dpmpp_2m_sde_heun_gpu(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    solver_type: str = "heun",
) -> Tensor:
    return sample_dpmpp_2m_sde(
        model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, solver_type, False
    )


@torch.no_grad()
def sample_dpmpp_3m_sde_gpu(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    return sample_dpmpp_3m_sde(
        model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, False
    )


# -- DDPM, LCM ----------------------------------------------------------------------------------


@torch.no_grad()
def sample_ddpm(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Ancestral DDPM posterior steps, taken in variance-preserving coordinates."""
    kwargs, seed = split_extra_args(extra_args)
    noise_sampler = _or_default(noise_sampler, x, seed)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        report_step(callback, i, x, sigmas[i], sigmas[i], denoised)
        sigma, sigma_prev = sigmas[i], sigmas[i + 1]
        x_vp = x / torch.sqrt(1.0 + sigma**2.0)
        eps = (x - denoised) / sigma
        alpha_cumprod = 1 / ((sigma * sigma) + 1)
        alpha_cumprod_prev = 1 / ((sigma_prev * sigma_prev) + 1)
        alpha = alpha_cumprod / alpha_cumprod_prev
        mu = (1.0 / alpha).sqrt() * (x_vp - (1 - alpha) * eps / (1 - alpha_cumprod).sqrt())
        if sigma_prev > 0:
            mu += ((1 - alpha) * (1.0 - alpha_cumprod_prev) / (1.0 - alpha_cumprod)).sqrt() * noise_sampler(
                sigma, sigma_prev
            )
            mu *= torch.sqrt(1.0 + sigma_prev**2.0)
        x = mu
    return x


@torch.no_grad()
def sample_lcm(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Latent Consistency Model steps: jump to the prediction, re-noise to the next sigma."""
    kwargs, seed = split_extra_args(extra_args)
    noise_sampler = _or_default(noise_sampler, x, seed)
    ms = model_sampling_of(model)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        report_step(callback, i, x, sigmas[i], sigmas[i], denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = ms.noise_scaling(sigmas[i + 1], noise_sampler(sigmas[i], sigmas[i + 1]), x)
    return x


# -- pseudo-numerical / exponential multistep (diff-solvers) ---------------------------------------


def _shift_buffer(buffer: list[Tensor], d: Tensor, max_order: int) -> None:
    """Keep the last max_order - 1 derivatives."""
    if max_order <= 1:
        return
    if len(buffer) == max_order - 1:
        buffer.pop(0)
    buffer.append(d)


@torch.no_grad()
def sample_ipndm(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    max_order: int = 4,
) -> Tensor:
    """Improved PNDM: Adams-Bashforth in sigma with fixed coefficients."""
    kwargs, _seed = split_extra_args(extra_args)
    s_in = x.new_ones([x.shape[0]])
    buffer: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, t_cur * s_in, **kwargs)
        report_step(callback, i, x, t_cur, t_cur, denoised)
        d_cur = (x - denoised) / t_cur
        order = min(max_order, i + 1)
        dt = t_next - t_cur
        if t_next == 0:
            x_next = denoised
        elif order == 1:
            x_next = x + dt * d_cur
        elif order == 2:
            x_next = x + dt * (3 * d_cur - buffer[-1]) / 2
        elif order == 3:
            x_next = x + dt * (23 * d_cur - 16 * buffer[-1] + 5 * buffer[-2]) / 12
        else:
            x_next = x + dt * (55 * d_cur - 59 * buffer[-1] + 37 * buffer[-2] - 9 * buffer[-3]) / 24
        _shift_buffer(buffer, d_cur, max_order)
        x = x_next
    return x


@torch.no_grad()
def sample_ipndm_v(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    max_order: int = 4,
) -> Tensor:
    """Improved PNDM with variable-step coefficients."""
    kwargs, _seed = split_extra_args(extra_args)
    s_in = x.new_ones([x.shape[0]])
    t_steps = sigmas
    buffer: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, t_cur * s_in, **kwargs)
        report_step(callback, i, x, t_cur, t_cur, denoised)
        d_cur = (x - denoised) / t_cur
        order = min(max_order, i + 1)
        if t_next == 0:
            x_next = denoised
        elif order == 1:
            x_next = x + (t_next - t_cur) * d_cur
        else:
            h_n = t_next - t_cur
            h_n_1 = t_cur - t_steps[i - 1]
            if order == 2:
                coeff1 = (2 + (h_n / h_n_1)) / 2
                coeff2 = -(h_n / h_n_1) / 2
                x_next = x + (t_next - t_cur) * (coeff1 * d_cur + coeff2 * buffer[-1])
            else:
                h_n_2 = t_steps[i - 1] - t_steps[i - 2]
                temp1 = (
                    1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))
                ) / 2
                if order == 3:
                    coeff1 = (2 + (h_n / h_n_1)) / 2 + temp1
                    coeff2 = -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp1
                    coeff3 = temp1 * h_n_1 / h_n_2
                    x_next = x + (t_next - t_cur) * (
                        coeff1 * d_cur + coeff2 * buffer[-1] + coeff3 * buffer[-2]
                    )
                else:
                    h_n_3 = t_steps[i - 2] - t_steps[i - 3]
                    ratio = h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3))
                    temp2 = (
                        (
                            (1 - h_n / (3 * (h_n + h_n_1))) / 2
                            + (1 - h_n / (2 * (h_n + h_n_1))) * h_n / (6 * (h_n + h_n_1 + h_n_2))
                        )
                        * (h_n * (h_n + h_n_1) * (h_n + h_n_1 + h_n_2))
                        / (h_n_1 * (h_n_1 + h_n_2) * (h_n_1 + h_n_2 + h_n_3))
                    )
                    coeff1 = (2 + (h_n / h_n_1)) / 2 + temp1 + temp2
                    coeff2 = (
                        -(h_n / h_n_1) / 2
                        - (1 + h_n_1 / h_n_2) * temp1
                        - (1 + (h_n_1 / h_n_2) + ratio) * temp2
                    )
                    coeff3 = temp1 * h_n_1 / h_n_2 + ((h_n_1 / h_n_2) + ratio * (1 + h_n_2 / h_n_3)) * temp2
                    coeff4 = -temp2 * ratio * h_n_1 / h_n_2
                    x_next = x + (t_next - t_cur) * (
                        coeff1 * d_cur + coeff2 * buffer[-1] + coeff3 * buffer[-2] + coeff4 * buffer[-3]
                    )
        _shift_buffer(buffer, d_cur, max_order)
        x = x_next
    return x


@torch.no_grad()
def sample_deis(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    max_order: int = 3,
) -> Tensor:
    """DEIS (tAB): exponential-integrator multistep with precomputed coefficients."""
    kwargs, _seed = split_extra_args(extra_args)
    s_in = x.new_ones([x.shape[0]])
    coeff_list = deis_coefficients(sigmas, max_order)
    buffer: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, t_cur * s_in, **kwargs)
        report_step(callback, i, x, t_cur, t_cur, denoised)
        d_cur = (x - denoised) / t_cur
        order = 1 if t_next <= 0 else min(max_order, i + 1)
        if order == 1:
            x_next = x + (t_next - t_cur) * d_cur
        else:
            coeffs = coeff_list[i]
            x_next = x + coeffs[0].to(x.device) * d_cur
            for k in range(1, order):
                x_next = x_next + coeffs[k].to(x.device) * buffer[-k]
        _shift_buffer(buffer, d_cur, max_order)
        x = x_next
    return x


# -- CFG++ samplers (need the unconditional prediction) ----------------------------------------------


@torch.no_grad()
def sample_euler_ancestral_cfg_pp(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Ancestral Euler (CFG++): step along the unconditional direction from the guided prediction."""
    kwargs, seed = split_extra_args(extra_args)
    noise_sampler = _or_default(noise_sampler, x, seed)
    ms = model_sampling_of(model)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised, uncond = denoise_with_uncond(model, x, sigmas[i] * s_in, kwargs)
        report_step(callback, i, x, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        alpha_s = sigmas[i] * ms.half_log_snr(sigmas[i]).exp()
        alpha_t = sigmas[i + 1] * ms.half_log_snr(sigmas[i + 1]).exp()
        d = to_d(x, sigmas[i], alpha_s * uncond)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i] / alpha_s, sigmas[i + 1] / alpha_t, eta=eta)
        x = alpha_t * denoised + alpha_t * sigma_down * d
        if eta > 0 and s_noise > 0:
            x = x + alpha_t * noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_euler_cfg_pp(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
) -> Tensor:
    """Euler (CFG++)."""
    return sample_euler_ancestral_cfg_pp(
        model, x, sigmas, extra_args, callback, disable, eta=0.0, s_noise=0.0
    )


@torch.no_grad()
def sample_dpmpp_2s_ancestral_cfg_pp(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Ancestral DPM-Solver++(2S) (CFG++)."""
    kwargs, seed = split_extra_args(extra_args)
    noise_sampler = _or_default(noise_sampler, x, seed)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised, uncond = denoise_with_uncond(model, x, sigmas[i] * s_in, kwargs)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        report_step(callback, i, x, sigmas[i], sigmas[i], denoised)
        if sigma_down == 0:
            x = denoised + to_d(x, sigmas[i], uncond) * sigma_down
        else:
            t, t_next = _t_fn(sigmas[i]), _t_fn(sigma_down)
            h = t_next - t
            s = t + h / 2
            x_2 = (_sigma_fn(s) / _sigma_fn(t)) * (x + (denoised - uncond)) - (-h / 2).expm1() * denoised
            denoised_2, uncond_2 = denoise_with_uncond(model, x_2, _sigma_fn(s) * s_in, kwargs)
            # ComfyUI's hook has been overwritten by the second call here: its uncond is used.
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * (x + (denoised - uncond_2)) - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_2m_cfg_pp(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (CFG++)."""
    kwargs, _seed = split_extra_args(extra_args)
    s_in = x.new_ones([x.shape[0]])
    old_uncond: Tensor | None = None
    for i in range(len(sigmas) - 1):
        denoised, uncond = denoise_with_uncond(model, x, sigmas[i] * s_in, kwargs)
        report_step(callback, i, x, sigmas[i], sigmas[i], denoised)
        t, t_next = _t_fn(sigmas[i]), _t_fn(sigmas[i + 1])
        h = t_next - t
        if old_uncond is None or sigmas[i + 1] == 0:
            denoised_mix = -torch.exp(-h) * uncond
        else:
            r = (t - _t_fn(sigmas[i - 1])) / h
            denoised_mix = -torch.exp(-h) * uncond - torch.expm1(-h) * (1 / (2 * r)) * (denoised - old_uncond)
        x = denoised + denoised_mix + torch.exp(-h) * x
        old_uncond = uncond
    return x


def _res_multistep(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs,
    callback: StepCallback | None,
    s_noise: float,
    noise_sampler: NoiseSampler | None,
    eta: float,
    cfg_pp: bool,
) -> Tensor:
    """Second-order RES multistep (arXiv 2308.02157), optionally ancestral and/or CFG++."""
    kwargs, seed = split_extra_args(extra_args)
    noise_sampler = _or_default(noise_sampler, x, seed)
    s_in = x.new_ones([x.shape[0]])

    def phi1(t: Tensor) -> Tensor:
        return torch.expm1(t) / t

    def phi2(t: Tensor) -> Tensor:
        return (phi1(t) - 1.0) / t

    old_sigma_down: Tensor | None = None
    old_denoised: Tensor | None = None
    for i in range(len(sigmas) - 1):
        if cfg_pp:
            denoised, uncond = denoise_with_uncond(model, x, sigmas[i] * s_in, kwargs)
        else:
            denoised = uncond = model(x, sigmas[i] * s_in, **kwargs)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        report_step(callback, i, x, sigmas[i], sigmas[i], denoised)
        if sigma_down == 0 or old_denoised is None or old_sigma_down is None:
            if cfg_pp:
                x = denoised + to_d(x, sigmas[i], uncond) * sigma_down
            else:
                x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_old = _t_fn(sigmas[i]), _t_fn(old_sigma_down)
            t_next, t_prev = _t_fn(sigma_down), _t_fn(sigmas[i - 1])
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1_val, phi2_val = phi1(-h), phi2(-h)
            b1 = torch.nan_to_num(phi1_val - phi2_val / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2_val / c2, nan=0.0)
            if cfg_pp:
                x = x + (denoised - uncond)
                x = _sigma_fn(h) * x + h * (b1 * uncond + b2 * old_denoised)
            else:
                x = _sigma_fn(h) * x + h * (b1 * denoised + b2 * old_denoised)
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        old_denoised = uncond if cfg_pp else denoised
        old_sigma_down = sigma_down
    return x


@torch.no_grad()
def sample_res_multistep(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    return _res_multistep(
        model, x, sigmas, extra_args, callback, s_noise, noise_sampler, eta=0.0, cfg_pp=False
    )


@torch.no_grad()
def sample_res_multistep_cfg_pp(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    return _res_multistep(
        model, x, sigmas, extra_args, callback, s_noise, noise_sampler, eta=0.0, cfg_pp=True
    )


@torch.no_grad()
def sample_res_multistep_ancestral(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    return _res_multistep(
        model, x, sigmas, extra_args, callback, s_noise, noise_sampler, eta=eta, cfg_pp=False
    )


@torch.no_grad()
def sample_res_multistep_ancestral_cfg_pp(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    return _res_multistep(
        model, x, sigmas, extra_args, callback, s_noise, noise_sampler, eta=eta, cfg_pp=True
    )


@torch.no_grad()
def sample_gradient_estimation(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    ge_gamma: float = 2.0,
    cfg_pp: bool = False,
) -> Tensor:
    """Gradient-estimation sampler (openreview o2ND9v0CeK): Euler plus a derivative correction."""
    kwargs, _seed = split_extra_args(extra_args)
    s_in = x.new_ones([x.shape[0]])
    old_d: Tensor | None = None
    for i in range(len(sigmas) - 1):
        if cfg_pp:
            denoised, uncond = denoise_with_uncond(model, x, sigmas[i] * s_in, kwargs)
        else:
            denoised = uncond = model(x, sigmas[i] * s_in, **kwargs)
        d = to_d(x, sigmas[i], uncond)
        report_step(callback, i, x, sigmas[i], sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = denoised + d * sigmas[i + 1] if cfg_pp else x + d * dt
            if i >= 1 and old_d is not None:
                x = x + (ge_gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


@torch.no_grad()
def sample_gradient_estimation_cfg_pp(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    ge_gamma: float = 2.0,
) -> Tensor:
    return sample_gradient_estimation(model, x, sigmas, extra_args, callback, disable, ge_gamma, cfg_pp=True)


# -- ER-SDE, SEEDS, SA-Solver ---------------------------------------------------------------------


def _er_sde_noise_scaler(x: Tensor) -> Tensor:
    return x * ((x**0.3).exp() + 10.0)


@torch.no_grad()
def sample_er_sde(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    noise_scaler: Callable[[Tensor], Tensor] | None = None,
    max_stage: int = 3,
) -> Tensor:
    """Extended reverse-time SDE solver, VP ER-SDE-Solver-3 (arXiv 2309.06169)."""
    kwargs, seed = split_extra_args(extra_args)
    noise_sampler = _or_default(noise_sampler, x, seed)
    scaler = noise_scaler or _er_sde_noise_scaler
    ms = model_sampling_of(model)
    s_in = x.new_ones([x.shape[0]])
    num_points = 200.0
    point_indice = torch.arange(0, num_points, dtype=torch.float32, device=x.device)
    er_lambdas = ms.half_log_snr(sigmas).neg().exp()  # sigma / alpha
    old_denoised: Tensor | None = None
    old_denoised_d: Tensor | None = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        report_step(callback, i, x, sigmas[i], sigmas[i], denoised)
        stage_used = min(max_stage, i + 1)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            er_lambda_s, er_lambda_t = er_lambdas[i], er_lambdas[i + 1]
            alpha_s = sigmas[i] / er_lambda_s
            alpha_t = sigmas[i + 1] / er_lambda_t
            r_alpha = alpha_t / alpha_s
            r = scaler(er_lambda_t) / scaler(er_lambda_s)
            x = r_alpha * r * x + alpha_t * (1 - r) * denoised
            if stage_used >= 2 and old_denoised is not None:
                dt = er_lambda_t - er_lambda_s
                lambda_step_size = -dt / num_points
                lambda_pos = er_lambda_t + point_indice * lambda_step_size
                scaled_pos = scaler(lambda_pos)
                s = torch.sum(1 / scaled_pos) * lambda_step_size
                denoised_d = (denoised - old_denoised) / (er_lambda_s - er_lambdas[i - 1])
                x = x + alpha_t * (dt + s * scaler(er_lambda_t)) * denoised_d
                if stage_used >= 3 and old_denoised_d is not None:
                    s_u = torch.sum((lambda_pos - er_lambda_s) / scaled_pos) * lambda_step_size
                    denoised_u = (denoised_d - old_denoised_d) / ((er_lambda_s - er_lambdas[i - 2]) / 2)
                    x = x + alpha_t * ((dt**2) / 2 + s_u * scaler(er_lambda_t)) * denoised_u
                old_denoised_d = denoised_d
            if s_noise > 0:
                spread = (er_lambda_t**2 - er_lambda_s**2 * r**2).sqrt().nan_to_num(nan=0.0)
                x = x + alpha_t * noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * spread
        old_denoised = denoised
    return x


def _ei_h_phi_1(h: Tensor) -> Tensor:
    """h * phi_1(h) of exponential integrators."""
    return torch.expm1(h)


def _ei_h_phi_2(h: Tensor) -> Tensor:
    """h * phi_2(h) of exponential integrators."""
    return (torch.expm1(h) - h) / h


@torch.no_grad()
def sample_seeds_2(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    r: float = 0.5,
    solver_type: str = "phi_1",
) -> Tensor:
    """SEEDS-2 (arXiv 2305.14267), data prediction, two stages."""
    if solver_type not in {"phi_1", "phi_2"}:
        raise ValueError("solver_type must be 'phi_1' or 'phi_2'")
    kwargs, seed = split_extra_args(extra_args)
    noise_sampler = _or_default(noise_sampler, x, seed)
    ms = model_sampling_of(model)
    s_in = x.new_ones([x.shape[0]])
    inject_noise = eta > 0 and s_noise > 0
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        report_step(callback, i, x, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = ms.half_log_snr(sigmas[i]), ms.half_log_snr(sigmas[i + 1])
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        lambda_s_1 = torch.lerp(lambda_s, lambda_t, r)
        sigma_s_1 = ms.sigma_from_half_log_snr(lambda_s_1)
        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()

        x_2 = (
            sigma_s_1 / sigmas[i] * (-r * h * eta).exp() * x - alpha_s_1 * _ei_h_phi_1(-r * h_eta) * denoised
        )
        sde_noise: Tensor | None = None
        if inject_noise:
            sde_noise = (-2 * r * h * eta).expm1().neg().sqrt() * noise_sampler(sigmas[i], sigma_s_1)
            x_2 = x_2 + sde_noise * sigma_s_1 * s_noise
        denoised_2 = model(x_2, sigma_s_1 * s_in, **kwargs)

        if solver_type == "phi_1":
            denoised_d = torch.lerp(denoised, denoised_2, fac)
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * _ei_h_phi_1(-h_eta) * denoised_d
        else:
            b2 = _ei_h_phi_2(-h_eta) / r
            b1 = _ei_h_phi_1(-h_eta) - b2
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b2 * denoised_2)
        if sde_noise is not None:
            # Continue the same Brownian path over the rest of the step.
            segment_factor = (r - 1) * h * eta
            sde_noise = sde_noise * segment_factor.exp()
            sde_noise = sde_noise + segment_factor.mul(2).expm1().neg().sqrt() * noise_sampler(
                sigma_s_1, sigmas[i + 1]
            )
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x


@torch.no_grad()
def sample_exp_heun_2_x0(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    solver_type: str = "phi_2",
) -> Tensor:
    """Deterministic exponential Heun, data prediction, in log-SNR time (SEEDS-2 with r = 1, eta = 0)."""
    return sample_seeds_2(
        model, x, sigmas, extra_args, callback, disable, eta=0.0, s_noise=0.0, r=1.0, solver_type=solver_type
    )


@torch.no_grad()
def sample_exp_heun_2_x0_sde(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    solver_type: str = "phi_2",
) -> Tensor:
    """Stochastic exponential Heun (SEEDS-2 with r = 1)."""
    return sample_seeds_2(
        model,
        x,
        sigmas,
        extra_args,
        callback,
        disable,
        eta=eta,
        s_noise=s_noise,
        noise_sampler=noise_sampler,
        r=1.0,
        solver_type=solver_type,
    )


@torch.no_grad()
def sample_seeds_3(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    r_1: float = 1.0 / 3,
    r_2: float = 2.0 / 3,
) -> Tensor:
    """SEEDS-3 (arXiv 2305.14267), data prediction, three stages."""
    kwargs, seed = split_extra_args(extra_args)
    noise_sampler = _or_default(noise_sampler, x, seed)
    ms = model_sampling_of(model)
    s_in = x.new_ones([x.shape[0]])
    inject_noise = eta > 0 and s_noise > 0
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **kwargs)
        report_step(callback, i, x, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = ms.half_log_snr(sigmas[i]), ms.half_log_snr(sigmas[i + 1])
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        lambda_s_1 = torch.lerp(lambda_s, lambda_t, r_1)
        lambda_s_2 = torch.lerp(lambda_s, lambda_t, r_2)
        sigma_s_1, sigma_s_2 = ms.sigma_from_half_log_snr(lambda_s_1), ms.sigma_from_half_log_snr(lambda_s_2)
        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
        alpha_s_2 = sigma_s_2 * lambda_s_2.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()

        # Stage 1
        x_2 = (
            sigma_s_1 / sigmas[i] * (-r_1 * h * eta).exp() * x
            - alpha_s_1 * _ei_h_phi_1(-r_1 * h_eta) * denoised
        )
        sde_noise: Tensor | None = None
        if inject_noise:
            sde_noise = (-2 * r_1 * h * eta).expm1().neg().sqrt() * noise_sampler(sigmas[i], sigma_s_1)
            x_2 = x_2 + sde_noise * sigma_s_1 * s_noise
        denoised_2 = model(x_2, sigma_s_1 * s_in, **kwargs)

        # Stage 2
        a3_2 = r_2 / r_1 * _ei_h_phi_2(-r_2 * h_eta)
        a3_1 = _ei_h_phi_1(-r_2 * h_eta) - a3_2
        x_3 = sigma_s_2 / sigmas[i] * (-r_2 * h * eta).exp() * x - alpha_s_2 * (
            a3_1 * denoised + a3_2 * denoised_2
        )
        if sde_noise is not None:
            segment_factor = (r_1 - r_2) * h * eta
            sde_noise = sde_noise * segment_factor.exp()
            sde_noise = sde_noise + segment_factor.mul(2).expm1().neg().sqrt() * noise_sampler(
                sigma_s_1, sigma_s_2
            )
            x_3 = x_3 + sde_noise * sigma_s_2 * s_noise
        denoised_3 = model(x_3, sigma_s_2 * s_in, **kwargs)

        # Stage 3
        b3 = _ei_h_phi_2(-h_eta) / r_2
        b1 = _ei_h_phi_1(-h_eta) - b3
        x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b3 * denoised_3)
        if sde_noise is not None:
            segment_factor = (r_2 - 1) * h * eta
            sde_noise = sde_noise * segment_factor.exp()
            sde_noise = sde_noise + segment_factor.mul(2).expm1().neg().sqrt() * noise_sampler(
                sigma_s_2, sigmas[i + 1]
            )
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x


@torch.no_grad()
def sample_sa_solver(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    tau_func: Callable[[Tensor | float], float] | None = None,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    predictor_order: int = 3,
    corrector_order: int = 4,
    use_pece: bool = False,
    simple_order_2: bool = False,
) -> Tensor:
    """SA-Solver (NeurIPS 2023): stochastic Adams predictor-corrector in half-log-SNR.

    By default it is stochastic (tau = 1) between 20 % and 80 % of the model's schedule.
    """
    if len(sigmas) <= 1:
        return x
    kwargs, seed = split_extra_args(extra_args)
    noise_sampler = _or_default(noise_sampler, x, seed)
    ms = model_sampling_of(model)
    s_in = x.new_ones([x.shape[0]])
    lambdas = ms.half_log_snr(sigmas)
    if tau_func is None:
        tau_func = tau_interval(ms.percent_to_sigma(0.2), ms.percent_to_sigma(0.8), eta=1.0)

    max_used_order = max(predictor_order, corrector_order)
    x_pred = x  # x: the corrected state, x_pred: the predicted next state
    h = sigmas.new_zeros(())
    tau_t = 0.0
    noise: Tensor | float = 0.0
    pred_list: list[Tensor] = []
    lower_order_to_end = float(sigmas[-1]) == 0  # lower the order near the end for stability

    for i in range(len(sigmas) - 1):
        denoised = model(x_pred, sigmas[i] * s_in, **kwargs)
        report_step(callback, i, x_pred, sigmas[i], sigmas[i], denoised)
        pred_list.append(denoised)
        pred_list = pred_list[-max_used_order:]

        predictor_order_used = min(predictor_order, len(pred_list))
        if i == 0 or (sigmas[i + 1] == 0 and not use_pece):
            corrector_order_used = 0
        else:
            corrector_order_used = min(corrector_order, len(pred_list))
        if lower_order_to_end:
            predictor_order_used = min(predictor_order_used, len(sigmas) - 2 - i)
            corrector_order_used = min(corrector_order_used, len(sigmas) - 1 - i)

        # Corrector
        if corrector_order_used == 0:
            x = x_pred
        else:
            b_coeffs = stochastic_adams_coefficients(
                sigmas[i],
                lambdas[i - corrector_order_used + 1 : i + 1],
                lambdas[i - 1],
                lambdas[i],
                tau_t,
                simple_order_2,
                is_corrector=True,
            )
            pred_mat = torch.stack(pred_list[-corrector_order_used:], dim=1)  # [B, K, ...]
            corr_res = torch.tensordot(pred_mat, b_coeffs, dims=([1], [0]))
            x = sigmas[i] / sigmas[i - 1] * (-(tau_t**2) * h).exp() * x + corr_res
            if tau_t > 0 and s_noise > 0:
                x = x + noise  # the noise drawn by the previous predictor step
            if use_pece:
                denoised = model(x, sigmas[i] * s_in, **kwargs)
                pred_list[-1] = denoised

        # Predictor
        if sigmas[i + 1] == 0:
            x_pred = denoised
        else:
            tau_t = tau_func(sigmas[i + 1])
            b_coeffs = stochastic_adams_coefficients(
                sigmas[i + 1],
                lambdas[i - predictor_order_used + 1 : i + 1],
                lambdas[i],
                lambdas[i + 1],
                tau_t,
                simple_order_2,
                is_corrector=False,
            )
            pred_mat = torch.stack(pred_list[-predictor_order_used:], dim=1)
            pred_res = torch.tensordot(pred_mat, b_coeffs, dims=([1], [0]))
            h = lambdas[i + 1] - lambdas[i]
            x_pred = sigmas[i + 1] / sigmas[i] * (-(tau_t**2) * h).exp() * x + pred_res
            if tau_t > 0 and s_noise > 0:
                noise = (
                    noise_sampler(sigmas[i], sigmas[i + 1])
                    * sigmas[i + 1]
                    * (-2 * tau_t**2 * h).expm1().neg().sqrt()
                    * s_noise
                )
                x_pred = x_pred + noise
    return x_pred


@torch.no_grad()
def sample_sa_solver_pece(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: ExtraArgs = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    tau_func: Callable[[Tensor | float], float] | None = None,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    predictor_order: int = 3,
    corrector_order: int = 4,
    simple_order_2: bool = False,
) -> Tensor:
    """SA-Solver in PECE mode (predict, evaluate, correct, evaluate)."""
    return sample_sa_solver(
        model,
        x,
        sigmas,
        extra_args,
        callback,
        disable,
        tau_func,
        s_noise,
        noise_sampler,
        predictor_order,
        corrector_order,
        True,
        simple_order_2,
    )


# -- the registry ---------------------------------------------------------------------------------

SAMPLERS: dict[str, SamplerFn] = {
    "euler": sample_euler,
    "euler_cfg_pp": sample_euler_cfg_pp,
    "euler_ancestral": sample_euler_ancestral,
    "euler_ancestral_cfg_pp": sample_euler_ancestral_cfg_pp,
    "heun": sample_heun,
    "heunpp2": sample_heunpp2,
    "exp_heun_2_x0": sample_exp_heun_2_x0,
    "exp_heun_2_x0_sde": sample_exp_heun_2_x0_sde,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpm_fast": sample_dpm_fast,
    "dpm_adaptive": sample_dpm_adaptive,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_2s_ancestral_cfg_pp": sample_dpmpp_2s_ancestral_cfg_pp,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_sde_gpu": sample_dpmpp_sde_gpu,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_cfg_pp": sample_dpmpp_2m_cfg_pp,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_gpu": sample_dpmpp_2m_sde_gpu,
    "dpmpp_2m_sde_heun": sample_dpmpp_2m_sde_heun,
    "dpmpp_2m_sde_heun_gpu": sample_dpmpp_2m_sde_heun_gpu,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "dpmpp_3m_sde_gpu": sample_dpmpp_3m_sde_gpu,
    "ddpm": sample_ddpm,
    "lcm": sample_lcm,
    "ipndm": sample_ipndm,
    "ipndm_v": sample_ipndm_v,
    "deis": sample_deis,
    "res_multistep": sample_res_multistep,
    "res_multistep_cfg_pp": sample_res_multistep_cfg_pp,
    "res_multistep_ancestral": sample_res_multistep_ancestral,
    "res_multistep_ancestral_cfg_pp": sample_res_multistep_ancestral_cfg_pp,
    "gradient_estimation": sample_gradient_estimation,
    "gradient_estimation_cfg_pp": sample_gradient_estimation_cfg_pp,
    "er_sde": sample_er_sde,
    "seeds_2": sample_seeds_2,
    "seeds_3": sample_seeds_3,
    "sa_solver": sample_sa_solver,
    "sa_solver_pece": sample_sa_solver_pece,
    # ComfyUI's "ddim" is Euler; it differs only in the inpainting noise (see run.py).
    "ddim": sample_euler,
    "uni_pc": sample_unipc,
    "uni_pc_bh2": sample_unipc_bh2,
}

# ComfyUI's "ddim" blends fresh noise (seed + 1) into the masked-off area instead of the initial noise.
INPAINT_RANDOM_NOISE_SAMPLERS = frozenset({"ddim"})


def get_sampler(name: str) -> SamplerFn:
    """The sampler registered under a ComfyUI sampler_name."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise UnknownSamplerError(f"unknown sampler {name!r}") from None


__all__ = ["KSAMPLER_NAMES", "SAMPLERS", "SAMPLER_NAMES", "get_sampler"]
