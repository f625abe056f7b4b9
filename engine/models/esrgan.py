"""ESRGAN / Real-ESRGAN upscale models (RRDBNet), read from safetensors files in any of their layouts.

Kiln's module names are basicsr's (the Real-ESRGAN releases), so ``state_dict()`` gives those::

    conv_first                      3x3, in * f^2 -> nf   (f: pixel-unshuffle factor, 1, 2 or 4)
    body.{i}.rdb{1,2,3}.conv{1..5}  residual dense blocks: conv_k takes nf + (k-1)*gc -> gc (conv5 -> nf)
    conv_body                       3x3, nf -> nf, then added to conv_first's output
    conv_up{k}                      nearest x2 + 3x3 nf -> nf + leaky relu, one per x2 stage
    conv_hr, conv_last              3x3 nf -> nf + leaky relu, 3x3 nf -> out

Files come in three layouts, all mapped to these names on load (facts from spandrel's ESRGAN
architecture and basicsr's ``RRDBNet``; the code is Kiln's own):

- old ESRGAN (``model.0``, ``model.1.sub.{i}.RDB{r}.conv{c}.0``, ``model.1.sub.{nb}`` the trunk conv,
  upsample convs at ``model.3``, ``model.6``, ... then the HR conv at ``model.{3S+2}`` and the last
  conv at ``model.{3S+4}``, where S is the number of x2 stages);
- basicsr / Real-ESRGAN (``conv_first``, ``body.{i}.rdb{r}.conv{c}``, ``conv_body``, ``conv_up{k}``,
  ``conv_hr``, ``conv_last``);
- BSRGAN / RealSR (``RRDB_trunk``, ``trunk_conv``, ``upconv{k}``, ``HRconv``);

optionally under a ``params_ema.`` / ``params.`` (basicsr training) or ``module.`` (DataParallel)
prefix. Everything else is inferred from shapes: feature width (conv_first's outputs), growth channels
(conv1's outputs), number of blocks, in/out channels, and the scale: 2^S divided by the
pixel-unshuffle factor, which Real-ESRGAN x2 / x1 models use (conv_first takes 4x / 16x the output
channels: 12 or 48 for RGB) as spandrel detects it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.errors import ModelError
from engine.models.handles import WeightPatch, WeightsSource
from engine.models.safetensors_file import read_header

Layout = Literal["old", "new", "bsrgan"]
# Wrappers around the state dict seen in released files, most preferred first (basicsr keeps the EMA
# weights, the ones to use, next to the raw ones).
WRAPPER_PREFIXES = ("params_ema.", "params.", "module.")
LEAKY_SLOPE = 0.2
RESIDUAL_SCALE = 0.2
UNSHUFFLE_FACTORS = (1, 2, 4)

# ------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class ESRGANConfig:
    """An RRDBNet's hyperparameters. ``in_channels`` counts image channels (before pixel-unshuffle)."""

    in_channels: int = 3
    out_channels: int = 3
    num_features: int = 64
    num_blocks: int = 23
    growth_channels: int = 32
    upsample_stages: int = 2  # x2 nearest + conv stages
    unshuffle: int = 1  # pixel-unshuffle factor of the input (Real-ESRGAN x2: 2, x1: 4)

    def __post_init__(self) -> None:
        if self.unshuffle not in UNSHUFFLE_FACTORS:
            raise ModelError(f"pixel-unshuffle factor {self.unshuffle} is not one of {UNSHUFFLE_FACTORS}")
        if 2**self.upsample_stages < self.unshuffle:
            raise ModelError(
                f"{self.upsample_stages} x2 stages after a pixel-unshuffle by {self.unshuffle} would shrink "
                "the image"
            )
        if min(self.in_channels, self.out_channels, self.num_features, self.num_blocks) < 1:
            raise ModelError(f"invalid ESRGAN config {self}")

    @property
    def scale(self) -> int:
        """Output side / input side."""
        return 2**self.upsample_stages // self.unshuffle

    @classmethod
    def realesrgan_x4plus(cls) -> ESRGANConfig:
        """RealESRGAN_x4plus / ESRGAN 4x: 64 features, 23 blocks, growth 32."""
        return cls()

    @classmethod
    def for_scale(
        cls, scale: int, num_features: int = 64, num_blocks: int = 23, growth_channels: int = 32
    ) -> ESRGANConfig:
        """An RGB model of ``scale`` 1, 2 or 4 (two x2 stages; 1 and 2 pixel-unshuffle the input by 4
        and 2, as Real-ESRGAN x1 / x2) or 8 (three stages)."""
        stages = {1: 2, 2: 2, 4: 2, 8: 3}.get(scale)
        if stages is None:
            raise ModelError(f"unsupported scale {scale}; expected 1, 2, 4 or 8")
        unshuffle = {1: 4, 2: 2}.get(scale, 1)
        return cls(3, 3, num_features, num_blocks, growth_channels, stages, unshuffle)

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]]) -> ESRGANConfig:
        """The config of a state dict in Kiln's names (see ``canonical_names``), from shapes alone."""

        def shape(name: str) -> tuple[int, ...]:
            found = shapes.get(name)
            if found is None:
                raise ModelError(f"ESRGAN state dict has no {name}")
            return tuple(found)

        first = shape("conv_first.weight")
        if len(first) != 4 or first[2:] != (3, 3):
            raise ModelError(f"conv_first.weight has shape {first}, expected a 3x3 conv")
        num_features, raw_in = first[0], first[1]
        out_channels = shape("conv_last.weight")[0]
        growth = shape("body.0.rdb1.conv1.weight")[0]
        blocks = {int(m.group(1)) for name in shapes if (m := re.match(r"body\.(\d+)\.", name))}
        ups = sorted(int(m.group(1)) for name in shapes if (m := re.fullmatch(r"conv_up(\d+)\.weight", name)))
        if blocks != set(range(len(blocks))):
            raise ModelError(f"ESRGAN blocks are not numbered 0..n-1: {sorted(blocks)[:8]}")
        if ups != list(range(1, len(ups) + 1)):
            raise ModelError(f"ESRGAN upsample convs are not numbered 1..n: {ups}")
        # Real-ESRGAN x2 / x1 pixel-unshuffle the input by 2 / 4 (spandrel's detection rule).
        unshuffle = 1
        for factor in (2, 4):
            if raw_in == out_channels * factor * factor:
                unshuffle = factor
        return cls(
            in_channels=raw_in // (unshuffle * unshuffle),
            out_channels=out_channels,
            num_features=num_features,
            num_blocks=len(blocks),
            growth_channels=growth,
            upsample_stages=len(ups),
            unshuffle=unshuffle,
        )


