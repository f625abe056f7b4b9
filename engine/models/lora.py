"""LoRA files -> weight patches on a MODEL and a CLIP handle (what ComfyUI's LoraLoader does).

A LoRA file holds, per adapted layer ("module"), a few tensors named ``<module>.<suffix>``. Module
names come in several dialects, all mapped to the model's own keys (``unet_lora_targets``,
``clip_lora_targets``):

- kohya / sd-scripts: ``lora_unet_<module>`` / ``lora_te_<module>`` (also ``lora_te1_``), the module
  path with ``_`` for ``.``, in diffusers names (``lora_unet_down_blocks_0_attentions_0_transformer_
  blocks_0_attn1_to_q``) or LDM names (``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q``);
  ``lycoris_<diffusers module>`` is SimpleTuner's spelling of the same names;
- diffusers / PEFT: ``unet.<diffusers module>`` and ``text_encoder.<transformers module>`` (also
  without the prefix), including the old attention processors' ``...attn1.processor.to_q``;
- ComfyUI's generic names: the model's keys without ``.weight`` (``diffusion_model.<LDM module>``,
  ``<LDM module>``, ``text_encoders.clip_l.transformer.text_model...``).

Suffixes, per module: LoRA / LoCon ``.lora_up.weight`` + ``.lora_down.weight`` (+ ``.lora_mid.weight``),
PEFT ``.lora_B.weight`` + ``.lora_A.weight``, diffusers ``.lora.up.weight`` / ``_lora.up.weight`` /
``.lora_linear_layer.up.weight`` (and the ``down`` twins); LyCORIS LoHa ``.hada_w1_a``, ``.hada_w1_b``,
``.hada_w2_a``, ``.hada_w2_b`` (+ ``.hada_t1``, ``.hada_t2``) and LoKr ``.lokr_w1`` or
``.lokr_w1_a``/``_b``, ``.lokr_w2`` or ``.lokr_w2_a``/``_b`` (+ ``.lokr_t2``); any of these with
``.alpha`` and DoRA's ``.dora_scale``; full differences ``.diff`` (weight) and ``.diff_b`` (bias).

Math (ComfyUI's ``weight_adapter`` ``calculate_weight``), in float32 on the weight's device, per patch:
``W' = W * strength_model + (strength * scale) * diff`` with ``scale = alpha / rank`` (1 without alpha):

- LoRA: ``diff = up.flatten(1) @ down.flatten(1)`` reshaped to W; rank = ``down.shape[0]``; a LoCon
  ``mid`` (CP decomposition of a conv) folds into ``down`` first;
- LoHa: ``diff = (w1_a @ w1_b) * (w2_a @ w2_b)`` (Tucker: ``einsum("ijkl,jr,ip->prkl", t, w_b, w_a)``);
  rank = ``w1_b.shape[0]``;
- LoKr: ``diff = kron(w1, w2)`` (each given whole or as ``a @ b``, ``w2`` possibly Tucker); rank =
  ``w2_b.shape[0]`` if w2 is factored, else ``w1_b.shape[0]`` if w1 is, else no scaling;
- DoRA (``dora_scale``): ``W + scale * diff`` renormalised to ``dora_scale`` along the axis it names,
  then blended in by ``strength``.

The model manager applies the patches inside ``manager.use`` and restores the weights bit for bit.
"""

from __future__ import annotations

import logging
import math
import os
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from engine.errors import ModelError
from engine.models.handles import ClipHandle, DiffPatch, ModelHandle, Offset, WeightPatch, tensor_digest
from engine.models.safetensors_file import load_tensors
from engine.models.unet import UNetConfig

log = logging.getLogger(__name__)

Cast = Callable[[Tensor], Tensor]

# Tensor-name prefixes that address a text encoder (left alone, not reported, when no CLIP is given).
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "text_encoders.")
_SHOWN = 8  # tensor names listed in a warning or error before "and N more"


# ------------------------------------------------------------------------------------------ targets


