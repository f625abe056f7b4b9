"""UniPC (Zhao et al. 2023), multistep B(h) variants, as ComfyUI runs it.

ComfyUI drives UniPC in variance-preserving coordinates with sigma itself as the time variable:
``alpha(s) = 1 / sqrt(1 + s^2)``, ``std(s) = s * alpha(s)``. The state is ``x / sqrt(1 + s^2)``, the
model is queried for eps through the VE denoiser, a final sigma of 0 is replaced by 0.001 and the
result is divided by ``alpha`` of the last sigma. Order is ``min(3, len(sigmas) - 2)`` with lower
orders at the end; the corrector is skipped on the last step. (With a single step ComfyUI's loop
only evaluates the model and returns its input rescaled; this does the same.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from engine.sampling.common import DenoiserFn, StepCallback, append_dims, report_step, split_extra_args

_FINAL_SIGMA = 0.001


def _log_alpha(s: Tensor) -> Tensor:
    return 0.5 * torch.log(1 / ((s * s) + 1))


def _alpha(s: Tensor) -> Tensor:
    return torch.exp(_log_alpha(s))


def _std(s: Tensor) -> Tensor:
    return torch.sqrt(1.0 - torch.exp(2.0 * _log_alpha(s)))


def _lambda(s: Tensor) -> Tensor:
    log_alpha = _log_alpha(s)
    return log_alpha - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))


class _UniPC:
    def __init__(self, model: DenoiserFn, kwargs: Mapping[str, Any], variant: str) -> None:
        if variant not in ("bh1", "bh2"):
            raise ValueError(f"unknown UniPC variant {variant!r}")
        self.model = model
        self.kwargs = kwargs
        self.variant = variant

    def data_prediction(self, x: Tensor, t: Tensor) -> Tensor:
        """x0 from the VP state x at sigma t [B], through the VE denoiser's eps."""
        sigma = append_dims(t, x.ndim)
        x_ve = x * ((sigma**2 + 1.0) ** 0.5)
        eps = (x_ve - self.model(x_ve, t, **self.kwargs)) / sigma
        return (x - append_dims(_std(t), x.ndim) * eps) / append_dims(_alpha(t), x.ndim)

    def update(
        self,
        x: Tensor,
        model_prev: list[Tensor],
        t_prev: list[Tensor],
        t: Tensor,
        order: int,
        use_corrector: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """One multistep predictor(-corrector) step to time t with the B(h) coefficients."""
        ndim = x.ndim
        t_prev_0 = t_prev[-1]
        lambda_prev_0 = _lambda(t_prev_0)
        lambda_t = _lambda(t)
        model_prev_0 = model_prev[-1]
        sigma_prev_0, sigma_t = _std(t_prev_0), _std(t)
        alpha_t = torch.exp(_log_alpha(t))
        h = lambda_t - lambda_prev_0

        rks: list[Tensor] = []
        d1s: list[Tensor] = []
        for i in range(1, order):
            rk = ((_lambda(t_prev[-(i + 1)]) - lambda_prev_0) / h)[0]
            rks.append(rk)
            d1s.append((model_prev[-(i + 1)] - model_prev_0) / rk)
        rks_t = torch.stack([*rks, torch.ones_like(h[0])])

        hh = -h[0]  # data prediction: integrate in -lambda
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        b_h = hh if self.variant == "bh1" else torch.expm1(hh)
        rows: list[Tensor] = []
        b: list[Tensor] = []
        factorial_i = 1
        for i in range(1, order + 1):
            rows.append(torch.pow(rks_t, i - 1))
            b.append(h_phi_k * factorial_i / b_h)
            factorial_i *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        r_mat = torch.stack(rows)
        b_vec = torch.stack(b)

        d1_stack: Tensor | None = torch.stack(d1s, dim=1) if d1s else None  # [B, K, ...]
        x_t_ = (
            append_dims(sigma_t / sigma_prev_0, ndim) * x
            - append_dims(alpha_t * h_phi_1, ndim) * model_prev_0
        )
        if d1_stack is not None:
            rhos_p = (
                b_vec.new_tensor([0.5]) if order == 2 else torch.linalg.solve(r_mat[:-1, :-1], b_vec[:-1])
            )
            pred_res: Tensor | float = torch.tensordot(d1_stack, rhos_p, dims=([1], [0]))
        else:
            pred_res = 0.0
        x_t = x_t_ - append_dims(alpha_t * b_h, ndim) * pred_res

        model_t = None
        if use_corrector:
            rhos_c = b_vec.new_tensor([0.5]) if order == 1 else torch.linalg.solve(r_mat, b_vec)
            model_t = self.data_prediction(x_t, t)
            corr_res: Tensor | float = 0.0
            if d1_stack is not None:
                corr_res = torch.tensordot(d1_stack, rhos_c[:-1], dims=([1], [0]))
            d1_t = model_t - model_prev_0
            x_t = x_t_ - append_dims(alpha_t * b_h, ndim) * (corr_res + rhos_c[-1] * d1_t)
        return x_t, model_t


@torch.no_grad()
def sample_unipc(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    variant: str = "bh1",
) -> Tensor:
    """UniPC multistep; ``variant`` "bh1" (B(h) = h) or "bh2" (B(h) = e^h - 1)."""
    kwargs, _seed = split_extra_args(extra_args)
    solver = _UniPC(model, kwargs, variant)
    ts = sigmas.clone()
    if ts[-1] == 0:
        ts[-1] = _FINAL_SIGMA
    batch = x.shape[0]
    steps = len(ts) - 1
    order = min(3, len(ts) - 2)
    x = x / torch.sqrt(1.0 + ts[0] ** 2.0)

    model_prev: list[Tensor] = []
    t_prev: list[Tensor] = []
    for step_index in range(steps):
        t_now = ts[step_index]
        if step_index == 0:
            vec_t = ts[0].expand(batch)
            model_prev = [solver.data_prediction(x, vec_t)]
            t_prev = [vec_t]
        elif step_index < order:
            # Warm-up: the first steps use the orders the history allows.
            vec_t = ts[step_index].expand(batch)
            x, model_x = solver.update(x, model_prev, t_prev, vec_t, step_index, use_corrector=True)
            model_prev.append(model_x if model_x is not None else solver.data_prediction(x, vec_t))
            t_prev.append(vec_t)
        else:
            # The last step also takes the final (corrector-free) step to ts[steps].
            last = step_index + (2 if step_index == steps - 1 else 1)
            for step in range(step_index, last):
                vec_t = ts[step].expand(batch)
                t_now = ts[step]
                step_order = min(order, steps + 1 - step)
                x, model_x = solver.update(
                    x, model_prev, t_prev, vec_t, step_order, use_corrector=step != steps
                )
                for k in range(order - 1):
                    t_prev[k] = t_prev[k + 1]
                    model_prev[k] = model_prev[k + 1]
                t_prev[-1] = vec_t
                if step < steps:
                    model_prev[-1] = model_x if model_x is not None else solver.data_prediction(x, vec_t)
        # The callback sees the state in the sampler's (VE) scale.
        report_step(
            callback, step_index, x / _alpha(t_now), sigmas[step_index], sigmas[step_index], model_prev[-1]
        )
    return x / _alpha(ts[-1])


@torch.no_grad()
def sample_unipc_bh2(
    model: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
) -> Tensor:
    return sample_unipc(model, x, sigmas, extra_args, callback, disable, variant="bh2")
