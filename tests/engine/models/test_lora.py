"""LoRA loading: key dialects, the patch math (LoRA, LoCon, LoHa, LoKr, DoRA), stacking, exact
restore, matching errors and warnings, and LoraLoader / LoraLoaderModelOnly through the executor."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from engine.context import NodeContext, NodeResult
from engine.errors import ModelError, PromptValidationError
from engine.models.handles import ClipHandle, ModelHandle
from engine.models.lora import apply_lora, apply_lora_tensors
from engine.models.lora_keys import (
    clip_lora_targets,
    diffusers_unet_modules,
    group_tensors,
    unet_lora_targets,
)
from engine.models.lora_patches import LoHaPatch, LoKrPatch, LoRAPatch
from engine.models.manager import ModelManager
from engine.models.unet import UNetConfig, UNetModel
from engine.runtime import EngineRuntime
from engine.schema import MODEL, NodeSpec, link
from engine.settings import EngineSettings

ATTN = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"  # Linear [32, 128]
CONV = "input_blocks.1.0.in_layers.2"  # Conv2d [32, 32, 3, 3]
KOHYA_ATTN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
KOHYA_CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
TE_Q = "lora_te_text_model_encoder_layers_1_self_attn_q_proj"

# An output node that reports a MODEL's patched weight, so the MODEL path runs inside real prompts
# (``node_modules=["tests.engine.models.test_lora"]``).
NODE_SPECS = (
    NodeSpec(
        "KilnTestModelSummary",
        category="testing",
        impl="tests.engine.models.test_lora:model_summary",
        required=(link("model", MODEL),),
        output_node=True,
        python_module="tests",
    ),
)


def model_summary(ctx: NodeContext, model: ModelHandle) -> NodeResult:
    assert ctx.services.models is not None
    with ctx.services.models.use(model) as net:
        weight = net.state_dict()[f"{ATTN}.weight"]
        row = {"patches": len(model.patches), "sum": float(weight.double().sum())}
    return NodeResult(ui={"model": [row]})


def rand(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1


def write_lora(path: Path, tensors: Mapping[str, Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def kohya_lora(module: str, out: int, inp: int, rank: int, alpha: float, seed: int, **extra: Tensor) -> dict:
    return {
        f"{module}.lora_up.weight": rand(out, rank, seed=seed),
        f"{module}.lora_down.weight": rand(rank, inp, seed=seed + 1),
        f"{module}.alpha": torch.tensor(alpha),
        **{f"{module}.{k}": v for k, v in extra.items()},
    }


@pytest.fixture(scope="module")
def manager(tokenizer) -> ModelManager:
    return ModelManager("cpu", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def sd15(manager, tiny_sd15) -> tuple[ModelHandle, ClipHandle]:
    model, clip, _ = manager.load_checkpoint(tiny_sd15)
    assert clip is not None
    return model, clip


def unet_weights(manager: ModelManager, model: ModelHandle, *keys: str) -> dict[str, Tensor]:
    with manager.use(model) as net:
        sd = net.state_dict()
        return {k: sd[f"{k}.weight"].clone() for k in keys}


def clip_weight(manager: ModelManager, clip: ClipHandle, key: str) -> Tensor:
    with manager.use(clip) as encoder:
        return encoder.model.state_dict()[key].clone()


# ------------------------------------------------------------------------------ key names


def test_diffusers_names_follow_comfyuis_unet_to_diffusers_for_sd15():
    with torch.device("meta"):
        keys = UNetModel(UNetConfig.sd15()).state_dict()
    modules = [k[: -len(".weight")] for k in keys if k.endswith(".weight")]
    names = diffusers_unet_modules(UNetConfig.sd15(), modules)
    expected = {
        "input_blocks.0.0": "conv_in",
        "time_embed.2": "time_embedding.linear_2",
        "input_blocks.5.1.proj_in": "down_blocks.1.attentions.1.proj_in",
        "input_blocks.4.0.skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
        "input_blocks.9.0.op": "down_blocks.2.downsamplers.0.conv",
        "input_blocks.11.0.emb_layers.1": "down_blocks.3.resnets.1.time_emb_proj",
        "middle_block.1.transformer_blocks.0.ff.net.0.proj": (
            "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"
        ),
        "middle_block.2.out_layers.3": "mid_block.resnets.1.conv2",
        "output_blocks.2.1.conv": "up_blocks.0.upsamplers.0.conv",
        "output_blocks.2.0.in_layers.0": "up_blocks.0.resnets.2.norm1",
        "output_blocks.5.2.conv": "up_blocks.1.upsamplers.0.conv",
        "output_blocks.5.1.transformer_blocks.0.attn1.to_out.0": (
            "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0"
        ),
        "output_blocks.11.1.proj_out": "up_blocks.3.attentions.2.proj_out",
        "out.2": "conv_out",
    }
    for ldm, diffusers in expected.items():
        assert names[ldm] == (diffusers,), ldm
    assert "output_blocks.11.2.conv" not in keys  # the last level does not upsample
    assert len(names) == len(modules)  # every SD1.5 weight has a diffusers name


def test_every_dialect_maps_to_the_same_layer(sd15):
    model, clip = sd15
    unet, te = unet_lora_targets(model), clip_lora_targets(clip)
    attn = unet[KOHYA_ATTN]
    assert attn.weight.key == f"{ATTN}.weight" and attn.weight.shape == (32, 128) and attn.bias is None
    for name in (
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k",  # kohya, LDM names
        "lycoris_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",  # PEFT
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k",  # old diffusers
        f"diffusion_model.{ATTN}",  # ComfyUI generic
        ATTN,
    ):
        assert unet[name] == attn, name
    out = unet["unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out"]
    assert out.weight.key == "output_blocks.2.1.transformer_blocks.0.attn1.to_out.0.weight"  # 2 per level
    assert out.bias is not None and out.bias.key.endswith("to_out.0.bias")
    assert unet[KOHYA_CONV].weight.key == f"{CONV}.weight"
    q = te[TE_Q]
    assert q.weight.key == "blocks.1.attn.qkv.weight" and q.weight.offset == (0, 0, 128)
    assert te["lora_te_text_model_encoder_layers_1_self_attn_v_proj"].weight.offset == (0, 256, 128)
    assert te["text_encoder.text_model.encoder.layers.1.self_attn.q_proj"] == q
    assert te["lora_te1_text_model_encoder_layers_1_self_attn_q_proj"] == q
    assert te["text_encoders.clip_l.transformer.text_model.encoder.layers.1.self_attn.q_proj"] == q
    assert te["lora_te_text_model_encoder_layers_0_mlp_fc1"].weight.key == "blocks.0.mlp.fc.weight"


def test_suffix_dialects_group_into_modules():
    names = [
        "a.lora_up.weight",
        "a.lora_down.weight",
        "a.alpha",
        "b.lora_B.weight",
        "b.lora_A.weight",
        "c.processor.to_q_lora.up.weight",
        "c.processor.to_q_lora.down.weight",
        "d.lora.up.weight",
        "e.lora_linear_layer.down.weight",
        "f.hada_w1_a",
        "g.lokr_w1_b",
        "h.diff_b",
        "stray_tensor",
    ]
    modules, unknown = group_tensors(names)
    assert modules["a"] == {"up": "a.lora_up.weight", "down": "a.lora_down.weight", "alpha": "a.alpha"}
    assert modules["b"] == {"up": "b.lora_B.weight", "down": "b.lora_A.weight"}
    assert set(modules["c.processor.to_q"]) == {"up", "down"}
    assert modules["d"] == {"up": "d.lora.up.weight"} and modules["e"] == {"down": names[8]}
    assert modules["f"] == {"hada_w1_a": "f.hada_w1_a"} and modules["g"] == {"lokr_w1_b": "g.lokr_w1_b"}
    assert modules["h"] == {"diff_b": "h.diff_b"} and unknown == ["stray_tensor"]


# ------------------------------------------------------------------------------ patch math


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_lora_and_locon_merge_exactly_and_restore_bit_for_bit(tmp_path, tiny_sd15, tokenizer, precision):
    manager = ModelManager("cpu", precision=precision, tokenizer=tokenizer)
    model, _, _ = manager.load_checkpoint(tiny_sd15)
    up_conv, down_conv = rand(32, 4, 1, 1, seed=5), rand(4, 32, 3, 3, seed=6)
    tensors = {
        **kohya_lora(KOHYA_ATTN, 32, 128, 4, 2.0, seed=1),
        f"{KOHYA_CONV}.lora_up.weight": up_conv,
        f"{KOHYA_CONV}.lora_down.weight": down_conv,  # LoCon on a 3x3 conv, no alpha: scale 1
    }
    path = write_lora(tmp_path / "l.safetensors", tensors)
    original = unet_weights(manager, model, ATTN, CONV)
    strength = 0.7
    patched = apply_lora(path, "hash", model, None, strength, 0.0).model
    assert patched is not None and len(patched.patches) == 2
    got = unet_weights(manager, patched, ATTN, CONV)

    dtype = original[ATTN].dtype
    up, down = tensors[f"{KOHYA_ATTN}.lora_up.weight"], tensors[f"{KOHYA_ATTN}.lora_down.weight"]
    want_attn = original[ATTN].float() + (strength * (2.0 / 4)) * (up @ down)
    want_conv = original[CONV].float() + strength * (up_conv.flatten(1) @ down_conv.flatten(1)).reshape(
        32, 32, 3, 3
    )
    assert torch.equal(got[ATTN], want_attn.to(dtype))
    assert torch.equal(got[CONV], want_conv.to(dtype))
    assert not torch.equal(got[ATTN], original[ATTN])
    # leaving ``use`` restored the originals exactly
    after = unet_weights(manager, model, ATTN, CONV)
    assert all(torch.equal(after[k], original[k]) for k in original)


def test_locon_mid_and_loha_and_lokr_formulas():
    weight = torch.zeros(32, 32, 3, 3)
    r = 4
    # LoCon with a CP-decomposed core: down [r, in, 1, 1], mid [r, r, 3, 3], up [out, r, 1, 1]
    up, down, mid = rand(32, r, 1, 1, seed=1), rand(r, 32, 1, 1, seed=2), rand(r, r, 3, 3, seed=3)
    locon = LoRAPatch(key="k", up=up, down=down, mid=mid, alpha=2.0)
    core = torch.einsum("a b k l, b i -> a i k l", mid, down.flatten(1))  # [r, in, 3, 3]
    want = torch.einsum("o a, a i k l -> o i k l", up.flatten(1), core)
    assert torch.allclose(locon.delta(weight), (2.0 / r) * want, atol=1e-6)

    w1a, w1b, w2a, w2b = rand(32, r, seed=4), rand(r, 288, seed=5), rand(32, r, seed=6), rand(r, 288, seed=7)
    loha = LoHaPatch(key="k", w1_a=w1a, w1_b=w1b, w2_a=w2a, w2_b=w2b, alpha=1.0, strength=0.5)
    diff = ((w1a @ w1b) * (w2a @ w2b)).reshape(weight.shape)
    assert torch.equal(loha.apply(weight), weight + (0.5 * (1.0 / r)) * diff)
    # Tucker LoHa: t [r, r, 3, 3], w_a [r, out], w_b [r, in]
    t1, t2, a1, b1, a2, b2 = (rand(*s, seed=10 + i) for i, s in enumerate([(r, r, 3, 3)] * 2 + [(r, 32)] * 4))
    tucker = LoHaPatch(key="k", w1_a=a1, w1_b=b1, w2_a=a2, w2_b=b2, t1=t1, t2=t2)
    m1 = torch.einsum("ijkl,jr,ip->prkl", t1, b1, a1)
    m2 = torch.einsum("ijkl,jr,ip->prkl", t2, b2, a2)
    assert torch.allclose(tucker.delta(weight), m1 * m2, atol=1e-7)

    # LoKr: whole w1, factored w2 (rank from w2_b), conv kernel in w2
    w1, w2a, w2b = rand(4, 4, seed=20), rand(8, 2, seed=21), rand(2, 72, seed=22)
    lokr = LoKrPatch(key="k", w1=w1, w2_a=w2a, w2_b=w2b, alpha=3.0)
    assert lokr.rank == 2
    assert torch.equal(lokr.delta(weight), 1.5 * torch.kron(w1, w2a @ w2b).reshape(weight.shape))
    w2 = rand(8, 8, 3, 3, seed=23)
    conv = LoKrPatch(key="k", w1_a=rand(4, 1, seed=24), w1_b=rand(1, 4, seed=25), w2=w2, alpha=2.0)
    w1 = conv.w1_a @ conv.w1_b  # type: ignore[operator]
    assert conv.rank == 1
    assert torch.equal(conv.delta(weight), 2.0 * torch.kron(w1[:, :, None, None], w2))
    assert LoKrPatch(key="k", w1=w1, w2=w2, alpha=2.0).scale == 1.0  # nothing factored: no scaling
    for bad in ({"w1": w1}, {"w2": w2}):
        with pytest.raises(ModelError, match="LoKr"):
            LoKrPatch(key="k", **bad)


def test_loha_and_lokr_files_through_the_manager(tmp_path, manager, sd15):
    model, _ = sd15
    r = 2
    tensors = {
        f"{KOHYA_ATTN}.hada_w1_a": rand(32, r, seed=1),
        f"{KOHYA_ATTN}.hada_w1_b": rand(r, 128, seed=2),
        f"{KOHYA_ATTN}.hada_w2_a": rand(32, r, seed=3),
        f"{KOHYA_ATTN}.hada_w2_b": rand(r, 128, seed=4),
        f"{KOHYA_ATTN}.alpha": torch.tensor(1.0),
        f"{KOHYA_CONV}.lokr_w1": rand(4, 4, seed=5),
        f"{KOHYA_CONV}.lokr_w2": rand(8, 8, 3, 3, seed=6),
    }
    path = write_lora(tmp_path / "lyco.safetensors", tensors)
    original = unet_weights(manager, model, ATTN, CONV)
    patched = apply_lora(path, "hash", model, None, 1.0, 0.0).model
    got = unet_weights(manager, patched, ATTN, CONV)
    t = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(KOHYA_ATTN)}
    hada = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    assert torch.equal(got[ATTN], original[ATTN] + (1.0 * (1.0 / r)) * hada)
    kron = torch.kron(tensors[f"{KOHYA_CONV}.lokr_w1"][:, :, None, None], tensors[f"{KOHYA_CONV}.lokr_w2"])
    assert torch.equal(got[CONV], original[CONV] + 1.0 * kron)


def test_dora_renormalises_like_comfyui(sd15):
    weight = rand(32, 128, seed=1) * 10
    up, down = rand(32, 4, seed=2), rand(4, 128, seed=3)
    diff = (up @ down) * (8.0 / 4)
    eps = torch.finfo(torch.float32).eps
    # input axis (LyCORIS's default): magnitude [1, in], norms of the updated weight's columns
    magnitude = rand(1, 128, seed=4).abs() + 1
    patch = LoRAPatch(key="k", up=up, down=down, alpha=8.0, dora_scale=magnitude, strength=0.5)
    updated = weight + diff
    want = updated * (magnitude / (updated.norm(dim=0, keepdim=True) + eps))
    assert torch.allclose(patch.apply(weight), weight + 0.5 * (want - weight), atol=1e-6)
    # output axis: magnitude [out, 1], norms of the original rows (as ComfyUI computes them)
    rows = rand(32, 1, seed=5).abs() + 1
    patch = LoRAPatch(key="k", up=up, down=down, alpha=8.0, dora_scale=rows)
    want = updated * (rows / (weight.norm(dim=1, keepdim=True) + eps))
    assert torch.allclose(patch.apply(weight), want, atol=1e-6)


def test_clip_q_k_v_land_in_slices_of_the_fused_qkv(tmp_path, manager, sd15):
    model, clip = sd15
    tensors = {
        **kohya_lora(TE_Q, 128, 128, 4, 4.0, seed=1),
        # PEFT names for v of the same layer
        "text_encoder.text_model.encoder.layers.1.self_attn.v_proj.lora_B.weight": rand(128, 2, seed=3),
        "text_encoder.text_model.encoder.layers.1.self_attn.v_proj.lora_A.weight": rand(2, 128, seed=4),
    }
    path = write_lora(tmp_path / "te.safetensors", tensors)
    key = "blocks.1.attn.qkv.weight"
    original = clip_weight(manager, clip, key)
    result = apply_lora(path, "hash", model, clip, 1.0, 0.5)
    assert result.model is model  # nothing for the UNet: the handle is returned as is
    got = clip_weight(manager, result.clip, key)
    q = tensors[f"{TE_Q}.lora_up.weight"] @ tensors[f"{TE_Q}.lora_down.weight"]
    pv = "text_encoder.text_model.encoder.layers.1.self_attn.v_proj"
    v = tensors[f"{pv}.lora_B.weight"] @ tensors[f"{pv}.lora_A.weight"]
    assert torch.equal(got[:128], original[:128] + (0.5 * (4.0 / 4)) * q)
    assert torch.equal(got[128:256], original[128:256])  # k untouched
    assert torch.equal(got[256:], original[256:] + 0.5 * v)  # PEFT without alpha: scale 1
    assert torch.equal(clip_weight(manager, clip, key), original)


def test_two_loras_stack_additively_and_unstack(tmp_path, manager, sd15):
    model, _ = sd15
    first = kohya_lora(KOHYA_ATTN, 32, 128, 4, 4.0, seed=1)
    second = {  # the same layer, PEFT dialect
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": rand(32, 8, seed=7),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": rand(8, 128, seed=8),
    }
    a = apply_lora(write_lora(tmp_path / "a.safetensors", first), "ha", model, None, 1.0, 0)
    b = apply_lora(write_lora(tmp_path / "b.safetensors", second), "hb", a.model, None, -0.5, 0)
    assert b.model is not None and len(b.model.patches) == 2
    original = unet_weights(manager, model, ATTN)[ATTN]
    got = unet_weights(manager, b.model, ATTN)[ATTN]
    d1 = first[f"{KOHYA_ATTN}.lora_up.weight"] @ first[f"{KOHYA_ATTN}.lora_down.weight"]
    d2 = torch.mm(*second.values())
    assert torch.equal(got, (original + (1.0 * (4.0 / 4)) * d1) + (-0.5 * 1.0) * d2)
    assert torch.equal(unet_weights(manager, a.model, ATTN)[ATTN], original + d1)
    assert torch.equal(unet_weights(manager, model, ATTN)[ATTN], original)


# ------------------------------------------------------------------------------ matching


def test_no_match_is_an_error_and_a_partial_match_a_warning(sd15, caplog):
    model, clip = sd15
    stray = kohya_lora("lora_unet_not_a_layer", 32, 128, 4, 4.0, seed=1)
    with pytest.raises(ModelError, match="matches no layer of the diffusion model or text encoder"):
        apply_lora_tensors(stray, "h", model, clip, 1.0, 1.0)
    with caplog.at_level(logging.WARNING, logger="engine.models.lora"):
        result = apply_lora_tensors(
            {**stray, **kohya_lora(KOHYA_ATTN, 32, 128, 4, 4.0, 2)}, "h", model, clip, 1, 1
        )
    assert result.model is not None and len(result.model.patches) == 1
    [warning] = result.warnings
    assert "3 tensor(s) match no layer" in warning and "lora_unet_not_a_layer.lora_up.weight" in warning
    assert warning in caplog.text


def test_model_only_leaves_text_encoder_tensors_alone(sd15, caplog):
    model, _ = sd15
    te_only = kohya_lora(TE_Q, 128, 128, 4, 4.0, seed=1)
    with pytest.raises(ModelError, match="3 text-encoder tensors need LoraLoader's clip input"):
        apply_lora_tensors(te_only, "h", model, None, 1.0, 0.0)
    with caplog.at_level(logging.WARNING, logger="engine.models.lora"):
        both = {**te_only, **kohya_lora(KOHYA_ATTN, 32, 128, 4, 4.0, seed=2)}
        result = apply_lora_tensors(both, "h", model, None, 1.0, 0.0)
    assert result.warnings == () and not caplog.records and result.clip is None


def test_a_lora_for_another_model_is_refused(sd15):
    model, clip = sd15
    wrong = kohya_lora(KOHYA_ATTN, 32, 1024, 4, 4.0, seed=1)  # an SD2-sized cross-attention
    with pytest.raises(ModelError, match=r"does not fit this model.*another base model"):
        apply_lora_tensors(wrong, "h", model, clip, 1.0, 1.0)


def test_mismatched_factors_are_refused(sd15):
    model, clip = sd15
    broken = {
        f"{KOHYA_ATTN}.lora_up.weight": rand(32, 4, seed=1),
        f"{KOHYA_ATTN}.lora_down.weight": rand(8, 128, seed=2),
    }
    with pytest.raises(ModelError, match="do not combine"):
        apply_lora_tensors(broken, "h", model, clip, 1.0, 1.0)
    half_tucker = {
        f"{KOHYA_ATTN}.hada_{r}": rand(2, 2, seed=2) for r in ("w1_a", "w1_b", "w2_a", "w2_b", "t1")
    }
    with pytest.raises(ModelError, match=r"LoRA module .*hada_t1 and hada_t2"):
        apply_lora_tensors(half_tucker, "h", model, clip, 1.0, 1.0)


def test_full_diffs_for_weight_and_bias(manager, sd15):
    model, _ = sd15
    out = "output_blocks.2.1.transformer_blocks.0.attn1.to_out.0"
    diff, diff_b = rand(32, 32, seed=1), rand(32, seed=2)
    tensors = {f"diffusion_model.{out}.diff": diff, f"diffusion_model.{out}.diff_b": diff_b}
    patched = apply_lora_tensors(tensors, "h", model, None, 2.0, 0).model
    with manager.use(model) as net:
        before = {k: v.clone() for k, v in net.state_dict().items() if k.startswith(out)}
    with manager.use(patched) as net:
        after = net.state_dict()
        assert torch.equal(after[f"{out}.weight"], before[f"{out}.weight"] + 2.0 * diff)
        assert torch.equal(after[f"{out}.bias"], before[f"{out}.bias"] + 2.0 * diff_b)


def test_strength_zero_keeps_the_handle(tmp_path, sd15):
    model, clip = sd15
    path = write_lora(
        tmp_path / "z.safetensors",
        {**kohya_lora(KOHYA_ATTN, 32, 128, 4, 4.0, 1), **kohya_lora(TE_Q, 128, 128, 4, 1, 2)},
    )
    only_clip = apply_lora(path, "h", model, clip, 0.0, 1.0)
    assert only_clip.model is model and only_clip.clip is not clip
    only_model = apply_lora(path, "h", model, clip, 1.0, 0.0)
    assert only_model.model is not model and only_model.clip is clip
    missing = tmp_path / "missing.safetensors"
    nothing = apply_lora(missing, "h", model, clip, 0.0, 0.0)  # the file is not even read
    assert nothing.model is model and nothing.clip is clip


def test_cache_keys_follow_strength_and_content(sd15):
    model, _ = sd15
    lora = kohya_lora(KOHYA_ATTN, 32, 128, 4, 4.0, seed=1)
    key = apply_lora_tensors(lora, "hash-a", model, None, 1.0, 0).model.cache_key  # type: ignore[union-attr]
    assert apply_lora_tensors(lora, "hash-a", model, None, 1.0, 0).model.cache_key == key  # type: ignore[union-attr]
    assert apply_lora_tensors(lora, "hash-a", model, None, 0.5, 0).model.cache_key != key  # type: ignore[union-attr]
    assert apply_lora_tensors(lora, "hash-b", model, None, 1.0, 0).model.cache_key != key  # type: ignore[union-attr]
    assert model.cache_key != key
    # patches built in memory (no file hash) are identified by their tensors
    up, down = rand(32, 4, seed=1), rand(4, 128, seed=2)
    same = LoRAPatch(key=f"{ATTN}.weight", up=up, down=down).cache_token()
    assert LoRAPatch(key=f"{ATTN}.weight", up=up.clone(), down=down).cache_token() == same
    assert LoRAPatch(key=f"{ATTN}.weight", up=up * 2, down=down).cache_token() != same


def test_pickled_loras_are_refused(tmp_path, sd15):
    model, clip = sd15
    path = tmp_path / "old.ckpt"
    path.write_bytes(b"not really")
    with pytest.raises(ModelError, match="pickled"):
        apply_lora(path, "h", model, clip, 1.0, 1.0)


# ------------------------------------------------------------------------------ nodes


@pytest.fixture
def lora_settings(engine_settings: EngineSettings, tiny_sd15: Path, tmp_path: Path) -> EngineSettings:
    root = engine_settings.models_dirs[0]
    (root / "checkpoints").mkdir()
    (root / "loras").mkdir()
    shutil.copy(tiny_sd15, root / "checkpoints" / "tiny.safetensors")
    tensors = {**kohya_lora(KOHYA_ATTN, 32, 128, 4, 4.0, 1), **kohya_lora(TE_Q, 128, 128, 4, 4.0, 2)}
    write_lora(root / "loras" / "style.safetensors", tensors)
    write_lora(
        root / "loras" / "extra.safetensors", {**tensors, "lora_unet_gone.lora_up.weight": torch.ones(1)}
    )
    return engine_settings.model_copy(
        update={"offline": True, "node_modules": ["tests.engine.model_test_nodes", __name__]}
    )


def lora_prompt(name: str = "style.safetensors", strength_clip: float = 1.0) -> dict[str, Any]:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "2": {
            "class_type": "LoraLoader",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "lora_name": name,
                "strength_model": 1.0,
                "strength_clip": strength_clip,
            },
        },
        "3": {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": ["2", 0], "lora_name": name, "strength_model": 0.5},
        },
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["2", 1]}},
        "5": {"class_type": "KilnTestConditioningSummary", "inputs": {"conditioning": ["4", 0]}},
        "6": {"class_type": "KilnTestModelSummary", "inputs": {"model": ["3", 0]}},
    }


def test_declarations_match_comfyui(registry):
    info = registry.object_info()
    lora = info["LoraLoader"]
    required = lora["input"]["required"]
    assert list(required) == ["model", "clip", "lora_name", "strength_model", "strength_clip"]
    assert required["model"] == ["MODEL", {"tooltip": "The diffusion model the LoRA will be applied to."}]
    assert required["lora_name"][1] == {"tooltip": "The name of the LoRA."}
    assert required["strength_clip"] == [
        "FLOAT",
        {
            "default": 1.0,
            "min": -100.0,
            "max": 100.0,
            "step": 0.01,
            "tooltip": "How strongly to modify the CLIP model. This value can be negative.",
        },
    ]
    assert lora["output"] == ["MODEL", "CLIP"] and lora["category"] == "loaders"
    assert lora["display_name"] == "Load LoRA" and lora["description"].startswith("LoRAs are used")
    assert lora["output_tooltips"] == ["The modified diffusion model.", "The modified CLIP model."]
    only = info["LoraLoaderModelOnly"]
    assert only["input_order"] == {"required": ["model", "lora_name", "strength_model"]}
    assert only["input"]["required"]["strength_model"] == [
        "FLOAT",
        {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01},
    ]
    assert only["output"] == ["MODEL"] and only["category"] == "loaders"
    for name in ("LoraLoader", "LoraLoaderModelOnly"):
        assert registry.get(name).fingerprint is not None


def test_lora_nodes_through_the_executor(lora_settings):
    runtime = EngineRuntime(lora_settings)
    info = runtime.registry.object_info(runtime.inventory)
    assert info["LoraLoader"]["input"]["required"]["lora_name"][0] == [
        "extra.safetensors",
        "style.safetensors",
    ]
    bad = lora_prompt(name="missing.safetensors")
    with pytest.raises(PromptValidationError) as err:
        runtime.validate(bad)
    assert err.value.node_errors["2"]["errors"][0]["type"] == "value_not_in_list"

    plain = runtime.execute(lora_prompt(strength_clip=0.0))  # CLIP untouched by a 0 strength
    first = runtime.execute(lora_prompt())
    assert {"2", "3", "4"} <= set(first.executed) and "2" not in first.outputs  # no warnings to show
    cond = first.outputs["5"]["conditioning"][0]["sum"]
    assert cond != plain.outputs["5"]["conditioning"][0]["sum"]
    [row] = first.outputs["6"]["model"]
    assert row["patches"] == 2 and row["sum"] == plain.outputs["6"]["model"][0]["sum"]
    loader = lora_prompt()
    loader["6"]["inputs"]["model"] = ["1", 0]
    [bare] = runtime.execute(loader).outputs["6"]["model"]
    unpatched = bare["sum"]
    assert bare["patches"] == 0 and unpatched != row["sum"]

    again = runtime.execute(lora_prompt())
    assert {"1", "2", "3", "4"} <= set(again.cached)
    stronger = lora_prompt()
    stronger["3"]["inputs"]["strength_model"] = 0.25
    changed = runtime.execute(stronger)
    assert "3" in changed.executed and "2" in changed.cached
    assert changed.outputs["6"]["model"][0]["sum"] not in (row["sum"], unpatched)

    # new content under the same name: the fingerprint changes, the nodes run again
    path = lora_settings.models_dirs[0] / "loras" / "style.safetensors"
    write_lora(path, {**kohya_lora(KOHYA_ATTN, 32, 128, 4, 4.0, 9), **kohya_lora(TE_Q, 128, 128, 4, 4.0, 10)})
    rerun = runtime.execute(lora_prompt())
    assert {"2", "3", "4"} <= set(rerun.executed)
    assert rerun.outputs["5"]["conditioning"][0]["sum"] != cond

    warned = runtime.execute(lora_prompt(name="extra.safetensors"))
    [message] = warned.outputs["2"]["warnings"]
    assert "lora_unet_gone.lora_up.weight" in message
