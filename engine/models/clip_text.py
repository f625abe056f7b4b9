"""The CLIP text transformer of SD1.x (OpenAI CLIP ViT-L/14) and SD2.x (OpenCLIP ViT-H/14).

One architecture, pre-LayerNorm, causal self-attention:

    x = token_embedding[ids] + position_embedding            # [B, T, C]
    for block in blocks:                                      # T = 77 positions
        x = x + attn(ln_1(x))                                 # fused qkv, causal SDPA
        x = x + mlp(ln_2(x))                                  # fc -> quick_gelu | gelu -> proj
    last = final_norm(x)
    pooled = last[b, first EOS position]                      # [B, C]
    projected = text_projection(pooled)                       # [B, P] where the file has one

Kiln's own module layout (``blocks.N.attn.qkv`` etc.) is loaded from either file layout:

``"sd1"`` - transformers' ``CLIPTextModel`` keys, as SD1.x checkpoints store them under
    ``cond_stage_model.transformer.text_model.`` (older files omit ``text_model.``):
    ``embeddings.{token,position}_embedding.weight``, ``embeddings.position_ids`` (int64 or
    float, ignored), ``encoder.layers.N.{layer_norm1,layer_norm2}``,
    ``encoder.layers.N.self_attn.{q,k,v,out}_proj``, ``encoder.layers.N.mlp.{fc1,fc2}``,
    ``final_layer_norm``; optional ``text_projection.weight`` next to ``text_model.``.
``"sd2"`` - OpenCLIP keys, as SD2.x checkpoints store them under ``cond_stage_model.model.``:
    ``token_embedding.weight``, ``positional_embedding``,
    ``transformer.resblocks.N.{ln_1,ln_2}``, ``transformer.resblocks.N.attn.in_proj_{weight,bias}``
    (q, k, v stacked), ``transformer.resblocks.N.attn.out_proj``,
    ``transformer.resblocks.N.mlp.{c_fc,c_proj}``, ``ln_final``, ``text_projection``
    ([C, P], used as ``x @ text_projection``) and ``logit_scale`` (ignored). Real SD2.x files
    carry all 24 resblocks (0..23); SD2 reads the penultimate one by default, which is a choice of
    the text encoder (see ``text_encoding``), not of this module.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.errors import ModelError

Layout = Literal["sd1", "sd2"]
Activation = Literal["quick_gelu", "gelu"]

HEAD_DIM = 64
# Where SD1.x / SD2.x single-file checkpoints keep the text model's keys.
DEFAULT_PREFIX: Mapping[Layout, str] = MappingProxyType(
    {"sd1": "cond_stage_model.transformer.text_model.", "sd2": "cond_stage_model.model."}
)

_HF_LAYER = re.compile(r"encoder\.layers\.(\d+)\.")
_OPENCLIP_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.")


# ---------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class CLIPTextConfig:
    """Dimensions of a CLIP text transformer."""

    width: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    vocab_size: int = 49408
    max_positions: int = 77
    activation: Activation = "quick_gelu"
    projection_dim: int | None = None  # None: no text_projection in the file
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.activation not in ("quick_gelu", "gelu"):
            raise ValueError(f"unknown activation {self.activation!r}")

    @classmethod
    def clip_l(cls) -> CLIPTextConfig:
        """SD1.x: OpenAI CLIP ViT-L/14 text tower (no projection in SD1 checkpoints)."""
        return cls(width=768, layers=12, heads=12, intermediate=3072, activation="quick_gelu")

    @classmethod
    def open_clip_h(cls) -> CLIPTextConfig:
        """SD2.x: OpenCLIP ViT-H/14 text tower, 24 blocks, projection 1024 -> 1024."""
        return cls(width=1024, layers=24, heads=16, intermediate=4096, activation="gelu", projection_dim=1024)

    @classmethod
    def tiny(cls, activation: Activation = "quick_gelu", projection_dim: int | None = None) -> CLIPTextConfig:
        """A small config for tests (full vocabulary and 77 positions, so real token ids work)."""
        return cls(
            width=128,
            layers=3,
            heads=2,
            intermediate=512,
            activation=activation,
            projection_dim=projection_dim,
        )

    @classmethod
    def from_state_dict(
        cls, sd: Mapping[str, Tensor], prefix: str = "", *, activation: Activation | None = None
    ) -> CLIPTextConfig:
        """Infer the config from the shapes and key layout of a checkpoint's text model.

        ``prefix`` may point at the text model itself or at its wrapper (``cond_stage_model.``).
        Heads are width / 64. The activation is not stored in files: OpenCLIP layout means gelu;
        transformers layout means quick_gelu (OpenAI CLIP-L) up to width 768 and gelu above
        (OpenCLIP H / bigG converted to that layout). Pass ``activation`` to override.
        """
        layout, model_prefix = detect_layout(sd, prefix)
        internal = _to_internal(sd, layout, model_prefix)
        return _config_from_internal(internal, layout, activation)


def _config_from_internal(
    internal: Mapping[str, Tensor], layout: Layout, activation: Activation | None
) -> CLIPTextConfig:
    vocab_size, width = internal["token_embedding.weight"].shape
    layers = 1 + max(int(k.split(".")[1]) for k in internal if k.startswith("blocks."))
    if activation is None:
        activation = "gelu" if layout == "sd2" or width > 768 else "quick_gelu"
    projection = internal.get("text_projection.weight")
    return CLIPTextConfig(
        width=width,
        layers=layers,
        heads=max(1, width // HEAD_DIM),
        intermediate=internal["blocks.0.mlp.fc.weight"].shape[0],
        vocab_size=vocab_size,
        max_positions=internal["position_embedding"].shape[0],
        activation=activation,
        projection_dim=None if projection is None else projection.shape[0],
    )


# --------------------------------------------------------------------------------- building blocks


class CausalSelfAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.width, 3 * config.width)  # q, k, v stacked (OpenCLIP in_proj)
        self.proj = nn.Linear(config.width, config.width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape  # [B, T, C]
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # 3x[B,H,T,D]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, D]
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.width, config.intermediate)
        self.proj = nn.Linear(config.intermediate, config.width)
        self.quick_gelu = config.activation == "quick_gelu"

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)  # [B, T, I]
        h = h * torch.sigmoid(1.702 * h) if self.quick_gelu else F.gelu(h)
        return self.proj(h)


class Block(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TextModelOutput(NamedTuple):
    last_hidden_state: Tensor  # [B, T, C] last block, final LayerNorm applied
    hidden_state: Tensor | None  # [B, T, C] the block asked for (final LN if normalize_hidden)
    pooled: Tensor  # [B, C] last_hidden_state at the first EOS token
    projected: Tensor | None  # [B, P] text_projection(pooled); None without a projection


# ---------------------------------------------------------------------------------------- model


class CLIPTextModel(nn.Module):
    """CLIP text transformer in Kiln's layout (see the module docstring)."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        # Weights always come from a checkpoint: pass an empty tensor so nothing is initialised
        # (normal_() on a meta tensor would import torch._dynamo, seconds on first use).
        self.token_embedding = nn.Embedding(
            config.vocab_size, config.width, _weight=torch.empty(config.vocab_size, config.width)
        )
        self.position_embedding = nn.Parameter(torch.empty(config.max_positions, config.width))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.final_norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.text_projection = (
            nn.Linear(config.width, config.projection_dim, bias=False)
            if config.projection_dim is not None
            else None
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """Token embeddings [B, T, C] of ids [B, T] (no positions)."""
        return self.token_embedding(tokens)

    def forward(
        self,
        tokens: Tensor | None = None,
        *,
        embeds: Tensor | None = None,
        hidden_layer: int | None = None,
        normalize_hidden: bool = True,
        eos_index: Tensor | None = None,
    ) -> TextModelOutput:
        """Run the transformer on ids [B, T] or on ready token embeddings [B, T, C].

        ``hidden_layer``: also return the output of that block (0-based; negative counts from the
        end, -1 = last block), passed through the final LayerNorm when ``normalize_hidden``.
        ``eos_index`` [B]: where to pool; by default the first position whose id is the EOS id
        (position 0 when there is none). Required with ``embeds``.
        """
        if embeds is None:
            if tokens is None:
                raise ValueError("pass tokens or embeds")
            embeds = self.embed_tokens(tokens)
            if eos_index is None:
                eos_index = (tokens == self.config.eos_token_id).int().argmax(dim=-1)
        elif eos_index is None:
            raise ValueError("eos_index is required with embeds")
        t = embeds.shape[1]
        x = embeds + self.position_embedding[:t].to(embeds.dtype)  # [B, T, C]

        hidden_index = None
        if hidden_layer is not None:
            hidden_index = len(self.blocks) + hidden_layer if hidden_layer < 0 else hidden_layer
            if not 0 <= hidden_index < len(self.blocks):
                raise ValueError(f"hidden_layer {hidden_layer} out of range for {len(self.blocks)} blocks")
        hidden = None
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == hidden_index:
                hidden = x
        last = self.final_norm(x)
        if hidden is not None and normalize_hidden:
            hidden = self.final_norm(hidden)

        pooled = last[torch.arange(last.shape[0], device=last.device), eos_index.to(last.device)]  # [B, C]
        projected = self.text_projection(pooled) if self.text_projection is not None else None
        return TextModelOutput(last, hidden, pooled, projected)

    # ------------------------------------------------------------------------------- loading

    @classmethod
    def from_state_dict(
        cls,
        sd: Mapping[str, Tensor],
        prefix: str = "",
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        activation: Activation | None = None,
    ) -> CLIPTextModel:
        """Build from a checkpoint in either file layout; weights are assigned, not copied twice.

        The module is created on ``meta`` and takes the (converted) tensors with
        ``load_state_dict(assign=True)``. ``dtype`` defaults to the token embedding's dtype.
        """
        layout, model_prefix = detect_layout(sd, prefix)
        internal = _to_internal(sd, layout, model_prefix)
        config = _config_from_internal(internal, layout, activation)
        if dtype is None:
            dtype = internal["token_embedding.weight"].dtype
        internal = {k: v.to(device=device, dtype=dtype) for k, v in internal.items()}
        with torch.device("meta"):
            model = cls(config)
        try:
            model.load_state_dict(internal, strict=True, assign=True)
        except RuntimeError as exc:
            raise ModelError(f"text model at {model_prefix!r} does not load: {exc}") from exc
        return model.eval().requires_grad_(False)

    def internal_state_dict(self) -> dict[str, Tensor]:
        """The weights under Kiln's own key names (what ``to_file_layout`` converts)."""
        return {k: v.detach() for k, v in self.state_dict().items()}


# ---------------------------------------------------------------------------------- converters


def detect_layout(sd: Mapping[str, Tensor], prefix: str = "") -> tuple[Layout, str]:
    """Find the text model under ``prefix``: returns (layout, the key prefix of the model itself).

    Tries, in order, ``transformer.text_model.``, ``text_model.``, ``transformer.`` and nothing for
    the transformers layout, then ``model.`` and nothing for the OpenCLIP layout.
    """
    for inner in ("transformer.text_model.", "text_model.", "transformer.", ""):
        if f"{prefix}{inner}embeddings.token_embedding.weight" in sd:
            return "sd1", prefix + inner
    for inner in ("model.", ""):
        if f"{prefix}{inner}token_embedding.weight" in sd and (
            f"{prefix}{inner}transformer.resblocks.0.attn.in_proj_weight" in sd
        ):
            return "sd2", prefix + inner
    raise ModelError(f"no CLIP text model found under {prefix!r}")


def _to_internal(sd: Mapping[str, Tensor], layout: Layout, model_prefix: str) -> dict[str, Tensor]:
    return hf_to_internal(sd, model_prefix) if layout == "sd1" else openclip_to_internal(sd, model_prefix)


def _count(sd: Mapping[str, Tensor], prefix: str, pattern: re.Pattern[str]) -> int:
    indices = {int(m.group(1)) for k in sd if k.startswith(prefix) and (m := pattern.match(k, len(prefix)))}
    if not indices:
        raise ModelError(f"no transformer layers under {prefix!r}")
    if indices != set(range(len(indices))):
        raise ModelError(f"transformer layers under {prefix!r} are not numbered 0..N-1")
    return len(indices)


def _take(sd: Mapping[str, Tensor], key: str) -> Tensor:
    try:
        return sd[key]
    except KeyError:
        raise ModelError(f"checkpoint is missing {key!r}") from None


def _projection_from(sd: Mapping[str, Tensor], *candidates: str) -> Tensor | None:
    """A text projection as a Linear weight [P, C]: ``*.weight`` as is, a bare parameter transposed."""
    for key in candidates:
        if key in sd:
            value = sd[key]
            return value if key.endswith(".weight") else value.t().contiguous()
    return None


def hf_to_internal(sd: Mapping[str, Tensor], model_prefix: str) -> dict[str, Tensor]:
    """transformers ``CLIPTextModel`` keys under ``model_prefix`` -> Kiln keys (q/k/v concatenated)."""
    p = model_prefix
    out = {
        "token_embedding.weight": _take(sd, f"{p}embeddings.token_embedding.weight"),
        "position_embedding": _take(sd, f"{p}embeddings.position_embedding.weight"),
        "final_norm.weight": _take(sd, f"{p}final_layer_norm.weight"),
        "final_norm.bias": _take(sd, f"{p}final_layer_norm.bias"),
    }
    for i in range(_count(sd, p, _HF_LAYER)):
        src, dst = f"{p}encoder.layers.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.qkv.{kind}"] = torch.cat(
                [_take(sd, f"{src}self_attn.{n}_proj.{kind}") for n in ("q", "k", "v")], dim=0
            )
            out[f"{dst}attn.proj.{kind}"] = _take(sd, f"{src}self_attn.out_proj.{kind}")
            out[f"{dst}ln_1.{kind}"] = _take(sd, f"{src}layer_norm1.{kind}")
            out[f"{dst}ln_2.{kind}"] = _take(sd, f"{src}layer_norm2.{kind}")
            out[f"{dst}mlp.fc.{kind}"] = _take(sd, f"{src}mlp.fc1.{kind}")
            out[f"{dst}mlp.proj.{kind}"] = _take(sd, f"{src}mlp.fc2.{kind}")
    parent = p[: -len("text_model.")] if p.endswith("text_model.") else p
    projection = _projection_from(sd, f"{parent}text_projection.weight", f"{parent}text_projection")
    if projection is not None:
        out["text_projection.weight"] = projection
    return out


