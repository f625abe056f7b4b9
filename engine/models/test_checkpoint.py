"""Deterministic random-weight checkpoints in the real single-file layout (``kiln make-test-checkpoint``).

For tests, demos and benchmarks on machines without real weights. A file holds what an LDM
single-file checkpoint holds (see ``engine.models.checkpoint``): the UNet under
``model.diffusion_model.``, the VAE under ``first_stage_model.``, the text encoder under
``cond_stage_model.`` (SD1: transformers CLIP-L layout with int64 ``position_ids``; SD2: OpenCLIP
layout with ``text_projection`` and ``logit_scale``), the twelve DDPM buffers of SD's schedule and
the ``model_ema.decay`` / ``model_ema.num_updates`` counters.

- ``size="full"``: exactly the real tensor names and shapes (``v1-5-pruned-emaonly`` for sd15:
  1145 tensors; ``v2-1_768-ema-pruned`` for sd21);
- ``size="tiny"``: the same layout scaled down (UNet 32 channels, two levels; VAE 32/64 channels;
  text encoder 128 wide, 3 layers, the full 49408-token vocabulary), a few MB, loads in
  milliseconds. Every config is inferred back from the shapes by the loader.

Weights come from each model's ``random_state_dict`` with seeds derived from ``seed``, so the same
arguments give the same bytes. ``prediction="v"`` makes the file read as v-prediction the way real
files do: for sd21 the last output block's first transformer gets large norm1 biases (ComfyUI's
test, see ``engine.models.checkpoint``), for sd15 a ``v_pred`` marker key is added. Floating
weights are stored in ``dtype``; the DDPM buffers and EMA counters stay float32 / int32 as in the
real files, ``position_ids`` int64 (``float_position_ids`` stores them as float32, as some files do).

``write_test_esrgan`` writes an ESRGAN / Real-ESRGAN upscale model the same way, in any of the
layouts ``engine.models.esrgan`` reads; ``write_test_lora`` a kohya-format LoRA for a checkpoint.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from engine.errors import ModelError
from engine.models import clip_text, esrgan, unet, vae
from engine.models.checkpoint import CLIP_PREFIX, UNET_PREFIX, V_PRED_KEY, VAE_PREFIX
from engine.models.clip_text import CLIPTextConfig
from engine.models.unet import UNetConfig
from engine.models.vae import VAEConfig
from engine.sampling.model_sampling import (
    SD_BETA_SCHEDULE,
    SD_LINEAR_END,
    SD_LINEAR_START,
    SD_TIMESTEPS,
    make_beta_schedule,
)

Arch = Literal["sd15", "sd21"]
Size = Literal["tiny", "full"]
Prediction = Literal["eps", "v"]
ARCHES: tuple[Arch, ...] = ("sd15", "sd21")
SIZES: tuple[Size, ...] = ("tiny", "full")
DTYPES: Mapping[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# The real SD1.5 single file (v1-5-pruned-emaonly.safetensors): 686 UNet + 248 VAE + 197 text
# encoder tensors (196 weights and position_ids) + 12 DDPM buffers + 2 EMA counters.
SD15_TENSORS = 1145
TINY_WIDTH = 128  # tiny text encoder width = the tiny UNet's cross-attention context


@dataclass(frozen=True)
class TestCheckpointSpec:
    """The configs of a test checkpoint."""

    __test__ = False  # not a pytest test class, whatever its name says

    arch: Arch
    size: Size
    unet: UNetConfig
    vae: VAEConfig
    clip: CLIPTextConfig

    @property
    def layout(self) -> clip_text.Layout:
        return "sd1" if self.arch == "sd15" else "sd2"


def checkpoint_spec(arch: Arch, size: Size) -> TestCheckpointSpec:
    """The UNet / VAE / text-encoder configs of a test checkpoint."""
    if arch not in ARCHES:
        raise ModelError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHES)}")
    if size not in SIZES:
        raise ModelError(f"unknown size {size!r}; expected one of {', '.join(SIZES)}")
    if size == "full":
        if arch == "sd15":
            return TestCheckpointSpec(arch, size, UNetConfig.sd15(), VAEConfig.sd(), CLIPTextConfig.clip_l())
        return TestCheckpointSpec(arch, size, UNetConfig.sd21(), VAEConfig.sd(), CLIPTextConfig.open_clip_h())
    sd2 = arch == "sd21"
    unet_config = UNetConfig.from_levels(
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(1, 2),
        context_dim=TINY_WIDTH,
        num_heads=8,  # what the loader infers for a context that is not SD2's 1024
        use_linear_in_transformer=sd2,
        upcast_attention=sd2,
    )
    clip_config = (
        CLIPTextConfig.tiny(activation="gelu", projection_dim=TINY_WIDTH) if sd2 else CLIPTextConfig.tiny()
    )
    return TestCheckpointSpec(arch, size, unet_config, VAEConfig.tiny(), clip_config)


def ddpm_buffers() -> dict[str, Tensor]:
    """The twelve LDM DDPM buffers of SD's schedule, computed in float64 and stored float32 (as LDM's
    ``register_schedule`` does)."""
    betas = make_beta_schedule(SD_BETA_SCHEDULE, SD_TIMESTEPS, SD_LINEAR_START, SD_LINEAR_END)
    alphas = 1.0 - betas
    acp = torch.cumprod(alphas, dim=0)
    acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
    posterior_variance = betas * (1.0 - acp_prev) / (1.0 - acp)
    values = {
        "betas": betas,
        "alphas_cumprod": acp,
        "alphas_cumprod_prev": acp_prev,
        "sqrt_alphas_cumprod": acp.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - acp).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - acp).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / acp).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / acp - 1.0).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * acp_prev.sqrt() / (1.0 - acp),
        "posterior_mean_coef2": (1.0 - acp_prev) * alphas.sqrt() / (1.0 - acp),
    }
    return {name: value.to(torch.float32) for name, value in values.items()}


def build_test_checkpoint(
    arch: Arch,
    size: Size,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    prediction: Prediction | None = None,
    float_position_ids: bool = False,
) -> dict[str, Tensor]:
    """The tensors of a test checkpoint (see the module docstring). ``prediction`` defaults to
    ``eps`` for sd15 and ``v`` for sd21 (like SD2.1 768-v)."""
    spec = checkpoint_spec(arch, size)
    prediction = prediction or ("v" if arch == "sd21" else "eps")
    if prediction not in ("eps", "v"):
        raise ModelError(f"unknown prediction {prediction!r}; expected eps or v")
    out: dict[str, Tensor] = {}
    unet_sd = unet.random_state_dict(spec.unet, seed=seed, dtype=dtype)
    if prediction == "v" and arch == "sd21":
        last = len(spec.unet.transformer_depth_output) - 1
        key = f"output_blocks.{last}.1.transformer_blocks.0.norm1.bias"
        gen = torch.Generator().manual_seed(seed + 3)
        unet_sd[key] = (torch.randn(unet_sd[key].shape, generator=gen) * 0.2).to(dtype)
    out.update({UNET_PREFIX + key: value for key, value in unet_sd.items()})
    out.update(
        {VAE_PREFIX + key: value for key, value in vae.random_state_dict(spec.vae, seed + 1, dtype).items()}
    )
    clip_sd = clip_text.random_state_dict(spec.clip, seed + 2, dtype, layout=spec.layout)
    if float_position_ids:
        clip_sd = {k: v.float() if k.endswith("position_ids") else v for k, v in clip_sd.items()}
    out.update(clip_sd)
    assert all(key.startswith(CLIP_PREFIX) for key in clip_sd)
    out.update(ddpm_buffers())
    out["model_ema.decay"] = torch.tensor(0.9999, dtype=torch.float32)
    out["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    if prediction == "v" and arch == "sd15":
        out[V_PRED_KEY] = torch.tensor([])
    return out


def write_test_checkpoint(
    path: str | os.PathLike[str],
    arch: Arch = "sd15",
    size: Size = "tiny",
    *,
    seed: int = 0,
    dtype: torch.dtype | str = torch.float16,
    prediction: Prediction | None = None,
    float_position_ids: bool = False,
) -> Path:
    """Write a test checkpoint to ``path`` (a ``.safetensors`` name); returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise ModelError(f"{path}: test checkpoints are written as .safetensors")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ModelError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    tensors = build_test_checkpoint(
        arch, size, seed=seed, dtype=dtype, prediction=prediction, float_position_ids=float_position_ids
    )
    # One metadata entry: safetensors writes metadata from a hash map, so several would come out in
    # varying order and the same arguments would not give the same bytes.
    metadata = {
        "kiln.test_checkpoint": f"{arch}-{size} seed={seed} dtype={str(dtype).removeprefix('torch.')}"
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def write_test_esrgan(
    path: str | os.PathLike[str],
    *,
    scale: int = 4,
    layout: esrgan.Layout = "new",
    nf: int = 8,
    nb: int = 2,
    gc: int | None = None,
    seed: int = 0,
    dtype: torch.dtype | str = torch.float32,
    wrapper: str = "",
) -> Path:
    """Write a random-weight ESRGAN upscale model (``.safetensors``); returns the path.

    ``scale`` 1 / 2 use Real-ESRGAN's pixel-unshuffle (x4 network), 4 two x2 stages, 8 three;
    ``layout`` ``"new"`` (basicsr / Real-ESRGAN), ``"old"`` (ESRGAN ``model.N``) or ``"bsrgan"``;
    ``wrapper`` a key prefix such as ``"params_ema."``; ``gc`` defaults to ``nf // 2``, so ``nf=64,
    nb=23`` at scale 4 has RealESRGAN_x4plus's shapes. The weights depend on the config and ``seed``
    only, never on ``layout``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise ModelError(f"{path}: test models are written as .safetensors")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ModelError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    config = esrgan.ESRGANConfig.for_scale(scale, nf, nb, gc if gc is not None else max(nf // 2, 4))
    tensors = esrgan.to_file_layout(esrgan.random_state_dict(config, seed, dtype), config, layout)
    metadata = {"kiln.test_checkpoint": f"esrgan-x{scale}-{layout} nf={nf} nb={nb} seed={seed}"}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({wrapper + k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


# The projections a typical kohya LoRA trains: UNet attention (LDM names) and CLIP-L attention + MLP.
_LORA_UNET_MODULE = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_LORA_CLIP_MODULE = re.compile(r"\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


def write_test_lora(
    path: str | os.PathLike[str],
    base: str | os.PathLike[str],
    *,
    rank: int = 4,
    alpha: float = 2.0,
    seed: int = 0,
    text_encoder: bool = True,
) -> Path:
    """Write a random kohya LoRA (``lora_unet_*`` in LDM names, ``lora_te_*``) for every attention
    projection of the SD1.x checkpoint ``base`` (and its text encoder's attention and MLP layers),
    with ``lora_down`` / ``lora_up`` / ``alpha`` tensors sized from the checkpoint's header."""
    from safetensors.torch import save_file

    from engine.models.safetensors_file import read_header

    path = Path(path)
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise ModelError(f"{path}: test LoRAs are written as .safetensors")
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, Tensor] = {}
    clip_prefix = f"{CLIP_PREFIX}transformer."
    for name, info in sorted(read_header(base).tensors.items()):
        if not name.endswith(".weight") or len(info.shape) != 2:
            continue
        module = name.removesuffix(".weight")
        if module.startswith(UNET_PREFIX) and _LORA_UNET_MODULE.search(module):
            lora_name = "lora_unet_" + module.removeprefix(UNET_PREFIX).replace(".", "_")
        elif text_encoder and module.startswith(clip_prefix) and _LORA_CLIP_MODULE.search(module):
            lora_name = "lora_te_" + module.removeprefix(clip_prefix).replace(".", "_")
        else:
            continue
        out_features, in_features = info.shape
        tensors[f"{lora_name}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) * 0.1
        tensors[f"{lora_name}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * 0.1
        tensors[f"{lora_name}.alpha"] = torch.tensor(float(alpha))
    if not tensors:
        raise ModelError(f"{base}: no SD1.x attention layers to write a LoRA for")
    metadata = {"kiln.test_lora": f"rank={rank} alpha={alpha} seed={seed}"}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.to(torch.float16).contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def meta_layout(arch: Arch, size: Size) -> dict[str, tuple[int, ...]]:
    """Names and shapes a test checkpoint has, without generating weights (for layout checks)."""
    return dict(_meta_layout(arch, size))


@functools.lru_cache(maxsize=4)
def _meta_layout(arch: Arch, size: Size) -> dict[str, tuple[int, ...]]:
    spec = checkpoint_spec(arch, size)
    shapes: dict[str, tuple[int, ...]] = {}
    shapes.update({UNET_PREFIX + k: tuple(v.shape) for k, v in unet.meta_state_dict(spec.unet).items()})
    with torch.device("meta"):
        vae_model = vae.AutoencoderKL(spec.vae)
        text_model = clip_text.CLIPTextModel(spec.clip)
    shapes.update({VAE_PREFIX + k: tuple(v.shape) for k, v in vae_model.state_dict().items()})
    internal = {k: v.detach() for k, v in text_model.state_dict().items()}
    shapes.update({k: tuple(v.shape) for k, v in clip_text.to_file_layout(internal, spec.layout).items()})
    shapes.update({k: tuple(v.shape) for k, v in ddpm_buffers().items()})
    shapes.update({"model_ema.decay": (), "model_ema.num_updates": ()})
    return shapes
