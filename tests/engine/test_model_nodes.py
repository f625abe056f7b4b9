"""Model, conditioning and VAE nodes: ComfyUI's declarations, their semantics, and whole prompts with a
tiny checkpoint through the real executor and ``kiln run``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from engine.context import NodeContext, Services
from engine.errors import ModelError, PromptValidationError
from engine.events import NullSink
from engine.interrupt import InterruptFlag
from engine.models.manager import ModelManager
from engine.models.test_checkpoint import write_test_checkpoint
from engine.ops import conditioning as cond_ops
from engine.ops import models as model_ops
from engine.ops import vae as vae_ops
from engine.registry import default_registry
from engine.runtime import EngineRuntime
from engine.settings import EngineSettings
from engine.validation import validate_prompt

REPO = Path(__file__).resolve().parents[1].parent


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return write_test_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", "sd15", "tiny", seed=7)


@pytest.fixture
def model_settings(engine_settings: EngineSettings, tiny_checkpoint: Path) -> EngineSettings:
    folder = engine_settings.models_dirs[0] / "checkpoints"
    folder.mkdir(parents=True)
    shutil.copy(tiny_checkpoint, folder / "tiny.safetensors")
    return engine_settings.model_copy(
        update={"offline": True, "node_modules": ["tests.engine.model_test_nodes"]}
    )


def pipeline_prompt(text: str = "a red fox", color: int = 0x336699) -> dict[str, Any]:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
        "3": {"class_type": "KilnTestConditioningSummary", "inputs": {"conditioning": ["2", 0]}},
        "4": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": color},
        },
        "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "roundtrip"}},
    }


# ------------------------------------------------------------------------------ declarations


def test_declarations_match_comfyui(registry):
    info = registry.object_info()
    ckpt = info["CheckpointLoaderSimple"]
    assert ckpt["input"]["required"]["ckpt_name"][1] == {
        "tooltip": "The name of the checkpoint (model) to load."
    }
    assert ckpt["output"] == ["MODEL", "CLIP", "VAE"] and ckpt["display_name"] == "Load Checkpoint"
    assert ckpt["category"] == "loaders" and len(ckpt["output_tooltips"]) == 3
    assert info["CheckpointLoader"]["input_order"]["required"] == ["config_name", "ckpt_name"]
    assert "v1-inference.yaml" in info["CheckpointLoader"]["input"]["required"]["config_name"][0]
    clip_loader = info["CLIPLoader"]["input"]
    assert clip_loader["required"]["type"][0][0] == "stable_diffusion"
    assert clip_loader["optional"]["device"] == [["default", "cpu"], {"advanced": True}]
    assert info["UNETLoader"]["input"]["required"]["weight_dtype"][0][0] == "default"
    assert info["UNETLoader"]["display_name"] == "Load Diffusion Model"
    assert info["CLIPSetLastLayer"]["input"]["required"]["stop_at_clip_layer"] == [
        "INT",
        {"default": -1, "min": -24, "max": -1, "step": 1},
    ]
    text = info["CLIPTextEncode"]["input"]["required"]["text"]
    assert text == [
        "STRING",
        {"multiline": True, "tooltip": "The text to be encoded.", "dynamicPrompts": True},
    ]
    assert info["CLIPTextEncode"]["display_name"] == "CLIP Text Encode (Prompt)"
    area = info["ConditioningSetArea"]["input"]["required"]
    assert area["width"] == ["INT", {"default": 64, "min": 64, "max": 16384, "step": 8}]
    assert info["ConditioningSetMask"]["input"]["required"]["set_cond_area"][0] == ["default", "mask bounds"]
    assert info["ConditioningZeroOut"]["category"] == "advanced/conditioning"
    tiled = info["VAEDecodeTiled"]["input"]["required"]
    assert list(tiled) == ["samples", "vae", "tile_size", "overlap", "temporal_size", "temporal_overlap"]
    assert tiled["tile_size"][1] == {"default": 512, "min": 64, "max": 4096, "step": 32}
    assert info["VAEEncodeTiled"]["input"]["required"]["tile_size"][1]["step"] == 64
    assert info["VAEEncodeForInpaint"]["input"]["required"]["grow_mask_by"][1] == {
        "default": 6,
        "min": 0,
        "max": 64,
        "step": 1,
    }
    assert info["VAEDecode"]["output_tooltips"] == ["The decoded image."]
    for name in ("CheckpointLoaderSimple", "CheckpointLoader", "VAELoader", "CLIPLoader", "UNETLoader"):
        assert registry.get(name).fingerprint is not None, name


def test_model_combos_list_the_model_folders(model_settings):
    runtime = EngineRuntime(model_settings)
    info = runtime.registry.object_info(runtime.inventory)
    assert "tiny.safetensors" in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    prompt = pipeline_prompt()
    prompt["1"]["inputs"]["ckpt_name"] = "missing.ckpt"
    with pytest.raises(PromptValidationError) as err:
        runtime.validate(prompt)
    assert err.value.node_errors["1"]["errors"][0]["type"] == "value_not_in_list"


# ------------------------------------------------------------------------------ through the executor


def test_pipeline_runs_and_caches_across_prompts(model_settings):
    runtime = EngineRuntime(model_settings)
    first = runtime.execute(pipeline_prompt())
    assert {"1", "2", "5", "6"} <= set(first.executed)
    [row] = first.outputs["3"]["conditioning"]
    assert row["shape"] == [1, 77, 128] and row["pooled"] == [1, 128] and row["device"] == "cpu"
    [saved] = first.saved
    with Image.open(saved.location) as image:
        assert image.size == (64, 48)
    second = runtime.execute(pipeline_prompt())
    assert {"1", "2", "5", "6"} <= set(second.cached)
    # another prompt text re-encodes, the loader stays cached
    third = runtime.execute(pipeline_prompt(text="a blue fox"))
    assert "1" in third.cached and "2" in third.executed
    assert third.outputs["3"]["conditioning"][0]["sum"] != row["sum"]
    parts = {r["part"] for r in runtime.models.resident()}
    assert parts == {"unet", "clip", "vae"}


def test_replacing_the_file_invalidates_the_loader(model_settings, tmp_path):
    runtime = EngineRuntime(model_settings)
    first = runtime.execute(pipeline_prompt())
    path = model_settings.models_dirs[0] / "checkpoints" / "tiny.safetensors"
    other = write_test_checkpoint(tmp_path / "other.safetensors", "sd15", "tiny", seed=8)
    os.replace(other, path)
    second = runtime.execute(pipeline_prompt())
    assert "1" in second.executed and "2" in second.executed
    assert second.outputs["3"]["conditioning"][0]["sum"] != first.outputs["3"]["conditioning"][0]["sum"]


def test_kiln_run_end_to_end(model_settings, tmp_path):
    workflow = tmp_path / "workflow.json"
    workflow.write_text(json.dumps(pipeline_prompt()))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("KILN_CONFIG", None)
    args = [
        sys.executable,
        "-m",
        "kiln",
        "run",
        str(workflow),
        str(workflow),
        "--models-dir",
        str(model_settings.models_dirs[0]),
        "--input-dir",
        str(model_settings.input_dir),
        "--output-dir",
        str(model_settings.output_dir),
        "--temp-dir",
        str(model_settings.temp_dir),
        "--node-modules",
        "tests.engine.model_test_nodes",
        "--device",
        "cpu",
        "--offline",
    ]
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=170)
    assert proc.returncode == 0, proc.stderr
    first, second = (json.loads(line) for line in proc.stdout.splitlines() if line.strip())
    assert first["status"] == second["status"] == "success"
    assert first["history"]["3"]["conditioning"][0]["shape"] == [1, 77, 128]
    assert {"1", "2", "5", "6"} <= set(second["cached_nodes"])
    [out] = first["outputs"]
    with Image.open(out["path"]) as image:
        assert image.size == (64, 48)
        assert json.loads(image.text["prompt"]) == pipeline_prompt()
    assert "Loaded tiny.safetensors (unet)" in proc.stderr


def test_missing_clip_or_vae_gives_comfyuis_message():
    with pytest.raises(ModelError, match="clip input is invalid: None"):
        model_ops.clip_set_last_layer(None, None, -2)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="vae input is invalid: None"):
        vae_ops.vae_decode(None, {"samples": torch.zeros(1, 4, 8, 8)}, None)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ node semantics


@pytest.fixture(scope="module")
def ctx(tiny_checkpoint) -> NodeContext:
    manager = ModelManager("cpu")
    services = Services(outputs=None, inputs=None, models=manager)  # type: ignore[arg-type]
    return NodeContext("1", "test", "p", services, NullSink(), InterruptFlag(), [])


@pytest.fixture(scope="module")
def handles(ctx, tiny_checkpoint):
    return ctx.services.models.load_checkpoint(tiny_checkpoint)


def test_clip_text_encode_and_last_layer(ctx, handles):
    _, clip, _ = handles
    [[cond, options]] = cond_ops.clip_text_encode(ctx, "a red fox", clip)[0]
    assert cond.shape == (1, 77, 128) and options["pooled_output"].shape == (1, 128)
    [[skipped, _]] = cond_ops.clip_text_encode(
        ctx, "a red fox", model_ops.clip_set_last_layer(ctx, clip, -2)[0]
    )[0]
    assert not torch.allclose(cond, skipped)
    [[long, _]] = cond_ops.clip_text_encode(ctx, "word " * 80, clip)[0]
    assert long.shape == (1, 154, 128)


def test_checkpoint_loader_with_config(ctx, tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(ctx.services.models, "resolve", lambda folder, name: tiny_checkpoint)
    model, clip, _ = model_ops.checkpoint_loader(ctx, "v2-inference-v.yaml", "tiny.safetensors")
    assert model.model_sampling.parameterization == "v_prediction" and clip.layer_idx is None
    model, clip, _ = model_ops.checkpoint_loader(ctx, "v1-inference_clip_skip_2.yaml", "tiny.safetensors")
    assert model.model_sampling.parameterization == "eps" and clip.layer_idx == -2
    plain = model_ops.checkpoint_loader_simple(ctx, "tiny.safetensors")
    same = model_ops.checkpoint_loader(ctx, "v1-inference.yaml", "tiny.safetensors")
    assert [h.cache_key for h in plain] == [h.cache_key for h in same]


def test_conditioning_nodes():
    a = [[torch.ones(1, 77, 4), {"pooled_output": torch.ones(1, 4)}]]
    b = [[torch.full((1, 154, 4), 3.0), {"pooled_output": torch.full((1, 4), 3.0), "strength": 0.5}]]
    assert cond_ops.conditioning_combine(None, a, b)[0] == a + b
    [[avg, opts]] = cond_ops.conditioning_average(None, a, b, 0.25)[0]
    assert torch.allclose(avg, torch.full((1, 77, 4), 0.25 * 1 + 0.75 * 3))
    assert torch.allclose(opts["pooled_output"], torch.full((1, 4), 2.5))
    [[padded, _]] = cond_ops.conditioning_average(None, b, a, 0.5)[0]  # from is shorter: zero-padded
    assert torch.allclose(padded[:, :77], torch.full((1, 77, 4), 2.0))
    assert torch.allclose(padded[:, 77:], torch.full((1, 77, 4), 1.5))
    [[cat, cat_opts]] = cond_ops.conditioning_concat(None, a, b)[0]
    assert cat.shape == (1, 231, 4) and cat_opts == a[0][1] and cat_opts is not a[0][1]
    [[_, area]] = cond_ops.conditioning_set_area(None, a, 256, 128, 64, 32, 0.8)[0]
    assert area["area"] == (16, 32, 4, 8) and area["strength"] == 0.8 and area["set_area_to_bounds"] is False
    assert "area" not in a[0][1]  # the input is never modified
    assert cond_ops.conditioning_set_area_strength(None, b, 2.0)[0][0][1]["strength"] == 2.0
    [[_, masked]] = cond_ops.conditioning_set_mask(None, a, torch.ones(8, 8), 0.7, "mask bounds")[0]
    assert (
        masked["mask"].shape == (1, 8, 8) and masked["mask_strength"] == 0.7 and masked["set_area_to_bounds"]
    )
    [[zero, zero_opts]] = cond_ops.conditioning_zero_out(None, b)[0]
    assert not zero.any() and not zero_opts["pooled_output"].any() and zero_opts["strength"] == 0.5


def test_vae_nodes(ctx, handles):
    _, _, vae = handles
    pixels = torch.rand(2, 70, 64, 4)  # height cropped to 64 (3 rows off the top)
    latent = vae_ops.vae_encode(ctx, pixels, vae)[0]
    assert latent["samples"].shape == (2, 4, 8, 8)
    image = vae_ops.vae_decode(ctx, latent, vae)[0]
    assert image.shape == (2, 64, 64, 3) and image.min() >= 0 and image.max() <= 1
    # one tile covers everything: tiled equals plain
    tiled = vae_ops.vae_decode_tiled(ctx, latent, vae, 512, 64, 64, 8)[0]
    assert torch.allclose(tiled, image, atol=1e-6)
    tiled_latent = vae_ops.vae_encode_tiled(ctx, pixels, vae, 512, 64, 64, 8)[0]
    assert torch.allclose(tiled_latent["samples"], latent["samples"], atol=1e-5)
    mask = torch.zeros(1, 70, 64)
    mask[:, 20:40, 20:40] = 1.0
    inpaint = vae_ops.vae_encode_for_inpaint(ctx, pixels, vae, mask, 6)[0]
    noise_mask = inpaint["noise_mask"]
    assert noise_mask.shape == (1, 1, 64, 64) and set(noise_mask.unique().tolist()) == {0.0, 1.0}
    assert noise_mask.sum() > mask.sum()  # grown by a few pixels
    assert inpaint["samples"].shape == (2, 4, 8, 8)
    assert not torch.allclose(inpaint["samples"], latent["samples"])


def test_validation_without_a_model_manager_stays_torch_free_in_declarations():
    prompt = pipeline_prompt()
    validated = validate_prompt(
        prompt,
        default_registry(["tests.engine.model_test_nodes"]),
        inventory=_Inventory(),
    )
    assert set(validated.prompt) == set(prompt)


class _Inventory:
    def list_choices(self, kind: str) -> list[str]:
        return ["tiny.safetensors"] if kind == "models:checkpoints" else []