def openclip_to_internal(sd: Mapping[str, Tensor], model_prefix: str) -> dict[str, Tensor]:
    """OpenCLIP text keys under ``model_prefix`` -> Kiln keys (renames; projection transposed)."""
    p = model_prefix
    out = {
        "token_embedding.weight": _take(sd, f"{p}token_embedding.weight"),
        "position_embedding": _take(sd, f"{p}positional_embedding"),
        "final_norm.weight": _take(sd, f"{p}ln_final.weight"),
        "final_norm.bias": _take(sd, f"{p}ln_final.bias"),
    }
    for i in range(_count(sd, p, _OPENCLIP_BLOCK)):
        src, dst = f"{p}transformer.resblocks.{i}.", f"blocks.{i}."
        out[f"{dst}attn.qkv.weight"] = _take(sd, f"{src}attn.in_proj_weight")
        out[f"{dst}attn.qkv.bias"] = _take(sd, f"{src}attn.in_proj_bias")
        for kind in ("weight", "bias"):
            out[f"{dst}attn.proj.{kind}"] = _take(sd, f"{src}attn.out_proj.{kind}")
            out[f"{dst}ln_1.{kind}"] = _take(sd, f"{src}ln_1.{kind}")
            out[f"{dst}ln_2.{kind}"] = _take(sd, f"{src}ln_2.{kind}")
            out[f"{dst}mlp.fc.{kind}"] = _take(sd, f"{src}mlp.c_fc.{kind}")
            out[f"{dst}mlp.proj.{kind}"] = _take(sd, f"{src}mlp.c_proj.{kind}")
    projection = _projection_from(sd, f"{p}text_projection", f"{p}text_projection.weight")
    if projection is not None:
        out["text_projection.weight"] = projection
    return out


