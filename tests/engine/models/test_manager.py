"""The model manager: loading, precision, LRU placement within budgets, residency reports, freeing."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.errors import ModelError
from engine.models.handles import DiffPatch
from engine.models.hub import ModelHub
from engine.models.known_models import KnownModels
from engine.models.manager import ModelManager
from engine.models.text_encoding import TextEncoder
from engine.models.unet import UNetModel
from engine.models.vae import VAE
from engine.sampling.model_sampling import Parameterization

UNET_KEY = "model.diffusion_model.out.2.bias"


@pytest.fixture(scope="module")
def three_files(tmp_path_factory, tiny_sd15, tiny_sd21):
    """Three checkpoints with different content (so three models for the LRU)."""
    folder = tmp_path_factory.mktemp("three")
    third = folder / "c.safetensors"
    tensors = load_file(str(tiny_sd15))
    tensors[UNET_KEY] = tensors[UNET_KEY] + 1
    save_file(tensors, str(third))
    return tiny_sd15, tiny_sd21, third


def tier(manager: ModelManager, name: str) -> str | None:
    found = [r["where"] for r in manager.resident() if r["file"] == name and r["part"] == "unet"]
    return found[0] if found else None


def test_load_checkpoint_gives_working_handles(tiny_sd15, tiny_sd21, tokenizer):
    manager = ModelManager("cpu", tokenizer=tokenizer)
    for path, parameterization in (
        (tiny_sd15, Parameterization.EPS),
        (tiny_sd21, Parameterization.V_PREDICTION),
    ):
        model, clip, vae = manager.load_checkpoint(path)
        assert model.model_sampling.parameterization is parameterization
        with manager.use(clip) as encoder:
            assert isinstance(encoder, TextEncoder)
            cond, pooled = encoder.encode("a (red:1.2) fox, embedding:missing")
            assert cond.shape == (1, 77, 128) and cond.dtype == torch.float32 and pooled.shape == (1, 128)
        with manager.use(model) as net, torch.no_grad():
            assert isinstance(net, UNetModel)
            out = net(torch.randn(2, 4, 8, 8), torch.tensor([999.0, 999.0]), cond.expand(2, -1, -1))
            assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
        with manager.use(vae) as v:
            assert isinstance(v, VAE)
            latent = v.encode(torch.rand(1, 64, 70, 4))  # alpha dropped, width cropped to 64
            assert latent.shape == (1, 4, 8, 8)
            assert v.decode(latent).shape == (1, 64, 64, 3)
    assert {r["part"] for r in manager.resident()} == {"unet", "clip", "vae"}
    assert len(manager.resident()) == 6


def test_precision_policy(tiny_sd15, tokenizer):
    auto = ModelManager("cpu", tokenizer=tokenizer)
    assert (auto.unet_dtype, auto.text_encoder_dtype, auto.vae_dtype) == (torch.float32,) * 3
    half = ModelManager("cpu", precision="fp16", tokenizer=tokenizer)
    model, clip, vae = half.load_checkpoint(tiny_sd15)
    with half.use(model) as net:
        assert net.dtype == torch.float16
        # fp16 file, fp16 weights: the values are the file's, unconverted
        assert torch.equal(
            net.state_dict()["out.2.weight"], load_file(str(tiny_sd15))["model.diffusion_model.out.2.weight"]
        )
    with half.use(clip) as encoder:
        assert encoder.model.dtype == torch.float32  # ComfyUI computes CLIP in fp32
    with half.use(vae) as v:
        assert v.dtype == torch.float32  # fp16 is no working dtype of the SD VAE
    bf16 = ModelManager("cpu", precision="bf16", tokenizer=tokenizer)
    assert (bf16.unet_dtype, bf16.vae_dtype) == (torch.bfloat16, torch.bfloat16)
    assert ModelManager("cpu", precision="bf16", vae_fp32=True).vae_dtype == torch.float32
    with pytest.raises(ModelError, match="precision"):
        ModelManager("cpu", precision="fp8")


def test_lru_within_device_and_host_budgets(three_files, tokenizer):
    a, b, c = three_files
    probe = ModelManager("cpu", tokenizer=tokenizer)
    handle = probe.load_diffusion_model(a)
    unet_bytes = probe.resident()[0]["bytes"]
    assert probe.resident()[0]["part"] == "unet" and handle.source.prefix == "model.diffusion_model."

    manager = ModelManager(
        "cpu",
        device_budget_bytes=int(2.5 * unet_bytes),
        host_budget_bytes=int(1.5 * unet_bytes),
        tokenizer=tokenizer,
    )
    ha, hb = manager.load_diffusion_model(a), manager.load_diffusion_model(b)
    assert (tier(manager, a.name), tier(manager, b.name)) == ("device", "device")
    hc = manager.load_diffusion_model(c)  # a is the least recently used: it moves to the host tier
    assert (tier(manager, a.name), tier(manager, b.name), tier(manager, c.name)) == (
        "host",
        "device",
        "device",
    )
    with manager.use(ha) as net_a:
        # a comes back; b (now least recent) cannot go to the full host tier and is dropped
        assert (tier(manager, a.name), tier(manager, b.name), tier(manager, c.name)) == (
            "device",
            None,
            "device",
        )
        assert manager.resident()[0]["in_use"] and manager.resident()[0]["file"] == a.name
        ptr = net_a.out[2].weight.data_ptr()
    assert len(manager.load_stats()) == 3
    with manager.use(hb):  # read from its file again; c (least recent) moves to the host
        pass
    assert len(manager.load_stats()) == 4
    assert (tier(manager, a.name), tier(manager, b.name), tier(manager, c.name)) == (
        "device",
        "device",
        "host",
    )
    with manager.use(ha) as again:
        assert again.out[2].weight.data_ptr() == ptr  # on CPU, tiers share RAM: no copies
    used = manager.memory_used()
    assert used["device"] <= manager.device_budget and used["host"] <= manager.host_budget
    assert hc.cache_key != ha.cache_key


def test_models_in_use_are_never_evicted(three_files, tokenizer, caplog):
    a, b, c = three_files
    manager = ModelManager("cpu", device_budget_bytes=1, host_budget_bytes=0, tokenizer=tokenizer)
    ha = manager.load_diffusion_model(a, preload=False)
    with caplog.at_level(logging.WARNING, logger="engine.models.manager"), manager.use(ha):
        manager.load_diffusion_model(b)  # over budget: loads anyway, a stays
        assert tier(manager, a.name) == "device" and tier(manager, b.name) == "device"
    assert "budget" in caplog.text
    manager.load_diffusion_model(c)  # the next load evicts every idle model it can
    assert (tier(manager, a.name), tier(manager, b.name), tier(manager, c.name)) == (None, None, "device")


def test_resident_load_stats_and_free_all(tiny_sd15, tokenizer):
    manager = ModelManager("cpu", tokenizer=tokenizer)
    model, _, vae = manager.load_checkpoint(tiny_sd15)
    resident = manager.resident()
    assert {r["part"] for r in resident} == {"unet", "clip", "vae"}
    for row in resident:
        assert set(row) == {"file", "content_hash", "part", "where", "device", "dtype", "bytes", "in_use"}
        assert row["file"] == tiny_sd15.name and len(row["content_hash"]) == 64 and row["bytes"] > 0
        assert row["where"] == "device" and row["device"] == "cpu" and not row["in_use"]
    stats = manager.load_stats()
    assert len(stats) == 3 and all(s["seconds"] >= 0 and s["bytes"] > 0 for s in stats)
    assert sum(r["bytes"] for r in resident) == manager.memory_used()["device"]
    with manager.use(model):
        freed = manager.free_all()  # the model in use stays
        assert [r["part"] for r in manager.resident()] == ["unet"]
    assert freed == sum(r["bytes"] for r in resident if r["part"] != "unet")
    manager.free_all()
    assert manager.resident() == [] and manager.memory_used() == {"device": 0, "host": 0}
    with manager.use(vae) as v:  # a handle outlives free_all: the weights come back from the file
        assert v.decode(torch.zeros(1, 4, 4, 4)).shape == (1, 32, 32, 3)
    assert len(manager.load_stats()) == 4


def test_patched_models_are_unpatched_before_eviction(tiny_sd15, tokenizer):
    manager = ModelManager("cpu", tokenizer=tokenizer)
    model = manager.load_diffusion_model(tiny_sd15)
    key = "out.2.weight"
    with manager.use(model) as net:
        original = net.state_dict()[key].clone()
    patched = model.with_patches([DiffPatch(key, diff=torch.ones(original.shape))])
    with manager.use(patched) as net:
        assert torch.equal(net.state_dict()[key], original + 1)
    with manager.use(model) as net:
        assert torch.equal(net.state_dict()[key], original)


def test_a_changed_file_is_not_loaded_under_the_old_hash(tiny_sd15, tmp_path, tokenizer):
    path = tmp_path / "model.safetensors"
    shutil.copy(tiny_sd15, path)
    manager = ModelManager("cpu", tokenizer=tokenizer)
    model = manager.load_diffusion_model(path)
    manager.free_all()
    tensors = load_file(str(path))
    tensors[UNET_KEY] = tensors[UNET_KEY] + 1
    save_file(tensors, str(path))
    os.utime(path, ns=(1, 1))
    with pytest.raises(ModelError, match="changed since it was loaded"), manager.use(model):
        pass


def test_refusals_through_the_manager(tmp_path, tiny_sd15, tokenizer):
    manager = ModelManager("cpu", tokenizer=tokenizer)
    ckpt = tmp_path / "model.ckpt"
    torch.save({}, ckpt)
    for load in (
        manager.load_checkpoint,
        manager.load_vae,
        manager.load_text_encoder,
        manager.load_diffusion_model,
    ):
        with pytest.raises(ModelError, match="pickled"):
            load(ckpt)
    with pytest.raises(ModelError, match="not supported yet"):
        manager.load_text_encoder(tiny_sd15, "sd3")
    with pytest.raises(ModelError, match="fp8"):
        manager.load_diffusion_model(tiny_sd15, "fp8_e4m3fn")
    with pytest.raises(ModelError, match="no model hub"):
        manager.resolve("checkpoints", "x.safetensors")


def test_names_resolve_through_the_hub(tmp_path, tiny_sd15, tokenizer):
    folder = tmp_path / "models" / "checkpoints"
    folder.mkdir(parents=True)
    shutil.copy(tiny_sd15, folder / "tiny.safetensors")
    hub = ModelHub([tmp_path / "models"], KnownModels(), offline=True)
    manager = ModelManager("cpu", hub=hub, tokenizer=tokenizer)
    assert manager.resolve("checkpoints", "tiny.safetensors") == folder / "tiny.safetensors"
    import hashlib

    assert (
        manager.fingerprint("checkpoints", "tiny.safetensors")
        == hashlib.sha256(tiny_sd15.read_bytes()).hexdigest()
    )
    assert manager.hasher is hub.hasher
    with pytest.raises(ModelError, match="not found"):
        manager.resolve("checkpoints", "missing.safetensors")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_placement_moves_and_precision(three_files, tokenizer):
    a, b, _ = three_files
    probe = ModelManager("cuda", tokenizer=tokenizer)
    model_a = probe.load_diffusion_model(a)
    size = probe.resident()[0]["bytes"]
    assert probe.resident()[0]["device"].startswith("cuda") and probe.unet_dtype == torch.float16
    probe.free_all()
    del model_a
    manager = ModelManager(
        "cuda", device_budget_bytes=int(1.5 * size), host_budget_bytes=4 * size, tokenizer=tokenizer
    )
    model_a = manager.load_diffusion_model(a)
    model_b = manager.load_diffusion_model(b)
    assert (tier(manager, a.name), tier(manager, b.name)) == ("host", "device")
    key = "out.2.weight"
    patched = model_a.with_patches([DiffPatch(key, diff=torch.ones(model_a.weight_shapes()[key]))])
    with manager.use(patched) as net:
        assert net.device.type == "cuda" and net.dtype == torch.float16
        assert tier(manager, a.name) == "device" and tier(manager, b.name) == "host"
        patched_weight = net.state_dict()[key].float().cpu()
        with torch.no_grad():
            out = net(
                torch.randn(1, 4, 8, 8, device="cuda"),
                torch.tensor([10.0], device="cuda"),
                torch.randn(1, 77, 128, device="cuda"),
            )
        assert out.device.type == "cuda" and torch.isfinite(out).all()
    with manager.use(model_b):
        pass
    with manager.use(model_a) as net:
        restored = net.state_dict()[key].float().cpu()
    assert not torch.equal(restored, patched_weight)
    file_weight = load_file(str(a))["model.diffusion_model." + key].float()
    assert torch.equal(restored, file_weight.half().float())  # bit for bit after moves and unpatching
    _, _, vae = manager.load_checkpoint(a)
    with manager.use(vae) as v:
        expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        assert v.dtype == expected
        assert v.decode(torch.zeros(1, 4, 4, 4)).device.type == "cpu"
    del net, v
    manager.free_all()
    assert manager.resident() == []
    assert torch.cuda.memory_allocated() < size
