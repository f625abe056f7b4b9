"""Loader nodes and CLIPSetLastLayer: model files -> MODEL / CLIP / VAE handles.

The model manager (``ctx.services.models``) resolves names through the model hub, inspects the file
and loads its weights; the handles it returns are what flows through the sockets (see
``engine.models.handles``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from engine.context import NodeContext
from engine.errors import ModelError
from engine.models.handles import ClipHandle, ModelHandle, VAEHandle
from engine.models.manager import ModelManager
from engine.sampling.model_sampling import Parameterization

# What ComfyUI's (deprecated) load_checkpoint reads from the LDM configs it ships: the v
# parameterization (model.params.parameterization) and the clip skip
# (cond_stage_config.params.layer_idx). Everything else in them is inferred from the weights.
CONFIG_OVERRIDES: dict[str, dict[str, Any]] = {
    "anything_v3.yaml": {"layer_idx": -2},
    "v1-inference_clip_skip_2.yaml": {"layer_idx": -2},
    "v1-inference_clip_skip_2_fp16.yaml": {"layer_idx": -2},
    "v2-inference-v.yaml": {"parameterization": Parameterization.V_PREDICTION},
    "v2-inference-v_fp32.yaml": {"parameterization": Parameterization.V_PREDICTION},
}


def manager_of(ctx: NodeContext) -> ModelManager:
    manager = ctx.services.models
    if manager is None:
        raise ModelError("this engine has no model manager: model nodes cannot run")
    return manager


def _fingerprint(ctx: NodeContext, folder: str, name: str) -> str:
    return manager_of(ctx).fingerprint(folder, name)


def checkpoint_fingerprint(ctx: NodeContext, ckpt_name: str, **_: Any) -> str:
    return _fingerprint(ctx, "checkpoints", ckpt_name)


def vae_fingerprint(ctx: NodeContext, vae_name: str, **_: Any) -> str:
    return _fingerprint(ctx, "vae", vae_name)


def clip_fingerprint(ctx: NodeContext, clip_name: str, **_: Any) -> str:
    return _fingerprint(ctx, "text_encoders", clip_name)


def unet_fingerprint(ctx: NodeContext, unet_name: str, **_: Any) -> str:
    return _fingerprint(ctx, "diffusion_models", unet_name)


def checkpoint_loader_simple(
    ctx: NodeContext, ckpt_name: str
) -> tuple[ModelHandle, ClipHandle | None, VAEHandle | None]:
    manager = manager_of(ctx)
    return manager.load_checkpoint(manager.resolve("checkpoints", ckpt_name))


def checkpoint_loader(
    ctx: NodeContext, config_name: str, ckpt_name: str
) -> tuple[ModelHandle, ClipHandle | None, VAEHandle | None]:
    model, clip, vae = checkpoint_loader_simple(ctx, ckpt_name)
    overrides = CONFIG_OVERRIDES.get(config_name, {})
    parameterization = overrides.get("parameterization")
    if parameterization is not None and model.model_sampling.parameterization != parameterization:
        sampling = dataclasses.replace(model.model_sampling, parameterization=parameterization)
        model = model.with_model_sampling(sampling)
    layer_idx = overrides.get("layer_idx")
    if layer_idx is not None and clip is not None:
        clip = clip.clip_layer(layer_idx)
    return model, clip, vae


def vae_loader(ctx: NodeContext, vae_name: str) -> tuple[VAEHandle]:
    manager = manager_of(ctx)
    return (manager.load_vae(manager.resolve("vae", vae_name)),)


def clip_loader(ctx: NodeContext, clip_name: str, type: str, device: str = "default") -> tuple[ClipHandle]:
    # ``device``: ComfyUI can keep a text encoder on the CPU; Kiln's manager places it with the rest.
    manager = manager_of(ctx)
    return (manager.load_text_encoder(manager.resolve("text_encoders", clip_name), type),)


def unet_loader(ctx: NodeContext, unet_name: str, weight_dtype: str) -> tuple[ModelHandle]:
    manager = manager_of(ctx)
    return (manager.load_diffusion_model(manager.resolve("diffusion_models", unet_name), weight_dtype),)


def clip_set_last_layer(ctx: NodeContext, clip: ClipHandle, stop_at_clip_layer: int) -> tuple[ClipHandle]:
    return (require_clip(clip).clip_layer(stop_at_clip_layer),)


def require_clip(clip: ClipHandle | None) -> ClipHandle:
    if clip is None:
        raise ModelError(
            "ERROR: clip input is invalid: None\n\nIf the clip is from a checkpoint loader node your "
            "checkpoint does not contain a valid clip or text encoder model."
        )
    return clip


def require_vae(vae: VAEHandle | None) -> VAEHandle:
    if vae is None:
        raise ModelError(
            "ERROR: vae input is invalid: None\n\nIf the vae is from a checkpoint loader node your "
            "checkpoint does not contain a valid vae model."
        )
    return vae