def internal_to_hf(internal: Mapping[str, Tensor], model_prefix: str) -> dict[str, Tensor]:
    """Kiln keys -> transformers ``CLIPTextModel`` keys under ``model_prefix`` (SD1 file layout).

    Adds ``embeddings.position_ids`` (int64 [1, T]) as SD1 checkpoints carry it. A projection goes
    to ``text_projection.weight`` next to ``text_model.``.
    """
    p = model_prefix
    t = internal["position_embedding"].shape[0]
    out = {
        f"{p}embeddings.token_embedding.weight": internal["token_embedding.weight"],
        f"{p}embeddings.position_embedding.weight": internal["position_embedding"],
        f"{p}embeddings.position_ids": torch.arange(t, dtype=torch.int64).unsqueeze(0),
        f"{p}final_layer_norm.weight": internal["final_norm.weight"],
        f"{p}final_layer_norm.bias": internal["final_norm.bias"],
    }
    layers = 1 + max(int(k.split(".")[1]) for k in internal if k.startswith("blocks."))
    for i in range(layers):
        src, dst = f"blocks.{i}.", f"{p}encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = internal[f"{src}attn.qkv.{kind}"].chunk(3, dim=0)
            out[f"{dst}self_attn.q_proj.{kind}"] = q.contiguous()
            out[f"{dst}self_attn.k_proj.{kind}"] = k.contiguous()
            out[f"{dst}self_attn.v_proj.{kind}"] = v.contiguous()
            out[f"{dst}self_attn.out_proj.{kind}"] = internal[f"{src}attn.proj.{kind}"]
            out[f"{dst}layer_norm1.{kind}"] = internal[f"{src}ln_1.{kind}"]
            out[f"{dst}layer_norm2.{kind}"] = internal[f"{src}ln_2.{kind}"]
            out[f"{dst}mlp.fc1.{kind}"] = internal[f"{src}mlp.fc.{kind}"]
            out[f"{dst}mlp.fc2.{kind}"] = internal[f"{src}mlp.proj.{kind}"]
    if "text_projection.weight" in internal:
        parent = p[: -len("text_model.")] if p.endswith("text_model.") else p
        out[f"{parent}text_projection.weight"] = internal["text_projection.weight"]
    return out