@dataclass(frozen=True)
class Target:
    """One weight a module's update lands on: the model key, its slice and the slice's shape."""

    key: str
    shape: tuple[int, ...]
    offset: Offset | None = None


@dataclass(frozen=True)
class ModuleTarget:
    """What a LoRA module adapts: a weight, and the bias ``.diff_b`` would change (if the layer has one)."""

    weight: Target
    bias: Target | None = None


def _target(key: str, shapes: Mapping[str, tuple[int, ...]], offset: Offset | None = None) -> Target:
    shape = tuple(shapes[key])
    if offset is not None:
        dim, _, length = offset
        shape = (*shape[:dim], length, *shape[dim + 1 :])
    return Target(key, shape, offset)


# LDM ResBlock layer -> diffusers ResnetBlock2D layer.
_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
# LDM modules outside the blocks -> diffusers modules.
_BASIC: Mapping[str, tuple[str, ...]] = {
    "input_blocks.0.0": ("conv_in",),
    "time_embed.0": ("time_embedding.linear_1",),
    "time_embed.2": ("time_embedding.linear_2",),
    "out.0": ("conv_norm_out",),
    "out.2": ("conv_out",),
    "label_emb.0.0": ("class_embedding.linear_1", "add_embedding.linear_1"),
    "label_emb.0.2": ("class_embedding.linear_2", "add_embedding.linear_2"),
}


def _diffusers_blocks(config: UNetConfig) -> dict[str, str]:
    """LDM block prefix (``input_blocks.1.1``, ``middle_block.0``, ...) -> diffusers block prefix
    (``down_blocks.0.attentions.0``, ``mid_block.resnets.0``, ...), as ComfyUI's ``unet_to_diffusers``."""
    levels = len(config.num_res_blocks)
    blocks: dict[str, str] = {}
    n = 1
    for level, count in enumerate(config.num_res_blocks):
        for i in range(count):
            blocks[f"input_blocks.{n}.0"] = f"down_blocks.{level}.resnets.{i}"
            blocks[f"input_blocks.{n}.1"] = f"down_blocks.{level}.attentions.{i}"
            n += 1
        if level < levels - 1:
            blocks[f"input_blocks.{n}.0"] = f"down_blocks.{level}.downsamplers.0"
            n += 1
    blocks["middle_block.0"] = "mid_block.resnets.0"
    blocks["middle_block.1"] = "mid_block.attentions.0"
    blocks["middle_block.2"] = "mid_block.resnets.1"
    n = 0
    for level, count in enumerate(reversed(config.num_res_blocks)):
        for i in range(count + 1):
            blocks[f"output_blocks.{n}.0"] = f"up_blocks.{level}.resnets.{i}"
            slot = 1
            if config.transformer_depth_output[n] > 0:
                blocks[f"output_blocks.{n}.1"] = f"up_blocks.{level}.attentions.{i}"
                slot = 2
            if i == count and level < levels - 1:  # the level's last block upsamples
                blocks[f"output_blocks.{n}.{slot}"] = f"up_blocks.{level}.upsamplers.0"
            n += 1
    return blocks