# ------------------------------------------------------------------------------------------ layouts

_RDB = {
    "old": re.compile(r"model\.1\.sub\.(\d+)\.RDB([123])\.conv([1-5])\.0\.(weight|bias)"),
    "new": re.compile(r"body\.(\d+)\.rdb([123])\.conv([1-5])\.(weight|bias)"),
    "bsrgan": re.compile(r"RRDB_trunk\.(\d+)\.RDB([123])\.conv([1-5])\.(weight|bias)"),
}
# Non-block names of the new and BSRGAN layouts (upsample convs are handled by pattern).
_NAMED = {
    "new": {
        "conv_first": "conv_first",
        "conv_body": "conv_body",
        "conv_hr": "conv_hr",
        "conv_last": "conv_last",
    },
    "bsrgan": {
        "conv_first": "conv_first",
        "trunk_conv": "conv_body",
        "HRconv": "conv_hr",
        "conv_last": "conv_last",
    },
}
_UP = {"new": re.compile(r"conv_up(\d+)"), "bsrgan": re.compile(r"upconv(\d+)")}


def detect_layout(names: Iterable[str]) -> Layout:
    """Which RRDBNet layout these (unprefixed) tensor names use; ModelError for anything else."""
    names = set(names)
    if any(".conv1x1." in name for name in names):
        raise ModelError("ESRGAN+ models (RRDB blocks with conv1x1) are not supported yet")
    if {"model.0.weight", "model.1.sub.0.RDB1.conv1.0.weight"} <= names:
        return "old"
    if {"conv_first.weight", "body.0.rdb1.conv1.weight", "conv_body.weight", "conv_last.weight"} <= names:
        return "new"
    if {"conv_first.weight", "RRDB_trunk.0.RDB1.conv1.weight", "trunk_conv.weight"} <= names:
        return "bsrgan"
    sample = ", ".join(sorted(names)[:4])
    raise ModelError(
        "not an ESRGAN / Real-ESRGAN (RRDBNet) model, the only upscale architecture Kiln supports so far "
        f"(tensors: {sample}, ...)"
    )


