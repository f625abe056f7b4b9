"""CLIP text transformer: layouts, config inference, parity with transformers / an OpenCLIP reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import ModelError
from engine.models.clip_text import (
    CLIPTextConfig,
    CLIPTextModel,
    detect_layout,
    hf_to_internal,
    openclip_to_internal,
    random_internal_state_dict,
    random_state_dict,
    to_file_layout,
)

SD1_PREFIX = "cond_stage_model.transformer.text_model."
SD2_PREFIX = "cond_stage_model.model."

# Two prompts' ids: EOS followed by EOS padding (SD1 style) and by 0 padding (SD2 style).
IDS = torch.tensor(
    [
        [49406, 320, 1125, 539, 320, 2368, 267, 8543, 49407] + [49407] * 68,
        [49406, 1215, 3086, 49407] + [0] * 73,
    ]
)
EOS = torch.tensor([8, 3])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ----------------------------------------------------------------------------- config / layouts


def test_presets():
    l_cfg = CLIPTextConfig.clip_l()
    assert (l_cfg.width, l_cfg.layers, l_cfg.heads, l_cfg.max_positions, l_cfg.vocab_size) == (
        768,
        12,
        12,
        77,
        49408,
    )
    assert l_cfg.activation == "quick_gelu" and l_cfg.projection_dim is None
    h_cfg = CLIPTextConfig.open_clip_h()
    assert (h_cfg.width, h_cfg.layers, h_cfg.heads, h_cfg.intermediate) == (1024, 24, 16, 4096)
    assert h_cfg.activation == "gelu" and h_cfg.projection_dim == 1024


def _meta_file_layout(config: CLIPTextConfig, layout: str) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = CLIPTextModel(config)
    return to_file_layout(model.state_dict(), layout)  # type: ignore[arg-type]


def test_full_size_sd1_keys_and_inference():
    sd = _meta_file_layout(CLIPTextConfig.clip_l(), "sd1")
    assert sd[f"{SD1_PREFIX}embeddings.token_embedding.weight"].shape == (49408, 768)
    assert sd[f"{SD1_PREFIX}embeddings.position_embedding.weight"].shape == (77, 768)
    assert sd[f"{SD1_PREFIX}embeddings.position_ids"].dtype == torch.int64
    assert sd[f"{SD1_PREFIX}encoder.layers.11.self_attn.q_proj.weight"].shape == (768, 768)
    assert sd[f"{SD1_PREFIX}encoder.layers.11.mlp.fc2.weight"].shape == (768, 3072)
    assert f"{SD1_PREFIX}encoder.layers.12.mlp.fc1.weight" not in sd
    assert f"{SD1_PREFIX}final_layer_norm.bias" in sd
    assert not any("text_projection" in k for k in sd)
    assert len(sd) == 5 + 12 * 16
    assert CLIPTextConfig.from_state_dict(sd, "cond_stage_model.") == CLIPTextConfig.clip_l()


def test_full_size_sd2_keys_and_inference():
    sd = _meta_file_layout(CLIPTextConfig.open_clip_h(), "sd2")
    assert sd[f"{SD2_PREFIX}token_embedding.weight"].shape == (49408, 1024)
    assert sd[f"{SD2_PREFIX}positional_embedding"].shape == (77, 1024)
    assert sd[f"{SD2_PREFIX}transformer.resblocks.23.attn.in_proj_weight"].shape == (3072, 1024)
    assert sd[f"{SD2_PREFIX}transformer.resblocks.23.attn.in_proj_bias"].shape == (3072,)
    assert sd[f"{SD2_PREFIX}transformer.resblocks.0.mlp.c_fc.weight"].shape == (4096, 1024)
    assert sd[f"{SD2_PREFIX}text_projection"].shape == (1024, 1024)
    assert sd[f"{SD2_PREFIX}logit_scale"].shape == ()
    assert f"{SD2_PREFIX}ln_final.weight" in sd
    assert len(sd) == 6 + 24 * 12
    assert CLIPTextConfig.from_state_dict(sd, "cond_stage_model.") == CLIPTextConfig.open_clip_h()


def test_detect_layout_prefixes():
    cfg = CLIPTextConfig.tiny()
    sd1 = random_state_dict(cfg, layout="sd1")
    assert detect_layout(sd1, "cond_stage_model.") == ("sd1", SD1_PREFIX)
    assert detect_layout(sd1, SD1_PREFIX) == ("sd1", SD1_PREFIX)
    sd2 = random_state_dict(cfg, layout="sd2")
    assert detect_layout(sd2, "cond_stage_model.") == ("sd2", SD2_PREFIX)
    assert detect_layout(sd2, SD2_PREFIX) == ("sd2", SD2_PREFIX)
    with pytest.raises(ModelError):
        detect_layout(sd1, "first_stage_model.")


def test_activation_inference():
    sd1 = random_state_dict(CLIPTextConfig.tiny(), layout="sd1")
    sd2 = random_state_dict(CLIPTextConfig.tiny(), layout="sd2")
    assert CLIPTextConfig.from_state_dict(sd1, "cond_stage_model.").activation == "quick_gelu"
    assert CLIPTextConfig.from_state_dict(sd2, "cond_stage_model.").activation == "gelu"
    sd = random_state_dict(CLIPTextConfig.tiny(), layout="sd1")
    assert CLIPTextConfig.from_state_dict(sd, "cond_stage_model.", activation="gelu").activation == "gelu"


def test_random_state_dict_is_deterministic():
    cfg = CLIPTextConfig.tiny(projection_dim=32)
    a = random_state_dict(cfg, seed=3, layout="sd2")
    b = random_state_dict(cfg, seed=3, layout="sd2")
    c = random_state_dict(cfg, seed=4, layout="sd2")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[f"{SD2_PREFIX}token_embedding.weight"], c[f"{SD2_PREFIX}token_embedding.weight"])
    half = random_state_dict(cfg, seed=3, dtype=torch.float16, layout="sd1")
    assert half[f"{SD1_PREFIX}encoder.layers.0.self_attn.q_proj.weight"].dtype == torch.float16


@pytest.mark.parametrize("layout", ["sd1", "sd2"])
def test_layout_round_trip(layout):
    cfg = CLIPTextConfig.tiny(projection_dim=48)
    internal = random_internal_state_dict(cfg, seed=5)
    file_sd = to_file_layout(internal, layout)
    prefix = SD1_PREFIX if layout == "sd1" else SD2_PREFIX
    back = hf_to_internal(file_sd, prefix) if layout == "sd1" else openclip_to_internal(file_sd, prefix)
    assert back.keys() == internal.keys()
    assert all(torch.equal(back[k], internal[k]) for k in internal)


# ------------------------------------------------------------------------------------- loading


def test_loads_on_meta_with_assign():
    sd = random_state_dict(CLIPTextConfig.tiny(), seed=1, layout="sd1")
    model = CLIPTextModel.from_state_dict(sd, "cond_stage_model.")
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training
    assert torch.equal(model.token_embedding.weight, sd[f"{SD1_PREFIX}embeddings.token_embedding.weight"])


@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.float32, None])
def test_position_ids_any_dtype_or_absent(ids_dtype):
    sd = random_state_dict(CLIPTextConfig.tiny(), seed=2, layout="sd1")
    key = f"{SD1_PREFIX}embeddings.position_ids"
    if ids_dtype is None:
        del sd[key]
    else:
        sd[key] = sd[key].to(ids_dtype)
    model = CLIPTextModel.from_state_dict(sd, "cond_stage_model.")
    reference = CLIPTextModel.from_state_dict(
        random_state_dict(CLIPTextConfig.tiny(), seed=2), "cond_stage_model."
    )
    assert torch.equal(model(IDS).last_hidden_state, reference(IDS).last_hidden_state)


def test_old_sd1_files_without_text_model():
    sd = random_state_dict(
        CLIPTextConfig.tiny(), seed=2, layout="sd1", prefix="cond_stage_model.transformer."
    )
    assert "cond_stage_model.transformer.embeddings.token_embedding.weight" in sd
    model = CLIPTextModel.from_state_dict(sd, "cond_stage_model.")
    reference = CLIPTextModel.from_state_dict(
        random_state_dict(CLIPTextConfig.tiny(), seed=2), "cond_stage_model."
    )
    assert torch.equal(model(IDS).last_hidden_state, reference(IDS).last_hidden_state)


def test_dtype_and_missing_keys():
    sd = random_state_dict(CLIPTextConfig.tiny(), seed=2, dtype=torch.float16, layout="sd1")
    assert CLIPTextModel.from_state_dict(sd, "cond_stage_model.").dtype == torch.float16
    assert CLIPTextModel.from_state_dict(sd, "cond_stage_model.", dtype=torch.float32).dtype == torch.float32
    del sd[f"{SD1_PREFIX}encoder.layers.1.mlp.fc1.bias"]
    with pytest.raises(ModelError):
        CLIPTextModel.from_state_dict(sd, "cond_stage_model.")


# --------------------------------------------------------------------------- SD1: transformers


@pytest.fixture(scope="module")
def sd1_pair():
    transformers = pytest.importorskip("transformers")
    cfg = CLIPTextConfig.tiny()
    sd = random_state_dict(cfg, seed=11, layout="sd1")
    ours = CLIPTextModel.from_state_dict(sd, "cond_stage_model.")
    hf_config = transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.max_positions,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    hf = transformers.CLIPTextModel(hf_config).eval()
    # transformers 5 keeps CLIPTextModel's keys at the top level, older versions under text_model.
    hf_keys = set(hf.state_dict())
    strip = SD1_PREFIX if "embeddings.token_embedding.weight" in hf_keys else "cond_stage_model.transformer."
    hf_sd = {k[len(strip) :]: v for k, v in sd.items() if k[len(strip) :] in hf_keys}
    hf.load_state_dict(hf_sd, strict=True)
    return ours, hf


def test_sd1_matches_transformers(sd1_pair):
    ours, hf = sd1_pair
    with torch.no_grad():
        ref = hf(input_ids=IDS, output_hidden_states=True)
        out = ours(IDS, hidden_layer=-2)
        final_ln = hf.final_layer_norm if hasattr(hf, "final_layer_norm") else hf.text_model.final_layer_norm
        penultimate = final_ln(ref.hidden_states[-2])
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) < 1e-4
    assert rel_err(out.hidden_state, penultimate) < 1e-4
    assert rel_err(out.pooled, ref.pooler_output) < 1e-4
    assert out.projected is None


def test_sd1_hidden_layers_match_transformers(sd1_pair):
    ours, hf = sd1_pair
    with torch.no_grad():
        ref = hf(input_ids=IDS, output_hidden_states=True)
        for layer in range(-3, 0):
            raw = ours(IDS, hidden_layer=layer, normalize_hidden=False).hidden_state
            assert rel_err(raw, ref.hidden_states[layer]) < 1e-4
        assert torch.equal(ours(IDS, hidden_layer=-1).hidden_state, ours(IDS).last_hidden_state)
        assert torch.equal(ours(IDS, hidden_layer=0).hidden_state, ours(IDS, hidden_layer=-3).hidden_state)
        with pytest.raises(ValueError):
            ours(IDS, hidden_layer=-4)


def test_pooled_is_first_eos(sd1_pair):
    ours, _ = sd1_pair
    with torch.no_grad():
        out = ours(IDS)
    for b in range(IDS.shape[0]):
        assert torch.equal(out.pooled[b], out.last_hidden_state[b, EOS[b]])


def test_embeds_input_matches_ids(sd1_pair):
    ours, _ = sd1_pair
    with torch.no_grad():
        a = ours(IDS)
        b = ours(embeds=ours.embed_tokens(IDS), eos_index=EOS)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)
    assert torch.equal(a.pooled, b.pooled)


# --------------------------------------------------------------------- SD2: OpenCLIP reference


class OpenCLIPReference(nn.Module):
    """A plain OpenCLIP-style text tower reading the SD2 file keys directly (fused in_proj)."""

    def __init__(self, sd: dict[str, torch.Tensor], prefix: str, heads: int) -> None:
        super().__init__()
        self.sd = {k[len(prefix) :]: v.float() for k, v in sd.items() if k.startswith(prefix)}
        self.heads = heads
        self.blocks = 1 + max(int(k.split(".")[2]) for k in self.sd if k.startswith("transformer.resblocks."))

    def _attention(self, x: torch.Tensor, p: str) -> torch.Tensor:
        b, t, c = x.shape
        qkv = x @ self.sd[f"{p}attn.in_proj_weight"].t() + self.sd[f"{p}attn.in_proj_bias"]
        q, k, v = qkv.split(c, dim=-1)
        d = c // self.heads
        q, k, v = (y.reshape(b, t, self.heads, d).transpose(1, 2) for y in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        mask = torch.full((t, t), float("-inf")).triu(1)
        y = torch.softmax(scores + mask, dim=-1) @ v
        y = y.transpose(1, 2).reshape(b, t, c)
        return y @ self.sd[f"{p}attn.out_proj.weight"].t() + self.sd[f"{p}attn.out_proj.bias"]

    def _ln(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.sd[f"{name}.weight"], self.sd[f"{name}.bias"], 1e-5)

    def forward(self, ids: torch.Tensor, stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.sd["token_embedding.weight"][ids] + self.sd["positional_embedding"]
        for i in range(self.blocks if stop is None else stop):
            p = f"transformer.resblocks.{i}."
            x = x + self._attention(self._ln(x, f"{p}ln_1"), p)
            h = self._ln(x, f"{p}ln_2") @ self.sd[f"{p}mlp.c_fc.weight"].t() + self.sd[f"{p}mlp.c_fc.bias"]
            x = x + F.gelu(h) @ self.sd[f"{p}mlp.c_proj.weight"].t() + self.sd[f"{p}mlp.c_proj.bias"]
        x = self._ln(x, "ln_final")
        pooled = x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ self.sd["text_projection"]
        return x, pooled


def test_sd2_matches_openclip_reference():
    cfg = CLIPTextConfig.tiny(activation="gelu", projection_dim=96)
    sd = random_state_dict(cfg, seed=21, layout="sd2")
    ours = CLIPTextModel.from_state_dict(sd, "cond_stage_model.")
    assert ours.config.activation == "gelu" and ours.config.projection_dim == 96
    reference = OpenCLIPReference(sd, SD2_PREFIX, heads=cfg.heads)
    with torch.no_grad():
        out = ours(IDS, hidden_layer=-2)
        ref_last, ref_pooled = reference(IDS)
        ref_penultimate, _ = reference(IDS, stop=cfg.layers - 1)
    assert rel_err(out.last_hidden_state, ref_last) < 1e-4
    assert rel_err(out.hidden_state, ref_penultimate) < 1e-4
    assert rel_err(out.projected, ref_pooled) < 1e-4


def test_sd2_in_transformers_layout_loads_the_same():
    cfg = CLIPTextConfig.tiny(activation="gelu", projection_dim=64)
    internal = random_internal_state_dict(cfg, seed=8)
    a = CLIPTextModel.from_state_dict(to_file_layout(internal, "sd2"), "cond_stage_model.")
    hf_layout = to_file_layout(internal, "sd1", prefix="clip_h.transformer.text_model.")
    b = CLIPTextModel.from_state_dict(hf_layout, "clip_h.", activation="gelu")
    with torch.no_grad():
        assert torch.equal(a(IDS).projected, b(IDS).projected)
