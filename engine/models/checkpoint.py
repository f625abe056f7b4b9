"""Single-file Stable Diffusion checkpoints: what is in the file, read from its header.

An LDM single-file checkpoint (``v1-5-pruned-emaonly.safetensors``, ``v2-1_768-ema-pruned``) holds
three models and some training state under fixed prefixes::

    model.diffusion_model.*                  the UNet                       -> ModelHandle
    first_stage_model.*                      the KL VAE                     -> VAEHandle
    cond_stage_model.transformer.*           SD1.x: OpenAI CLIP-L (transformers layout) -> ClipHandle
    cond_stage_model.model.*                 SD2.x: OpenCLIP-H                          -> ClipHandle
    alphas_cumprod, betas, ... (12)          DDPM buffers of the training schedule
    model_ema.*                              EMA state (ignored: emaonly files hold the EMA weights
                                             in model.diffusion_model.*, full ones also a copy here)

Everything here works from the safetensors header (``engine.models.safetensors_file``: the only way
Kiln opens model files, which refuses pickles): the architecture is recognised from key names,
every config is inferred from tensor shapes by the models' own ``from_state_dict`` functions (fed
meta tensors, so nothing is read), and only a few small tensors are read (the DDPM schedule, one
norm bias for SD2's v-prediction test). Loading the weights is the model manager's job.

Facts from ComfyUI's ``comfy/model_detection.py`` and ``comfy/supported_models.py``:

- SD2 v-prediction (class ``SD20.model_type``): a 4-channel SD2 UNet is v-prediction when the
  population standard deviation of ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` is above
  0.09 (a v-trained 768 model's last norm has large biases; the 512 base model's do not). Kiln
  reads the same tensor; for scaled-down files in the same layout it reads the last output block's
  first transformer (which is ``output_blocks.11`` in a real SD2 UNet). A ``v_pred`` key in the file
  (how SDXL-era tools mark v-prediction files) also means v-prediction.
- SD2 attention runs in float32 (``attn_precision``), so SD2 UNets get ``upcast_attention``.
- ComfyUI computes the sigma table from SD's beta schedule and ignores the file's DDPM buffers.
  Kiln uses the buffers when present but, when they match SD's schedule to the precision they were
  stored in, takes the schedule computed in float64 (so the table is exactly ComfyUI's); a file
  whose ``alphas_cumprod`` (or ``betas``) differ gets its own table.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import torch
from torch import Tensor

from engine.errors import ModelError
from engine.models.clip_text import CLIPTextConfig, Layout, detect_layout
from engine.models.safetensors_file import SafetensorsHeader, load_tensors, read_header
from engine.models.unet import UNetConfig
from engine.models.vae import VAEConfig, prepare_vae_state_dict
from engine.sampling.model_sampling import (
    SD_BETA_SCHEDULE,
    SD_LINEAR_END,
    SD_LINEAR_START,
    SD_TIMESTEPS,
    ModelSampling,
    Parameterization,
    make_beta_schedule,
)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_CLIP_PREFIX = "cond_stage_model.model."
SDXL_PREFIX = "conditioner.embedders."
EMA_PREFIX = "model_ema."
V_PRED_KEY = "v_pred"

# The LDM DDPM buffers (ldm/models/diffusion/ddpm.py register_schedule), in the order it registers them.
DDPM_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
EMA_COUNTERS = ("model_ema.decay", "model_ema.num_updates")

# ComfyUI's threshold on the std of the last output block's norm1 bias (SD20.model_type).
V_PREDICTION_STD_THRESHOLD = 0.09

_META_DTYPES: Mapping[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class Architecture(StrEnum):
    """The model families Kiln runs."""

    SD1 = "sd1"
    SD2 = "sd2"


@dataclass(frozen=True)
class CheckpointInfo:
    """What a single-file checkpoint holds, inferred from its header (see the module docstring)."""

    path: Path
    architecture: Architecture
    unet_config: UNetConfig
    model_sampling: ModelSampling
    vae_config: VAEConfig | None
    clip_config: CLIPTextConfig | None
    clip_layout: Layout | None
    weights_dtype: str  # safetensors dtype of the UNet's weights: "F32", "F16", "BF16"
    parts: Mapping[str, str] = field(default_factory=dict)  # part -> key prefix in the file
    ignored: tuple[str, ...] = ()  # keys no part uses (EMA state, DDPM buffers, unknown extras)

    @property
    def parameterization(self) -> Parameterization:
        return self.model_sampling.parameterization


# ---------------------------------------------------------------------------------------- helpers


def meta_state_dict(header: SafetensorsHeader, prefix: str = "", strip: bool = False) -> dict[str, Tensor]:
    """The header's tensors under ``prefix`` as meta tensors (shapes and dtypes, no data)."""
    out: dict[str, Tensor] = {}
    for name, info in header.tensors.items():
        if not name.startswith(prefix):
            continue
        dtype = _META_DTYPES.get(info.dtype, torch.float32)
        out[name[len(prefix) :] if strip else name] = torch.empty(info.shape, dtype=dtype, device="meta")
    return out


