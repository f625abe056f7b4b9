"""The sampler nodes on a tiny SD1.5 checkpoint: ComfyUI's declarations, KSampler against Euler written
out by hand, the equivalences between the KSampler family and the custom-sampling path, step
windows, inpainting, progress, previews and interruption."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from engine.context import NodeContext, Services
from engine.errors import ExecutionInterrupted, ModelError
from engine.events import PREVIEW, PROGRESS, CallbackSink, Event, ListSink, NullSink
from engine.interrupt import InterruptFlag
from engine.models.manager import ModelManager
from engine.models.test_checkpoint import write_test_checkpoint
from engine.ops import conditioning as cond_ops
from engine.ops import custom_sampling as custom_ops
from engine.ops import latent as latent_ops
from engine.ops import sampling as sampling_ops
from engine.ops import vae as vae_ops
from engine.sampling.model_sampling import Denoiser
from engine.sampling.names import SAMPLER_NAMES, SCHEDULER_NAMES
from engine.sampling.noise import prepare_noise
from engine.sampling.schedulers import calculate_sigmas

SEED = 1234
STEPS = 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", "sd15", "tiny", seed=3)


@pytest.fixture(scope="module")
def manager() -> ModelManager:
    return ModelManager("cpu")


def make_ctx(manager: ModelManager, sink: Any = None, preview_interval: int = 0) -> NodeContext:
    services = Services(outputs=None, inputs=None, models=manager, preview_interval=preview_interval)  # type: ignore[arg-type]
    return NodeContext("3", "KSampler", "p", services, sink or NullSink(), InterruptFlag(), [])


@pytest.fixture(scope="module")
def ctx(manager: ModelManager) -> NodeContext:
    return make_ctx(manager)


@pytest.fixture(scope="module")
def handles(manager: ModelManager, checkpoint: Path) -> tuple[Any, Any, Any]:
    return manager.load_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def conds(ctx: NodeContext, handles: tuple[Any, Any, Any]) -> tuple[Any, Any]:
    _, clip, _ = handles
    positive = cond_ops.clip_text_encode(ctx, "a lighthouse at dusk", clip)[0]
    negative = cond_ops.clip_text_encode(ctx, "blurry", clip)[0]
    return positive, negative


def empty_latent(ctx: NodeContext, size: int = 64, batch: int = 1) -> dict[str, Any]:
    return latent_ops.empty_latent_image(ctx, size, size, batch)[0]


def ksampler(ctx: NodeContext, handles: Any, conds: Any, latent: dict[str, Any], **kw: Any) -> torch.Tensor:
    args: dict[str, Any] = {
        "seed": SEED,
        "steps": STEPS,
        "cfg": 7.0,
        "sampler_name": "euler",
        "scheduler": "normal",
        "denoise": 1.0,
    }
    args.update(kw)
    return sampling_ops.ksampler(
        ctx, handles[0], positive=conds[0], negative=conds[1], latent_image=latent, **args
    )[0]["samples"]


# ------------------------------------------------------------------------------ declarations


def test_declarations_match_comfyui(registry) -> None:
    info = registry.object_info()
    ks = info["KSampler"]
    assert ks["input_order"]["required"] == [
        "model",
        "seed",
        "steps",
        "cfg",
        "sampler_name",
        "scheduler",
        "positive",
        "negative",
        "latent_image",
        "denoise",
    ]
    seed = ks["input"]["required"]["seed"][1]
    assert seed["control_after_generate"] is True and seed["max"] == 0xFFFFFFFFFFFFFFFF
    cfg = ks["input"]["required"]["cfg"][1]
    assert (cfg["default"], cfg["min"], cfg["max"], cfg["step"], cfg["round"]) == (8.0, 0.0, 100.0, 0.1, 0.01)
    assert "dpmpp_2m_sde_gpu" in ks["input"]["required"]["sampler_name"][0]
    assert ks["input"]["required"]["scheduler"][0][0] == "simple"
    assert ks["output"] == ["LATENT"] and ks["category"] == "sampling"
    adv = info["KSamplerAdvanced"]["input"]["required"]
    assert adv["add_noise"][0] == ["enable", "disable"]
    assert adv["return_with_leftover_noise"][0] == ["disable", "enable"]
    assert adv["end_at_step"][1]["default"] == 10000
    custom = info["SamplerCustom"]
    assert custom["output"] == ["LATENT", "LATENT"]
    assert custom["output_name"] == ["output", "denoised_output"]
    assert custom["input"]["required"]["add_noise"] == ["BOOLEAN", {"default": True}]
    assert info["SamplerCustomAdvanced"]["input_order"]["required"] == [
        "noise",
        "guider",
        "sampler",
        "sigmas",
        "latent_image",
    ]
    assert info["SDTurboScheduler"]["input"]["required"]["steps"][1] == {
        "default": 1,
        "min": 1,
        "max": 10,
        "step": 1,
    }
    assert info["CFGGuider"]["output"] == ["GUIDER"]
    assert info["BasicGuider"]["category"] == "sampling/custom_sampling/guiders"
    inpaint = info["InpaintModelConditioning"]
    assert inpaint["output_name"] == ["positive", "negative", "latent"]
    assert inpaint["input"]["required"]["noise_mask"][1]["default"] is True


# ------------------------------------------------------------------------------ numerics


def test_ksampler_is_comfyuis_euler_written_out(ctx, handles, conds, manager) -> None:
    """CFG Euler from ComfyUI's formulas: noise from the seed on the CPU, x = noise * sqrt(1 +
    sigma_max^2) for txt2img, D = uncond + (cond - uncond) * cfg, x += (x - D) / sigma * dsigma,
    then the latent format's 1 / 0.18215."""
    model, _, _ = handles
    latent = empty_latent(ctx)
    got = ksampler(ctx, handles, conds, latent)

    ms = model.model_sampling
    sigmas = calculate_sigmas(ms, "normal", STEPS)
    noise = prepare_noise(latent["samples"].shape, SEED)
    cond, uncond = conds[0][0][0], conds[1][0][0]
    with manager.use(model) as net:
        denoiser = Denoiser(net, ms)
        x = noise * math.sqrt(1.0 + float(sigmas[0]) ** 2)
        for i in range(STEPS):
            s = sigmas[i].reshape(1)
            d_cond = denoiser(x, s, cond)
            d_uncond = denoiser(x, s, uncond)
            denoised = d_uncond + (d_cond - d_uncond) * 7.0
            x = x + (x - denoised) / s * (sigmas[i + 1] - sigmas[i])
    expected = x / 0.18215
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, torch.zeros_like(got))