def internal_to_openclip(internal: Mapping[str, Tensor], model_prefix: str) -> dict[str, Tensor]:
    """Kiln keys -> OpenCLIP keys under ``model_prefix`` (SD2 file layout), with ``logit_scale``."""
    p = model_prefix
    out = {
        f"{p}token_embedding.weight": internal["token_embedding.weight"],
        f"{p}positional_embedding": internal["position_embedding"],
        f"{p}ln_final.weight": internal["final_norm.weight"],
        f"{p}ln_final.bias": internal["final_norm.bias"],
    }
    layers = 1 + max(int(k.split(".")[1]) for k in internal if k.startswith("blocks."))
    for i in range(layers):
        src, dst = f"blocks.{i}.", f"{p}transformer.resblocks.{i}."
        out[f"{dst}attn.in_proj_weight"] = internal[f"{src}attn.qkv.weight"]
        out[f"{dst}attn.in_proj_bias"] = internal[f"{src}attn.qkv.bias"]
        for kind in ("weight", "bias"):
            out[f"{dst}attn.out_proj.{kind}"] = internal[f"{src}attn.proj.{kind}"]
            out[f"{dst}ln_1.{kind}"] = internal[f"{src}ln_1.{kind}"]
            out[f"{dst}ln_2.{kind}"] = internal[f"{src}ln_2.{kind}"]
            out[f"{dst}mlp.c_fc.{kind}"] = internal[f"{src}mlp.fc.{kind}"]
            out[f"{dst}mlp.c_proj.{kind}"] = internal[f"{src}mlp.proj.{kind}"]
    if "text_projection.weight" in internal:
        out[f"{p}text_projection"] = internal["text_projection.weight"].t().contiguous()
    dtype = internal["token_embedding.weight"].dtype
    out[f"{p}logit_scale"] = torch.tensor(math.log(100.0), dtype=dtype)
    return out