def diffusers_unet_modules(config: UNetConfig, modules: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """LDM module name (``input_blocks.1.1.proj_in``) -> its diffusers name(s)
    (``down_blocks.0.attentions.0.proj_in``) for each of ``modules`` that diffusers has."""
    blocks = _diffusers_blocks(config)
    out: dict[str, tuple[str, ...]] = {}
    for module in modules:
        if module in _BASIC:
            out[module] = _BASIC[module]
            continue
        parts = module.split(".")
        depth = 2 if parts[0] == "middle_block" else 3
        block, rest = blocks.get(".".join(parts[:depth])), ".".join(parts[depth:])
        if block is None or not rest:
            continue
        if ".resnets." in block:
            renamed = _RESNET.get(rest)
            if renamed is None:
                continue
            rest = renamed
        elif block.endswith("samplers.0"):
            rest = "conv"  # LDM ``op`` (down) / ``conv`` (up)
        out[module] = (f"{block}.{rest}",)
    return out


def _processor_form(module: str) -> str:
    """The old diffusers attention-processor name: ``attn1.to_q`` -> ``attn1.processor.to_q``,
    ``attn1.to_out.0`` -> ``attn1.processor.to_out``."""
    name = module.replace(".to_", ".processor.to_")
    return name[: -len(".0")] if name.endswith(".to_out.0") else name


def unet_lora_targets(model: ModelHandle) -> dict[str, ModuleTarget]:
    """Every module name a LoRA may use for ``model``'s UNet -> what it adapts."""
    shapes = model.weight_shapes()
    modules = [k[: -len(".weight")] for k in shapes if k.endswith(".weight")]
    diffusers = diffusers_unet_modules(model.config, modules)
    out: dict[str, ModuleTarget] = {}
    for module in modules:
        bias = f"{module}.bias"
        target = ModuleTarget(
            _target(f"{module}.weight", shapes), _target(bias, shapes) if bias in shapes else None
        )
        names = [f"lora_unet_{module.replace('.', '_')}", module, f"diffusion_model.{module}"]
        for name in diffusers.get(module, ()):
            flat = name.replace(".", "_")
            names += [f"lora_unet_{flat}", f"lycoris_{flat}"]
            for form in dict.fromkeys((name, _processor_form(name))):
                names += [form, f"unet.{form}"]
        for name in names:
            out[name] = target
    return out


def clip_lora_targets(clip: ClipHandle) -> dict[str, ModuleTarget]:
    """Every module name a LoRA may use for ``clip``'s text model -> what it adapts (q, k and v are
    slices of Kiln's fused ``attn.qkv``)."""
    shapes = clip.weight_shapes()
    key_map = clip.file_key_map()
    comfy_name = "clip_h" if clip.layout == "sd2" else "clip_l"
    out: dict[str, ModuleTarget] = {}
    for name, (key, offset) in key_map.items():
        if not name.startswith("text_model.") or not name.endswith(".weight"):
            continue
        module = name[: -len(".weight")]
        bias = key_map.get(f"{module}.bias")
        target = ModuleTarget(
            _target(key, shapes, offset), _target(bias[0], shapes, bias[1]) if bias is not None else None
        )
        flat = module.replace(".", "_")
        for alias in (
            f"lora_te_{flat}",
            f"lora_te1_{flat}",
            f"text_encoder.{module}",
            f"text_encoders.{comfy_name}.transformer.{module}",
        ):
            out[alias] = target
    return out


# ------------------------------------------------------------------------------------------ patches


def _cast_to(weight: Tensor) -> Cast:
    return lambda t: t.to(device=weight.device, dtype=torch.float32)


def _to_meta(t: Tensor) -> Tensor:
    return t.to(device="meta", dtype=torch.float32)


def _tucker(t: Tensor, w_b: Tensor, w_a: Tensor) -> Tensor:
    # t [i, j, k, l], w_b [j, r], w_a [i, p] -> [p, r, k, l]
    return torch.einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a)