def canonical_names(names: Iterable[str]) -> dict[str, str]:
    """File tensor name (unprefixed) -> Kiln name, for any of the three layouts."""
    names = list(names)
    layout = detect_layout(names)
    out: dict[str, str] = {}
    rest: list[str] = []
    for name in names:
        if m := _RDB[layout].fullmatch(name):
            block, rdb, conv, kind = m.groups()
            out[name] = f"body.{block}.rdb{rdb}.conv{conv}.{kind}"
        else:
            rest.append(name)
    if layout == "old":
        out.update(_old_top_level(rest, out))
        return out
    unknown = []
    for name in rest:
        owner, _, kind = name.rpartition(".")
        if owner in _NAMED[layout]:
            out[name] = f"{_NAMED[layout][owner]}.{kind}"
        elif m := _UP[layout].fullmatch(owner):
            out[name] = f"conv_up{int(m.group(1))}.{kind}"
        else:
            unknown.append(name)
    if unknown:
        raise ModelError(f"unexpected tensors in an ESRGAN file: {', '.join(sorted(unknown)[:5])}")
    return out


def _old_top_level(names: list[str], blocks: Mapping[str, str]) -> dict[str, str]:
    """Old layout: model.0 conv_first, model.1.sub.{nb} conv_body, model.{3k} conv_up{k},
    model.{3S+2} conv_hr, model.{3S+4} conv_last."""
    num_blocks = len({kiln.split(".")[1] for kiln in blocks.values()})
    indices: dict[str, tuple[int, str]] = {}
    unknown = []
    for name in names:
        if m := re.fullmatch(r"model\.(\d+)\.(weight|bias)", name):
            indices[name] = (int(m.group(1)), m.group(2))
        elif m := re.fullmatch(rf"model\.1\.sub\.{num_blocks}\.(weight|bias)", name):
            indices[name] = (-1, m.group(1))
        else:
            unknown.append(name)
    if unknown:
        raise ModelError(f"unexpected tensors in an ESRGAN file: {', '.join(sorted(unknown)[:5])}")
    layers = sorted({index for index, _ in indices.values() if index > 1})
    stages = len(layers) - 2
    expected = [3 * k for k in range(1, stages + 1)] + [3 * stages + 2, 3 * stages + 4]
    if stages < 0 or layers != expected:
        raise ModelError(
            f"ESRGAN layers model.{layers} do not follow the upconv layout (expected model.{expected}); "
            "pixel-shuffle and x3 ESRGAN variants are not supported yet"
        )
    role = {0: "conv_first", -1: "conv_body", 3 * stages + 2: "conv_hr", 3 * stages + 4: "conv_last"}
    role.update({3 * k: f"conv_up{k}" for k in range(1, stages + 1)})
    return {name: f"{role[index]}.{kind}" for name, (index, kind) in indices.items()}