def to_file_layout(
    internal: Mapping[str, Tensor], layout: Layout = "sd1", prefix: str | None = None
) -> dict[str, Tensor]:
    """Kiln keys -> a checkpoint's keys (``prefix`` defaults to where SD1 / SD2 files keep them)."""
    model_prefix = DEFAULT_PREFIX[layout] if prefix is None else prefix
    if layout == "sd1":
        return internal_to_hf(internal, model_prefix)
    if layout == "sd2":
        return internal_to_openclip(internal, model_prefix)
    raise ValueError(f"unknown layout {layout!r}")


# ------------------------------------------------------------------------------ random weights


def random_internal_state_dict(
    config: CLIPTextConfig, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """Deterministic random weights under Kiln's keys, scaled so activations stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    c, i_dim = config.width, config.intermediate

    def normal(*shape: int, std: float, mean: float = 0.0) -> Tensor:
        return (torch.randn(*shape, generator=gen) * std + mean).to(dtype)

    out = {
        "token_embedding.weight": normal(config.vocab_size, c, std=0.02),
        "position_embedding": normal(config.max_positions, c, std=0.01),
    }
    for n in range(config.layers):
        b = f"blocks.{n}."
        out[f"{b}ln_1.weight"] = normal(c, std=0.1, mean=1.0)
        out[f"{b}ln_1.bias"] = normal(c, std=0.02)
        out[f"{b}attn.qkv.weight"] = normal(3 * c, c, std=c**-0.5)
        out[f"{b}attn.qkv.bias"] = normal(3 * c, std=0.02)
        out[f"{b}attn.proj.weight"] = normal(c, c, std=c**-0.5)
        out[f"{b}attn.proj.bias"] = normal(c, std=0.02)
        out[f"{b}ln_2.weight"] = normal(c, std=0.1, mean=1.0)
        out[f"{b}ln_2.bias"] = normal(c, std=0.02)
        out[f"{b}mlp.fc.weight"] = normal(i_dim, c, std=c**-0.5)
        out[f"{b}mlp.fc.bias"] = normal(i_dim, std=0.02)
        out[f"{b}mlp.proj.weight"] = normal(c, i_dim, std=i_dim**-0.5)
        out[f"{b}mlp.proj.bias"] = normal(c, std=0.02)
    out["final_norm.weight"] = normal(c, std=0.1, mean=1.0)
    out["final_norm.bias"] = normal(c, std=0.02)
    if config.projection_dim is not None:
        out["text_projection.weight"] = normal(config.projection_dim, c, std=c**-0.5)
    return out


def random_state_dict(
    config: CLIPTextConfig,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    layout: Layout = "sd1",
    prefix: str | None = None,
) -> dict[str, Tensor]:
    """Deterministic random weights in a real checkpoint layout, with the real key names.

    ``layout="sd1"``: keys under ``cond_stage_model.transformer.text_model.`` (plus int64
    ``position_ids``); ``layout="sd2"``: keys under ``cond_stage_model.model.`` (plus
    ``text_projection`` and ``logit_scale``). ``prefix`` overrides where the model's keys go.
    """
    return to_file_layout(random_internal_state_dict(config, seed, dtype), layout, prefix)