@dataclass(frozen=True, eq=False)
class AdapterPatch(WeightPatch):
    """A LyCORIS-family update: ``strength * scale * diff``, or DoRA's renormalised weight.

    ``source`` (``"<file sha256>:<module>"``) is the patch's identity in cache keys; without it the
    tensors' bytes are hashed once.
    """

    alpha: float | None = None
    dora_scale: Tensor | None = None
    source: str = ""

    @property
    @abstractmethod
    def rank(self) -> int | None:
        """The divisor of ``alpha`` (None: the update is not scaled)."""

    @abstractmethod
    def product(self, cast: Cast) -> Tensor:
        """The unscaled update from the patch's tensors, each passed through ``cast`` first."""

    @property
    def scale(self) -> float:
        rank = self.rank
        return self.alpha / rank if self.alpha is not None and rank else 1.0

    def diff(self, weight: Tensor) -> Tensor:
        """The unscaled update in float32 on ``weight``'s device, with ``weight``'s shape."""
        return self.product(_cast_to(weight)).reshape(weight.shape)

    def diff_numel(self) -> int:
        """How many values the update has (computed on the meta device: no arithmetic)."""
        return self.product(_to_meta).numel()

    def apply(self, weight: Tensor) -> Tensor:
        if self.strength_model != 1.0:
            weight = weight * self.strength_model
        diff = self.diff(weight)
        if self.dora_scale is None:
            # (strength * scale) first, as ComfyUI multiplies: same float32 rounding.
            return weight + (self.strength * self.scale) * diff
        return self._decompose(weight, diff, self.strength)

    def delta(self, weight: Tensor) -> Tensor:
        diff = self.diff(weight)
        if self.dora_scale is None:
            return self.scale * diff
        return self._decompose(weight, diff, 1.0) - weight

    def _decompose(self, weight: Tensor, diff: Tensor, strength: float) -> Tensor:
        """DoRA (ComfyUI's ``weight_decompose``): the updated weight rescaled to ``dora_scale``, whose
        first dimension says the axis (output rows, else input columns)."""
        assert self.dora_scale is not None
        magnitude = self.dora_scale.to(device=weight.device, dtype=torch.float32)
        updated = weight + diff * self.scale
        ones = [1] * (weight.dim() - 1)
        if magnitude.shape[0] == updated.shape[0]:
            # ComfyUI takes this norm from the weight before the update.
            norm = (
                weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(weight.shape[0], *ones)
            )
        else:
            cols = updated.shape[1]
            norm = updated.transpose(0, 1).reshape(cols, -1).norm(dim=1, keepdim=True)
            norm = norm.reshape(cols, *ones).transpose(0, 1)
        updated = updated * (magnitude / (norm + torch.finfo(torch.float32).eps))
        if strength != 1.0:
            return weight + strength * (updated - weight)
        return updated

    def token(self) -> str:
        if self.source:
            return self.source
        cached = self.__dict__.get("_token")
        if cached is None:  # built in memory: identify by content
            tensors = [(f.name, v) for f in fields(self) if isinstance(v := getattr(self, f.name), Tensor)]
            cached = ",".join(f"{name}={tensor_digest(t)}" for name, t in tensors) + f";alpha={self.alpha}"
            object.__setattr__(self, "_token", cached)
        return cached


@dataclass(frozen=True, eq=False)
class LoRAPatch(AdapterPatch):
    """LoRA / LoCon: ``up @ down`` (``mid``: LoCon's CP-decomposed conv core)."""

    up: Tensor | None = None
    down: Tensor | None = None
    mid: Tensor | None = None

    def __post_init__(self) -> None:
        if self.up is None or self.down is None:
            raise ModelError("a LoRA module needs both an up and a down tensor")

    @property
    def rank(self) -> int:
        assert self.down is not None
        return self.down.shape[0]

    def product(self, cast: Cast) -> Tensor:
        assert self.up is not None and self.down is not None
        up, down = cast(self.up), cast(self.down)
        if self.mid is not None:
            mid = cast(self.mid)
            shape = [down.shape[1], down.shape[0], mid.shape[2], mid.shape[3]]
            down = torch.mm(down.transpose(0, 1).flatten(1), mid.transpose(0, 1).flatten(1))
            down = down.reshape(shape).transpose(0, 1)
        return torch.mm(up.flatten(1), down.flatten(1))


