"""Initial and per-step noise, seeded as ComfyUI seeds it."""

from __future__ import annotations

import pytest
import torch

from engine.sampling.noise import BrownianTreeNoiseSampler, DefaultNoiseSampler, inpaint_noise, prepare_noise

SHAPE = (3, 4, 8, 6)


def comfy_initial_noise(
    seed: int, shape: tuple[int, ...], batch_index: list[int] | None = None
) -> torch.Tensor:
    """ComfyUI's prepare_noise written out: torch.manual_seed, then randn per batch index up to the max."""
    with torch.random.fork_rng(devices=[]):
        generator = torch.manual_seed(seed)
        if batch_index is None:
            return torch.randn(shape, generator=generator)
        draws = [torch.randn((1, *shape[1:]), generator=generator) for _ in range(max(batch_index) + 1)]
        return torch.cat([draws[i] for i in batch_index])


@pytest.mark.parametrize("seed", [0, 42, 2**32 + 7, 2**64 - 1])
def test_initial_noise_matches_comfyui(seed: int) -> None:
    noise = prepare_noise(SHAPE, seed)
    assert noise.dtype == torch.float32 and noise.device.type == "cpu"
    assert torch.equal(noise, comfy_initial_noise(seed, SHAPE))


def test_initial_noise_batch_index_skips_generations() -> None:
    noise = prepare_noise(SHAPE, 7, batch_index=[2, 0, 2])
    assert torch.equal(noise, comfy_initial_noise(7, SHAPE, [2, 0, 2]))
    # Image k of a batch is image k of the full batch drawn with the same seed.
    full = prepare_noise((5, *SHAPE[1:]), 7)
    assert torch.equal(prepare_noise((1, *SHAPE[1:]), 7, batch_index=[4])[0], full[4])


def test_initial_noise_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    prepare_noise(SHAPE, 1)
    assert torch.equal(state, torch.get_rng_state())


def test_default_noise_sampler_seeds_cpu_generator_with_seed_plus_one() -> None:
    x = torch.zeros(SHAPE)
    sampler = DefaultNoiseSampler(x, seed=11)
    generator = torch.Generator().manual_seed(12)
    first = torch.randn(SHAPE, generator=generator)
    second = torch.randn(SHAPE, generator=generator)
    sigma = torch.tensor(1.0)
    assert torch.equal(sampler(sigma, sigma), first)
    assert torch.equal(sampler(sigma, sigma), second)


def test_inpaint_noise_uses_seed_plus_one() -> None:
    expected = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    assert torch.equal(inpaint_noise(5, SHAPE, torch.float32, torch.device("cpu")), expected)


def test_brownian_tree_noise_is_consistent_and_seeded() -> None:
    x = torch.zeros(2, 4, 4, 4)
    sigma_min, sigma_max = torch.tensor(0.03), torch.tensor(14.6)
    a = BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=3)
    b = BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=3)
    c = BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=4)
    s0, s1, s2 = torch.tensor(14.6), torch.tensor(5.0), torch.tensor(1.0)
    n01 = a(s0, s1)
    assert n01.shape == x.shape and n01.dtype == torch.float32
    assert torch.equal(n01, b(s0, s1))  # same seed, same noise whatever the query order
    assert not torch.equal(n01, c(s0, s1))
    # Brownian increments add up: W(s2) - W(s0) = (W(s1) - W(s0)) + (W(s2) - W(s1)).
    total = a(s0, s2) * (s0 - s2).sqrt()
    parts = a(s0, s1) * (s0 - s1).sqrt() + a(s1, s2) * (s1 - s2).sqrt()
    torch.testing.assert_close(total, parts, rtol=1e-4, atol=1e-4)
