"""Declarations of the image and mask nodes that need no model (ComfyUI's names and specs)."""

from __future__ import annotations

from engine.nodes.shapes import Inputs, Shapes, resized, same_as, scaled_by, sized
from engine.schema import (
    IMAGE,
    INT,
    MASK,
    MAX_RESOLUTION,
    ChoiceSource,
    InputSpec,
    NodeSpec,
    OutputSpec,
    Shape,
    bool_input,
    combo,
    float_input,
    int_input,
    link,
    string_input,
)

UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
CROP_METHODS = ("disabled", "center")
INPUT_IMAGES = ChoiceSource("input_images")
# ComfyUI defines ImageCrop and the mask nodes outside nodes.py; object_info names their modules.
EXTRAS_IMAGES = "comfy_extras.nodes_images"
EXTRAS_MASK = "comfy_extras.nodes_mask"


def _batched(_: Inputs, linked: Shapes) -> Shape | None:
    first, second = linked.get("image1"), linked.get("image2")
    if first is None or second is None:
        return first or second
    return Shape(first.pixels, first.batch + second.batch)


IMAGE_NODE_SPECS = (
    NodeSpec(
        "EmptyImage",
        category="image",
        impl="engine.ops.image:empty_image",
        required=(
            int_input("width", 512, 1, MAX_RESOLUTION),
            int_input("height", 512, 1, MAX_RESOLUTION),
            # ComfyUI declares no step here, so object_info shows none.
            InputSpec("batch_size", INT, default=1, min=1, max=4096),
            int_input("color", 0, 0, 0xFFFFFF, options={"display": "color"}),
        ),
        outputs=(OutputSpec(IMAGE),),
        shape=sized,
    ),
    NodeSpec(
        "LoadImage",
        category="image",
        impl="engine.ops.image_files:load_image",
        fingerprint="engine.ops.image_files:image_fingerprint",
        required=(combo("image", INPUT_IMAGES, is_path=True, options={"image_upload": True}),),
        outputs=(OutputSpec(IMAGE), OutputSpec(MASK)),
        display_name="Load Image",
        shape=lambda constants, linked: None,
    ),
    NodeSpec(
        "LoadImageMask",
        category="mask",
        impl="engine.ops.image_files:load_image_mask",
        fingerprint="engine.ops.image_files:image_fingerprint",
        required=(
            combo("image", INPUT_IMAGES, is_path=True, options={"image_upload": True}),
            combo("channel", ("alpha", "red", "green", "blue")),
        ),
        outputs=(OutputSpec(MASK),),
        display_name="Load Image (as Mask)",
    ),
    NodeSpec(
        "SaveImage",
        category="image",
        impl="engine.ops.image_files:save_image",
        required=(
            link("images", IMAGE, tooltip="The images to save."),
            string_input(
                "filename_prefix",
                "ComfyUI",
                is_path=True,
                tooltip="The prefix for the file to save. This may include formatting information such as "
                "%date:yyyy-MM-dd% or %Empty Latent Image.width% to include values from nodes.",
            ),
        ),
        hidden={"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        output_node=True,
        display_name="Save Image",
        description="Saves the input images to your ComfyUI output directory.",
    ),
    NodeSpec(
        "PreviewImage",
        category="image",
        impl="engine.ops.image_files:preview_image",
        required=(link("images", IMAGE),),
        hidden={"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        output_node=True,
        display_name="Preview Image",
        description="Saves the input images to your ComfyUI output directory.",
    ),
    NodeSpec(
        "ImageScale",
        category="image/upscaling",
        impl="engine.ops.image:image_scale",
        required=(
            link("image", IMAGE),
            combo("upscale_method", UPSCALE_METHODS),
            int_input("width", 512, 0, MAX_RESOLUTION),
            int_input("height", 512, 0, MAX_RESOLUTION),
            combo("crop", CROP_METHODS),
        ),
        outputs=(OutputSpec(IMAGE),),
        display_name="Upscale Image",
        shape=resized("image"),
    ),
    NodeSpec(
        "ImageScaleBy",
        category="image/upscaling",
        impl="engine.ops.image:image_scale_by",
        required=(
            link("image", IMAGE),
            combo("upscale_method", UPSCALE_METHODS),
            float_input("scale_by", 1.0, 0.01, 8.0),
        ),
        outputs=(OutputSpec(IMAGE),),
        display_name="Upscale Image By",
        shape=scaled_by("image"),
    ),
    NodeSpec(
        "ImageInvert",
        category="image",
        impl="engine.ops.image:image_invert",
        required=(link("image", IMAGE),),
        outputs=(OutputSpec(IMAGE),),
        display_name="Invert Image",
        shape=same_as("image"),
    ),
    NodeSpec(
        "ImageBatch",
        category="image",
        impl="engine.ops.image:image_batch",
        required=(link("image1", IMAGE), link("image2", IMAGE)),
        outputs=(OutputSpec(IMAGE),),
        display_name="Batch Images",
        shape=_batched,
    ),
    NodeSpec(
        "ImageCrop",
        category="image/transform",
        impl="engine.ops.image:image_crop",
        required=(
            link("image", IMAGE),
            int_input("width", 512, 1, MAX_RESOLUTION),
            int_input("height", 512, 1, MAX_RESOLUTION),
            int_input("x", 0, 0, MAX_RESOLUTION),
            int_input("y", 0, 0, MAX_RESOLUTION),
        ),
        outputs=(OutputSpec(IMAGE),),
        display_name="Image Crop",
        shape=resized("image"),
        python_module=EXTRAS_IMAGES,
    ),
    NodeSpec(
        "ImagePadForOutpaint",
        category="image",
        impl="engine.ops.image:image_pad_for_outpaint",
        required=(
            link("image", IMAGE),
            int_input("left", 0, 0, MAX_RESOLUTION, step=8),
            int_input("top", 0, 0, MAX_RESOLUTION, step=8),
            int_input("right", 0, 0, MAX_RESOLUTION, step=8),
            int_input("bottom", 0, 0, MAX_RESOLUTION, step=8),
            int_input("feathering", 40, 0, MAX_RESOLUTION),
        ),
        outputs=(OutputSpec(IMAGE), OutputSpec(MASK)),
        display_name="Pad Image for Outpainting",
        shape=same_as("image"),
    ),
    NodeSpec(
        "ImageCompositeMasked",
        category="image",
        impl="engine.ops.image:image_composite_masked",
        required=(
            link("destination", IMAGE),
            link("source", IMAGE),
            int_input("x", 0, 0, MAX_RESOLUTION),
            int_input("y", 0, 0, MAX_RESOLUTION),
            bool_input("resize_source", False),
        ),
        optional=(link("mask", MASK),),
        outputs=(OutputSpec(IMAGE),),
        shape=same_as("destination"),
        python_module=EXTRAS_MASK,
    ),
    NodeSpec(
        "SolidMask",
        category="mask",
        impl="engine.ops.mask:solid_mask",
        required=(
            float_input("value", 1.0, 0.0, 1.0),
            int_input("width", 512, 1, MAX_RESOLUTION),
            int_input("height", 512, 1, MAX_RESOLUTION),
        ),
        outputs=(OutputSpec(MASK),),
        python_module=EXTRAS_MASK,
    ),
    NodeSpec(
        "InvertMask",
        category="mask",
        impl="engine.ops.mask:invert_mask",
        required=(link("mask", MASK),),
        outputs=(OutputSpec(MASK),),
        python_module=EXTRAS_MASK,
    ),
    NodeSpec(
        "MaskToImage",
        category="mask",
        impl="engine.ops.mask:mask_to_image",
        required=(link("mask", MASK),),
        outputs=(OutputSpec(IMAGE),),
        display_name="Convert Mask to Image",
        python_module=EXTRAS_MASK,
    ),
    NodeSpec(
        "ImageToMask",
        category="mask",
        impl="engine.ops.mask:image_to_mask",
        required=(link("image", IMAGE), combo("channel", ("red", "green", "blue", "alpha"))),
        outputs=(OutputSpec(MASK),),
        display_name="Convert Image to Mask",
        python_module=EXTRAS_MASK,
    ),
)
