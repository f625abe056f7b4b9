"""Noise: the initial latent noise and the per-step noise samplers, seeded as ComfyUI seeds them.

- Initial noise (``prepare_noise``): float randn of the latent's shape from a CPU generator seeded
  with the seed. ComfyUI calls ``torch.manual_seed(seed)``, which seeds the *global* generator and
  returns it; a private ``torch.Generator`` seeded the same way yields the same numbers without
  touching global state. With a ``batch_index`` ComfyUI draws one sample per index from 0 up to the
  largest index (skipping the ones not asked for), so image k of a batch equals image k of a larger
  run with the same seed.
- Ancestral / SDE step noise (``DefaultNoiseSampler``): ComfyUI seeds a generator *on the latent's
  device* with the seed (seed + 1 on CPU, so it does not repeat the initial noise). The CUDA and CPU
  generators differ, so these samplers give device-dependent results in ComfyUI too.
- Brownian-tree noise (``BrownianTreeNoiseSampler``) for the DPM++ SDE samplers: a torchsde
  BrownianTree with the seed as entropy, built on CPU (``cpu=True``, ComfyUI's default variants)
  or on the latent's device (the ``*_gpu`` variants).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

_UINT64 = 2**64
# torchsde rounds the tree's interval ends to this many decimals (its tol=1e-6); queries rounded the
# same way stay inside the interval instead of tripping its "Should have tb<=t1" warning. The values
# are what torchsde computes after clamping anyway.
_TREE_DIGITS = 6


class NoiseSampler(Protocol):
    """Unit-variance noise for the step from ``sigma`` to ``sigma_next``."""

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor: ...


def _cpu_generator(seed: int) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed % _UINT64)
    return generator


def prepare_noise(
    shape: Sequence[int],
    seed: int,
    batch_index: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """ComfyUI's initial noise for a latent of ``shape`` [B, C, H, W] (always on CPU)."""
    generator = _cpu_generator(seed)
    if batch_index is None:
        return torch.randn(tuple(shape), dtype=dtype, generator=generator, device="cpu")
    wanted = sorted(set(int(i) for i in batch_index))
    sample_shape = (1, *tuple(shape)[1:])
    drawn: dict[int, Tensor] = {}
    for i in range(wanted[-1] + 1):
        sample = torch.randn(sample_shape, dtype=dtype, generator=generator, device="cpu")
        if i in wanted:
            drawn[i] = sample
    return torch.cat([drawn[int(i)] for i in batch_index], dim=0)


def inpaint_noise(seed: int | None, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The noise ComfyUI's "ddim" sampler (Euler with random inpaint noise) noises the kept area of an
    inpainting latent with, instead of the initial noise: CPU randn seeded with seed + 1 (42 without
    a seed)."""
    generator = _cpu_generator((41 if seed is None else seed) + 1)
    return torch.randn(tuple(shape), generator=generator, device="cpu").to(dtype=dtype, device=device)


class DefaultNoiseSampler:
    """Fresh Gaussian noise per call from a generator on ``like``'s device (ComfyUI's default)."""

    def __init__(self, like: Tensor, seed: int | None) -> None:
        self.shape = like.shape
        self.dtype = like.dtype
        self.device = like.device
        self.generator: torch.Generator | None = None
        if seed is not None:
            if like.device.type == "cpu":
                seed += 1  # the initial noise came from a CPU generator with this very seed
            self.generator = torch.Generator(device=like.device)
            self.generator.manual_seed(seed % _UINT64)

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        # Without a seed this draws from torch's global generator, like ComfyUI.
        return torch.randn(self.shape, dtype=self.dtype, device=self.device, generator=self.generator)


class BrownianTreeNoiseSampler:
    """Noise from a Brownian motion W(sigma): (W(s1) - W(s0)) / sqrt(|s1 - s0|).

    Querying the same interval twice gives the same noise, so SDE samplers take consistent noise
    whatever their step structure.
    """

    def __init__(
        self, like: Tensor, sigma_min: Tensor, sigma_max: Tensor, seed: int | None = None, cpu: bool = True
    ) -> None:
        import torchsde  # imported here: only the SDE samplers need it

        if seed is None:
            seed = int(torch.randint(0, 2**63 - 1, ()).item())
        t0, t1, self._sign = _ordered(torch.as_tensor(sigma_min), torch.as_tensor(sigma_max))
        w0 = torch.zeros_like(like)
        self.cpu = cpu
        if cpu:
            t0, t1, w0 = t0.detach().cpu(), t1.detach().cpu(), w0.detach().cpu()
        self.tree = torchsde.BrownianTree(t0, w0, t1, entropy=seed)

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        s0, s1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        t0, t1, sign = _ordered(s0, s1)
        device, dtype = t0.device, t0.dtype
        if self.cpu:
            t0, t1 = t0.detach().cpu().float(), t1.detach().cpu().float()
        ta, tb = round(float(t0), _TREE_DIGITS), round(float(t1), _TREE_DIGITS)
        w = self.tree(ta, tb).to(device=device, dtype=dtype) * (self._sign * sign)
        return w / (s1 - s0).abs().sqrt()


def _ordered(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, int]:
    return (a, b, 1) if a < b else (b, a, -1)
