"""The KL autoencoder of latent diffusion (the Stable Diffusion 1.x/2.x VAE), in the LDM checkpoint layout.

Module and parameter names follow the original checkpoints exactly (the keys under
``first_stage_model.`` in an SD checkpoint, or the bare keys of a standalone VAE file such as
``vae-ft-mse-840000-ema-pruned.safetensors``), so ``load_state_dict`` takes the stripped dict as is
and ``state_dict()`` gives the real names:

    encoder.conv_in                         3 -> ch, 3x3
    encoder.down.{i}.block.{j}              ResnetBlock (norm1, conv1, norm2, conv2[, nin_shortcut])
    encoder.down.{i}.downsample.conv        pad (0,1,0,1) + 3x3 stride-2 conv (not on the last level)
    encoder.mid.{block_1, attn_1, block_2}  attn_1: norm, q, k, v, proj_out (1x1 convs)
    encoder.norm_out, encoder.conv_out      -> 2 * z_channels (mean and log-variance)
    quant_conv                              1x1, 2*z -> 2*embed_dim
    post_quant_conv                         1x1, embed_dim -> z
    decoder.conv_in, decoder.mid.*          as in the encoder
    decoder.up.{i}.block.{j}                num_res_blocks + 1 blocks per level
    decoder.up.{i}.upsample.conv            nearest x2 + 3x3 conv (not on level 0)
    decoder.norm_out, decoder.conv_out

The file has three layers: the network (building blocks, ``Encoder``, ``Decoder``, ``AutoencoderKL``),
checkpoint handling (``VAEConfig.from_state_dict``, ``prepare_vae_state_dict``, ``load_autoencoder``,
``random_state_dict``), and ``VAE``, the wrapper with ComfyUI's semantics (pixel layout and range,
cropping, batch splitting by a memory budget, tiled encode/decode). Facts were taken from ComfyUI's
``comfy/ldm/modules/diffusionmodules/model.py``, ``comfy/ldm/models/autoencoder.py``, ``comfy/sd.py``
(class ``VAE``) and ``comfy/utils.py`` (``tiled_scale_multidim``); the code is Kiln's own.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.errors import ModelError

# The SD1.x/SD2.x latent scale (ComfyUI's ``LatentFormat`` SD15 ``scale_factor``; diffusers'
# ``LDM_VAE_DEFAULT_SCALING_FACTOR``). The sampler multiplies VAE latents by it on the way in; the
# VAE itself never applies it. SDXL's VAE has the same architecture but 0.13025: weights cannot tell.
SD_LATENT_SCALE_FACTOR = 0.18215

# Most attention scores (B * queries * keys) one scaled_dot_product_attention call may cover; longer
# inputs are split along the queries. 2**26 scores are 256 MiB in fp32.
DEFAULT_ATTN_MAX_SCORES = 1 << 26

# Prefixes under which full checkpoints store the VAE (LDM/SD: first_stage_model., some SDXL-era files: vae.).
CHECKPOINT_PREFIXES = ("first_stage_model.", "vae.")

# Top-level names of the autoencoder; anything else in a VAE file (model_ema.*, loss.*) is ignored.
_VAE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")

# ComfyUI's memory estimates for the SD VAE (bytes per element of the dtype): encode costs 1767 per
# input pixel, decode 2178 per output pixel (64 per latent pixel). Kiln scales them by ch / 128.
_ENCODE_BYTES_PER_PIXEL = 1767
_DECODE_BYTES_PER_PIXEL = 2178


# ----------------------------------------------------------------------------------------------------------
# Building blocks


def group_norm(channels: int) -> nn.GroupNorm:
    """The VAE's normalisation: 32 groups, eps 1e-6, affine."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, max_scores: int = DEFAULT_ATTN_MAX_SCORES) -> Tensor:
    """Softmax attention (scale 1/sqrt(C)) that never covers more than ``max_scores`` scores per call.

    q: [B, heads, N, C], k: [B, heads, M, C], v: [B, heads, M, Cv] -> [B, heads, N, Cv]. The queries are
    split into row chunks, so even a kernel that materialises the score matrix (the math fallback of
    scaled_dot_product_attention) holds at most ``max_scores`` of them at a time. Rows are
    independent, so the result equals the unchunked one.
    """
    b, heads, n, _ = q.shape
    rows = max(1, max_scores // max(1, b * heads * k.shape[2]))
    if rows >= n:
        return F.scaled_dot_product_attention(q, k, v)
    out = q.new_empty((b, heads, n, v.shape[-1]))
    for start in range(0, n, rows):
        out[:, :, start : start + rows] = F.scaled_dot_product_attention(q[:, :, start : start + rows], k, v)
    return out


class ResnetBlock(nn.Module):
    """norm -> swish -> conv3x3, twice, plus a (1x1-projected when channels change) skip connection."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:  # [B, Cin, H, W] -> [B, Cout, H, W]
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # dropout is 0 at inference: omitted
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions; q, k, v, proj_out are 1x1 convs."""

    def __init__(self, channels: int, max_scores: int = DEFAULT_ATTN_MAX_SCORES) -> None:
        super().__init__()
        self.max_scores = max_scores
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, H, W] -> [B, C, H, W]
        b, c, height, width = x.shape
        h = self.norm(x)
        # [B, C, H, W] -> [B, 1, H*W, C]: one head whose tokens are the positions
        q, k, v = (p(h).reshape(b, 1, c, height * width).transpose(2, 3) for p in (self.q, self.k, self.v))
        out = chunked_attention(q, k, v, self.max_scores)  # [B, 1, H*W, C]
        out = out.transpose(2, 3).reshape(b, c, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve H and W: pad right and bottom by one, then a 3x3 stride-2 conv (torch pads symmetrically)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, H, W] -> [B, C, H/2, W/2]
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour repetition, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, H, W] -> [B, C, 2H, 2W]
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock, attention, ResnetBlock at the lowest resolution (names: block_1, attn_1, block_2)."""

    def __init__(self, channels: int, max_scores: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels, max_scores)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class DownLevel(nn.Module):
    """One encoder resolution: ``block.{j}`` ResnetBlocks, then ``downsample`` unless it is the last level."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, downsample: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if j == 0 else out_channels, out_channels) for j in range(num_blocks)
        )
        self.downsample = Downsample(out_channels) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(nn.Module):
    """One decoder resolution: ``block.{j}`` ResnetBlocks, then ``upsample`` unless it is level 0."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, upsample: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if j == 0 else out_channels, out_channels) for j in range(num_blocks)
        )
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


# ----------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class VAEConfig:
    """Shape of a KL autoencoder. ``sd()`` is the SD1.x/SD2.x VAE (also SDXL's, with another scale factor)."""

    ch: int = 128  # channels of the first level
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # per-level channel multipliers; len - 1 halvings
    num_res_blocks: int = 2  # ResnetBlocks per encoder level (decoder levels have one more)
    in_channels: int = 3  # image channels in
    out_channels: int = 3  # image channels out
    z_channels: int = 4  # latent channels inside encoder/decoder
    embed_dim: int = 4  # latent channels outside (after quant_conv)
    use_quant_conv: bool = True  # quant_conv / post_quant_conv present (absent in SD3/Flux-style VAEs)
    scaling_factor: float = SD_LATENT_SCALE_FACTOR  # the sampler's latent scale; weights cannot tell it

    def __post_init__(self) -> None:
        if not self.ch_mult:
            raise ValueError("ch_mult must have at least one level")
        if any((self.ch * m) % 32 for m in self.ch_mult):
            raise ValueError("every level's channels (ch * mult) must be a multiple of 32 (GroupNorm groups)")
        if not self.use_quant_conv and self.embed_dim != self.z_channels:
            raise ValueError("without quant convs, embed_dim must equal z_channels")

    @property
    def num_levels(self) -> int:
        return len(self.ch_mult)

    @property
    def downscale_ratio(self) -> int:
        """Pixels per latent pixel along each side: 8 for the SD VAE (three halvings)."""
        return 2 ** (self.num_levels - 1)

    @property
    def latent_channels(self) -> int:
        return self.embed_dim

    @classmethod
    def sd(cls) -> VAEConfig:
        """The SD1.x/SD2.x VAE (ComfyUI's default ddconfig): ch 128, mult (1,2,4,4), 2 blocks, 4 latents."""
        return cls()

    @classmethod
    def tiny(cls) -> VAEConfig:
        """A small VAE for tests: 8x downscale, 32/64 channels, one block per level, every block kind."""
        return cls(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)

    @classmethod
    def from_state_dict(
        cls, sd: Mapping[str, Tensor], scaling_factor: float = SD_LATENT_SCALE_FACTOR
    ) -> VAEConfig:
        """Infer the shape from a bare LDM-layout state dict (see ``prepare_vae_state_dict``)."""

        def shape(key: str) -> tuple[int, ...]:
            if key not in sd:
                raise ModelError(f"not a KL autoencoder state dict: missing {key}")
            return tuple(sd[key].shape)

        ch, in_channels = shape("encoder.conv_in.weight")[:2]
        levels = sorted({int(m.group(1)) for key in sd if (m := re.match(r"encoder\.down\.(\d+)\.", key))})
        if not levels or levels != list(range(len(levels))):
            raise ModelError("not a KL autoencoder state dict: encoder.down.* levels missing or out of order")
        ch_mult = []
        for level in levels:
            out = shape(f"encoder.down.{level}.block.0.conv1.weight")[0]
            if out % ch:
                raise ModelError(f"encoder.down.{level} has {out} channels, not a multiple of ch={ch}")
            ch_mult.append(out // ch)
        blocks = {m.group(1) for key in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", key))}
        num_res_blocks = len(blocks)
        z_channels = shape("decoder.conv_in.weight")[1]
        if shape("encoder.conv_out.weight")[0] != 2 * z_channels:
            raise ModelError("encoder.conv_out must output 2 * z_channels (mean and log-variance)")
        use_quant_conv = "quant_conv.weight" in sd
        embed_dim = shape("quant_conv.weight")[0] // 2 if use_quant_conv else z_channels
        out_channels = shape("decoder.conv_out.weight")[0]
        try:
            return cls(
                ch=ch,
                ch_mult=tuple(ch_mult),
                num_res_blocks=num_res_blocks,
                in_channels=in_channels,
                out_channels=out_channels,
                z_channels=z_channels,
                embed_dim=embed_dim,
                use_quant_conv=use_quant_conv,
                scaling_factor=scaling_factor,
            )
        except ValueError as exc:
            raise ModelError(f"unsupported KL autoencoder shape: {exc}") from exc


# ----------------------------------------------------------------------------------------------------------
# The network


class Encoder(nn.Module):
    """Image [B, in, H, W] -> moments [B, 2*z, H/r, W/r] (r = 2**(levels-1))."""

    def __init__(self, config: VAEConfig, max_scores: int = DEFAULT_ATTN_MAX_SCORES) -> None:
        super().__init__()
        chans = [config.ch * m for m in config.ch_mult]
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList(
            DownLevel(
                in_channels=config.ch if i == 0 else chans[i - 1],
                out_channels=chans[i],
                num_blocks=config.num_res_blocks,
                downsample=i != config.num_levels - 1,
            )
            for i in range(config.num_levels)
        )
        self.mid = MidBlock(chans[-1], max_scores)
        self.norm_out = group_norm(chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], 2 * config.z_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # [B, ch, H, W]
        for level in self.down:
            h = level(h)  # [B, ch*mult[i], H/2**i', W/2**i']
        h = self.mid(h)  # [B, ch*mult[-1], H/r, W/r]
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, 2*z, H/r, W/r]


class Decoder(nn.Module):
    """Latent [B, z, h, w] -> image [B, out, h*r, w*r]."""

    def __init__(self, config: VAEConfig, max_scores: int = DEFAULT_ATTN_MAX_SCORES) -> None:
        super().__init__()
        chans = [config.ch * m for m in config.ch_mult]
        n = config.num_levels
        self.conv_in = nn.Conv2d(config.z_channels, chans[-1], kernel_size=3, padding=1)
        self.mid = MidBlock(chans[-1], max_scores)
        # up[i] runs at level i's resolution; the decoder walks them from n-1 down to 0
        self.up = nn.ModuleList(
            UpLevel(
                in_channels=chans[min(i + 1, n - 1)],
                out_channels=chans[i],
                num_blocks=config.num_res_blocks + 1,
                upsample=i != 0,
            )
            for i in range(n)
        )
        self.norm_out = group_norm(chans[0])
        self.conv_out = nn.Conv2d(chans[0], config.out_channels, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))  # [B, ch*mult[-1], h, w]
        for level in reversed(self.up):
            h = level(h)  # doubles H, W except at level 0
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, out, h*r, w*r]


