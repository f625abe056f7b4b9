"""The SD 1.x/2.x UNet: checkpoint layout, config inference, parity with diffusers, chunked attention."""

from __future__ import annotations

import dataclasses
import math
import warnings
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from engine.errors import ModelError
from engine.models.unet import (
    UNET_PREFIX,
    UNetConfig,
    UNetModel,
    attention,
    build_unet,
    conv3x3,
    load_unet,
    meta_state_dict,
    random_state_dict,
)

# Facts about the real files (v1-5-pruned-emaonly.safetensors, v2-1_768-ema-pruned.safetensors):
# 686 tensors under model.diffusion_model. in both; 859,520,964 / 865,910,724 parameters.
# Shapes from the LDM sources (openaimodel.py / attention.py with v1/v2-inference.yaml) and
# ComfyUI's model detection.
SD15_UNET_TENSORS = 686
SD15_UNET_PARAMS = 859_520_964
SD21_UNET_PARAMS = 865_910_724
SD15_SAMPLE_KEYS = {
    "time_embed.0.weight": (1280, 320),
    "time_embed.2.bias": (1280,),
    "input_blocks.0.0.weight": (320, 4, 3, 3),
    "input_blocks.1.0.in_layers.0.weight": (320,),
    "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
    "input_blocks.1.0.emb_layers.1.weight": (320, 1280),
    "input_blocks.1.0.out_layers.3.weight": (320, 320, 3, 3),
    "input_blocks.1.1.norm.weight": (320,),
    "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
    "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.bias": (320,),
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
    "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight": (320, 1280),
    "input_blocks.1.1.transformer_blocks.0.norm3.bias": (320,),
    "input_blocks.1.1.proj_out.weight": (320, 320, 1, 1),
    "input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "input_blocks.6.0.op.weight": (640, 640, 3, 3),
    "input_blocks.9.0.op.weight": (1280, 1280, 3, 3),
    "input_blocks.11.0.out_layers.3.bias": (1280,),
    "middle_block.0.in_layers.0.weight": (1280,),
    "middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
    "middle_block.2.out_layers.3.weight": (1280, 1280, 3, 3),
    "output_blocks.0.0.skip_connection.weight": (1280, 2560, 1, 1),
    "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    "output_blocks.11.1.transformer_blocks.0.norm1.bias": (320,),
    "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
    "out.0.weight": (320,),
    "out.2.weight": (4, 320, 3, 3),
}
SD15_ABSENT_KEYS = (
    "input_blocks.10.1.proj_in.weight",  # no attention at the deepest level
    "output_blocks.2.2.conv.weight",  # ... so its upsampler sits at index 1
    "output_blocks.11.2.conv.weight",  # no upsampler at the top level
    "label_emb.0.0.weight",
)
SD21_SAMPLE_KEYS = {
    "input_blocks.1.1.proj_in.weight": (320, 320),
    "input_blocks.1.1.proj_out.weight": (320, 320),
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
    "middle_block.1.proj_in.weight": (1280, 1280),
    "output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight": (320, 1024),
}


