"""UpscaleModelLoader and ImageUpscaleWithModel: ComfyUI's declarations, tiled upscaling (blending,
out-of-memory fallback, progress and interruption) and whole prompts through the executor."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from engine.context import NodeContext, Services
from engine.errors import ExecutionInterrupted, ModelError, PromptValidationError
from engine.events import PROGRESS, ListSink
from engine.interrupt import InterruptFlag
from engine.models import esrgan
from engine.models.manager import ModelManager
from engine.models.test_checkpoint import write_test_esrgan
from engine.models.vae import count_tiles
from engine.ops import upscale as upscale_ops
from engine.ops.upscale import upscale_tiled
from engine.runtime import EngineRuntime
from engine.schema import Shape
from engine.settings import EngineSettings


def local_model(pixels: torch.Tensor) -> torch.Tensor:
    """A x4 'model' whose output pixels depend only on their own input pixel: tiling is exact."""
    return F.interpolate(pixels * 2.0 - 0.3, scale_factor=4, mode="nearest")


@pytest.fixture(scope="module")
def tiny_x4(tmp_path_factory) -> Path:
    return write_test_esrgan(tmp_path_factory.mktemp("upscale") / "tiny-x4.safetensors", scale=4, seed=11)


@pytest.fixture
def node_ctx() -> NodeContext:
    services = Services(outputs=None, inputs=None, models=ModelManager("cpu"))  # type: ignore[arg-type]
    return NodeContext("7", "ImageUpscaleWithModel", "p", services, ListSink(), InterruptFlag(), [])


# ------------------------------------------------------------------------------------------ declarations


def test_declarations_match_comfyui(registry):
    info = registry.object_info()
    loader = info["UpscaleModelLoader"]
    assert loader["input_order"] == {"required": ["model_name"]} and loader["output"] == ["UPSCALE_MODEL"]
    assert loader["category"] == "loaders" and loader["display_name"] == "Load Upscale Model"
    assert loader["python_module"] == "comfy_extras.nodes_upscale_model"
    node = info["ImageUpscaleWithModel"]
    assert node["input"]["required"] == {"upscale_model": ["UPSCALE_MODEL"], "image": ["IMAGE"]}
    assert node["input_order"] == {"required": ["upscale_model", "image"]} and node["output"] == ["IMAGE"]
    assert node["category"] == "image/upscaling" and node["display_name"] == "Upscale Image (using Model)"
    assert registry.get("UpscaleModelLoader").fingerprint is not None
    # cost estimates assume x4
    assert registry.get("ImageUpscaleWithModel").shape({}, {"image": Shape(100, 2)}) == Shape(1600, 2)


# ------------------------------------------------------------------------------------------ tiling


def test_tiled_blending_is_exact_for_a_local_model():
    pixels = torch.rand(2, 3, 40, 52)
    events: list[tuple[int, int]] = []
    out = upscale_tiled(
        local_model, pixels, 4, tile=24, overlap=8, progress=lambda d, t: events.append((d, t))
    )
    assert out.shape == (2, 3, 160, 208) and out.dtype == torch.float32 and out.device.type == "cpu"
    torch.testing.assert_close(out, local_model(pixels), rtol=1e-6, atol=1e-6)
    tiles = count_tiles(40, 52, (24, 24), 8)
    assert tiles == 2 * 3  # starts every 16 px below size - overlap: (0, 16) x (0, 16, 32)
    assert events == [(i, 2 * tiles) for i in range(1, 2 * tiles + 1)]  # one event per tile and image


def test_tiled_matches_untiled_for_a_real_model():
    config = esrgan.ESRGANConfig.for_scale(4, 8, 1, 4)
    net = esrgan.load_esrgan(esrgan.random_state_dict(config, seed=1), config)
    pixels = torch.rand(1, 3, 64, 80)
    with torch.no_grad():
        whole = net(pixels)
    tiled = upscale_tiled(net, pixels, 4, tile=48, overlap=16)  # tiles start at 0 and 32 on both axes
    assert tiled.shape == whole.shape
    # Only the first tile covers [0, 32); more than the receptive field (~20 px) from its edge at 48
    # it sees exactly what the whole image sees.
    torch.testing.assert_close(tiled[..., :112, :112], whole[..., :112, :112], rtol=1e-5, atol=1e-5)
    # Near the seams tiles lack context (as in ComfyUI): blended, the error stays small.
    assert (tiled - whole).abs().mean() < 0.01 * whole.abs().mean() + 1e-3


def test_an_image_that_fits_one_tile_is_not_tiled():
    calls: list[tuple[int, ...]] = []

    def model(pixels: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(pixels.shape))
        return local_model(pixels)

    upscale_tiled(model, torch.rand(2, 3, 30, 20), 4, tile=32, overlap=8)
    assert calls == [(1, 3, 30, 20), (1, 3, 30, 20)]  # one call per image


def test_out_of_memory_halves_the_tile():
    seen: list[int] = []

    def model(pixels: torch.Tensor) -> torch.Tensor:
        side = max(pixels.shape[-2:])
        seen.append(side)
        if side > 16:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return local_model(pixels)

    pixels = torch.rand(1, 3, 40, 40)
    events: list[tuple[int, int]] = []
    out = upscale_tiled(
        model, pixels, 4, tile=64, overlap=4, min_tile=8, progress=lambda d, t: events.append((d, t))
    )
    torch.testing.assert_close(out, local_model(pixels), rtol=1e-6, atol=1e-6)
    assert seen[:2] == [40, 32] and set(seen[2:]) <= {16, 12, 4}  # 64 (whole image), 32, then 16
    tiles = count_tiles(40, 40, (16, 16), 4)
    assert events == [(i, tiles) for i in range(1, tiles + 1)]


def test_out_of_memory_below_the_minimum_tile_is_raised():
    def model(pixels: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(torch.OutOfMemoryError):
        upscale_tiled(model, torch.rand(1, 3, 40, 40), 4, tile=32, overlap=4, min_tile=16)


def test_other_errors_are_not_retried():
    calls = []

    def model(pixels: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        upscale_tiled(model, torch.rand(1, 3, 40, 40), 4, tile=16, overlap=4, min_tile=4)
    assert len(calls) == 1


# ------------------------------------------------------------------------------------------ the node


def test_node_upscales_clamps_and_reports_progress(node_ctx, tiny_x4, monkeypatch):
    monkeypatch.setattr(node_ctx.services.models, "resolve", lambda folder, name: tiny_x4)
    [handle] = upscale_ops.upscale_model_loader(node_ctx, "tiny-x4.safetensors")
    assert handle.scale == 4
    image = torch.rand(3, 12, 10, 3)
    [out] = upscale_ops.image_upscale_with_model(node_ctx, handle, image)
    assert out.shape == (3, 48, 40, 3) and out.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    with node_ctx.services.models.use(handle) as net, torch.no_grad():
        expected = net(image.movedim(-1, 1)).clamp(0, 1).movedim(1, -1)
    torch.testing.assert_close(out, expected)
    progress = node_ctx.events.of_type(PROGRESS)
    assert [(e["value"], e["max"], e["node"]) for e in progress] == [(1, 3, "7"), (2, 3, "7"), (3, 3, "7")]


def test_node_keeps_alpha(node_ctx, tiny_x4):
    handle = node_ctx.services.models.load_upscale_model(tiny_x4)
    image = torch.rand(1, 6, 8, 4)
    [out] = upscale_ops.image_upscale_with_model(node_ctx, handle, image)
    assert out.shape == (1, 24, 32, 4)
    [rgb] = upscale_ops.image_upscale_with_model(node_ctx, handle, image[..., :3])
    torch.testing.assert_close(out[..., :3], rgb)
    alpha = F.interpolate(image[..., 3:].movedim(-1, 1), size=(24, 32), mode="bilinear").movedim(1, -1)
    torch.testing.assert_close(out[..., 3:], alpha)


def test_node_checks_channels(node_ctx, tiny_x4):
    handle = node_ctx.services.models.load_upscale_model(tiny_x4)
    with pytest.raises(ModelError, match="3-channel"):
        upscale_ops.image_upscale_with_model(node_ctx, handle, torch.rand(1, 8, 8, 1))


def test_node_honours_interruption(node_ctx, tiny_x4):
    handle = node_ctx.services.models.load_upscale_model(tiny_x4)
    node_ctx.interrupt.request()
    with pytest.raises(ExecutionInterrupted):
        upscale_ops.image_upscale_with_model(node_ctx, handle, torch.rand(1, 8, 8, 3))
    assert node_ctx.services.models.resident()[0]["in_use"] is False  # released after the interruption


# ------------------------------------------------------------------------------------------ executor


@pytest.fixture
def upscale_settings(engine_settings: EngineSettings, tiny_x4: Path) -> EngineSettings:
    folder = engine_settings.models_dirs[0] / "upscale_models"
    folder.mkdir(parents=True)
    shutil.copy(tiny_x4, folder / "tiny-x4.safetensors")
    return engine_settings.model_copy(update={"offline": True})


def upscale_prompt(model_name: str = "tiny-x4.safetensors") -> dict[str, Any]:
    return {
        "1": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": model_name}},
        "2": {
            "class_type": "EmptyImage",
            "inputs": {"width": 24, "height": 16, "batch_size": 1, "color": 0x336699},
        },
        "3": {
            "class_type": "ImageUpscaleWithModel",
            "inputs": {"upscale_model": ["1", 0], "image": ["2", 0]},
        },
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "up"}},
    }


def test_prompt_runs_through_the_executor(upscale_settings):
    runtime = EngineRuntime(upscale_settings)
    info = runtime.registry.object_info(runtime.inventory)
    assert info["UpscaleModelLoader"]["input"]["required"]["model_name"][0] == ["tiny-x4.safetensors"]
    events = ListSink()
    first = runtime.execute(upscale_prompt(), events=events)
    assert {"1", "3"} <= set(first.executed)
    [saved] = first.saved
    with Image.open(saved.location) as image:
        assert image.size == (96, 64)
    assert [(e["value"], e["max"]) for e in events.of_type(PROGRESS) if e["node"] == "3"] == [(1, 1)]
    [row] = runtime.models.resident()
    assert row["part"] == "upscale" and row["file"] == "tiny-x4.safetensors"
    second = runtime.execute(upscale_prompt())
    assert {"1", "3"} <= set(second.cached)


def test_model_name_is_validated(upscale_settings):
    runtime = EngineRuntime(upscale_settings)
    with pytest.raises(PromptValidationError) as err:
        runtime.validate(upscale_prompt("RealESRGAN_x4plus.pth"))
    [error] = err.value.node_errors["1"]["errors"]
    assert error["type"] == "value_not_in_list"