@dataclass(frozen=True)
class DiagonalGaussian:
    """The encoder's posterior: per-element mean and log-variance (clamped to [-30, 20] as in LDM)."""

    mean: Tensor  # [B, E, h, w]
    logvar: Tensor  # [B, E, h, w]

    @classmethod
    def from_moments(cls, moments: Tensor) -> DiagonalGaussian:  # [B, 2E, h, w]
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar.clamp(-30.0, 20.0))

    def mode(self) -> Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        mean = self.mean
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.mean + torch.exp(0.5 * self.logvar) * noise


class AutoencoderKL(nn.Module):
    """The KL autoencoder: ``encode`` gives the posterior mean (as ComfyUI does), ``decode`` the image."""

    def __init__(self, config: VAEConfig, max_scores: int = DEFAULT_ATTN_MAX_SCORES) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config, max_scores)
        self.decoder = Decoder(config, max_scores)
        if config.use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
            self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        else:
            self.quant_conv = None
            self.post_quant_conv = None

    def set_attention_max_scores(self, max_scores: int) -> None:
        """Change how many attention scores one SDPA call may cover (both mid-block attentions)."""
        self.encoder.mid.attn_1.max_scores = max_scores
        self.decoder.mid.attn_1.max_scores = max_scores

    def encode_distribution(self, x: Tensor) -> DiagonalGaussian:  # x: [B, in, H, W] in -1..1
        moments = self.encoder(x)  # [B, 2z, H/r, W/r]
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)  # [B, 2E, H/r, W/r]
        return DiagonalGaussian.from_moments(moments)

    def encode(self, x: Tensor) -> Tensor:
        """[B, in, H, W] in -1..1 -> posterior mean [B, E, H/r, W/r]. ComfyUI samples no noise since
        PR #8705 (2025-06): its DiagonalGaussianRegularizer returns the mode, which is the mean."""
        return self.encode_distribution(x).mode()

    def decode(self, z: Tensor) -> Tensor:
        """[B, E, h, w] -> [B, out, h*r, w*r], roughly -1..1 (not clamped)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)  # [B, z, h, w]
        return self.decoder(z)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints

_DIFFUSERS_ATTN_NAMES = MappingProxyType(
    {
        "group_norm": "norm",
        "to_q": "q",
        "to_k": "k",
        "to_v": "v",
        "to_out.0": "proj_out",
        "query": "q",  # older diffusers names
        "key": "k",
        "value": "v",
        "proj_attn": "proj_out",
    }
)


def is_diffusers_vae_state_dict(sd: Mapping[str, Tensor]) -> bool:
    return any(".up_blocks." in key or ".down_blocks." in key or ".mid_block." in key for key in sd)


def convert_diffusers_vae_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a diffusers ``AutoencoderKL`` state dict to the LDM layout (tensors untouched; linear
    attention weights [C, C] are reshaped at load). ComfyUI accepts both layouts, so Kiln does too."""
    up_ids = [int(m.group(1)) for key in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", key))]
    num_up = max(up_ids) + 1 if up_ids else 0

    def rename(key: str) -> str:
        key = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)
        key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", key)
        key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
        key = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
            lambda m: f"decoder.up.{num_up - 1 - int(m.group(1))}.block.{m.group(2)}.",
            key,
        )
        key = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: f"decoder.up.{num_up - 1 - int(m.group(1))}.upsample.",
            key,
        )
        key = re.sub(
            r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.",
            lambda m: f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.",
            key,
        )
        key = re.sub(
            r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0|query|key|value"
            r"|proj_attn)\.",
            lambda m: f"{m.group(1)}.mid.attn_1.{_DIFFUSERS_ATTN_NAMES[m.group(2)]}.",
            key,
        )
        return re.sub(r"\.block\.(\d+)\.conv_shortcut\.", r".block.\1.nin_shortcut.", key)

    return {rename(key): tensor for key, tensor in sd.items()}