def test_seeds_are_deterministic(ctx, handles, conds) -> None:
    latent = empty_latent(ctx)
    a = ksampler(ctx, handles, conds, latent, sampler_name="euler_ancestral")
    b = ksampler(ctx, handles, conds, latent, sampler_name="euler_ancestral")
    c = ksampler(ctx, handles, conds, latent, sampler_name="euler_ancestral", seed=SEED + 1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_batch_index_gives_the_noise_of_the_full_batch(ctx, handles, conds) -> None:
    full = ksampler(ctx, handles, conds, empty_latent(ctx, batch=3))
    picked = latent_ops.latent_from_batch(ctx, empty_latent(ctx, batch=3), 2, 1)[0]
    one = ksampler(ctx, handles, conds, picked)
    torch.testing.assert_close(one[0], full[2], rtol=1e-3, atol=1e-3)  # batched vs single convs


def test_ksampler_advanced_split_equals_one_run(ctx, handles, conds) -> None:
    """Two KSamplerAdvanced halves (leftover noise, then add_noise disable) make one Euler run."""
    model = handles[0]
    latent = empty_latent(ctx)
    whole = ksampler(ctx, handles, conds, latent, steps=6)
    common = {
        "noise_seed": SEED,
        "steps": 6,
        "cfg": 7.0,
        "sampler_name": "euler",
        "scheduler": "normal",
        "positive": conds[0],
        "negative": conds[1],
    }
    first = sampling_ops.ksampler_advanced(
        ctx,
        model,
        add_noise="enable",
        latent_image=latent,
        start_at_step=0,
        end_at_step=3,
        return_with_leftover_noise="enable",
        **common,
    )[0]
    second = sampling_ops.ksampler_advanced(
        ctx,
        model,
        add_noise="disable",
        latent_image=first,
        start_at_step=3,
        end_at_step=10000,
        return_with_leftover_noise="disable",
        **common,
    )[0]
    torch.testing.assert_close(second["samples"], whole, rtol=1e-4, atol=1e-4)


def test_empty_windows_return_the_latent_untouched(ctx, handles, conds) -> None:
    latent = {"samples": torch.randn(1, 4, 8, 8)}
    out = sampling_ops.ksampler_advanced(
        ctx,
        handles[0],
        add_noise="enable",
        noise_seed=SEED,
        steps=4,
        cfg=7.0,
        sampler_name="euler",
        scheduler="normal",
        positive=conds[0],
        negative=conds[1],
        latent_image=latent,
        start_at_step=4,
        end_at_step=10000,
        return_with_leftover_noise="disable",
    )[0]
    assert out["samples"] is latent["samples"]
    assert ksampler(ctx, handles, conds, latent, denoise=0.0) is latent["samples"]


def test_custom_sampling_paths_equal_ksampler(ctx, handles, conds) -> None:
    model = handles[0]
    latent = empty_latent(ctx)
    expected = ksampler(ctx, handles, conds, latent, sampler_name="dpmpp_2m", scheduler="karras")
    sampler = custom_ops.ksampler_select(ctx, "dpmpp_2m")[0]
    sigmas = sampling_ops.basic_scheduler(ctx, model, "karras", STEPS, 1.0)[0]
    guider = sampling_ops.cfg_guider(ctx, model, conds[0], conds[1], 7.0)[0]
    noise = custom_ops.random_noise(ctx, SEED)[0]
    out, denoised = sampling_ops.sampler_custom_advanced(ctx, noise, guider, sampler, sigmas, latent)
    torch.testing.assert_close(out["samples"], expected, rtol=1e-4, atol=1e-4)
    # The last step ends at sigma 0, where the sample is the last denoised estimate.
    torch.testing.assert_close(denoised["samples"], out["samples"], rtol=1e-4, atol=1e-4)
    out2, _ = sampling_ops.sampler_custom(
        ctx, model, True, SEED, 7.0, conds[0], conds[1], sampler, sigmas, latent
    )
    torch.testing.assert_close(out2["samples"], expected, rtol=1e-4, atol=1e-4)


def test_denoised_output_is_the_last_steps_estimate(ctx, handles, conds) -> None:
    """Stopping at sigma_3 > 0 leaves noise in ``output``; ``denoised_output`` is D(x_2, sigma_2),
    which is what Euler returns when that last step goes to sigma 0 instead."""
    model = handles[0]
    sigmas = sampling_ops.basic_scheduler(ctx, model, "normal", 6, 1.0)[0]
    high, _ = custom_ops.split_sigmas(ctx, sigmas, 3)
    to_zero = torch.cat([high[:-1], high.new_zeros(1)])
    sampler = custom_ops.ksampler_select(ctx, "euler")[0]
    latent = empty_latent(ctx)

    def run(schedule: torch.Tensor) -> tuple[dict[str, Any], dict[str, Any]]:
        return sampling_ops.sampler_custom(
            ctx, model, True, SEED, 7.0, conds[0], conds[1], sampler, schedule, latent
        )

    out, denoised = run(high)
    finished, _ = run(to_zero)
    assert not torch.allclose(out["samples"], denoised["samples"], atol=1e-2)
    torch.testing.assert_close(denoised["samples"], finished["samples"], rtol=1e-4, atol=1e-4)


def test_basic_guider_is_cfg_one(ctx, handles, conds) -> None:
    model = handles[0]
    latent = empty_latent(ctx)
    expected = ksampler(ctx, handles, conds, latent, cfg=1.0)
    guider = sampling_ops.basic_guider(ctx, model, conds[0])[0]
    sampler = custom_ops.ksampler_select(ctx, "euler")[0]
    sigmas = sampling_ops.basic_scheduler(ctx, model, "normal", STEPS, 1.0)[0]
    out, _ = sampling_ops.sampler_custom_advanced(
        ctx, custom_ops.random_noise(ctx, SEED)[0], guider, sampler, sigmas, latent
    )
    torch.testing.assert_close(out["samples"], expected, rtol=1e-4, atol=1e-4)


def test_sd_turbo_scheduler(ctx, handles) -> None:
    model = handles[0]
    sigmas = sampling_ops.sd_turbo_scheduler(ctx, model, 2, 1.0)[0]
    table = model.model_sampling.sigmas
    torch.testing.assert_close(sigmas, torch.stack([table[999], table[899], torch.tensor(0.0)]))
    half = sampling_ops.sd_turbo_scheduler(ctx, model, 1, 0.5)[0]
    torch.testing.assert_close(half, torch.stack([table[499], torch.tensor(0.0)]))


def test_img2img_keeps_the_image_at_low_denoise(ctx, handles, conds) -> None:
    _, _, vae = handles
    pixels = torch.rand(1, 64, 64, 3)
    latent = vae_ops.vae_encode(ctx, pixels, vae)[0]
    light = ksampler(ctx, handles, conds, latent, denoise=0.1)
    heavy = ksampler(ctx, handles, conds, latent, denoise=1.0)
    start = latent["samples"]
    assert float((light - start).abs().mean()) < float((heavy - start).abs().mean())


def test_noise_mask_keeps_the_unmasked_latent(ctx, handles, conds) -> None:
    source = torch.randn(1, 4, 8, 8)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1.0
    latent = latent_ops.set_latent_noise_mask(ctx, {"samples": source}, mask)[0]
    out = ksampler(ctx, handles, conds, latent)
    torch.testing.assert_close(out[..., :1, :], source[..., :1, :], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out[..., 3:5, 3:5], source[..., 3:5, 3:5], atol=1e-2)


# ------------------------------------------------------------------------------ inpainting models


@pytest.fixture(scope="module")
def inpainting_checkpoint(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with a 9-channel conv_in: the layout of SD's inpainting checkpoints."""
    sd = load_file(str(checkpoint))
    key = "model.diffusion_model.input_blocks.0.0.weight"
    weight = sd[key]
    extra = torch.randn(weight.shape[0], 5, *weight.shape[2:], generator=torch.Generator().manual_seed(5))
    sd[key] = torch.cat([weight, extra.to(weight.dtype) * 0.5], dim=1).contiguous()
    path = tmp_path_factory.mktemp("inpaint") / "tiny-inpainting.safetensors"
    save_file(sd, str(path))
    return path


def test_inpaint_model_conditioning_feeds_the_concat_channels(
    ctx, manager, inpainting_checkpoint, conds
) -> None:
    model, _, vae = manager.load_checkpoint(inpainting_checkpoint)
    assert model.config.in_channels == 9
    pixels = torch.rand(1, 64, 64, 3)
    mask = torch.zeros(1, 64, 64)
    mask[:, 20:44, 20:44] = 1.0
    positive, negative, latent = vae_ops.inpaint_model_conditioning(
        ctx, conds[0], conds[1], vae, pixels, mask, True
    )
    assert latent["noise_mask"].shape == (1, 1, 64, 64)
    assert positive[0][1]["concat_latent_image"].shape == (1, 4, 8, 8)
    assert torch.equal(positive[0][1]["concat_mask"], negative[0][1]["concat_mask"])
    handles = (model, None, vae)
    out = ksampler(ctx, handles, (positive, negative), latent)
    # Another masked image changes what the UNet sees through its extra channels.
    other_pos, other_neg, _ = vae_ops.inpaint_model_conditioning(
        ctx, conds[0], conds[1], vae, 1.0 - pixels, mask, True
    )
    other = ksampler(ctx, handles, (other_pos, other_neg), latent)
    assert not torch.allclose(out, other, atol=1e-4)
    # Without a mask anywhere, an inpainting UNet still runs (ones + a grey image).
    assert ksampler(ctx, handles, conds, empty_latent(ctx)).shape == (1, 4, 8, 8)


def test_inpaint_model_conditioning_on_an_ordinary_model(ctx, handles, conds) -> None:
    _, _, vae = handles
    pixels = torch.rand(1, 66, 70, 3)  # cropped to multiples of 8, as ComfyUI crops
    mask = torch.ones(1, 66, 70)
    positive, negative, latent = vae_ops.inpaint_model_conditioning(
        ctx, conds[0], conds[1], vae, pixels, mask, False
    )
    assert "noise_mask" not in latent
    assert positive[0][1]["concat_mask"].shape == (1, 1, 64, 64)
    assert latent["samples"].shape == (1, 4, 8, 8)
    assert ksampler(ctx, handles, (positive, negative), latent, denoise=0.5).shape == (1, 4, 8, 8)


# ------------------------------------------------------------------------------ events


def test_one_progress_event_per_step_and_previews(manager, handles, conds) -> None:
    sink = ListSink()
    ctx = make_ctx(manager, sink, preview_interval=2)
    ksampler(ctx, handles, conds, empty_latent(ctx), steps=5)
    progress = sink.of_type(PROGRESS)
    assert [(p["value"], p["max"]) for p in progress] == [(i, 5) for i in range(1, 6)]
    assert all(p["node"] == "3" and p["prompt_id"] == "p" for p in progress)
    previews = sink.of_type(PREVIEW)
    assert len(previews) == 3  # steps 2, 4 and the last
    with Image.open(io.BytesIO(previews[0]["image"])) as image:
        assert image.format == "JPEG" and image.size == (8, 8)


def test_no_previews_by_default(manager, handles, conds) -> None:
    sink = ListSink()
    ksampler(make_ctx(manager, sink), handles, conds, empty_latent(make_ctx(manager)))
    assert sink.of_type(PREVIEW) == []


def test_interruption_is_honoured_within_one_step(manager, handles, conds) -> None:
    steps_seen: list[int] = []
    flag = InterruptFlag()

    def on_event(event: Event) -> None:
        if event.type == PROGRESS:
            steps_seen.append(event.data["value"])
            if event.data["value"] == 2:
                flag.request()

    services = Services(outputs=None, inputs=None, models=manager)  # type: ignore[arg-type]
    ctx = NodeContext("3", "KSampler", "p", services, CallbackSink(on_event), flag, [])
    with pytest.raises(ExecutionInterrupted):
        ksampler(ctx, handles, conds, empty_latent(ctx), steps=10)
    assert steps_seen == [1, 2]


def test_a_missing_model_is_a_clear_error(ctx, conds) -> None:
    with pytest.raises(ModelError, match="model input is invalid"):
        sampling_ops.ksampler(
            ctx,
            None,
            SEED,
            2,
            7.0,
            "euler",
            "normal",
            conds[0],
            conds[1],
            {"samples": torch.zeros(1, 4, 8, 8)},
        )


@pytest.mark.parametrize("sampler_name", SAMPLER_NAMES)
def test_every_sampler_runs_through_ksampler(ctx, handles, conds, sampler_name) -> None:
    """Every name of KSampler's combo runs through the node on a real (tiny) UNet with CFG, including
    the CFG++ samplers (which need the uncond prediction) and the SDE ones (Brownian noise)."""
    latent = empty_latent(ctx, size=32)
    out = ksampler(ctx, handles, conds, latent, sampler_name=sampler_name, scheduler="karras", steps=3)
    again = ksampler(ctx, handles, conds, latent, sampler_name=sampler_name, scheduler="karras", steps=3)
    assert out.shape == (1, 4, 4, 4) and bool(torch.isfinite(out).all())
    torch.testing.assert_close(out, again, rtol=0, atol=0)  # deterministic per seed


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_every_scheduler_runs_through_ksampler(ctx, handles, conds, scheduler) -> None:
    latent = empty_latent(ctx, size=32)
    out = ksampler(ctx, handles, conds, latent, scheduler=scheduler, steps=3, denoise=0.7)
    assert out.shape == (1, 4, 4, 4) and bool(torch.isfinite(out).all())
