"""Classifier-free guidance over CONDITIONING (areas, masks, strengths, ranges, batching) and the
inpainting wrapper, against hand-computed expectations."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch

from engine.sampling.guidance import CFGGuider, InpaintDenoiser, prepare_denoise_mask
from engine.sampling.model_sampling import default_model_sampling
from engine.sampling.samplers import SAMPLERS
from engine.sampling.schedulers import ksampler_sigmas

MS = default_model_sampling()


class ContextModel:
    """Predicts, everywhere, the mean of its context (so each prompt has a known constant output)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, object]] = []

    def __call__(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        context: torch.Tensor | None,
        extra: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        self.calls.append({"x": x.shape, "sigma": sigma.clone(), "context": context, "extra": dict(extra)})
        assert context is not None and sigma.shape == (x.shape[0],)
        return torch.ones_like(x) * context.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def prompt(value: float, tokens: int = 77, **options: object) -> list[object]:
    return [torch.full((1, tokens, 8), value), options]


def guide(model: ContextModel, positive: list, negative: list | None, cfg: float, shape=(2, 4, 8, 8)):
    guider = CFGGuider(model, positive, negative, cfg, MS)
    x = torch.randn(shape)
    sigma = torch.full((shape[0],), 2.0)
    return guider, x, sigma


def test_cfg_combines_cond_and_uncond_in_one_batch() -> None:
    model = ContextModel()
    guider, x, sigma = guide(model, [prompt(3.0)], [prompt(1.0)], cfg=7.5)
    out = guider(x, sigma)
    torch.testing.assert_close(out, torch.full_like(x, 1.0 + (3.0 - 1.0) * 7.5))
    (call,) = model.calls  # cond and uncond share one model call, uncond first (ComfyUI's order)
    assert call["x"] == (4, 4, 8, 8)
    context = call["context"]
    assert isinstance(context, torch.Tensor)
    assert context[:2].mean().item() == 1.0 and context[2:].mean().item() == 3.0


def test_cfg_one_skips_the_uncond_pass_unless_forced() -> None:
    model = ContextModel()
    guider, x, sigma = guide(model, [prompt(3.0)], [prompt(1.0)], cfg=1.0)
    torch.testing.assert_close(guider(x, sigma), torch.full_like(x, 3.0))
    assert [c["x"] for c in model.calls] == [(2, 4, 8, 8)]
    denoised, uncond = guider.denoise_with_uncond(x, sigma)  # what the CFG++ samplers call
    torch.testing.assert_close(denoised, torch.full_like(x, 3.0))
    torch.testing.assert_close(uncond, torch.full_like(x, 1.0))
    assert model.calls[-1]["x"] == (4, 4, 8, 8)


def test_cfg_pp_sampler_gets_the_uncond_prediction_at_cfg_one() -> None:
    model = ContextModel()
    guider, x, _ = guide(model, [prompt(3.0)], [prompt(1.0)], cfg=1.0)
    sigmas = ksampler_sigmas(MS, "karras", 3)
    SAMPLERS["euler_cfg_pp"](guider, x, sigmas)
    assert all(c["x"] == (4, 4, 8, 8) for c in model.calls)
    model.calls.clear()
    SAMPLERS["euler"](guider, x, sigmas)
    assert all(c["x"] == (2, 4, 8, 8) for c in model.calls)


def test_strengths_of_entries_average() -> None:
    model = ContextModel()
    guider, x, sigma = guide(model, [prompt(2.0), prompt(6.0, strength=3.0)], None, cfg=1.0)
    torch.testing.assert_close(guider(x, sigma), torch.full_like(x, (2.0 + 6.0 * 3.0) / 4.0))
    assert len(model.calls) == 1  # equal shapes: one batched call


def test_context_lengths_pad_by_repetition_up_to_4x() -> None:
    model = ContextModel()
    guider, x, sigma = guide(model, [prompt(3.0, tokens=154)], [prompt(1.0, tokens=77)], cfg=2.0)
    torch.testing.assert_close(guider(x, sigma), torch.full_like(x, 1.0 + 2.0 * 2.0))
    (call,) = model.calls
    assert isinstance(call["context"], torch.Tensor) and call["context"].shape == (4, 154, 8)
    model = ContextModel()
    guider, x, sigma = guide(model, [prompt(3.0, tokens=385)], [prompt(1.0, tokens=77)], cfg=2.0)
    guider(x, sigma)
    assert len(model.calls) == 2  # 385 = 5 x 77: too much padding, separate calls


def test_area_entry_is_feathered_and_paired_with_an_uncond_area() -> None:
    model = ContextModel()
    area = {"area": (16, 16, 8, 8)}  # h, w, y, x in latent units
    guider, x, sigma = guide(
        model, [prompt(1.0), prompt(5.0, **area)], [prompt(0.0)], cfg=1.0, shape=(1, 4, 32, 32)
    )
    out = guider(x, sigma)
    # Inside the area the area prompt weighs 1 except a 4-wide ramp (16 // 4) at its inner borders.
    ramp = torch.ones(16)
    ramp[:4] = torch.tensor([0.25, 0.5, 0.75, 1.0])
    ramp[-4:] = torch.tensor([1.0, 0.75, 0.5, 0.25])
    weight = torch.zeros(32, 32)
    weight[8:24, 8:24] = ramp[:, None] * ramp[None, :]
    expected = (1.0 + 5.0 * weight) / (1.0 + weight)
    torch.testing.assert_close(out[0, 0], expected)
    assert (1, 4, 16, 16) in [c["x"] for c in model.calls]
    # The negative list got a same-area entry, so cfg applies the area's own uncond there.
    assert len(guider._entries(x)[1]) == 2


def test_percentage_area() -> None:
    model = ContextModel()
    guider, x, sigma = guide(
        model, [prompt(1.0), prompt(5.0, area=("percentage", 0.5, 0.25, 0.5, 0.0))], None, 1.0
    )
    guider(x, sigma)
    assert (2, 4, 4, 2) in [c["x"] for c in model.calls]


def test_mask_and_mask_strength() -> None:
    model = ContextModel()
    mask = torch.zeros(8, 8)
    mask[:, :4] = 1.0
    guider, x, sigma = guide(model, [prompt(1.0), prompt(4.0, mask=mask, mask_strength=0.5)], None, cfg=1.0)
    out = guider(x, sigma)
    torch.testing.assert_close(out[:, :, :, :4], torch.full_like(out[:, :, :, :4], (1.0 + 4.0 * 0.5) / 1.5))
    torch.testing.assert_close(out[:, :, :, 4:], torch.full_like(out[:, :, :, 4:], 1.0))


def test_mask_resized_and_set_area_to_bounds() -> None:
    model = ContextModel()
    mask = torch.zeros(1, 128, 128)  # pixel resolution: 16x the 8x8 latent
    mask[:, 32:96, 16:48] = 1.0
    guider, x, sigma = guide(
        model, [prompt(4.0, mask=mask, set_area_to_bounds=True)], None, 1.0, (1, 4, 8, 8)
    )
    guider(x, sigma)
    (call,) = model.calls
    entry = guider._entries(x)[0][0]
    assert entry.mask is not None and entry.mask.shape == (1, 8, 8)
    # The mask's box (rows 2..5, columns 1..2) is grown to the 8x8 minimum, then clipped to the latent.
    assert entry.area == (8, 8, 2, 1)
    assert call["x"] == (1, 4, 6, 7)


def test_start_end_percent_limit_an_entry_to_part_of_the_schedule() -> None:
    model = ContextModel()
    late = prompt(9.0, start_percent=0.5)
    guider, x, _ = guide(model, [prompt(1.0), late], None, cfg=1.0)
    threshold = MS.percent_to_sigma(0.5)
    early = guider(x, torch.full((2,), threshold * 1.5))
    torch.testing.assert_close(early, torch.full_like(x, 1.0))
    later = guider(x, torch.full((2,), threshold * 0.5))
    torch.testing.assert_close(later, torch.full_like(x, 5.0))


def test_extra_conds_are_batched() -> None:
    model = ContextModel()
    pooled = {"pooled_output": torch.ones(1, 16)}
    guider, x, sigma = guide(model, [prompt(3.0, **pooled)], [prompt(1.0, **pooled)], cfg=2.0)
    guider(x, sigma)
    (call,) = model.calls
    extra = call["extra"]
    assert isinstance(extra, dict) and extra["pooled_output"].shape == (4, 16)


def test_inpaint_denoiser_pins_the_unmasked_latent() -> None:
    latent = torch.randn(1, 4, 4, 4)
    noise = torch.randn(1, 4, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2] = 1.0  # regenerate the left half
    seen: list[torch.Tensor] = []

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        seen.append(x)
        return torch.zeros_like(x)

    wrapped = InpaintDenoiser(model, MS, latent, noise, prepare_denoise_mask(mask, latent.shape))
    x = torch.randn(1, 4, 4, 4)
    out = wrapped(x, torch.tensor([3.0]))
    torch.testing.assert_close(seen[0][..., :2], x[..., :2])
    torch.testing.assert_close(seen[0][..., 2:], latent[..., 2:] + noise[..., 2:] * 3.0)
    torch.testing.assert_close(out[..., :2], torch.zeros_like(out[..., :2]))
    torch.testing.assert_close(out[..., 2:], latent[..., 2:])


def test_prepare_denoise_mask_resizes_and_broadcasts() -> None:
    mask = torch.ones(64, 64)
    prepared = prepare_denoise_mask(mask, (3, 4, 8, 8))
    assert prepared.shape == (3, 4, 8, 8)
    assert torch.equal(prepared, torch.ones(3, 4, 8, 8))


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_guided_sampling_runs(cfg: float) -> None:
    model = ContextModel()
    guider, x, _ = guide(model, [prompt(0.5)], [prompt(-0.5)], cfg=cfg)
    sigmas = ksampler_sigmas(MS, "karras", 4)
    out = SAMPLERS["dpmpp_2m"](guider, x * sigmas[0], sigmas)
    torch.testing.assert_close(out, torch.full_like(out, -0.5 + cfg))