def to_file_layout(sd: Mapping[str, Tensor], config: ESRGANConfig, layout: Layout) -> dict[str, Tensor]:
    """A state dict in Kiln's names written in ``layout`` (for test files)."""
    if layout == "new":
        return dict(sd)
    stages = config.upsample_stages
    out = {}
    for name, tensor in sd.items():
        owner, _, kind = name.rpartition(".")
        if m := re.fullmatch(r"body\.(\d+)\.rdb(\d)\.conv(\d)", owner):
            block, rdb, conv = m.groups()
            if layout == "old":
                out[f"model.1.sub.{block}.RDB{rdb}.conv{conv}.0.{kind}"] = tensor
            else:
                out[f"RRDB_trunk.{block}.RDB{rdb}.conv{conv}.{kind}"] = tensor
            continue
        if m := re.fullmatch(r"conv_up(\d+)", owner):
            k = int(m.group(1))
            out[f"model.{3 * k}.{kind}" if layout == "old" else f"upconv{k}.{kind}"] = tensor
            continue
        if layout == "old":
            index = {"conv_first": "0", "conv_body": f"1.sub.{config.num_blocks}"}.get(owner)
            index = index or {"conv_hr": str(3 * stages + 2), "conv_last": str(3 * stages + 4)}[owner]
            out[f"model.{index}.{kind}"] = tensor
        else:
            renamed = {"conv_body": "trunk_conv", "conv_hr": "HRconv"}.get(owner, owner)
            out[f"{renamed}.{kind}"] = tensor
    return out


# ------------------------------------------------------------------------------------------ network


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, 1, 1)


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs, each seeing the input and every earlier output; residual scaled by 0.2."""

    def __init__(self, features: int, growth: int) -> None:
        super().__init__()
        self.conv1 = _conv(features, growth)
        self.conv2 = _conv(features + growth, growth)
        self.conv3 = _conv(features + 2 * growth, growth)
        self.conv4 = _conv(features + 3 * growth, growth)
        self.conv5 = _conv(features + 4 * growth, features)

    def forward(self, x: Tensor) -> Tensor:  # [B, nf, H, W] -> [B, nf, H, W]
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), LEAKY_SLOPE, inplace=True))
        return self.conv5(torch.cat(feats, 1)) * RESIDUAL_SCALE + x


class RRDB(nn.Module):
    """Three dense blocks in a row, residual scaled by 0.2."""

    def __init__(self, features: int, growth: int) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(features, growth)
        self.rdb2 = ResidualDenseBlock(features, growth)
        self.rdb3 = ResidualDenseBlock(features, growth)

    def forward(self, x: Tensor) -> Tensor:  # [B, nf, H, W] -> [B, nf, H, W]
        return self.rdb3(self.rdb2(self.rdb1(x))) * RESIDUAL_SCALE + x


class RRDBNet(nn.Module):
    """ESRGAN's generator: ``forward`` maps [B, in, H, W] to [B, out, H*scale, W*scale] (any H, W)."""

    def __init__(self, config: ESRGANConfig) -> None:
        super().__init__()
        self.config = config
        nf, factor = config.num_features, config.unshuffle
        self.conv_first = _conv(config.in_channels * factor * factor, nf)
        self.body = nn.Sequential(*(RRDB(nf, config.growth_channels) for _ in range(config.num_blocks)))
        self.conv_body = _conv(nf, nf)
        for k in range(1, config.upsample_stages + 1):
            self.add_module(f"conv_up{k}", _conv(nf, nf))
        self.conv_hr = _conv(nf, nf)
        self.conv_last = _conv(nf, config.out_channels)

    @property
    def scale(self) -> int:
        return self.config.scale

    @property
    def device(self) -> torch.device:
        return self.conv_first.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_first.weight.dtype

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        x = x.to(self.dtype)
        factor = self.config.unshuffle
        if factor > 1:
            # Pad right/bottom to a multiple of the factor (reflect, as spandrel), crop the result.
            pad_h, pad_w = -height % factor, -width % factor
            if pad_h or pad_w:
                mode = "reflect" if pad_h < height and pad_w < width else "replicate"
                x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
            x = F.pixel_unshuffle(x, factor)  # [B, in*f^2, H/f, W/f]
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for k in range(1, self.config.upsample_stages + 1):
            up = getattr(self, f"conv_up{k}")
            feat = F.leaky_relu(up(F.interpolate(feat, scale_factor=2, mode="nearest")), LEAKY_SLOPE)
        out = self.conv_last(F.leaky_relu(self.conv_hr(feat), LEAKY_SLOPE))
        if factor > 1:
            out = out[:, :, : height * self.scale, : width * self.scale]
        return out