def prepare_vae_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Bring any accepted VAE state dict to the bare LDM layout this module loads.

    Accepts a full checkpoint (keys under ``first_stage_model.`` or ``vae.``), a standalone VAE file
    (bare keys), or a diffusers ``AutoencoderKL`` state dict. Keys outside the autoencoder (the rest
    of a checkpoint, ``model_ema.*``, ``loss.*``) are dropped. Tensors are not copied.
    """
    for prefix in CHECKPOINT_PREFIXES:
        if any(key.startswith(prefix + root) for key in sd for root in _VAE_ROOTS):
            sd = {key[len(prefix) :]: t for key, t in sd.items() if key.startswith(prefix)}
            break
    sd = {key: t for key, t in sd.items() if key.startswith(_VAE_ROOTS)}
    if is_diffusers_vae_state_dict(sd):
        sd = convert_diffusers_vae_state_dict(sd)
    return sd


def load_autoencoder(
    sd: Mapping[str, Tensor],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    config: VAEConfig | None = None,
    max_scores: int = DEFAULT_ATTN_MAX_SCORES,
) -> AutoencoderKL:
    """Build an ``AutoencoderKL`` from a state dict without ever initialising random weights.

    The module is constructed on the ``meta`` device (no storage), each tensor is converted once to
    ``device``/``dtype`` (no copy when it already matches), and ``load_state_dict(assign=True)`` makes
    those tensors the parameters. Raises ``ModelError`` on missing, unexpected or misshapen keys.
    """
    sd = prepare_vae_state_dict(sd)
    config = config or VAEConfig.from_state_dict(sd)
    with torch.device("meta"):
        model = AutoencoderKL(config, max_scores)
    expected = model.state_dict()
    missing = sorted(expected.keys() - sd.keys())
    unexpected = sorted(sd.keys() - expected.keys())
    if missing or unexpected:
        raise ModelError(
            f"VAE state dict does not match the KL autoencoder layout: {len(missing)} missing "
            f"(first {missing[:8]}), {len(unexpected)} unexpected (first {unexpected[:8]})"
        )
    tensors = {}
    for name, ref in expected.items():
        tensor = sd[name]
        if tensor.shape != ref.shape:
            # 1x1 convs (attention q/k/v/proj_out) stored as linear [C, C] by diffusers-converted files
            if ref.shape[2:] == (1, 1) and tensor.shape == ref.shape[:2]:
                tensor = tensor.reshape(ref.shape)
            elif ref.shape[3:] == (1,) and tensor.shape == ref.shape[:3]:
                tensor = tensor.unsqueeze(-1)
            else:
                got, want = tuple(tensor.shape), tuple(ref.shape)
                raise ModelError(f"VAE tensor {name} has shape {got}, expected {want}")
        tensors[name] = tensor.to(device=device, dtype=dtype)
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def random_state_dict(
    config: VAEConfig, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """A deterministic random-weight state dict in the real LDM layout (for tests and benchmarks).

    Conv weights ~ N(0, 1/fan_in) (activations stay O(1)), conv biases ~ N(0, 0.02^2), GroupNorm
    weights 1 and biases 0. Values depend only on ``config`` and ``seed``, never on ``dtype``.
    """
    with torch.device("meta"):
        model = AutoencoderKL(config)
    generator = torch.Generator().manual_seed(seed)
    norms = {name for name, module in model.named_modules() if isinstance(module, nn.GroupNorm)}
    out = {}
    for name, ref in model.state_dict().items():
        owner, _, kind = name.rpartition(".")
        if owner in norms:
            tensor = torch.ones(ref.shape) if kind == "weight" else torch.zeros(ref.shape)
        elif kind == "weight":
            fan_in = math.prod(ref.shape[1:])
            tensor = torch.randn(ref.shape, generator=generator) / math.sqrt(fan_in)
        else:
            tensor = torch.randn(ref.shape, generator=generator) * 0.02
        out[name] = tensor.to(dtype)
    return out


# ----------------------------------------------------------------------------------------------------------
# Tiling (ComfyUI's tiled_scale semantics)


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins on one axis: [0] when it fits, else every ``tile - overlap`` below ``size - overlap``."""
    if size <= tile:
        return [0]
    if tile <= overlap:
        raise ValueError(f"tile size {tile} must be larger than the overlap {overlap}")
    return list(range(0, size - overlap, tile - overlap))


