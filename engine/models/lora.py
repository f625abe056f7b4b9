"""LoRA files -> weight patches on a MODEL and a CLIP handle (what ComfyUI's LoraLoader does).

Reads a LoRA file, groups its tensors by module, matches the modules to the model's and the text
encoder's layers (names: ``engine.models.lora_keys``) and builds one patch per layer (math:
``engine.models.lora_patches``); tensors that match nothing are reported, updates of the wrong size
refused.

The model manager applies the patches inside ``manager.use`` and restores the weights bit for bit.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import Tensor

from engine.errors import ModelError
from engine.models.handles import ClipHandle, DiffPatch, ModelHandle, WeightPatch
from engine.models.lora_keys import (
    TEXT_ENCODER_PREFIXES,
    ModuleTarget,
    Target,
    clip_lora_targets,
    group_tensors,
    unet_lora_targets,
)
from engine.models.lora_patches import AdapterPatch, LoHaPatch, LoKrPatch, LoRAPatch
from engine.models.safetensors_file import load_tensors

log = logging.getLogger(__name__)

_SHOWN = 8  # tensor names listed in a warning or error before "and N more"

# The roles that make a module LoHa / LoKr (see ``lora_keys._SUFFIXES``).
_HADA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_LOKR = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b")


@dataclass(frozen=True)
class LoraMatch:
    """A LoRA file matched against a model: the patches for each part, and what was left over."""

    model: tuple[WeightPatch, ...] = ()
    clip: tuple[WeightPatch, ...] = ()
    unmatched: tuple[str, ...] = ()  # tensors no layer (or no known format) took
    text_encoder: tuple[str, ...] = ()  # text-encoder tensors not used because no CLIP was given
    misfits: tuple[str, ...] = ()  # modules whose update does not have their layer's size


def _module_patches(
    module: str,
    roles: Mapping[str, str],
    tensors: Mapping[str, Tensor],
    target: ModuleTarget,
    source: str,
    strength: float,
) -> tuple[list[WeightPatch], set[str], list[str]]:
    """The patches of one module: (patches, roles used, misfit messages)."""

    def get(role: str) -> Tensor | None:
        return tensors[roles[role]] if role in roles else None

    alpha = get("alpha")
    common = {
        "key": target.weight.key,
        "offset": target.weight.offset,
        "strength": strength,
        "alpha": None if alpha is None else float(alpha.item()),
        "dora_scale": get("dora_scale"),
        "source": f"{source}:{module}",
    }
    adapter: AdapterPatch | None = None
    used: set[str] = set()
    try:
        if "up" in roles and "down" in roles:
            adapter = LoRAPatch(up=get("up"), down=get("down"), mid=get("mid"), **common)
            used = {"up", "down", "mid"}
        elif all(role in roles for role in _HADA):
            adapter = LoHaPatch(
                w1_a=get("hada_w1_a"),
                w1_b=get("hada_w1_b"),
                w2_a=get("hada_w2_a"),
                w2_b=get("hada_w2_b"),
                t1=get("hada_t1"),
                t2=get("hada_t2"),
                **common,
            )
            used = {*_HADA, "hada_t1", "hada_t2"}
        elif any(role in roles for role in _LOKR):
            lokr = {role[len("lokr_") :]: get(role) for role in (*_LOKR, "lokr_t2")}
            adapter = LoKrPatch(**lokr, **common)
            used = {*_LOKR, "lokr_t2"}
    except ModelError as exc:
        raise ModelError(f"LoRA module {module}: {exc}") from None

    patches: list[WeightPatch] = []
    misfits: list[str] = []

    def add(patch: AdapterPatch | DiffPatch, place: Target) -> None:
        patches.append(patch)
        try:
            numel = patch.diff_numel() if isinstance(patch, AdapterPatch) else patch.diff.numel()
        except RuntimeError as exc:  # factors whose shapes do not multiply
            misfits.append(f"{module} (its tensors do not combine: {exc})")
            return
        if numel != math.prod(place.shape):
            misfits.append(f"{module} ({numel} values for {place.key} {place.shape})")

    if adapter is not None:
        used |= {"alpha", "dora_scale"}
        add(adapter, target.weight)
    elif "diff" in roles:
        used.add("diff")
        add(_diff_patch(tensors, roles["diff"], target.weight, source, strength), target.weight)
    if "diff_b" in roles and target.bias is not None:
        used.add("diff_b")
        add(_diff_patch(tensors, roles["diff_b"], target.bias, source, strength), target.bias)
    return patches, used, misfits


def _diff_patch(
    tensors: Mapping[str, Tensor], name: str, place: Target, source: str, strength: float
) -> DiffPatch:
    return DiffPatch(
        key=place.key, offset=place.offset, strength=strength, diff=tensors[name], source=f"{source}:{name}"
    )


def match_lora(
    tensors: Mapping[str, Tensor],
    source: str,
    model_targets: Mapping[str, ModuleTarget],
    clip_targets: Mapping[str, ModuleTarget] | None,
    strength_model: float = 1.0,
    strength_clip: float = 1.0,
) -> LoraMatch:
    """Match a LoRA's tensors against the UNet's and (unless ``clip_targets`` is None: no CLIP) the text
    encoder's module names; ``source`` (the file's sha256) identifies the patches in cache keys."""
    modules, unknown = group_tensors(tensors)
    model: list[WeightPatch] = []
    clip: list[WeightPatch] = []
    unmatched, text_encoder, misfits = list(unknown), [], []
    for module, roles in modules.items():
        target, part, strength = model_targets.get(module), model, strength_model
        if target is None and clip_targets is not None:
            target, part, strength = clip_targets.get(module), clip, strength_clip
        if target is None:
            no_clip = clip_targets is None and module.startswith(TEXT_ENCODER_PREFIXES)
            (text_encoder if no_clip else unmatched).extend(roles.values())
            continue
        patches, used, bad = _module_patches(module, roles, tensors, target, source, strength)
        part.extend(patches)
        misfits.extend(bad)
        unmatched.extend(name for role, name in roles.items() if role not in used)
    return LoraMatch(
        model=tuple(model),
        clip=tuple(clip),
        unmatched=tuple(sorted(unmatched)),
        text_encoder=tuple(sorted(text_encoder)),
        misfits=tuple(misfits),
    )


@dataclass(frozen=True)
class LoraResult:
    """The patched handles (the inputs themselves where nothing applies) and the warnings to show."""

    model: ModelHandle | None
    clip: ClipHandle | None
    warnings: tuple[str, ...] = ()


def _listing(names: Iterable[str]) -> str:
    names = list(names)
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def apply_lora_tensors(
    tensors: Mapping[str, Tensor],
    source: str,
    model: ModelHandle | None,
    clip: ClipHandle | None,
    strength_model: float,
    strength_clip: float,
    name: str = "the LoRA",
) -> LoraResult:
    """Patch ``model`` and ``clip`` with a LoRA's tensors (``source``: the file's sha256).

    A strength of 0 leaves that handle as it is (ComfyUI skips it too). Raises ModelError when no
    tensor matches a layer, or when an update does not have its layer's size (a LoRA for another
    base model); tensors that match nothing are ignored with a warning (logged and returned).
    """
    match = match_lora(
        tensors,
        source,
        unet_lora_targets(model) if model is not None else {},
        clip_lora_targets(clip) if clip is not None else None,
        strength_model,
        strength_clip,
    )
    if match.misfits:
        raise ModelError(
            f"{name} does not fit this model: {len(match.misfits)} layer(s) have another size "
            f"({_listing(match.misfits)}); was it trained for another base model?"
        )
    if not match.model and not match.clip:
        what = "diffusion model or text encoder" if clip is not None else "diffusion model"
        hint = (
            f" (its {len(match.text_encoder)} text-encoder tensors need LoraLoader's clip input)"
            if match.text_encoder
            else ""
        )
        raise ModelError(
            f"{name} matches no layer of the {what}{hint}; its tensors: {_listing(match.unmatched)}"
        )
    warnings: list[str] = []
    if match.unmatched:
        warnings.append(
            f"{name}: {len(match.unmatched)} tensor(s) match no layer and were ignored: "
            f"{_listing(match.unmatched)}"
        )
        log.warning("%s", warnings[-1])
    if match.text_encoder:
        log.info("%s: %d text-encoder tensors not applied (no CLIP given)", name, len(match.text_encoder))
    if model is not None and strength_model != 0 and match.model:
        model = model.with_patches(match.model)
    if clip is not None and strength_clip != 0 and match.clip:
        clip = clip.with_patches(match.clip)
    return LoraResult(model, clip, tuple(warnings))


def apply_lora(
    path: str | os.PathLike[str],
    content_hash: str,
    model: ModelHandle | None,
    clip: ClipHandle | None,
    strength_model: float,
    strength_clip: float,
    name: str | None = None,
) -> LoraResult:
    """``apply_lora_tensors`` for a safetensors file (pickles are refused); with both strengths 0 the
    file is not read."""
    if strength_model == 0 and strength_clip == 0:
        return LoraResult(model, clip)
    tensors = load_tensors(path)
    label = f"LoRA {name or os.path.basename(path)}"
    return apply_lora_tensors(tensors, content_hash, model, clip, strength_model, strength_clip, label)
