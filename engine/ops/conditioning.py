"""Text encoding and conditioning nodes. CONDITIONING is a list of ``[cond, options]`` pairs; nodes
copy each options dict and set what they change, as ComfyUI's ``conditioning_set_values`` does."""

from __future__ import annotations

import logging
from typing import Any

import torch

from engine.context import NodeContext
from engine.models.handles import ClipHandle
from engine.ops.models import manager_of, require_clip

log = logging.getLogger(__name__)

Conditioning = list[list[Any]]


def clip_text_encode(ctx: NodeContext, text: str, clip: ClipHandle) -> tuple[Conditioning]:
    """[[cond [1, 77k, C], {"pooled_output": [1, P]}]], float32 on the CPU."""
    clip = require_clip(clip)
    with manager_of(ctx).use(clip) as encoder:
        cond, pooled = encoder.encode(text)
    options: dict[str, Any] = {"pooled_output": None if pooled is None else pooled.cpu()}
    return ([[cond.cpu(), options]],)


def set_values(conditioning: Conditioning, values: dict[str, Any]) -> Conditioning:
    """Each entry with a copy of its options updated with ``values``."""
    return [[cond, {**options, **values}] for cond, options in conditioning]


def conditioning_combine(
    ctx: NodeContext, conditioning_1: Conditioning, conditioning_2: Conditioning
) -> tuple[Conditioning]:
    return (conditioning_1 + conditioning_2,)


def conditioning_average(
    ctx: NodeContext,
    conditioning_to: Conditioning,
    conditioning_from: Conditioning,
    conditioning_to_strength: float,
) -> tuple[Conditioning]:
    """``to * strength + from * (1 - strength)`` per entry of ``conditioning_to``, with the first entry
    of ``conditioning_from`` cut or zero-padded to each entry's length; pooled outputs likewise."""
    if len(conditioning_from) > 1:
        log.warning(
            "ConditioningAverage conditioning_from contains more than 1 cond, only the first one will "
            "actually be applied to conditioning_to."
        )
    cond_from = conditioning_from[0][0]
    pooled_from = conditioning_from[0][1].get("pooled_output", None)
    out: Conditioning = []
    for t1, options in conditioning_to:
        pooled_to = options.get("pooled_output", pooled_from)
        t0 = cond_from[:, : t1.shape[1]]
        if t0.shape[1] < t1.shape[1]:
            pad = torch.zeros((t0.shape[0], t1.shape[1] - t0.shape[1], t1.shape[2]), dtype=t0.dtype)
            t0 = torch.cat([t0, pad.to(t0.device)], dim=1)
        tw = torch.mul(t1, conditioning_to_strength) + torch.mul(t0, 1.0 - conditioning_to_strength)
        new_options = dict(options)
        if pooled_from is not None and pooled_to is not None:
            new_options["pooled_output"] = torch.mul(pooled_to, conditioning_to_strength) + torch.mul(
                pooled_from, 1.0 - conditioning_to_strength
            )
        elif pooled_from is not None:
            new_options["pooled_output"] = pooled_from
        out.append([tw, new_options])
    return (out,)


def conditioning_concat(
    ctx: NodeContext, conditioning_to: Conditioning, conditioning_from: Conditioning
) -> tuple[Conditioning]:
    """Each entry of ``conditioning_to`` with the first entry of ``conditioning_from`` appended along
    the token axis."""
    if len(conditioning_from) > 1:
        log.warning(
            "ConditioningConcat conditioning_from contains more than 1 cond, only the first one will "
            "actually be applied to conditioning_to."
        )
    cond_from = conditioning_from[0][0]
    return ([[torch.cat((cond, cond_from), 1), dict(options)] for cond, options in conditioning_to],)


def conditioning_set_area(
    ctx: NodeContext, conditioning: Conditioning, width: int, height: int, x: int, y: int, strength: float
) -> tuple[Conditioning]:
    """``area`` in latent units (h, w, y, x) = pixels // 8."""
    area = (height // 8, width // 8, y // 8, x // 8)
    return (set_values(conditioning, {"area": area, "strength": strength, "set_area_to_bounds": False}),)


def conditioning_set_area_strength(
    ctx: NodeContext, conditioning: Conditioning, strength: float
) -> tuple[Conditioning]:
    return (set_values(conditioning, {"strength": strength}),)


def conditioning_set_mask(
    ctx: NodeContext, conditioning: Conditioning, mask: torch.Tensor, strength: float, set_cond_area: str
) -> tuple[Conditioning]:
    if mask.dim() < 3:
        mask = mask.unsqueeze(0)
    values = {"mask": mask, "set_area_to_bounds": set_cond_area != "default", "mask_strength": strength}
    return (set_values(conditioning, values),)


def conditioning_zero_out(ctx: NodeContext, conditioning: Conditioning) -> tuple[Conditioning]:
    out: Conditioning = []
    for cond, options in conditioning:
        new_options = dict(options)
        pooled = new_options.get("pooled_output")
        if pooled is not None:
            new_options["pooled_output"] = torch.zeros_like(pooled)
        out.append([torch.zeros_like(cond), new_options])
    return (out,)