def _feather(length: int, feather: int) -> Tensor:
    """1-D blend weights: both ends ramp (1/f, 2/f, ..., 1) over ``feather`` samples; no ramp when
    the tile is not longer than the ramp. Where the two ramps meet they multiply, as in ComfyUI."""
    weights = torch.ones(length)
    if 0 < feather < length:
        ramp = torch.arange(1, feather + 1, dtype=torch.float32) / feather
        weights[:feather] *= ramp
        weights[length - feather :] *= ramp.flip(0)
    return weights


def tiled_scale(
    samples: Tensor,
    function: Callable[[Tensor], Tensor],
    tile: tuple[int, int],
    overlap: int,
    scale: float,
    out_channels: int,
    output_device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """Apply ``function`` ([B, C, h, w] -> [B, out_channels, h*scale, w*scale]) tile by tile and blend.

    samples: [B, C, H, W]; tile: (tile_h, tile_w) in input pixels; ``overlap`` in input pixels.
    Same tiles, blend masks and placement as ComfyUI's ``tiled_scale_multidim``: tiles start every
    ``tile - overlap`` (the last one is cut at the border), each output tile is weighted by a
    separable feathered mask (ramps of ``round(overlap * scale)`` on every side, borders included),
    and the weighted sum is divided by the summed weights. An input that fits one tile is passed
    through unchanged. The whole batch goes through each tile at once (ComfyUI loops samples;
    GroupNorm is per sample, so the result is the same). Returns float32 on ``output_device``.
    ``progress`` is called with 1 after each tile.
    """
    b, _, height, width = samples.shape
    tile_h, tile_w = tile
    if height <= tile_h and width <= tile_w:
        out = function(samples).to(device=output_device, dtype=torch.float32)
        if progress is not None:
            progress(1)
        return out
    out_h, out_w = round(height * scale), round(width * scale)
    out = torch.zeros((b, out_channels, out_h, out_w), device=output_device)
    weight = torch.zeros((out_h, out_w), device=output_device)
    feather = round(overlap * scale)
    for y in _tile_starts(height, tile_h, overlap):
        for x in _tile_starts(width, tile_w, overlap):
            piece = samples[:, :, y : y + tile_h, x : x + tile_w]
            result = function(piece).to(device=output_device, dtype=torch.float32)  # [B, out, ph, pw]
            ph, pw = result.shape[2:]
            mask = _feather(ph, feather)[:, None] * _feather(pw, feather)[None, :]  # [ph, pw]
            mask = mask.to(output_device)
            oy, ox = round(y * scale), round(x * scale)
            out[:, :, oy : oy + ph, ox : ox + pw] += result * mask
            weight[oy : oy + ph, ox : ox + pw] += mask
            if progress is not None:
                progress(1)
    return out / weight


def count_tiles(height: int, width: int, tile: tuple[int, int], overlap: int) -> int:
    """How many ``function`` calls ``tiled_scale`` makes for one [.., height, width] input."""
    if height <= tile[0] and width <= tile[1]:
        return 1
    return len(_tile_starts(height, tile[0], overlap)) * len(_tile_starts(width, tile[1], overlap))


def _three_tilings(tile_x: int, tile_y: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """ComfyUI blends three tilings to hide seams: as given, half height/double width, double height/half
    width. Returned as (tile_h, tile_w)."""
    return (tile_y, tile_x), (tile_y // 2, tile_x * 2), (tile_y * 2, tile_x // 2)


# ----------------------------------------------------------------------------------------------------------
# The wrapper


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def free_memory(device: torch.device) -> int:
    """Bytes the VAE may use on ``device``: free CUDA memory plus torch's reserved-but-unused cache,
    or available system RAM on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError)


class VAE:
    """A loaded KL autoencoder with ComfyUI's VAE semantics.

    - ``encode(pixels [B, H, W, C] in 0..1) -> latent [B, E, H/r, W/r]``: extra channels (alpha) are
      dropped and H, W are centre-cropped down to multiples of r (ComfyUI's
      ``VAE.vae_encode_crop_pixels``, called from ``VAE.encode``/``encode_tiled`` since 2024; before
      that the ``VAEEncode`` node did it), pixels go to -1..1, the posterior mean comes back (float32,
      on ``output_device``). The latent is NOT multiplied by ``latent_scale_factor``: like ComfyUI's
      LATENT, it is raw; the sampler's latent format applies the factor.
    - ``decode(latent) -> pixels [B, H*r, W*r, 3]`` in 0..1: ``clamp((x + 1) / 2, 0, 1)``, float32.
    - Batches are split so that each chunk fits the memory budget (ComfyUI's per-image estimates);
      on a CUDA out-of-memory error, encode/decode retry tiled, as ComfyUI does.
    - ``encode_tiled``/``decode_tiled`` average three tilings blended with feathered masks.
    """

    def __init__(
        self,
        model: AutoencoderKL,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        output_device: torch.device | str = "cpu",
        memory_budget: int | None = None,
        latent_scale_factor: float | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.output_device = torch.device(output_device)
        self.memory_budget = memory_budget  # bytes per chunk; None: the device's free memory at call time
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.config = model.config
        self.latent_scale_factor = (
            self.config.scaling_factor if latent_scale_factor is None else latent_scale_factor
        )

    @classmethod
    def from_state_dict(
        cls,
        sd: Mapping[str, Tensor],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        output_device: torch.device | str = "cpu",
        memory_budget: int | None = None,
        latent_scale_factor: float | None = None,
        max_scores: int = DEFAULT_ATTN_MAX_SCORES,
    ) -> VAE:
        """Load from a checkpoint, a standalone VAE file or a diffusers state dict."""
        model = load_autoencoder(sd, device=device, dtype=dtype, max_scores=max_scores)
        return cls(model, device, dtype, output_device, memory_budget, latent_scale_factor)

    # -- shape facts

    @property
    def downscale_ratio(self) -> int:
        return self.config.downscale_ratio

    @property
    def upscale_ratio(self) -> int:
        return self.config.downscale_ratio

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    def memory_used_encode(self, shape: tuple[int, ...]) -> int:
        """Estimated bytes to encode ONE image of pixel shape [.., C, H, W] (ComfyUI's SD VAE figure)."""
        pixels = shape[-2] * shape[-1]
        return int(_ENCODE_BYTES_PER_PIXEL * pixels * dtype_size(self.dtype) * self.config.ch / 128)

    def memory_used_decode(self, shape: tuple[int, ...]) -> int:
        """Estimated bytes to decode ONE latent of shape [.., E, h, w] (ComfyUI's SD VAE figure)."""
        pixels = shape[-2] * shape[-1] * self.upscale_ratio**2
        return int(_DECODE_BYTES_PER_PIXEL * pixels * dtype_size(self.dtype) * self.config.ch / 128)

    def _batch_size(self, per_item: int) -> int:
        budget = self.memory_budget if self.memory_budget is not None else free_memory(self.device)
        return max(1, int(budget // max(1, per_item)))

    # -- pixel layout

    def crop_pixels(self, pixels: Tensor) -> Tensor:
        """[B, H, W, C] -> [B, H', W', in]: drop extra channels, centre-crop H and W to multiples of r."""
        pixels = pixels[..., : self.config.in_channels]
        r = self.downscale_ratio
        for dim in (1, 2):
            size = pixels.shape[dim]
            keep = (size // r) * r
            if keep != size:
                pixels = pixels.narrow(dim, (size % r) // 2, keep)
        return pixels

    @staticmethod
    def process_input(pixels: Tensor) -> Tensor:
        return pixels * 2.0 - 1.0

    @staticmethod
    def process_output(images: Tensor) -> Tensor:
        return ((images + 1.0) / 2.0).clamp(0.0, 1.0)

    # -- raw model calls, split into memory-sized chunks

    def _encode_raw(self, pixels: Tensor) -> Tensor:
        """[B, C, H, W] in 0..1 (any device) -> latent mean [B, E, H/r, W/r], float32 on output_device."""
        step = self._batch_size(self.memory_used_encode(pixels.shape))
        chunks = []
        for start in range(0, pixels.shape[0], step):
            x = self.process_input(pixels[start : start + step].to(device=self.device, dtype=self.dtype))
            chunks.append(self.model.encode(x).to(device=self.output_device, dtype=torch.float32))
        return torch.cat(chunks)

    def _decode_raw(self, latent: Tensor) -> Tensor:
        """[B, E, h, w] -> unclamped images [B, out, h*r, w*r], float32 on output_device."""
        step = self._batch_size(self.memory_used_decode(latent.shape))
        chunks = []
        for start in range(0, latent.shape[0], step):
            z = latent[start : start + step].to(device=self.device, dtype=self.dtype)
            chunks.append(self.model.decode(z).to(device=self.output_device, dtype=torch.float32))
        return torch.cat(chunks)

    # -- public API

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """[B, H, W, C] in 0..1 -> latent [B, E, H/r, W/r] (float32, unscaled)."""
        pixels = self.crop_pixels(pixels).movedim(-1, 1)  # [B, C, H', W']
        try:
            return self._encode_raw(pixels)
        except Exception as exc:
            if not _is_out_of_memory(exc):
                raise
        torch.cuda.empty_cache()
        return self._encode_tiled(pixels, 512, 512, 64, None)

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        """[B, E, h, w] -> pixels [B, h*r, w*r, 3] in 0..1 (float32)."""
        try:
            return self.process_output(self._decode_raw(latent)).movedim(1, -1)
        except Exception as exc:
            if not _is_out_of_memory(exc):
                raise
        torch.cuda.empty_cache()
        # ComfyUI's fallback: decode_tiled with its defaults (64x64 latent tiles, overlap 16)
        return self.decode_tiled(latent, 64, 64, 16)

    @torch.no_grad()
    def encode_tiled(
        self,
        pixels: Tensor,
        tile_x: int = 512,
        tile_y: int = 512,
        overlap: int = 64,
        progress: Callable[[int, int], None] | None = None,
    ) -> Tensor:
        """Tiled ``encode``: tiles and overlap in pixels; average of three tilings (see ``_three_tilings``).

        ``progress(done, total)`` is called after each tile.
        """
        pixels = self.crop_pixels(pixels).movedim(-1, 1)
        return self._encode_tiled(pixels, tile_x, tile_y, overlap, progress)

    def _encode_tiled(
        self,
        pixels: Tensor,
        tile_x: int,
        tile_y: int,
        overlap: int,
        progress: Callable[[int, int], None] | None,
    ) -> Tensor:  # pixels: [B, C, H, W], already cropped
        tilings = _three_tilings(tile_x, tile_y)
        step = _progress_counter(progress, pixels.shape[2], pixels.shape[3], tilings, overlap)
        total = None
        for tile in tilings:
            part = tiled_scale(
                pixels,
                self._encode_raw,
                tile,
                overlap,
                scale=1.0 / self.downscale_ratio,
                out_channels=self.latent_channels,
                output_device=self.output_device,
                progress=step,
            )
            total = part if total is None else total + part
        return total / 3.0

    @torch.no_grad()
    def decode_tiled(
        self,
        latent: Tensor,
        tile_x: int = 64,
        tile_y: int = 64,
        overlap: int = 8,
        progress: Callable[[int, int], None] | None = None,
    ) -> Tensor:
        """Tiled ``decode``: tiles and overlap in latent pixels (ComfyUI's VAEDecodeTiled node passes
        tile_size // 8 and overlap // 8: 512 px / 64 px by default -> 64 / 8). Three tilings of the raw
        decoder output are averaged, then mapped to 0..1 and clamped, as ComfyUI does."""
        tilings = _three_tilings(tile_x, tile_y)
        step = _progress_counter(progress, latent.shape[2], latent.shape[3], tilings, overlap)
        total = None
        # ComfyUI sums (half-width, double-width, as given); the order only matters for rounding
        for tile in (tilings[2], tilings[1], tilings[0]):
            part = tiled_scale(
                latent,
                self._decode_raw,
                tile,
                overlap,
                scale=float(self.upscale_ratio),
                out_channels=self.config.out_channels,
                output_device=self.output_device,
                progress=step,
            )
            total = part if total is None else total + part
        return self.process_output(total / 3.0).movedim(1, -1)


def _progress_counter(
    progress: Callable[[int, int], None] | None,
    height: int,
    width: int,
    tilings: tuple[tuple[int, int], ...],
    overlap: int,
) -> Callable[[int], None] | None:
    """Turn a ``progress(done, total)`` callback into the per-tile ``step(1)`` that ``tiled_scale`` calls."""
    if progress is None:
        return None
    total = sum(count_tiles(height, width, tile, overlap) for tile in tilings)
    done = [0]

    def step(n: int) -> None:
        done[0] += n
        progress(done[0], total)

    return step
