"""LoraLoader and LoraLoaderModelOnly: a LoRA file -> patched MODEL / CLIP handles.

The weights are not touched here: the handles carry the patches and the model manager applies them
inside ``manager.use`` (see ``engine.models.handles``). Tensors of the file that match no layer are
ignored with a warning, logged and shown in the node's UI output (``warnings``).
"""

from __future__ import annotations

from typing import Any

from engine.context import NodeContext, NodeResult
from engine.models.handles import ClipHandle, ModelHandle
from engine.models.lora import LoraResult, apply_lora
from engine.ops.models import manager_of


def lora_fingerprint(ctx: NodeContext, lora_name: str, **_: Any) -> str:
    return manager_of(ctx).fingerprint("loras", lora_name)


def _load(
    ctx: NodeContext,
    model: ModelHandle,
    clip: ClipHandle | None,
    lora_name: str,
    strength_model: float,
    strength_clip: float,
) -> LoraResult:
    if strength_model == 0 and strength_clip == 0:  # ComfyUI does not even open the file
        return LoraResult(model, clip)
    manager = manager_of(ctx)
    path = manager.resolve("loras", lora_name)
    content_hash = manager.hasher.content_hash(path)
    return apply_lora(path, content_hash, model, clip, strength_model, strength_clip, name=lora_name)


def _result(outputs: tuple[Any, ...], warnings: tuple[str, ...]) -> NodeResult:
    return NodeResult(result=outputs, ui={"warnings": list(warnings)} if warnings else None)


def lora_loader(
    ctx: NodeContext,
    model: ModelHandle,
    clip: ClipHandle | None,
    lora_name: str,
    strength_model: float,
    strength_clip: float,
) -> NodeResult:
    # ``clip`` is None when the checkpoint had no text encoder: the MODEL is still patched.
    loaded = _load(ctx, model, clip, lora_name, strength_model, strength_clip)
    return _result((loaded.model, loaded.clip), loaded.warnings)


def lora_loader_model_only(
    ctx: NodeContext, model: ModelHandle, lora_name: str, strength_model: float
) -> NodeResult:
    loaded = _load(ctx, model, None, lora_name, strength_model, 0.0)
    return _result((loaded.model,), loaded.warnings)
