"""The Stable Diffusion 1.x / 2.x UNet: the LDM ``openaimodel.UNetModel`` with spatial transformers.

Module and parameter names follow the LDM single-file checkpoint layout exactly (the keys under
``model.diffusion_model.`` in ``v1-5-pruned-emaonly.safetensors`` and SD 2.x files), so a stripped
checkpoint dict loads with ``model.load_state_dict(sd)`` and ``model.state_dict()`` gives the real
key names (``time_embed.0.weight``, ``input_blocks.1.1.proj_in.weight``, ``out.2.bias``, ...).

Numerics follow ComfyUI's defaults on a modern torch: norms and matmuls run in the weights' dtype,
attention goes through ``scaled_dot_product_attention`` (optionally upcast to float32), the sinusoidal
timestep embedding is computed in float32 and then cast to the weights' dtype.

Layout, top to bottom: attention kernel, building blocks (ResBlock, Downsample, Upsample,
CrossAttention, FeedForward, BasicTransformerBlock, SpatialTransformer), the config (with inference
from a state dict), the model, then loading helpers.

Shapes: B batch, C channels, H/W latent height/width, N = H*W tokens, L context tokens (77),
D context width (768 for SD1, 1024 for SD2), h heads, d head width.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.errors import ModelError

UNET_PREFIX = "model.diffusion_model."
"""Where the UNet lives inside an LDM single-file checkpoint."""

DEFAULT_ATTENTION_MEMORY_BUDGET = 1 << 30
"""Bytes one attention call may spend on its score matrix (q @ k^T) before queries are chunked."""


# ----------------------------------------------------------------------------------------------
# Attention kernel


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    heads: int,
    *,
    upcast: bool = False,
    memory_budget: int = DEFAULT_ATTENTION_MEMORY_BUDGET,
) -> Tensor:
    """Multi-head scaled dot-product attention over packed heads.

    q: [B, Nq, h*d], k and v: [B, Nk, h*d] -> [B, Nq, h*d]. Scale is d**-0.5 (SDPA's default).

    The work goes through ``torch.nn.functional.scaled_dot_product_attention``. Some of its
    backends (the math kernel; any backend given float32 on some devices) materialise the full
    [B, h, Nq, Nk] score matrix. So that a large image never asks for that at once, when the score
    matrix would exceed ``memory_budget`` bytes (counted at float32 when upcasting, else at the
    input's element size) the query dimension is split into chunks of at most
    ``memory_budget // (B * h * Nk * element_size)`` rows (at least one); each chunk attends to all
    keys, so the result equals the unchunked one up to float rounding.

    ``upcast`` runs the attention in float32 for half-precision inputs (ComfyUI's
    ``attn_precision=float32``; needed by SD 2.x 768-v in float16) and casts the result back.
    """
    b, nq, inner = q.shape
    nk = k.shape[1]
    d = inner // heads
    out_dtype = q.dtype
    if upcast and q.dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    q = q.view(b, nq, heads, d).transpose(1, 2)  # [B, h, Nq, d]
    k = k.view(b, nk, heads, d).transpose(1, 2)  # [B, h, Nk, d]
    v = v.view(b, nk, heads, d).transpose(1, 2)  # [B, h, Nk, d]

    row_bytes = b * heads * nk * q.element_size()  # one query row of the score matrix
    if row_bytes * nq <= memory_budget:
        out = F.scaled_dot_product_attention(q, k, v)  # [B, h, Nq, d]
        return out.transpose(1, 2).reshape(b, nq, inner).to(out_dtype)

    chunk = max(1, memory_budget // row_bytes)
    out = torch.empty(b, nq, heads, d, dtype=q.dtype, device=q.device)  # [B, Nq, h, d]
    for start in range(0, nq, chunk):
        stop = min(start + chunk, nq)
        part = F.scaled_dot_product_attention(q[:, :, start:stop], k, v)  # [B, h, n, d]
        out[:, start:stop] = part.transpose(1, 2)
    return out.view(b, nq, inner).to(out_dtype)


# ----------------------------------------------------------------------------------------------
# Building blocks


def group_norm(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    """The LDM ``normalization``: GroupNorm with 32 groups (eps 1e-5; 1e-6 in spatial transformers)."""
    return nn.GroupNorm(32, channels, eps=eps)


SMALL_CONV_MAX_POSITIONS = 128
"""On CPU, 3x3 convs whose output has at most this many positions (batch x height x width) run
as im2col + one batched GEMM (see ``conv3x3``)."""


def conv3x3(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """Apply a 3x3, padding-1 conv (stride 1 or 2); the same as ``conv(x)``.

    On CPU, oneDNN re-lays out the weights on every call, which dominates the low-resolution
    convs of the UNet's deep levels (1280-2560 channels at 4x4 or 8x8: 2-3x slower than the
    matmul itself). There, when B*Ho*Wo <= SMALL_CONV_MAX_POSITIONS, the conv runs as
    ``unfold`` (im2col, [B, Cin*9, Ho*Wo], small at these sizes) and one batched GEMM with the
    weights viewed as [Cout, Cin*9]. Elsewhere (larger maps, GPUs) it is the ordinary conv.
    """
    b, _, h, w = x.shape
    stride = conv.stride[0]
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    if x.device.type != "cpu" or b * ho * wo > SMALL_CONV_MAX_POSITIONS:
        return conv(x)
    cols = F.unfold(x, 3, padding=1, stride=stride)  # [B, Cin*9, Ho*Wo]
    weight = conv.weight.view(1, conv.out_channels, -1).expand(b, -1, -1)  # [B, Cout, Cin*9]
    out = torch.baddbmm(conv.bias.view(1, -1, 1), weight, cols)  # [B, Cout, Ho*Wo]
    return out.view(b, conv.out_channels, ho, wo)


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal timestep embedding as in LDM/ComfyUI: [B] -> [B, dim] float32, cos half first.

    freqs_i = exp(-ln(max_period) * i / (dim // 2)), i in [0, dim // 2); the embedding is
    cat(cos(t * freqs), sin(t * freqs)) (diffusers' ``flip_sin_to_cos=True``, shift 0), padded
    with a zero column when ``dim`` is odd. Timesteps may be fractional.
    """
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(-math.log(max_period) * steps / half)  # [dim/2], rounded as LDM/ComfyUI
    args = timesteps[:, None].float() * freqs[None]  # [B, dim/2]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, 2*(dim/2)]
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the projected timestep embedding, GroupNorm-SiLU-conv, plus skip.

    Keys: ``in_layers.{0,2}``, ``emb_layers.1``, ``out_layers.{0,3}`` and, when the channel count
    changes, ``skip_connection`` (a 1x1 conv). Slots without parameters (SiLU, dropout) keep their
    indices so the names match the checkpoint.
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(
            group_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            group_norm(out_channels),
            nn.SiLU(),
            nn.Identity(),  # dropout (inference only)
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        # x: [B, Cin, H, W], emb: [B, E] -> [B, Cout, H, W]
        norm1, _, conv1 = self.in_layers
        norm2, _, _, conv2 = self.out_layers
        h = conv3x3(conv1, F.silu(norm1(x), inplace=True))  # [B, Cout, H, W]
        h += self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # + [B, Cout, 1, 1]
        h = conv3x3(conv2, F.silu(norm2(h), inplace=True))  # [B, Cout, H, W]
        skip = self.skip_connection
        if not isinstance(skip, nn.Conv2d):
            return h.add_(x)
        # The 1x1 skip conv as a batched matmul accumulated into h (h += W @ x + b): the same
        # product, without the slow generic path that 1x1 convolutions take on CPU.
        b, cin = x.shape[:2]
        weight = skip.weight.view(1, -1, cin).expand(b, -1, -1)  # [B, Cout, Cin]
        h_flat = h.view(b, h.shape[1], -1)  # [B, Cout, H*W]
        h_flat.baddbmm_(weight, x.reshape(b, cin, -1))
        h_flat += skip.bias[None, :, None]
        return h


class Downsample(nn.Module):
    """Stride-2 3x3 conv (``op``): [B, C, H, W] -> [B, C, ceil(H/2), ceil(W/2)]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return conv3x3(self.op, x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 (or to ``size``, the matching skip's size) then a 3x3 conv (``conv``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: Sequence[int] | None = None) -> Tensor:
        # x: [B, C, H, W] -> [B, C, 2H, 2W] (or [B, C, *size])
        target = tuple(size) if size is not None else (x.shape[-2] * 2, x.shape[-1] * 2)
        return conv3x3(self.conv, F.interpolate(x, size=target, mode="nearest"))


class CrossAttention(nn.Module):
    """Multi-head attention; self-attention when no context is given.

    Keys: ``to_q``, ``to_k``, ``to_v`` (no bias), ``to_out.0``.
    """

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.upcast = False
        self.memory_budget = DEFAULT_ATTENTION_MEMORY_BUDGET
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))  # .1 was dropout

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        # x: [B, N, C], context: [B, L, D] (or None: attend to x) -> [B, N, C]
        context = x if context is None else context
        q = self.to_q(x)  # [B, N, h*d]
        k = self.to_k(context)  # [B, L, h*d]
        v = self.to_v(context)  # [B, L, h*d]
        out = attention(q, k, v, self.heads, upcast=self.upcast, memory_budget=self.memory_budget)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU: one projection to 2*dim_out, ``value * gelu(gate)`` (exact GELU). Key: ``proj``."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # 2 x [B, N, dim_out]
        return F.gelu(gate).mul_(value)


class FeedForward(nn.Module):
    """GEGLU to 4*dim then a linear back: keys ``net.0.proj`` and ``net.2``."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Identity(), nn.Linear(inner, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and GEGLU feed-forward, each with a residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None) -> None:
        super().__init__()
        # Creation order matches LDM's (attn1, ff, attn2, norms); it fixes random init order.
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        # x: [B, N, C], context: [B, L, D] -> [B, N, C]
        x = x + self.attn1(self.norm1(x))
        x += self.attn2(self.norm2(x), context)
        x += self.ff(self.norm3(x))
        return x


class SpatialTransformer(nn.Module):
    """GroupNorm, project in, transformer blocks over the H*W tokens, project out, plus the input.

    ``use_linear`` (SD 2.x) projects with Linear layers on tokens; otherwise (SD 1.x) with 1x1
    convs, stored as conv weights [C, C, 1, 1]. A 1x1 conv is the same matrix product as a Linear,
    so both are applied to the token layout (one layout change in, one out).
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        depth: int,
        context_dim: int | None,
        use_linear: bool,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = group_norm(channels, eps=1e-6)
        if use_linear:
            self.proj_in: nn.Module = nn.Linear(channels, inner)
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)
        )
        if use_linear:
            self.proj_out: nn.Module = nn.Linear(inner, channels)
        else:
            self.proj_out = nn.Conv2d(inner, channels, 1)

    @staticmethod
    def _as_linear(layer: nn.Module, x: Tensor) -> Tensor:
        weight = layer.weight
        if weight.dim() == 4:  # 1x1 conv [out, in, 1, 1] -> [out, in]
            weight = weight.flatten(1)
        return F.linear(x, weight, layer.bias)

    def forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        # x: [B, C, H, W], context: [B, L, D] -> [B, C, H, W]
        b, c, h, w = x.shape
        t = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # [B, N, C]
        t = self._as_linear(self.proj_in, t)  # [B, N, inner]
        for block in self.transformer_blocks:
            t = block(t, context)
        t = self._as_linear(self.proj_out, t)  # [B, N, C]
        return x + t.view(b, h, w, c).permute(0, 3, 1, 2)


class TimestepSequential(nn.Sequential):
    """One ``input_blocks.i`` / ``middle_block`` / ``output_blocks.i`` entry: runs its layers in
    order, giving each the inputs it takes (emb to ResBlocks, context to transformers, the skip's
    size to Upsample)."""

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        emb: Tensor,
        context: Tensor | None,
        size: Sequence[int] | None = None,
    ) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            elif isinstance(layer, nn.Conv2d):  # conv_in
                x = conv3x3(layer, x)
            else:
                x = layer(x)
        return x


# ----------------------------------------------------------------------------------------------
# Config


def _count(keys: set[str], template: str) -> int:
    """How many consecutive n = 0, 1, ... have ``template.format(n)`` among ``keys``."""
    n = 0
    while template.format(n) in keys:
        n += 1
    return n


def strip_prefix(sd: Mapping[str, Tensor], prefix: str = UNET_PREFIX) -> dict[str, Tensor]:
    """The entries under ``prefix`` with the prefix removed; ``sd`` itself (as a dict) if none are."""
    if not any(key.startswith(prefix) for key in sd):
        return dict(sd)
    return {key[len(prefix) :]: value for key, value in sd.items() if key.startswith(prefix)}


@dataclass(frozen=True)
class UNetConfig:
    """Everything that fixes the UNet's structure.

    ``transformer_depth`` has one entry per input ResBlock (``input_blocks`` in order, downsamplers
    skipped), ``transformer_depth_output`` one per ``output_blocks`` entry in order; 0 means no
    SpatialTransformer in that block. ``transformer_depth_middle`` is the middle transformer's depth
    (-1: the middle block is a single ResBlock). Heads: ``num_heads`` per attention layer (SD1: 8)
    or, when ``num_head_channels`` > 0, ``channels // num_head_channels`` heads (SD2: 64).
    ``upcast_attention`` is not stored in checkpoints: it asks for float32 attention in half
    precision.
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: tuple[int, ...] = (2, 2, 2, 2)
    transformer_depth: tuple[int, ...] = (1, 1, 1, 1, 1, 1, 0, 0)
    transformer_depth_middle: int = 1
    transformer_depth_output: tuple[int, ...] = (0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1)
    context_dim: int | None = 768
    num_heads: int = 8
    num_head_channels: int = -1
    use_linear_in_transformer: bool = False
    adm_in_channels: int | None = None
    upcast_attention: bool = False

    def __post_init__(self) -> None:
        levels = len(self.channel_mult)
        if levels == 0 or len(self.num_res_blocks) != levels:
            raise ValueError("num_res_blocks needs one entry per channel_mult level")
        if len(self.transformer_depth) != sum(self.num_res_blocks):
            raise ValueError("transformer_depth needs one entry per input ResBlock")
        if len(self.transformer_depth_output) != sum(n + 1 for n in self.num_res_blocks):
            raise ValueError("transformer_depth_output needs one entry per output block")
        if (self.num_heads > 0) == (self.num_head_channels > 0):
            raise ValueError("set exactly one of num_heads and num_head_channels")
        uses_attention = any(self.transformer_depth) or any(self.transformer_depth_output)
        if (uses_attention or self.transformer_depth_middle > 0) and not self.context_dim:
            raise ValueError("spatial transformers need a context_dim")
        if self.transformer_depth_middle == 0 or self.transformer_depth_middle < -1:
            raise ValueError("transformer_depth_middle must be >= 1, or -1 for no middle transformer")

    # -- construction helpers ------------------------------------------------------------------

    @classmethod
    def from_levels(
        cls,
        *,
        model_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        transformer_depth: int = 1,
        context_dim: int | None = 768,
        num_heads: int = -1,
        num_head_channels: int = -1,
        use_linear_in_transformer: bool = False,
        in_channels: int = 4,
        out_channels: int = 4,
        adm_in_channels: int | None = None,
        upcast_attention: bool = False,
    ) -> UNetConfig:
        """A config in the LDM yaml's terms: levels at downsample factor ``2**level`` in
        ``attention_resolutions`` get ``transformer_depth`` blocks after each ResBlock; the middle
        block always has one transformer of that depth."""
        depths = [
            transformer_depth if 2**lvl in attention_resolutions else 0 for lvl in range(len(channel_mult))
        ]
        return cls(
            in_channels=in_channels,
            out_channels=out_channels,
            model_channels=model_channels,
            channel_mult=tuple(channel_mult),
            num_res_blocks=(num_res_blocks,) * len(channel_mult),
            transformer_depth=tuple(d for d in depths for _ in range(num_res_blocks)),
            transformer_depth_middle=transformer_depth,
            transformer_depth_output=tuple(d for d in reversed(depths) for _ in range(num_res_blocks + 1)),
            context_dim=context_dim,
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            use_linear_in_transformer=use_linear_in_transformer,
            adm_in_channels=adm_in_channels,
            upcast_attention=upcast_attention,
        )

    @classmethod
    def sd15(cls) -> UNetConfig:
        """Stable Diffusion 1.x (v1-inference.yaml)."""
        return cls.from_levels(
            model_channels=320,
            channel_mult=(1, 2, 4, 4),
            num_res_blocks=2,
            attention_resolutions=(4, 2, 1),
            context_dim=768,
            num_heads=8,
        )

    @classmethod
    def sd21(cls) -> UNetConfig:
        """Stable Diffusion 2.x (v2-inference(-v).yaml): linear projections, 64-wide heads."""
        return cls.from_levels(
            model_channels=320,
            channel_mult=(1, 2, 4, 4),
            num_res_blocks=2,
            attention_resolutions=(4, 2, 1),
            context_dim=1024,
            num_head_channels=64,
            use_linear_in_transformer=True,
        )

    @classmethod
    def tiny(cls) -> UNetConfig:
        """A ~1M-parameter SD1-layout UNet for tests: 32 channels, two levels, context 64.

        ``from_state_dict`` recovers it exactly (8 heads is the SD1 default it infers)."""
        return cls.from_levels(
            model_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(1, 2),
            context_dim=64,
            num_heads=8,
        )

    # -- derived values --------------------------------------------------------------------------

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    @property
    def attention_resolutions(self) -> tuple[int, ...]:
        """Downsample factors (1, 2, 4, ...) of the levels whose input ResBlocks have attention."""
        out, i = [], 0
        for level, n in enumerate(self.num_res_blocks):
            if any(self.transformer_depth[i : i + n]):
                out.append(2**level)
            i += n
        return tuple(out)

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(heads, head width) of a transformer at ``channels``."""
        if self.num_head_channels > 0:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads

    # -- inference from weights ------------------------------------------------------------------

    @classmethod
    def from_state_dict(
        cls,
        sd: Mapping[str, Tensor],
        *,
        num_heads: int | None = None,
        num_head_channels: int | None = None,
        upcast_attention: bool = False,
    ) -> UNetConfig:
        """Infer the config from tensor shapes and key presence (as ComfyUI's model detection).

        ``sd`` is a UNet state dict, with or without the ``model.diffusion_model.`` prefix (a full
        checkpoint works: other keys are ignored). The head layout is not in the shapes: like
        ComfyUI, a 1024-wide context (SD 2.x) means 64-channel heads, anything else 8 heads;
        ``num_heads`` / ``num_head_channels`` override that. Only the shapes are read, so meta
        tensors work.

        Raises ModelError when the dict is not an LDM UNet in this layout.
        """
        sd = strip_prefix(sd)
        keys = set(sd)
        if "input_blocks.0.0.weight" not in keys or "out.2.weight" not in keys:
            raise ModelError("not an LDM UNet state dict: input_blocks.0.0.weight or out.2.weight missing")
        try:
            return cls._infer(sd, keys, num_heads, num_head_channels, upcast_attention)
        except (KeyError, ValueError, IndexError) as exc:
            raise ModelError(f"cannot infer the UNet config from the state dict: {exc}") from exc

    @classmethod
    def _infer(
        cls,
        sd: Mapping[str, Tensor],
        keys: set[str],
        num_heads: int | None,
        num_head_channels: int | None,
        upcast_attention: bool,
    ) -> UNetConfig:
        conv_in = sd["input_blocks.0.0.weight"]  # [mc, in, 3, 3]
        model_channels, in_channels = conv_in.shape[0], conv_in.shape[1]
        out_channels = sd["out.2.weight"].shape[0]

        def depth(prefix: str) -> int:
            return _count(keys, prefix + "transformer_blocks.{}.attn1.to_q.weight")

        channel_mult: list[int] = []
        num_res_blocks: list[int] = []
        transformer_depth: list[int] = []
        res_in_level, mult = 0, 0
        context_dim: int | None = None
        use_linear = False
        i = 1
        while True:
            prefix = f"input_blocks.{i}."
            if prefix + "0.op.weight" in keys:  # downsampler closes a level
                channel_mult.append(mult)
                num_res_blocks.append(res_in_level)
                res_in_level = 0
            elif prefix + "0.in_layers.0.weight" in keys:
                res_in_level += 1
                mult = sd[prefix + "0.out_layers.3.weight"].shape[0] // model_channels
                d = depth(prefix + "1.")
                transformer_depth.append(d)
                if d and context_dim is None:
                    context_dim = sd[prefix + "1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
                    use_linear = sd[prefix + "1.proj_in.weight"].dim() == 2
            else:
                break
            i += 1
        channel_mult.append(mult)
        num_res_blocks.append(res_in_level)

        if "middle_block.1.proj_in.weight" in keys:
            depth_middle = depth("middle_block.1.")
            if context_dim is None:
                context_dim = sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
                use_linear = sd["middle_block.1.proj_in.weight"].dim() == 2
        else:
            depth_middle = -1

        n_out = _count(keys, "output_blocks.{}.0.in_layers.0.weight")
        depth_output = tuple(depth(f"output_blocks.{j}.1.") for j in range(n_out))

        if num_heads is None and num_head_channels is None:
            if context_dim == 1024:  # SD 2.x, as ComfyUI's SD20 model config
                num_heads, num_head_channels = -1, 64
            else:  # SD 1.x and everything else in this layout
                num_heads, num_head_channels = 8, -1
        elif num_head_channels is not None and num_head_channels > 0:
            num_heads = -1
        else:
            num_head_channels = -1

        adm = sd["label_emb.0.0.weight"].shape[1] if "label_emb.0.0.weight" in keys else None
        return cls(
            in_channels=in_channels,
            out_channels=out_channels,
            model_channels=model_channels,
            channel_mult=tuple(channel_mult),
            num_res_blocks=tuple(num_res_blocks),
            transformer_depth=tuple(transformer_depth),
            transformer_depth_middle=depth_middle,
            transformer_depth_output=depth_output,
            context_dim=context_dim,
            num_heads=num_heads if num_heads is not None else -1,
            num_head_channels=num_head_channels if num_head_channels is not None else -1,
            use_linear_in_transformer=use_linear,
            adm_in_channels=adm,
            upcast_attention=upcast_attention,
        )


# ----------------------------------------------------------------------------------------------
# The model


class UNetModel(nn.Module):
    """The SD 1.x / 2.x denoiser: forward(x [B, 4, H, W], timesteps [B], context [B, L, D]) -> eps/v.

    Works in the dtype of its weights (float32, float16 or bfloat16): inputs are cast to it and
    the output is cast back to ``x``'s dtype. ``y`` ([B, adm_in_channels]) is required exactly when
    the config has ``adm_in_channels`` (``label_emb``, e.g. SD 2.1 unCLIP).
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        mc, emb_dim = cfg.model_channels, cfg.time_embed_dim

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            heads, dim_head = cfg.heads_for(ch)
            return SpatialTransformer(
                ch, heads, dim_head, depth, cfg.context_dim, cfg.use_linear_in_transformer
            )

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.adm_in_channels is not None:
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            )

        # Encoder: conv_in, then per level num_res_blocks x (ResBlock [+ transformer]), downsample.
        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels = [mc]
        ch = mc
        depths_in = iter(cfg.transformer_depth)
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks[level]):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc)]
                ch = mult * mc
                depth = next(depths_in)
                if depth > 0:
                    layers.append(transformer(ch, depth))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepSequential(Downsample(ch)))
                skip_channels.append(ch)

        middle: list[nn.Module] = [ResBlock(ch, emb_dim)]
        if cfg.transformer_depth_middle > 0:
            middle += [transformer(ch, cfg.transformer_depth_middle), ResBlock(ch, emb_dim)]
        self.middle_block = TimestepSequential(*middle)

        # Decoder: per level (deepest first) num_res_blocks + 1 x (ResBlock on concat(h, skip)
        # [+ transformer]), the last one of every level but the top also upsamples.
        self.output_blocks = nn.ModuleList()
        depths_out = iter(cfg.transformer_depth_output)
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks[level] + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mc * mult)]
                ch = mc * mult
                depth = next(depths_out)
                if depth > 0:
                    layers.append(transformer(ch, depth))
                if level and i == cfg.num_res_blocks[level]:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepSequential(*layers))

        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))
        self.set_attention_options(upcast=cfg.upcast_attention)

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.time_embed[0].weight.device

    def set_attention_options(self, *, upcast: bool | None = None, memory_budget: int | None = None) -> None:
        """Float32 attention for half-precision weights, and/or the per-call score-matrix budget
        in bytes above which queries are chunked (see ``attention``)."""
        for module in self.modules():
            if isinstance(module, CrossAttention):
                if upcast is not None:
                    module.upcast = upcast
                if memory_budget is not None:
                    module.memory_budget = max(1, int(memory_budget))

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor | None = None,
        y: Tensor | None = None,
    ) -> Tensor:
        # x: [B, Cin, H, W], timesteps: [B] (or one value), context: [B, L, D], y: [B, adm]
        # -> [B, Cout, H, W]
        dtype = self.dtype
        if (y is None) != (self.config.adm_in_channels is None):
            raise ValueError("y must be given exactly when the model has a label embedding (adm_in_channels)")
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1)
        if timesteps.numel() == 1:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(dtype))  # [B, E]
        if y is not None:
            emb = emb + self.label_emb(y.to(dtype))
        if context is not None:
            context = context.to(dtype)

        h = x.to(dtype)
        skips: list[Tensor] = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # [B, C + Cskip, H, W]
            size = skips[-1].shape[-2:] if skips else None  # the next skip's size, for odd sizes
            h = block(h, emb, context, size)
        norm, _, conv = self.out
        return conv3x3(conv, F.silu(norm(h), inplace=True)).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Loading