# ------------------------------------------------------------------------------------------ files


def find_prefix(names: Iterable[str]) -> str:
    """The wrapper prefix of a file's tensors (``params_ema.`` first), or ``""``."""
    names = list(names)
    return next((p for p in WRAPPER_PREFIXES if any(n.startswith(p) for n in names)), "")


@dataclass(frozen=True)
class UpscaleFileInfo:
    """What an upscale model file holds: the key prefix of its weights, their layout, the config."""

    prefix: str
    layout: Layout
    config: ESRGANConfig


def inspect_upscale_file(path: str | os.PathLike[str]) -> UpscaleFileInfo:
    """Read an upscale model's header (pickles refused) and infer its layout and config."""
    header = read_header(path)
    prefix = find_prefix(header.tensors)
    shapes = {n[len(prefix) :]: tuple(i.shape) for n, i in header.tensors.items() if n.startswith(prefix)}
    try:
        layout = detect_layout(shapes)
        names = canonical_names(shapes)
        config = ESRGANConfig.from_shapes({names[n]: s for n, s in shapes.items()})
    except ModelError as exc:
        raise ModelError(f"{Path(path).name} is not an upscale model Kiln can load: {exc}") from None
    return UpscaleFileInfo(prefix, layout, config)


def load_esrgan(
    sd: Mapping[str, Tensor],
    config: ESRGANConfig,
    *,
    prefix: str = "",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> RRDBNet:
    """An ``RRDBNet`` from a file's tensors (any layout, names under ``prefix``), without random init:
    built on ``meta`` and given the tensors with ``load_state_dict(assign=True)``."""
    sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    names = canonical_names(sd)
    with torch.device("meta"):
        model = RRDBNet(config)
    expected = model.state_dict()
    tensors = {names[k]: v for k, v in sd.items()}
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ModelError(
            f"ESRGAN state dict does not match its config: {len(missing)} missing (first {missing[:5]}), "
            f"{len(unexpected)} unexpected (first {unexpected[:5]})"
        )
    for name, ref in expected.items():
        if tensors[name].shape != ref.shape:
            raise ModelError(
                f"ESRGAN tensor {name} has shape {tuple(tensors[name].shape)}, expected {tuple(ref.shape)}"
            )
        tensors[name] = tensors[name].to(device=device, dtype=dtype)
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def random_state_dict(
    config: ESRGANConfig, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """Deterministic random weights in Kiln's (basicsr) names: conv weights ~ N(0, 1/fan_in), biases
    ~ N(0, 0.02^2). Each RRDB scales its input by about 1.2 with such weights, so a full-size (23
    block) random model gives large values, which the node clamps; tiny ones stay O(0.1)."""
    with torch.device("meta"):
        model = RRDBNet(config)
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, ref in model.state_dict().items():
        if name.endswith(".weight"):
            tensor = torch.randn(ref.shape, generator=generator) / math.sqrt(math.prod(ref.shape[1:]))
        else:
            tensor = torch.randn(ref.shape, generator=generator) * 0.02
        out[name] = tensor.to(dtype)
    return out


# ------------------------------------------------------------------------------------------ handle


@dataclass(frozen=True, eq=False)
class UpscaleModelHandle:
    """UPSCALE_MODEL: an RRDBNet's weights (by source) and its config. ``manager.use(handle)`` yields
    the ``RRDBNet`` on the engine's device (fp32). Upscale models take no weight patches."""

    source: WeightsSource
    config: ESRGANConfig

    kind = "UPSCALE_MODEL"
    patches: tuple[WeightPatch, ...] = ()
    patch_signature = ""

    @property
    def scale(self) -> int:
        return self.config.scale

    @functools.cached_property
    def cache_key(self) -> str:
        text = json.dumps([self.kind, self.source.key, dataclasses.asdict(self.config)], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def __repr__(self) -> str:
        return f"UpscaleModelHandle({self.source.file_name}, x{self.scale})"
