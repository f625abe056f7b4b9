"""Declarations of the latent nodes (ComfyUI's names and specs). LATENT values are dicts:
``{"samples": [B,4,H/8,W/8], "noise_mask"?: [B,1,H,W], "batch_index"?: [int]}``."""

from __future__ import annotations

from engine.nodes.shapes import Inputs, Shapes, resized, same_as, scaled_by, sized
from engine.schema import (
    LATENT,
    MASK,
    MAX_RESOLUTION,
    NodeSpec,
    OutputSpec,
    Shape,
    bool_input,
    combo,
    float_input,
    int_input,
    link,
)

LATENT_UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")
CROP_METHODS = ("disabled", "center")


def _repeated(constants: Inputs, linked: Shapes) -> Shape | None:
    source = linked.get("samples")
    if source is None:
        return None
    return Shape(source.pixels, source.batch * int(constants.get("amount", 1)))


LATENT_NODE_SPECS = (
    NodeSpec(
        "EmptyLatentImage",
        category="latent",
        impl="engine.ops.latent:empty_latent_image",
        required=(
            int_input(
                "width", 512, 16, MAX_RESOLUTION, step=8, tooltip="The width of the latent images in pixels."
            ),
            int_input(
                "height",
                512,
                16,
                MAX_RESOLUTION,
                step=8,
                tooltip="The height of the latent images in pixels.",
            ),
            int_input("batch_size", 1, 1, 4096, tooltip="The number of latent images in the batch."),
        ),
        outputs=(OutputSpec(LATENT, tooltip="The empty latent image batch."),),
        display_name="Empty Latent Image",
        description="Create a new batch of empty latent images to be denoised via sampling.",
        shape=sized,
    ),
    NodeSpec(
        "LatentUpscale",
        category="latent",
        impl="engine.ops.latent:latent_upscale",
        required=(
            link("samples", LATENT),
            combo("upscale_method", LATENT_UPSCALE_METHODS),
            int_input("width", 512, 0, MAX_RESOLUTION, step=8),
            int_input("height", 512, 0, MAX_RESOLUTION, step=8),
            combo("crop", CROP_METHODS),
        ),
        outputs=(OutputSpec(LATENT),),
        display_name="Upscale Latent",
        shape=resized("samples"),
    ),
    NodeSpec(
        "LatentUpscaleBy",
        category="latent",
        impl="engine.ops.latent:latent_upscale_by",
        required=(
            link("samples", LATENT),
            combo("upscale_method", LATENT_UPSCALE_METHODS),
            float_input("scale_by", 1.5, 0.01, 8.0),
        ),
        outputs=(OutputSpec(LATENT),),
        display_name="Upscale Latent By",
        shape=scaled_by("samples"),
    ),
    NodeSpec(
        "LatentFromBatch",
        category="latent/batch",
        impl="engine.ops.latent:latent_from_batch",
        required=(link("samples", LATENT), int_input("batch_index", 0, 0, 63), int_input("length", 1, 1, 64)),
        outputs=(OutputSpec(LATENT),),
        display_name="Latent From Batch",
        shape=same_as("samples"),
    ),
    NodeSpec(
        "RepeatLatentBatch",
        category="latent/batch",
        impl="engine.ops.latent:repeat_latent_batch",
        required=(link("samples", LATENT), int_input("amount", 1, 1, 64)),
        outputs=(OutputSpec(LATENT),),
        display_name="Repeat Latent Batch",
        shape=_repeated,
    ),
    NodeSpec(
        "LatentComposite",
        category="latent",
        impl="engine.ops.latent:latent_composite",
        required=(
            link("samples_to", LATENT),
            link("samples_from", LATENT),
            int_input("x", 0, 0, MAX_RESOLUTION, step=8),
            int_input("y", 0, 0, MAX_RESOLUTION, step=8),
            int_input("feather", 0, 0, MAX_RESOLUTION, step=8),
        ),
        outputs=(OutputSpec(LATENT),),
        shape=same_as("samples_to"),
    ),
    NodeSpec(
        "LatentCompositeMasked",
        category="latent",
        impl="engine.ops.latent:latent_composite_masked",
        required=(
            link("destination", LATENT),
            link("source", LATENT),
            int_input("x", 0, 0, MAX_RESOLUTION, step=8),
            int_input("y", 0, 0, MAX_RESOLUTION, step=8),
            bool_input("resize_source", False),
        ),
        optional=(link("mask", MASK),),
        outputs=(OutputSpec(LATENT),),
        python_module="comfy_extras.nodes_mask",
        shape=same_as("destination"),
    ),
    NodeSpec(
        "LatentBlend",
        category="_for_testing",
        impl="engine.ops.latent:latent_blend",
        required=(
            link("samples1", LATENT),
            link("samples2", LATENT),
            float_input("blend_factor", 0.5, 0.0, 1.0),
        ),
        outputs=(OutputSpec(LATENT),),
        display_name="Latent Blend",
        python_module="comfy_extras.nodes_latent",
        shape=same_as("samples1"),
    ),
    NodeSpec(
        "SetLatentNoiseMask",
        category="latent/inpaint",
        impl="engine.ops.latent:set_latent_noise_mask",
        required=(link("samples", LATENT), link("mask", MASK)),
        outputs=(OutputSpec(LATENT),),
        display_name="Set Latent Noise Mask",
        shape=same_as("samples"),
    ),
)
