"""MODEL / CLIP / VAE handles: immutability, cache keys, and weight patches applied and removed bit
for bit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.errors import ModelError
from engine.models.handles import DiffPatch, ModelHandle, WeightPatch, text_model_key_map
from engine.models.latent_format import SD15, LatentFormat
from engine.models.manager import ModelManager, apply_patches, restore_patches
from engine.models.unet import UNetConfig, build_unet

KEY = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, for exact comparison (NaN-safe, -0.0 != 0.0)."""
    return t.detach().contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()]).clone()


@pytest.fixture
def manager(tokenizer) -> ModelManager:
    return ModelManager("cpu", tokenizer=tokenizer)


@pytest.fixture
def loaded(manager, tiny_sd15):
    return manager.load_checkpoint(tiny_sd15)


# ------------------------------------------------------------------------------ patch arithmetic


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_apply_and_remove_are_bit_exact(dtype):
    net = build_unet(UNetConfig.tiny(), seed=3, dtype=dtype)
    before = {k: bits(v) for k, v in net.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    shape = net.state_dict()[KEY].shape
    diff = torch.randn(shape, generator=gen) * 1e-3
    backups = apply_patches(net, [DiffPatch(KEY, strength=0.7, diff=diff)])
    original = before[KEY].view(dtype)
    assert torch.equal(net.state_dict()[KEY], (original.float() + 0.7 * diff).to(dtype))
    restore_patches(net, backups)
    after = {k: bits(v) for k, v in net.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_patches_stack_in_order_in_float32():
    net = build_unet(UNetConfig.tiny(), seed=4)
    w = net.state_dict()[KEY].clone()
    d1, d2 = torch.randn(w.shape), torch.randn(w.shape)
    patches = [
        DiffPatch(KEY, strength=0.5, diff=d1),
        DiffPatch(KEY, strength=-0.25, diff=d2, strength_model=0.9),
    ]
    backups = apply_patches(net, patches)
    assert torch.equal(net.state_dict()[KEY], (w + 0.5 * d1) * 0.9 + -0.25 * d2)
    restore_patches(net, backups)
    assert torch.equal(net.state_dict()[KEY], w)


def test_offset_patches_touch_only_their_slice():
    net = build_unet(UNetConfig.tiny(), seed=5)
    w = net.state_dict()[KEY].clone()  # [inner, context]
    rows = w.shape[0] // 2
    delta = torch.ones(rows, w.shape[1])
    backups = apply_patches(net, [DiffPatch(KEY, diff=delta, offset=(0, rows, rows))])
    patched = net.state_dict()[KEY]
    assert torch.equal(patched[:rows], w[:rows])
    assert torch.equal(patched[rows:], w[rows:] + 1)
    restore_patches(net, backups)
    assert torch.equal(net.state_dict()[KEY], w)


def test_a_failing_patch_leaves_the_model_untouched():
    class Broken(WeightPatch):
        def delta(self, weight):
            raise RuntimeError("boom")

        def token(self):
            return "broken"

    net = build_unet(UNetConfig.tiny(), seed=6)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    first = "input_blocks.1.1.proj_in.weight"
    with pytest.raises(RuntimeError, match="boom"):
        apply_patches(net, [DiffPatch(first, diff=torch.ones(net.state_dict()[first].shape)), Broken(KEY)])
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


# ------------------------------------------------------------------------------ handles


def test_with_patches_checks_keys_and_sizes(loaded):
    model, clip, _ = loaded
    shape = model.weight_shapes()[KEY]
    patched = model.with_patches([DiffPatch(KEY, diff=torch.zeros(shape))])
    assert patched is not model and model.patches == () and len(patched.patches) == 1
    assert patched.source == model.source  # shared weights
    with pytest.raises(ModelError, match="no weight"):
        model.with_patches([DiffPatch("lora_unet_nowhere.weight", diff=torch.zeros(1))])
    with pytest.raises(ModelError, match="values"):
        model.with_patches([DiffPatch(KEY, diff=torch.zeros(3))])
    with pytest.raises(ModelError, match="offset"):
        model.with_patches([DiffPatch(KEY, diff=torch.zeros(1), offset=(0, shape[0], 1))])
    with pytest.raises(ModelError, match="no weight"):
        clip.with_patches([DiffPatch(KEY, diff=torch.zeros(shape))])


def test_cache_keys_follow_content_not_identity(manager, tiny_sd15, tiny_sd21):
    model, clip, vae = manager.load_checkpoint(tiny_sd15)
    again = manager.load_checkpoint(tiny_sd15)
    assert [h.cache_key for h in (model, clip, vae)] == [h.cache_key for h in again]
    assert len({model.cache_key, clip.cache_key, vae.cache_key}) == 3
    assert manager.load_checkpoint(tiny_sd21)[0].cache_key != model.cache_key
    diff = torch.ones(model.weight_shapes()[KEY])
    p1 = model.with_patches([DiffPatch(KEY, diff=diff, strength=0.5)])
    p2 = model.with_patches([DiffPatch(KEY, diff=diff.clone(), strength=0.5)])
    p3 = model.with_patches([DiffPatch(KEY, diff=diff, strength=0.6)])
    p4 = model.with_patches([DiffPatch(KEY, diff=diff, strength=0.5, source="lora-sha:key")])
    assert p1.cache_key == p2.cache_key  # same change, other tensor object
    assert len({model.cache_key, p1.cache_key, p3.cache_key, p4.cache_key}) == 4
    assert clip.clip_layer(-2).cache_key != clip.cache_key
    assert clip.clip_layer(-2).clip_layer(-1).cache_key == clip.clip_layer(-1).cache_key
    other = dataclasses.replace(model.model_sampling, sigma_data=0.5)
    assert model.with_model_sampling(other).cache_key != model.cache_key
    assert model.clone().cache_key == model.cache_key


def test_handles_are_immutable(loaded):
    model, clip, vae = loaded
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.patches = ()  # type: ignore[misc]
    assert clip.clip_layer(-2).layer_idx == -2 and clip.layer_idx is None
    assert vae.downscale_ratio == 8
    assert model.latent_format is SD15


def test_latent_format_is_comfyuis_sd15():
    latent = torch.randn(1, 4, 8, 8)
    assert SD15.scale_factor == 0.18215 and SD15.latent_channels == 4
    assert torch.equal(SD15.process_in(latent), latent * 0.18215)
    assert torch.equal(SD15.process_out(latent), latent / 0.18215)
    assert SD15.latent_rgb_factors[0] == (0.3512, 0.2297, 0.3227)
    assert SD15.latent_rgb_factors[3] == (-0.2120, -0.2616, -0.7177)
    rgb = SD15.preview_rgb(latent[0])
    assert rgb.shape == (8, 8, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert isinstance(LatentFormat(), LatentFormat)


def test_clip_key_map_covers_both_file_layouts(loaded):
    _, clip, _ = loaded
    width = clip.config.width
    mapping = clip.file_key_map()
    shapes = clip.weight_shapes()
    assert mapping["text_model.encoder.layers.0.self_attn.k_proj.weight"] == (
        "blocks.0.attn.qkv.weight",
        (0, width, width),
    )
    assert mapping["transformer.resblocks.2.attn.in_proj_weight"] == ("blocks.2.attn.qkv.weight", None)
    assert mapping["text_model.encoder.layers.1.mlp.fc2.bias"] == ("blocks.1.mlp.proj.bias", None)
    assert all(target in shapes for target, _ in mapping.values())
    assert mapping == text_model_key_map(clip.config)


# ------------------------------------------------------------------------------ through the manager


def test_use_applies_patches_and_removes_them_bit_for_bit(manager, loaded):
    model, _, _ = loaded
    with manager.use(model) as net:
        original = bits(net.state_dict()[KEY])
        x = torch.randn(1, 4, 8, 8)
        t = torch.tensor([500.0])
        context = torch.randn(1, 77, model.config.context_dim)
        with torch.no_grad():
            plain = net(x, t, context)
    diff = torch.randn(model.weight_shapes()[KEY])
    patched = model.with_patches([DiffPatch(KEY, diff=diff, strength=2.0)])
    with manager.use(patched) as net:
        assert not torch.equal(bits(net.state_dict()[KEY]), original)
        with torch.no_grad():
            assert not torch.allclose(net(x, t, context), plain)
        with manager.use(patched) as inner:  # re-entrant with the same patches
            assert inner is net
        with pytest.raises(ModelError, match="two patch sets"), manager.use(model):
            pass
    with manager.use(model) as net:
        assert torch.equal(bits(net.state_dict()[KEY]), original)
        with torch.no_grad():
            assert torch.equal(net(x, t, context), plain)


def test_clip_patches_through_the_key_map(manager, loaded):
    _, clip, _ = loaded
    target, offset = clip.file_key_map()["text_model.encoder.layers.0.self_attn.v_proj.weight"]
    with manager.use(clip) as encoder:
        plain, _ = encoder.encode("a red fox")
        qkv = encoder.model.state_dict()[target].clone()
    width = clip.config.width
    patch = DiffPatch(target, diff=torch.full((width, width), 0.01), offset=offset)
    with manager.use(clip.with_patches([patch])) as encoder:
        changed, _ = encoder.encode("a red fox")
        now = encoder.model.state_dict()[target]
        assert torch.equal(now[: 2 * width], qkv[: 2 * width])  # q and k untouched
        assert torch.equal(now[2 * width :], qkv[2 * width :] + 0.01)
    assert not torch.allclose(changed, plain)
    with manager.use(clip) as encoder:
        assert torch.equal(encoder.model.state_dict()[target], qkv)


def test_model_handle_repr_and_kind(loaded):
    model, clip, vae = loaded
    assert isinstance(model, ModelHandle)
    assert (model.kind, clip.kind, vae.kind) == ("MODEL", "CLIP", "VAE")
    assert "tiny-sd15" in repr(model)
