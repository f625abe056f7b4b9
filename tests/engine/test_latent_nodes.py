"""Latent and custom-sampling nodes against ComfyUI's formulas, written out here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.ops import custom_sampling as cs
from engine.ops import latent as ops
from engine.ops.resample import bislerp
from engine.sampling.names import SAMPLER_NAMES
from engine.sampling.samplers import SAMPLERS
from engine.sampling.schedulers import SCHEDULER_NAMES, SCHEDULERS

CTX = None  # these nodes never touch the context


def latent(batch=2, h=8, w=8, seed=0):
    return {"samples": torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(seed))}


def test_names_module_matches_the_implementations():
    assert set(SAMPLER_NAMES) == set(SAMPLERS)
    assert tuple(SCHEDULERS) == SCHEDULER_NAMES


def test_empty_latent_image():
    (out,) = ops.empty_latent_image(CTX, 512, 768, 3)
    assert out["samples"].shape == (3, 4, 96, 64) and not out["samples"].any()


@pytest.mark.parametrize("method", ["nearest-exact", "bilinear", "area", "bicubic"])
def test_latent_upscale_matches_interpolate(method):
    source = latent()
    (out,) = ops.latent_upscale(CTX, source, method, 128, 96, "disabled")
    expected = F.interpolate(source["samples"], size=(12, 16), mode=method)
    assert torch.equal(out["samples"], expected)


def test_latent_upscale_keeps_aspect_and_minimum():
    source = latent(h=8, w=16)
    (out,) = ops.latent_upscale(CTX, source, "bilinear", 0, 128, "disabled")
    assert out["samples"].shape[-2:] == (16, 32)
    (small,) = ops.latent_upscale(CTX, source, "bilinear", 16, 16, "disabled")
    assert small["samples"].shape[-2:] == (8, 8)  # both sides raised to 64 px
    (same,) = ops.latent_upscale(CTX, source, "bilinear", 0, 0, "disabled")
    assert same is source


def test_latent_upscale_by_rounds():
    (out,) = ops.latent_upscale_by(CTX, latent(h=7, w=9), "bicubic", 1.5)
    assert out["samples"].shape[-2:] == (round(7 * 1.5), round(9 * 1.5))


def test_bislerp_identity_and_norm_interpolation():
    x = latent()["samples"]
    assert torch.allclose(bislerp(x, 8, 8), x, atol=1e-6)
    # Orthogonal vectors: the direction turns and the norm is interpolated linearly.
    row = torch.tensor([[1.0, 0.0], [0.0, 3.0], [0.0, 0.0], [0.0, 0.0]]).reshape(1, 4, 1, 2)
    wide = bislerp(row, 4, 1)
    expected = F.interpolate(torch.tensor([1.0, 3.0]).reshape(1, 1, 1, 2), size=(1, 4), mode="bilinear")
    assert torch.allclose(wide.norm(dim=1).flatten(), expected.flatten(), atol=1e-5)
    # Same direction: ComfyUI keeps the first vector unchanged (no interpolation at all).
    same = torch.tensor([[1.0, 3.0], [2.0, 6.0], [2.0, 6.0], [0.0, 0.0]]).reshape(1, 4, 1, 2)
    assert torch.allclose(bislerp(same, 4, 1).norm(dim=1).flatten(), torch.tensor([3.0, 3.0, 3.0, 9.0]))


def test_bislerp_resizes_and_keeps_dtype():
    x = latent()["samples"].half()
    out = bislerp(x, 12, 6)
    assert out.shape == (2, 4, 6, 12) and out.dtype == torch.float16 and torch.isfinite(out).all()


def test_latent_from_batch_records_batch_index():
    source = latent(batch=4)
    (out,) = ops.latent_from_batch(CTX, source, 1, 2)
    assert torch.equal(out["samples"], source["samples"][1:3])
    assert out["batch_index"] == [1, 2]
    (clamped,) = ops.latent_from_batch(CTX, source, 10, 5)
    assert clamped["batch_index"] == [3]


def test_repeat_latent_batch_offsets_batch_index():
    (picked,) = ops.latent_from_batch(CTX, latent(batch=4), 1, 2)
    (out,) = ops.repeat_latent_batch(CTX, picked, 3)
    assert out["samples"].shape[0] == 6
    assert out["batch_index"] == [1, 2, 3, 4, 5, 6]


def test_latent_composite_without_and_with_feather():
    to, frm = latent(h=8, w=8, seed=1), latent(h=4, w=4, seed=2)
    (out,) = ops.latent_composite(CTX, to, frm, 16, 8, 0)
    expected = to["samples"].clone()
    expected[:, :, 1:5, 2:6] = frm["samples"]
    assert torch.equal(out["samples"], expected)

    (feathered,) = ops.latent_composite(CTX, to, frm, 16, 8, 16)
    # ComfyUI's feather: the mask ramps 1/f, 2/f ... on every side that is not at the border.
    f = 2
    mask = torch.ones(4, 4)
    for t in range(f):
        weight = (t + 1) / f
        mask[t, :] *= weight
        mask[3 - t, :] *= weight
        mask[:, t] *= weight
        mask[:, 3 - t] *= weight
    region = to["samples"][:, :, 1:5, 2:6]
    blended = frm["samples"] * mask + region * (1 - mask)
    assert torch.allclose(feathered["samples"][:, :, 1:5, 2:6], blended)


def test_latent_composite_masked_uses_pixel_offsets():
    dest, src = latent(h=8, w=8, seed=3), latent(h=2, w=2, seed=4)
    (out,) = ops.latent_composite_masked(CTX, dest, src, 32, 16, False)
    expected = dest["samples"].clone()
    expected[:, :, 2:4, 4:6] = src["samples"]
    assert torch.allclose(out["samples"], expected)


def test_latent_blend():
    a, b = latent(seed=5), latent(seed=6)
    (out,) = ops.latent_blend(CTX, a, b, 0.25)
    assert torch.allclose(out["samples"], a["samples"] * 0.25 + b["samples"] * 0.75)


def test_set_latent_noise_mask_shape():
    (out,) = ops.set_latent_noise_mask(CTX, latent(), torch.ones(64, 64))
    assert out["noise_mask"].shape == (1, 1, 64, 64)


def test_sigma_nodes():
    (karras,) = cs.karras_scheduler(CTX, 4, 14.614642, 0.0291675, 7.0)
    ramp = torch.linspace(0, 1, 4)
    lo, hi = 0.0291675 ** (1 / 7), 14.614642 ** (1 / 7)
    assert torch.allclose(karras[:-1], (hi + ramp * (lo - hi)) ** 7) and karras[-1] == 0
    (expo,) = cs.exponential_scheduler(CTX, 3, 10.0, 0.1)
    assert torch.allclose(expo[:-1], torch.tensor([10.0, 1.0, 0.1]), rtol=1e-5)
    high, low = cs.split_sigmas(CTX, karras, 2)
    assert torch.equal(high, karras[:3]) and torch.equal(low, karras[2:])
    (flipped,) = cs.flip_sigmas(CTX, karras)
    assert flipped[0] == pytest.approx(0.0001) and torch.equal(flipped[1:], karras.flip(0)[1:])
    assert karras[-1] == 0  # the input is not modified


def test_noise_nodes_match_comfyui_seeding():
    (noise,) = cs.random_noise(CTX, 42)
    source = latent(batch=2)
    expected = torch.randn(source["samples"].shape, generator=torch.Generator().manual_seed(42))
    assert torch.equal(noise.generate(source), expected)
    (disabled,) = cs.disable_noise(CTX)
    assert not disabled.generate(source).any()


def test_ksampler_select_checks_the_name():
    (choice,) = cs.ksampler_select(CTX, "euler")
    assert choice.name == "euler"
    with pytest.raises(ValueError):
        cs.ksampler_select(CTX, "not-a-sampler")


def test_polyexponential_is_exponential_at_rho_one():
    (poly,) = cs.polyexponential_scheduler(CTX, 5, 14.0, 0.03, 1.0)
    (expo,) = cs.exponential_scheduler(CTX, 5, 14.0, 0.03)
    assert torch.allclose(poly, expo, rtol=1e-5)
    assert math.isclose(float(poly[0]), 14.0, rel_tol=1e-5)