def shape_state_dict(header: SafetensorsHeader, prefix: str = "") -> dict[str, Tensor]:
    """The header's tensors under ``prefix`` (names kept) as zero-stride CPU tensors of the right shape
    and dtype: no memory, no data read, and unlike meta tensors they take ``torch.cat`` without
    pulling in torch's compiler stack (seconds on first use)."""
    out: dict[str, Tensor] = {}
    for name, info in header.tensors.items():
        if name.startswith(prefix):
            dtype = _META_DTYPES.get(info.dtype, torch.float32)
            out[name] = torch.zeros((), dtype=dtype).expand(info.shape)
    return out


def _has_prefix(header: SafetensorsHeader, prefix: str) -> bool:
    return any(name.startswith(prefix) for name in header.tensors)


def _unet_config(meta: Mapping[str, Tensor], where: str, *, upcast: bool) -> UNetConfig:
    try:
        config = UNetConfig.from_state_dict(meta, upcast_attention=upcast)
    except ModelError as exc:
        raise ModelError(f"{where}: {exc}") from None
    if config.adm_in_channels is not None:
        raise ModelError(
            f"{where}: the UNet has a label embedding (adm_in_channels={config.adm_in_channels}): SDXL or "
            "SD2 unCLIP, which Kiln does not support yet; it runs SD1.x and SD2.x models"
        )
    return config


def standard_alphas_cumprod() -> Tensor:
    """SD's training schedule (linear-in-sqrt betas 0.00085..0.012, 1000 steps), float64."""
    betas = make_beta_schedule(SD_BETA_SCHEDULE, SD_TIMESTEPS, SD_LINEAR_START, SD_LINEAR_END)
    return torch.cumprod(1.0 - betas, dim=0)


def model_sampling_from_file(header: SafetensorsHeader, parameterization: Parameterization) -> ModelSampling:
    """The sigma table: the file's ``alphas_cumprod`` (or ``betas``) when they differ from SD's
    schedule beyond their storage precision, else SD's schedule computed in float64 (ComfyUI's)."""
    standard = ModelSampling.from_beta_schedule(parameterization=parameterization)
    for name in ("alphas_cumprod", "betas"):
        info = header.tensors.get(name)
        if info is None:
            continue
        stored = load_tensors(header.path, keys=[name])[name]
        if not stored.is_floating_point() or stored.dim() != 1 or stored.numel() < 2:
            raise ModelError(f"{header.path}: {name} is not a 1-D float schedule ({info.dtype} {info.shape})")
        values = stored.to(torch.float64)
        acp = values if name == "alphas_cumprod" else torch.cumprod(1.0 - values, dim=0)
        if not bool(torch.isfinite(acp).all()) or not bool(((acp > 0) & (acp < 1)).all()):
            raise ModelError(f"{header.path}: {name} is not a diffusion schedule (values out of range)")
        reference = standard_alphas_cumprod()
        # Rounding to the stored dtype moves alphas_cumprod by < 1 ulp (a cumulated product of
        # rounded betas by less): 4 ulps tell a rounded copy of SD's schedule from another schedule.
        rtol = max(1e-6, 4 * torch.finfo(stored.dtype).eps)
        if acp.shape == reference.shape and bool(torch.allclose(acp, reference, rtol=rtol, atol=0.0)):
            return standard
        return ModelSampling.from_alphas_cumprod(acp, parameterization)
    return standard


def detect_v_prediction(
    header: SafetensorsHeader, unet_prefix: str, config: UNetConfig, architecture: Architecture
) -> bool:
    """ComfyUI's SD2 rule (see the module docstring), plus a ``v_pred`` marker key for any family."""
    if V_PRED_KEY in header.tensors:
        return True
    if architecture is not Architecture.SD2 or config.in_channels != 4:
        return False
    last = len(config.transformer_depth_output) - 1
    key = f"{unet_prefix}output_blocks.{last}.1.transformer_blocks.0.norm1.bias"
    if key not in header.tensors:
        return False
    bias = load_tensors(header.path, keys=[key])[key].to(torch.float64)
    return float(torch.std(bias, unbiased=False)) > V_PREDICTION_STD_THRESHOLD


# -------------------------------------------------------------------------------------- checkpoints


