"""Declarations of ComfyUI's LoRA loaders (LoraLoader, LoraLoaderModelOnly): names, inputs, defaults.

``lora_name`` lists the ``loras`` folder; the fingerprint is the file's content hash, so a cached
result follows the file, not its name. LoraLoaderModelOnly inherits LoraLoader's category,
description and (first) output tooltip in ComfyUI, and so it does here.
"""

from __future__ import annotations

from engine.schema import CLIP, MODEL, ChoiceSource, NodeSpec, OutputSpec, combo, float_input, link

LORAS = ChoiceSource("models:loras")

_OPS = "engine.ops.lora"
_DESCRIPTION = (
    "LoRAs are used to modify diffusion and CLIP models, altering the way in which latents are denoised "
    "such as applying styles. Multiple LoRA nodes can be linked together."
)
_MODEL_OUTPUT = OutputSpec(MODEL, tooltip="The modified diffusion model.")


LORA_NODE_SPECS = (
    NodeSpec(
        "LoraLoader",
        category="loaders",
        impl=f"{_OPS}:lora_loader",
        fingerprint=f"{_OPS}:lora_fingerprint",
        required=(
            link("model", MODEL, tooltip="The diffusion model the LoRA will be applied to."),
            link("clip", CLIP, tooltip="The CLIP model the LoRA will be applied to."),
            combo("lora_name", LORAS, is_path=True, tooltip="The name of the LoRA."),
            float_input(
                "strength_model",
                1.0,
                -100.0,
                100.0,
                0.01,
                tooltip="How strongly to modify the diffusion model. This value can be negative.",
            ),
            float_input(
                "strength_clip",
                1.0,
                -100.0,
                100.0,
                0.01,
                tooltip="How strongly to modify the CLIP model. This value can be negative.",
            ),
        ),
        outputs=(_MODEL_OUTPUT, OutputSpec(CLIP, tooltip="The modified CLIP model.")),
        display_name="Load LoRA",
        description=_DESCRIPTION,
    ),
    NodeSpec(
        "LoraLoaderModelOnly",
        category="loaders",
        impl=f"{_OPS}:lora_loader_model_only",
        fingerprint=f"{_OPS}:lora_fingerprint",
        required=(
            link("model", MODEL),
            combo("lora_name", LORAS, is_path=True),
            float_input("strength_model", 1.0, -100.0, 100.0, 0.01),
        ),
        outputs=(_MODEL_OUTPUT,),
        description=_DESCRIPTION,
    ),
)