def meta_state_dict(config: UNetConfig) -> dict[str, Tensor]:
    """The real key -> tensor layout of ``config``, as meta tensors (no memory, no init)."""
    with torch.device("meta"):
        return UNetModel(config).state_dict()


def _is_norm_weight_owner(module: nn.Module) -> bool:
    return isinstance(module, nn.GroupNorm | nn.LayerNorm)


def random_state_dict(
    config: UNetConfig,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    std: float = 0.02,
) -> dict[str, Tensor]:
    """Deterministic random weights in the real layout (for test checkpoints and benchmarks).

    Linear/conv weights ~ normal(0, std), biases zero, norm weights one. Values are drawn in
    float32 on the CPU from one generator seeded with ``seed`` (in state-dict order), then cast to
    ``dtype``, so the same arguments give the same tensors everywhere.
    """
    with torch.device("meta"):
        model = UNetModel(config)
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Tensor] = {}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            key = f"{module_name}.{name}" if module_name else name
            if name == "bias":
                value = torch.zeros(param.shape)
            elif _is_norm_weight_owner(module):
                value = torch.ones(param.shape)
            else:
                value = torch.empty(param.shape).normal_(0.0, std, generator=gen)
            out[key] = value.to(dtype)
    return out


def load_unet(
    sd: Mapping[str, Tensor],
    config: UNetConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> UNetModel:
    """Build a UNet from a state dict without random initialisation.

    The module is built on the ``meta`` device, every tensor is converted once to ``device`` /
    ``dtype`` (default: the dtype of ``input_blocks.0.0.weight``) and assigned in place with
    ``load_state_dict(..., assign=True)``. ``sd`` may carry the ``model.diffusion_model.`` prefix
    (other keys are then ignored). Tensors already on the right device and dtype are used as they
    are (the model shares their storage). The model is returned in eval mode, without grads.

    Raises ModelError when keys are missing or unexpected or a shape does not match.
    """
    sd = strip_prefix(sd)
    if config is None:
        config = UNetConfig.from_state_dict(sd)
    if dtype is None:
        dtype = sd["input_blocks.0.0.weight"].dtype
    with torch.device("meta"):
        model = UNetModel(config)
    converted = {
        key: value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
        for key, value in sd.items()
    }
    try:
        model.load_state_dict(converted, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelError(f"UNet weights do not match the inferred architecture: {exc}") from exc
    model.requires_grad_(False)
    return model.eval()


def build_unet(
    config: UNetConfig,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    std: float = 0.02,
) -> UNetModel:
    """A UNet with ``random_state_dict`` weights (tests, benchmarks)."""
    return load_unet(random_state_dict(config, seed, dtype, std), config, device=device, dtype=dtype)
