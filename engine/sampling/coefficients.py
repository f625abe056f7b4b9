"""Integration coefficients of the multistep samplers (LMS, DEIS, SA-Solver).

Pure functions of the sigma schedule; they follow the arithmetic of ComfyUI's implementations
(DEIS's fixed EDM-to-VP time map and its 10000-point Riemann sum included) so the samplers built on
them give ComfyUI's numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

# -- LMS ------------------------------------------------------------------------------------------


def lms_coefficient(order: int, t: Sequence[float], i: int, j: int) -> float:
    """Integral over [t[i], t[i+1]] of the Lagrange basis polynomial j on nodes t[i], t[i-1], ...

    The integrand is a polynomial of degree order - 1, so Gauss-Legendre with ``order`` nodes is
    exact (k-diffusion uses adaptive quadrature for the same value).
    """
    if order - 1 > i:
        raise ValueError(f"order {order} too high for step {i}")
    nodes, weights = np.polynomial.legendre.leggauss(max(order, 1))
    a, b = float(t[i]), float(t[i + 1])
    taus = 0.5 * (b - a) * nodes + 0.5 * (b + a)
    basis = np.ones_like(taus)
    for k in range(order):
        if k != j:
            basis *= (taus - float(t[i - k])) / (float(t[i - j]) - float(t[i - k]))
    return float(0.5 * (b - a) * np.sum(weights * basis))


# -- DEIS (tAB mode) --------------------------------------------------------------------------------

# DEIS maps sigma to a VP time with EDM's constants, whatever the model's own schedule.
_DEIS_EPSILON_S = 1e-3
_DEIS_SIGMA_MIN = 0.002
_DEIS_SIGMA_MAX = 80.0
_DEIS_POINTS = 10000


def deis_coefficients(sigmas: Tensor, max_order: int) -> list[list[Tensor]]:
    """Per-step DEIS coefficients [current, previous 1, ...] (an empty list for first-order steps)."""
    sigma_min = torch.tensor(_DEIS_SIGMA_MIN)
    sigma_max = torch.tensor(_DEIS_SIGMA_MAX)
    eps_s = _DEIS_EPSILON_S
    beta_d = 2 * (torch.log(sigma_min**2 + 1) / eps_s - torch.log(sigma_max**2 + 1)) / (eps_s - 1)
    beta_min = torch.log(sigma_max**2 + 1) - 0.5 * beta_d
    s = sigmas.detach().cpu()
    t_steps = ((beta_min**2 + 2 * beta_d * (s**2 + 1).log()).sqrt() - beta_min) / beta_d
    beta_0, beta_1 = beta_min, beta_d + beta_min

    coefficients: list[list[Tensor]] = []
    for i in range(len(t_steps) - 1):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        order = min(i + 1, max_order)
        if order == 1:
            coefficients.append([])
            continue
        taus = torch.linspace(t_cur, t_next, _DEIS_POINTS)
        dtau = (t_next - t_cur) / _DEIS_POINTS
        prev_t = t_steps[[i - k for k in range(order)]]
        # -0.5 d(log alpha)/dtau / sqrt(alpha (1 - alpha)), alpha the VP signal level at tau.
        alpha = torch.exp(-0.5 * taus**2 * (beta_1 - beta_0) - taus * beta_0)
        integrand = 0.5 * (taus * (beta_1 - beta_0) + beta_0) / torch.sqrt(alpha * (1 - alpha))
        row = []
        for j in range(order):
            poly = torch.ones_like(taus)
            for k in range(order):
                if k != j:
                    poly = poly * ((taus - prev_t[k]) / (prev_t[j] - prev_t[k]))
            row.append(torch.sum(integrand * poly) * dtau)
        coefficients.append(row)
    return coefficients


# -- SA-Solver ----------------------------------------------------------------------------------


def _exponential_coefficients(s: Tensor, t: Tensor, solver_order: int, tau_t: float) -> Tensor:
    """(1 + tau^2) * integral_s^t exp((1 + tau^2) x) x^p dx / exp((1 + tau^2) t), p = 0..order-1.

    Integration by parts gives a lower-triangular recursion, solved here in closed form.
    """
    tau_mul = 1 + tau_t**2
    h = t - s
    p = torch.arange(solver_order, dtype=s.dtype, device=s.device)
    product_terms = t**p - s**p * (-tau_mul * h).exp()
    depth = p.unsqueeze(1) - p.unsqueeze(0)
    log_factorial = (p + 1).lgamma()
    log_coeff = log_factorial.unsqueeze(1) - log_factorial.unsqueeze(0)
    if tau_t > 0:
        log_coeff = log_coeff - depth * math.log(tau_mul)
    signs = torch.where(depth % 2 == 0, 1.0, -1.0)
    return (log_coeff.exp() * signs).tril() @ product_terms


def _simple_order_2_coefficients(
    sigma_next: Tensor,
    curr_lambdas: Tensor,
    lambda_s: Tensor,
    lambda_t: Tensor,
    tau_t: float,
    is_corrector: bool,
) -> Tensor:
    """The simplified order-2 b coefficients of the SA-Solver paper (appendix D)."""
    tau_mul = 1 + tau_t**2
    h = lambda_t - lambda_s
    alpha_t = sigma_next * lambda_t.exp()
    if is_corrector:
        b_1 = alpha_t * (0.5 * tau_mul * h)
        b_2 = alpha_t * (-h * tau_mul).expm1().neg() - b_1
    else:
        b_2 = alpha_t * (0.5 * tau_mul * h**2) / (curr_lambdas[-2] - lambda_s)
        b_1 = alpha_t * (-h * tau_mul).expm1().neg() - b_2
    return torch.stack([b_2, b_1])


def stochastic_adams_coefficients(
    sigma_next: Tensor,
    curr_lambdas: Tensor,
    lambda_s: Tensor,
    lambda_t: Tensor,
    tau_t: float,
    simple_order_2: bool = False,
    is_corrector: bool = False,
) -> Tensor:
    """SA-Solver b_i (eqs. 15 and 18): integrals of the Lagrange basis on ``curr_lambdas``, shape (N,)."""
    n = curr_lambdas.shape[0]
    if simple_order_2 and n == 2:
        return _simple_order_2_coefficients(sigma_next, curr_lambdas, lambda_s, lambda_t, tau_t, is_corrector)
    exp_integrals = _exponential_coefficients(lambda_s, lambda_t, n, tau_t)
    vandermonde_t = torch.vander(curr_lambdas, n, increasing=True).T
    lagrange_integrals = torch.linalg.solve(vandermonde_t, exp_integrals)
    # sigma_t exp(-tau^2 lambda_t) exp((1 + tau^2) lambda_t) = sigma_t exp(lambda_t) = alpha_t
    return sigma_next * lambda_t.exp() * lagrange_integrals


def tau_interval(start_sigma: float, end_sigma: float, eta: float = 1.0) -> Callable[[Tensor | float], float]:
    """SA-Solver's stochasticity: eta while start_sigma >= sigma >= end_sigma, else 0 (ODE)."""

    def tau(sigma: Tensor | float) -> float:
        if eta <= 0:
            return 0.0
        value = float(sigma)
        return eta if start_sigma >= value >= end_sigma else 0.0

    return tau
