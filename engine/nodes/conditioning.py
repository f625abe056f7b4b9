"""Declarations of the text-encoding and conditioning nodes (ComfyUI's names and specs).

CONDITIONING values are lists of ``[cond, options]`` pairs: ``cond`` the text encoder's hidden
states [1, 77k, C], ``options`` a dict (``pooled_output``, ``area``, ``strength``, ``mask``,
``set_area_to_bounds``, ``mask_strength``, ``start_percent``, ``end_percent``), as
``engine.sampling.guidance`` reads them.
"""

from __future__ import annotations

from engine.schema import (
    CLIP,
    CONDITIONING,
    MASK,
    MAX_RESOLUTION,
    STRING,
    InputSpec,
    NodeSpec,
    OutputSpec,
    combo,
    float_input,
    int_input,
    link,
)

_OPS = "engine.ops.conditioning"


def _strength() -> InputSpec:
    return float_input("strength", 1.0, 0.0, 10.0)


CONDITIONING_NODE_SPECS = (
    NodeSpec(
        "CLIPTextEncode",
        category="conditioning",
        impl=f"{_OPS}:clip_text_encode",
        required=(
            InputSpec(
                "text",
                STRING,
                multiline=True,
                tooltip="The text to be encoded.",
                options={"dynamicPrompts": True},
            ),
            link("clip", CLIP, tooltip="The CLIP model used for encoding the text."),
        ),
        outputs=(
            OutputSpec(
                CONDITIONING,
                tooltip="A conditioning containing the embedded text used to guide the diffusion model.",
            ),
        ),
        display_name="CLIP Text Encode (Prompt)",
        description="Encodes a text prompt using a CLIP model into an embedding that can be used to guide "
        "the diffusion model towards generating specific images.",
    ),
    NodeSpec(
        "ConditioningCombine",
        category="conditioning",
        impl=f"{_OPS}:conditioning_combine",
        required=(link("conditioning_1", CONDITIONING), link("conditioning_2", CONDITIONING)),
        outputs=(OutputSpec(CONDITIONING),),
        display_name="Conditioning (Combine)",
    ),
    NodeSpec(
        "ConditioningAverage",
        category="conditioning",
        impl=f"{_OPS}:conditioning_average",
        required=(
            link("conditioning_to", CONDITIONING),
            link("conditioning_from", CONDITIONING),
            float_input("conditioning_to_strength", 1.0, 0.0, 1.0),
        ),
        outputs=(OutputSpec(CONDITIONING),),
    ),
    NodeSpec(
        "ConditioningConcat",
        category="conditioning",
        impl=f"{_OPS}:conditioning_concat",
        required=(link("conditioning_to", CONDITIONING), link("conditioning_from", CONDITIONING)),
        outputs=(OutputSpec(CONDITIONING),),
        display_name="Conditioning (Concat)",
    ),
    NodeSpec(
        "ConditioningSetArea",
        category="conditioning",
        impl=f"{_OPS}:conditioning_set_area",
        required=(
            link("conditioning", CONDITIONING),
            int_input("width", 64, 64, MAX_RESOLUTION, step=8),
            int_input("height", 64, 64, MAX_RESOLUTION, step=8),
            int_input("x", 0, 0, MAX_RESOLUTION, step=8),
            int_input("y", 0, 0, MAX_RESOLUTION, step=8),
            _strength(),
        ),
        outputs=(OutputSpec(CONDITIONING),),
        display_name="Conditioning (Set Area)",
    ),
    NodeSpec(
        "ConditioningSetAreaStrength",
        category="conditioning",
        impl=f"{_OPS}:conditioning_set_area_strength",
        required=(link("conditioning", CONDITIONING), _strength()),
        outputs=(OutputSpec(CONDITIONING),),
    ),
    NodeSpec(
        "ConditioningSetMask",
        category="conditioning",
        impl=f"{_OPS}:conditioning_set_mask",
        required=(
            link("conditioning", CONDITIONING),
            link("mask", MASK),
            _strength(),
            combo("set_cond_area", ("default", "mask bounds")),
        ),
        outputs=(OutputSpec(CONDITIONING),),
        display_name="Conditioning (Set Mask)",
    ),
    NodeSpec(
        "ConditioningZeroOut",
        category="advanced/conditioning",
        impl=f"{_OPS}:conditioning_zero_out",
        required=(link("conditioning", CONDITIONING),),
        outputs=(OutputSpec(CONDITIONING),),
    ),
)
