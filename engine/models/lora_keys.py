"""LoRA tensor names -> the model's keys: which weight each adapted layer ("module") of a LoRA file lands on.

A LoRA file holds, per module, a few tensors named ``<module>.<suffix>``. Module names come in several
dialects, all mapped to the model's own keys (``unet_lora_targets``, ``clip_lora_targets``):

- kohya / sd-scripts: ``lora_unet_<module>`` / ``lora_te_<module>`` (also ``lora_te1_``), the module
  path with ``_`` for ``.``, in diffusers names (``lora_unet_down_blocks_0_attentions_0_transformer_
  blocks_0_attn1_to_q``) or LDM names (``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q``);
  ``lycoris_<diffusers module>`` is SimpleTuner's spelling of the same names;
- diffusers / PEFT: ``unet.<diffusers module>`` and ``text_encoder.<transformers module>`` (also
  without the prefix), including the old attention processors' ``...attn1.processor.to_q``;
- ComfyUI's generic names: the model's keys without ``.weight`` (``diffusion_model.<LDM module>``,
  ``<LDM module>``, ``text_encoders.clip_l.transformer.text_model...``).

Suffixes, per module (``group_tensors`` sorts a file's tensors by module and role): LoRA / LoCon
``.lora_up.weight`` + ``.lora_down.weight`` (+ ``.lora_mid.weight``), PEFT ``.lora_B.weight`` +
``.lora_A.weight``, diffusers ``.lora.up.weight`` / ``_lora.up.weight`` / ``.lora_linear_layer.up.weight``
(and the ``down`` twins); LyCORIS LoHa ``.hada_w1_a``, ``.hada_w1_b``, ``.hada_w2_a``, ``.hada_w2_b``
(+ ``.hada_t1``, ``.hada_t2``) and LoKr ``.lokr_w1`` or ``.lokr_w1_a``/``_b``, ``.lokr_w2`` or
``.lokr_w2_a``/``_b`` (+ ``.lokr_t2``); any of these with ``.alpha`` and DoRA's ``.dora_scale``; full
differences ``.diff`` (weight) and ``.diff_b`` (bias).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from engine.models.handles import ClipHandle, ModelHandle, Offset
from engine.models.unet import UNetConfig

# Tensor-name prefixes that address a text encoder (left alone, not reported, when no CLIP is given).
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "text_encoders.")


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


# ------------------------------------------------------------------------------------------ tensor names

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
