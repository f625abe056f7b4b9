"""Declarations of the upscale-model nodes (ComfyUI's ``comfy_extras/nodes_upscale_model``).

``UpscaleModelLoader`` lists the ``upscale_models`` folder (plus known models the hub can fetch) and
fingerprints the file by content, as the other loaders do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.schema import IMAGE, UPSCALE_MODEL, ChoiceSource, NodeSpec, OutputSpec, Shape, combo, link

UPSCALE_MODELS = ChoiceSource("models:upscale_models")
# Cost estimates assume ESRGAN's usual x4: the real scale is known only once the file is read.
ESTIMATED_SCALE = 4

_MODULE = "comfy_extras.nodes_upscale_model"
_OPS = "engine.ops.upscale"


def _upscaled(constants: Mapping[str, Any], linked: Mapping[str, Shape | None]) -> Shape | None:
    shape = linked.get("image")
    if shape is None:
        return None
    return Shape(shape.pixels * ESTIMATED_SCALE * ESTIMATED_SCALE, shape.batch)


UPSCALE_NODE_SPECS = (
    NodeSpec(
        "UpscaleModelLoader",
        category="loaders",
        impl=f"{_OPS}:upscale_model_loader",
        fingerprint=f"{_OPS}:upscale_model_fingerprint",
        required=(combo("model_name", UPSCALE_MODELS, is_path=True),),
        outputs=(OutputSpec(UPSCALE_MODEL),),
        display_name="Load Upscale Model",
        python_module=_MODULE,
    ),
    NodeSpec(
        "ImageUpscaleWithModel",
        category="image/upscaling",
        impl=f"{_OPS}:image_upscale_with_model",
        required=(link("upscale_model", UPSCALE_MODEL), link("image", IMAGE)),
        outputs=(OutputSpec(IMAGE),),
        display_name="Upscale Image (using Model)",
        python_module=_MODULE,
        shape=_upscaled,
    ),
)