def inspect_checkpoint(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Recognise an SD1.x / SD2.x single-file checkpoint and infer every config from its header.

    Raises ModelError for a pickled or corrupt file, an SDXL (or other sgm-format) checkpoint, a file
    without an LDM UNet, or parts that do not fit together.
    """
    header = read_header(path)
    where = str(header.path)
    if _has_prefix(header, SDXL_PREFIX):
        raise ModelError(
            f"{where} is an SDXL checkpoint (it has {SDXL_PREFIX}* keys): SDXL is not supported yet; "
            "Kiln runs SD1.x and SD2.x checkpoints"
        )
    if f"{UNET_PREFIX}input_blocks.0.0.weight" not in header.tensors:
        raise ModelError(
            f"{where} is not a Stable Diffusion 1.x/2.x checkpoint: it has no {UNET_PREFIX}* UNet "
            "(a standalone UNet, VAE or text encoder file goes through UNETLoader, VAELoader or CLIPLoader)"
        )

    if _has_prefix(header, SD1_CLIP_PREFIX):
        architecture = Architecture.SD1
    elif _has_prefix(header, SD2_CLIP_PREFIX):
        architecture = Architecture.SD2
    else:
        # No text encoder (some UNet+VAE exports): the UNet's projections tell the family.
        architecture = None

    unet_meta = meta_state_dict(header, UNET_PREFIX, strip=True)
    if architecture is None:
        probe = UNetConfig.from_state_dict(unet_meta)
        architecture = Architecture.SD2 if probe.use_linear_in_transformer else Architecture.SD1
    unet_config = _unet_config(unet_meta, where, upcast=architecture is Architecture.SD2)

    clip_config: CLIPTextConfig | None = None
    clip_layout: Layout | None = None
    parts = {"unet": UNET_PREFIX}
    if _has_prefix(header, CLIP_PREFIX):
        clip_meta = shape_state_dict(header, CLIP_PREFIX)
        try:
            clip_layout, _ = detect_layout(clip_meta, CLIP_PREFIX)
            clip_config = CLIPTextConfig.from_state_dict(clip_meta, CLIP_PREFIX)
        except ModelError as exc:
            raise ModelError(f"{where}: the text encoder under {CLIP_PREFIX} is not usable: {exc}") from None
        expected = "sd1" if architecture is Architecture.SD1 else "sd2"
        if clip_layout != expected:
            raise ModelError(f"{where}: text encoder layout {clip_layout} under {CLIP_PREFIX} is unexpected")
        if unet_config.context_dim is not None and clip_config.width != unet_config.context_dim:
            raise ModelError(
                f"{where}: the text encoder is {clip_config.width} wide but the UNet's cross-attention "
                f"expects {unet_config.context_dim}"
            )
        parts["clip"] = CLIP_PREFIX

    vae_config: VAEConfig | None = None
    if _has_prefix(header, VAE_PREFIX):
        try:
            vae_meta = prepare_vae_state_dict(meta_state_dict(header, VAE_PREFIX))
            vae_config = VAEConfig.from_state_dict(vae_meta)
        except ModelError as exc:
            raise ModelError(f"{where}: the VAE under {VAE_PREFIX} is not usable: {exc}") from None
        parts["vae"] = VAE_PREFIX

    v_pred = detect_v_prediction(header, UNET_PREFIX, unet_config, architecture)
    parameterization = Parameterization.V_PREDICTION if v_pred else Parameterization.EPS
    model_sampling = model_sampling_from_file(header, parameterization)

    used = tuple(parts.values())
    ignored = tuple(sorted(name for name in header.tensors if not name.startswith(used)))
    return CheckpointInfo(
        path=header.path,
        architecture=architecture,
        unet_config=unet_config,
        model_sampling=model_sampling,
        vae_config=vae_config,
        clip_config=clip_config,
        clip_layout=clip_layout,
        weights_dtype=header.tensors[f"{UNET_PREFIX}input_blocks.0.0.weight"].dtype,
        parts=parts,
        ignored=ignored,
    )


def split_state_dict(sd: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """A loaded checkpoint dict by part: ``unet`` / ``vae`` (prefixes stripped), ``clip`` (keys kept
    under ``cond_stage_model.``, the layout ``load_text_encoder`` reads), ``buffers`` (the DDPM
    schedule), ``ignored`` (EMA state and anything else). Tensors are not copied."""
    out: dict[str, dict[str, Tensor]] = {"unet": {}, "vae": {}, "clip": {}, "buffers": {}, "ignored": {}}
    for key, value in sd.items():
        if key.startswith(UNET_PREFIX):
            out["unet"][key[len(UNET_PREFIX) :]] = value
        elif key.startswith(VAE_PREFIX):
            out["vae"][key[len(VAE_PREFIX) :]] = value
        elif key.startswith(CLIP_PREFIX):
            out["clip"][key] = value
        elif key in DDPM_BUFFERS:
            out["buffers"][key] = value
        else:
            out["ignored"][key] = value
    return out


# ---------------------------------------------------------------------------------- standalone files


@dataclass(frozen=True)
class UNetFileInfo:
    path: Path
    prefix: str
    architecture: Architecture
    config: UNetConfig
    model_sampling: ModelSampling
    weights_dtype: str


def inspect_unet_file(path: str | os.PathLike[str]) -> UNetFileInfo:
    """A diffusion-model file for UNETLoader: an LDM UNet with bare keys or under
    ``model.diffusion_model.`` (a full checkpoint works too). SD2 is recognised by its linear
    transformer projections; v-prediction and the schedule as for checkpoints."""
    header = read_header(path)
    where = str(header.path)
    if f"{UNET_PREFIX}input_blocks.0.0.weight" in header.tensors:
        prefix = UNET_PREFIX
    elif "input_blocks.0.0.weight" in header.tensors:
        prefix = ""
    elif "conv_in.weight" in header.tensors and _has_prefix(header, "down_blocks."):
        raise ModelError(
            f"{where} is a diffusers-format UNet; Kiln loads the single-file (LDM) layout "
            "(input_blocks.*, middle_block.*, output_blocks.*)"
        )
    else:
        raise ModelError(f"{where} is not an SD1.x/SD2.x UNet (no input_blocks.0.0.weight)")
    meta = meta_state_dict(header, prefix, strip=True)
    if any(key.startswith("label_emb.") for key in meta):
        _unet_config(meta, where, upcast=False)  # raises the SDXL / unCLIP error
    probe = UNetConfig.from_state_dict(meta)
    architecture = Architecture.SD2 if probe.use_linear_in_transformer else Architecture.SD1
    config = _unet_config(meta, where, upcast=architecture is Architecture.SD2)
    v_pred = detect_v_prediction(header, prefix, config, architecture)
    parameterization = Parameterization.V_PREDICTION if v_pred else Parameterization.EPS
    return UNetFileInfo(
        path=header.path,
        prefix=prefix,
        architecture=architecture,
        config=config,
        model_sampling=model_sampling_from_file(header, parameterization),
        weights_dtype=header.tensors[f"{prefix}input_blocks.0.0.weight"].dtype,
    )


def inspect_vae_file(path: str | os.PathLike[str]) -> tuple[Path, VAEConfig]:
    """A VAE file for VAELoader: bare LDM keys, a checkpoint's ``first_stage_model.`` / ``vae.``,
    or a diffusers ``AutoencoderKL``. Returns (path, config)."""
    header = read_header(path)
    try:
        config = VAEConfig.from_state_dict(prepare_vae_state_dict(meta_state_dict(header)))
    except ModelError as exc:
        raise ModelError(f"{header.path} is not a KL VAE Kiln can load: {exc}") from None
    return header.path, config


TEXT_ENCODER_PREFIXES = ("", CLIP_PREFIX, "clip_l.", "clip_h.")


def inspect_text_encoder_file(path: str | os.PathLike[str]) -> tuple[Path, str, CLIPTextConfig, Layout]:
    """A text-encoder file for CLIPLoader: a transformers ``CLIPTextModel`` (``text_model.*``), an
    OpenCLIP text tower, or either under ``cond_stage_model.`` / ``clip_l.`` / ``clip_h.`` (a full
    checkpoint works too). Returns (path, prefix, config, layout)."""
    header = read_header(path)
    meta = shape_state_dict(header)
    for prefix in TEXT_ENCODER_PREFIXES:
        try:
            layout, _ = detect_layout(meta, prefix)
        except ModelError:
            continue
        try:
            config = CLIPTextConfig.from_state_dict(meta, prefix)
        except ModelError as exc:
            raise ModelError(f"{header.path}: the text encoder is not usable: {exc}") from None
        return header.path, prefix, config, layout
    raise ModelError(
        f"{header.path} is not a CLIP text encoder Kiln can load (SD1.x CLIP-L or SD2.x OpenCLIP-H, "
        "transformers or OpenCLIP layout)"
    )


def tensor_bytes(header: SafetensorsHeader, prefix: str = "") -> int:
    """Bytes the file spends on tensors under ``prefix``."""
    return sum(end - start for name, (start, end) in header.offsets.items() if name.startswith(prefix))


def count_params(header: SafetensorsHeader, prefix: str = "") -> int:
    return sum(math.prod(info.shape) for name, info in header.tensors.items() if name.startswith(prefix))