def _shapes(config: UNetConfig) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in meta_state_dict(config).items()}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _parity_weights(config: UNetConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random weights with non-trivial biases and norm affines, scaled ~1/sqrt(fan_in)."""
    gen = torch.Generator().manual_seed(seed)
    sd = random_state_dict(config, seed=seed, std=1.0)
    out = {}
    for key, value in sd.items():
        noise = torch.randn(value.shape, generator=gen)
        if value.dim() == 1 and bool((value == 1).all()):  # norm weight
            out[key] = 1.0 + 0.1 * noise
        elif value.dim() == 1:  # bias
            out[key] = 0.1 * noise
        else:
            out[key] = value / math.sqrt(value[0].numel())
    return out


# ------------------------------------------------------------------------------------------------
# Layout and config inference


def test_sd15_key_set_matches_the_real_checkpoint():
    shapes = _shapes(UNetConfig.sd15())
    assert len(shapes) == SD15_UNET_TENSORS
    assert sum(math.prod(s) for s in shapes.values()) == SD15_UNET_PARAMS
    for key, shape in SD15_SAMPLE_KEYS.items():
        assert shapes[key] == shape, key
    for key in SD15_ABSENT_KEYS:
        assert key not in shapes


def test_sd21_layout():
    shapes = _shapes(UNetConfig.sd21())
    assert len(shapes) == SD15_UNET_TENSORS
    assert sum(math.prod(s) for s in shapes.values()) == SD21_UNET_PARAMS
    for key, shape in SD21_SAMPLE_KEYS.items():
        assert shapes[key] == shape, key


@pytest.mark.parametrize("preset", ["sd15", "sd21", "tiny"])
def test_config_round_trip(preset):
    config = getattr(UNetConfig, preset)()
    sd = meta_state_dict(config)
    assert UNetConfig.from_state_dict(sd) == config
    # A full checkpoint (prefixed, with other models' keys) works too.
    full = {UNET_PREFIX + k: v for k, v in sd.items()}
    full["first_stage_model.decoder.conv_in.weight"] = torch.empty(512, 4, 3, 3, device="meta")
    assert UNetConfig.from_state_dict(full) == config


def test_preset_facts():
    sd15, sd21 = UNetConfig.sd15(), UNetConfig.sd21()
    assert sd15.attention_resolutions == sd21.attention_resolutions == (1, 2, 4)
    assert [sd15.heads_for(c) for c in (320, 640, 1280)] == [(8, 40), (8, 80), (8, 160)]
    assert [sd21.heads_for(c) for c in (320, 640, 1280)] == [(5, 64), (10, 64), (20, 64)]
    assert not sd15.use_linear_in_transformer and sd21.use_linear_in_transformer
    assert sd15.adm_in_channels is None and sd15.context_dim == 768 and sd21.context_dim == 1024


def test_inference_of_irregular_layouts():
    config = UNetConfig(
        in_channels=9,
        out_channels=4,
        model_channels=32,
        channel_mult=(1, 2, 3),
        num_res_blocks=(1, 2, 1),
        transformer_depth=(0, 2, 1, 0),
        transformer_depth_middle=3,
        transformer_depth_output=(0, 0, 1, 1, 1, 2, 2),
        context_dim=40,
        num_heads=4,
        use_linear_in_transformer=True,
        adm_in_channels=24,
    )
    sd = meta_state_dict(config)
    assert UNetConfig.from_state_dict(sd, num_heads=4) == config
    attention_free = UNetConfig(
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=(1, 1),
        transformer_depth=(0, 0),
        transformer_depth_middle=-1,
        transformer_depth_output=(0, 0, 0, 0),
        context_dim=None,
    )
    sd = meta_state_dict(attention_free)
    assert "middle_block.1.in_layers.0.weight" not in sd
    assert UNetConfig.from_state_dict(sd) == attention_free


def test_head_overrides_and_errors():
    tiny = UNetConfig.tiny()
    sd = meta_state_dict(tiny)
    assert UNetConfig.from_state_dict(sd, num_head_channels=16).heads_for(64) == (4, 16)
    with pytest.raises(ModelError):
        UNetConfig.from_state_dict({"encoder.conv_in.weight": torch.empty(1)})
    broken = dict(sd)
    del broken["input_blocks.1.0.out_layers.3.weight"]
    with pytest.raises(ModelError):
        UNetConfig.from_state_dict(broken)
    with pytest.raises(ValueError):
        UNetConfig(num_heads=8, num_head_channels=64)


def test_sd15_keys_convert_one_to_one_with_diffusers():
    """diffusers' own single-file converter maps every LDM key of the sd15 preset onto exactly the
    parameters of its UNet2DConditionModel for SD 1.5."""
    conv = _diffusers()
    config = UNetConfig.sd15()
    ckpt = {UNET_PREFIX + k: v for k, v in meta_state_dict(config).items()}
    dconfig = conv.create_unet_diffusers_config_from_ldm(_ldm_yaml(config), ckpt)
    converted = conv.convert_ldm_unet_checkpoint(ckpt, dconfig)
    with torch.device("meta"):
        reference = conv.UNet2DConditionModel(**dconfig)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    assert len(expected) == SD15_UNET_TENSORS


# ------------------------------------------------------------------------------------------------
# Parity with diffusers


class _Diffusers:
    def __init__(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from diffusers import UNet2DConditionModel
            from diffusers.loaders.single_file_utils import (
                convert_ldm_unet_checkpoint,
                create_unet_diffusers_config_from_ldm,
            )
        self.UNet2DConditionModel = UNet2DConditionModel
        self.convert_ldm_unet_checkpoint = convert_ldm_unet_checkpoint
        self.create_unet_diffusers_config_from_ldm = create_unet_diffusers_config_from_ldm


def _diffusers() -> _Diffusers:
    pytest.importorskip("diffusers")
    return _Diffusers()


def _ldm_yaml(config: UNetConfig) -> dict:
    """The LDM inference yaml (as a dict) that describes ``config``; uniform configs only."""
    params = {
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "model_channels": config.model_channels,
        "attention_resolutions": list(config.attention_resolutions),
        "num_res_blocks": config.num_res_blocks[0],
        "channel_mult": list(config.channel_mult),
        "use_linear_in_transformer": config.use_linear_in_transformer,
        "transformer_depth": config.transformer_depth_middle,
        "context_dim": config.context_dim,
        "use_spatial_transformer": True,
        "legacy": False,
    }
    if config.num_head_channels > 0:
        params["num_head_channels"] = config.num_head_channels
    else:
        params["num_heads"] = config.num_heads
    return {
        "model": {
            "params": {
                "unet_config": {"params": params},
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }


SD1_STYLE = UNetConfig.from_levels(
    model_channels=32,
    channel_mult=(1, 2, 2),
    num_res_blocks=2,
    attention_resolutions=(1, 2),
    context_dim=48,
    num_heads=8,
)
SD2_STYLE = UNetConfig.from_levels(
    model_channels=32,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    attention_resolutions=(1, 2, 4),
    transformer_depth=2,
    context_dim=40,
    num_head_channels=16,
    use_linear_in_transformer=True,
)


@pytest.mark.parametrize(
    ("config", "size"),
    [(SD1_STYLE, (16, 16)), (SD1_STYLE, (13, 11)), (SD2_STYLE, (12, 20))],
    ids=["sd1-style", "sd1-style-odd-size", "sd2-style"],
)
def test_parity_with_diffusers(config, size):
    conv = _diffusers()
    sd = _parity_weights(config, seed=3)
    heads = {"num_head_channels": config.num_head_channels} if config.num_head_channels > 0 else {}
    assert UNetConfig.from_state_dict(sd, **heads) == config
    kiln = load_unet(sd, config)

    ckpt = {UNET_PREFIX + k: v.clone() for k, v in sd.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dconfig = conv.create_unet_diffusers_config_from_ldm(_ldm_yaml(config), ckpt)
        reference = conv.UNet2DConditionModel(**dconfig)
        missing, unexpected = reference.load_state_dict(conv.convert_ldm_unet_checkpoint(ckpt, dconfig))
    assert not missing and not unexpected
    reference.eval()

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, *size, generator=gen)
    t = torch.tensor([3.7, 801.0])
    context = torch.randn(2, 77, config.context_dim, generator=gen)
    with torch.inference_mode():
        ours = kiln(x, t, context)
        theirs = reference(x, t, encoder_hidden_states=context).sample
    assert ours.shape == theirs.shape == x.shape
    assert torch.isfinite(ours).all()
    assert _rel_err(ours, theirs) < 1e-4


# ------------------------------------------------------------------------------------------------
# Attention chunking, dtypes, loading


def test_chunked_attention_matches_unchunked():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 300, 64, generator=gen)
    k = torch.randn(2, 77, 64, generator=gen)
    v = torch.randn(2, 77, 64, generator=gen)
    full = attention(q, k, v, 4)
    row = 2 * 4 * 77 * 4  # bytes of one query row of the score matrix
    sdpa = F.scaled_dot_product_attention
    with mock.patch.object(F, "scaled_dot_product_attention", wraps=sdpa) as spy:
        chunked = attention(q, k, v, 4, memory_budget=row * 64)
    assert spy.call_count == math.ceil(300 / 64)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)
    one_row = attention(q, k, v, 4, memory_budget=1)
    torch.testing.assert_close(one_row, full, rtol=1e-5, atol=1e-6)
    # A reference written out by hand.
    qh, kh, vh = (t.view(2, -1, 4, 16).transpose(1, 2) for t in (q, k, v))
    ref = torch.softmax(qh @ kh.transpose(-1, -2) / 4.0, dim=-1) @ vh
    torch.testing.assert_close(full, ref.transpose(1, 2).reshape(2, 300, 64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("stride", "size"), [(1, (4, 4)), (1, (7, 5)), (2, (8, 8)), (2, (9, 7)), (1, (16, 16))]
)
def test_small_conv_path_matches_conv(stride, size):
    gen = torch.Generator().manual_seed(stride)
    conv = torch.nn.Conv2d(48, 40, 3, stride=stride, padding=1)
    x = torch.randn(2, 48, *size, generator=gen)
    with torch.inference_mode():
        torch.testing.assert_close(conv3x3(conv, x), conv(x), rtol=1e-5, atol=1e-5)


def test_model_with_chunked_attention_matches():
    model = load_unet(_parity_weights(UNetConfig.tiny(), seed=5))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 16, 16, generator=gen)
    context = torch.randn(1, 77, 64, generator=gen)
    with torch.inference_mode():
        with mock.patch.object(
            F, "scaled_dot_product_attention", wraps=F.scaled_dot_product_attention
        ) as spy:
            full = model(x, torch.tensor([10.0]), context)
            unchunked_calls = spy.call_count
            model.set_attention_options(memory_budget=1 << 18)  # a few query chunks per layer
            chunked = model(x, torch.tensor([10.0]), context)
        assert spy.call_count - unchunked_calls > unchunked_calls
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_in_weight_dtype(dtype):
    sd = _parity_weights(UNetConfig.tiny(), seed=2)
    ref_model = load_unet(sd)
    model = load_unet(sd, dtype=dtype)
    assert all(p.dtype == dtype for p in model.parameters())
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 77, 64, generator=gen)
    with torch.inference_mode():
        ref = ref_model(x, torch.tensor([500.0]), context)
        out = model(x, torch.tensor([500.0]), context)
        model.set_attention_options(upcast=True)
        upcast = model(x, torch.tensor([500.0]), context)
    assert out.dtype == torch.float32  # cast back to the input's dtype
    assert _rel_err(out, ref) < 5e-2
    assert _rel_err(upcast, ref) < 5e-2


def test_load_unet_assigns_without_init():
    config = UNetConfig.tiny()
    sd = random_state_dict(config, seed=11, dtype=torch.float16)
    model = load_unet({UNET_PREFIX + k: v for k, v in sd.items()}, dtype=torch.float32)
    assert isinstance(model, UNetModel) and not model.training
    assert model.config == config
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())
    assert set(model.state_dict()) == set(sd)
    torch.testing.assert_close(model.state_dict()["out.2.weight"], sd["out.2.weight"].float())
    same_dtype = load_unet(sd)  # checkpoint dtype kept, storage shared
    assert same_dtype.dtype == torch.float16
    assert same_dtype.out[2].weight.data_ptr() == sd["out.2.weight"].data_ptr()
    bad = dict(sd)
    bad["out.2.weight"] = torch.zeros(3, 32, 3, 3, dtype=torch.float16)
    with pytest.raises(ModelError):
        load_unet(bad, config)


def test_random_state_dict_is_deterministic_and_finite():
    config = UNetConfig.tiny()
    a, b = random_state_dict(config, seed=1), random_state_dict(config, seed=1)
    c = random_state_dict(config, seed=2)
    assert a.keys() == b.keys() == meta_state_dict(config).keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["out.2.weight"], c["out.2.weight"])
    assert torch.all(a["input_blocks.1.1.norm.weight"] == 1) and torch.all(a["out.2.bias"] == 0)
    model = build_unet(config, seed=1)
    with torch.inference_mode():
        out = model(torch.randn(2, 4, 8, 8), torch.tensor(999), torch.randn(2, 77, 64))
    assert torch.isfinite(out).all()


def test_label_embedding_needs_y():
    config = dataclasses.replace(UNetConfig.tiny(), adm_in_channels=12)
    model = build_unet(config)
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 64)
    with torch.inference_mode():
        assert model(x, torch.tensor([1.0]), ctx, y=torch.randn(1, 12)).shape == x.shape
        with pytest.raises(ValueError):
            model(x, torch.tensor([1.0]), ctx)