@dataclass(frozen=True, eq=False)
class LoHaPatch(AdapterPatch):
    """LyCORIS LoHa: the Hadamard product of two low-rank products (optionally Tucker-factored)."""

    w1_a: Tensor | None = None
    w1_b: Tensor | None = None
    w2_a: Tensor | None = None
    w2_b: Tensor | None = None
    t1: Tensor | None = None
    t2: Tensor | None = None

    def __post_init__(self) -> None:
        if any(t is None for t in (self.w1_a, self.w1_b, self.w2_a, self.w2_b)):
            raise ModelError("a LoHa module needs hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b")
        if (self.t1 is None) != (self.t2 is None):
            raise ModelError("a LoHa module needs both hada_t1 and hada_t2, or neither")

    @property
    def rank(self) -> int:
        assert self.w1_b is not None
        return self.w1_b.shape[0]

    def product(self, cast: Cast) -> Tensor:
        assert self.w1_a is not None and self.w1_b is not None
        assert self.w2_a is not None and self.w2_b is not None
        w1_a, w1_b, w2_a, w2_b = cast(self.w1_a), cast(self.w1_b), cast(self.w2_a), cast(self.w2_b)
        if self.t1 is not None and self.t2 is not None:
            return _tucker(cast(self.t1), w1_b, w1_a) * _tucker(cast(self.t2), w2_b, w2_a)
        return torch.mm(w1_a, w1_b) * torch.mm(w2_a, w2_b)


@dataclass(frozen=True, eq=False)
class LoKrPatch(AdapterPatch):
    """LyCORIS LoKr: the Kronecker product of ``w1`` and ``w2``, each whole or low-rank."""

    w1: Tensor | None = None
    w2: Tensor | None = None
    w1_a: Tensor | None = None
    w1_b: Tensor | None = None
    w2_a: Tensor | None = None
    w2_b: Tensor | None = None
    t2: Tensor | None = None

    def __post_init__(self) -> None:
        if self.w1 is None and (self.w1_a is None or self.w1_b is None):
            raise ModelError("a LoKr module needs lokr_w1, or lokr_w1_a and lokr_w1_b")
        if self.w2 is None and (self.w2_a is None or self.w2_b is None):
            raise ModelError("a LoKr module needs lokr_w2, or lokr_w2_a and lokr_w2_b")

    @property
    def rank(self) -> int | None:
        if self.w2 is None and self.w2_b is not None:
            return self.w2_b.shape[0]
        if self.w1 is None and self.w1_b is not None:
            return self.w1_b.shape[0]
        return None

    def product(self, cast: Cast) -> Tensor:
        if self.w1 is not None:
            w1 = cast(self.w1)
        else:
            assert self.w1_a is not None and self.w1_b is not None
            w1 = torch.mm(cast(self.w1_a), cast(self.w1_b))
        if self.w2 is not None:
            w2 = cast(self.w2)
        else:
            assert self.w2_a is not None and self.w2_b is not None
            w2_a, w2_b = cast(self.w2_a), cast(self.w2_b)
            w2 = torch.mm(w2_a, w2_b) if self.t2 is None else _tucker(cast(self.t2), w2_b, w2_a)
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        return torch.kron(w1, w2)


# ------------------------------------------------------------------------------------------ files

# Tensor-name suffix -> role. No suffix here ends another one, so the first match is the only one.
_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_up.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_mid.weight", "mid"),
    (".lora_B.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_A.default.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora.down.weight", "down"),
    ("_lora.up.weight", "up"),
    ("_lora.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".alpha", "alpha"),
    (".dora_scale", "dora_scale"),
    *((f".hada_{r}", f"hada_{r}") for r in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")),
    *((f".lokr_{r}", f"lokr_{r}") for r in ("w1", "w2", "w1_a", "w1_b", "w2_a", "w2_b", "t2")),
    (".diff", "diff"),
    (".diff_b", "diff_b"),
)
_HADA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_LOKR = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b")


def group_tensors(names: Iterable[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Tensor names -> ``{module: {role: tensor name}}``, plus the names with no known suffix."""
    modules: dict[str, dict[str, str]] = {}
    unknown: list[str] = []
    for name in names:
        for suffix, role in _SUFFIXES:
            if name.endswith(suffix) and len(name) > len(suffix):
                modules.setdefault(name[: -len(suffix)], {})[role] = name
                break
        else:
            unknown.append(name)
    return modules, unknown


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
