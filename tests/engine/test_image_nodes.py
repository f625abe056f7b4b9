"""The model-free image and mask nodes against ComfyUI's declarations and numerics.

Expectations are computed independently in this file: resampling with small NumPy references
written from PyTorch's documented index formulas, Lanczos with PIL on uint8 (what ComfyUI does),
and ComfyUI's per-pixel formulas as plain Python loops. ComfyUI's declared inputs are written out
below as data taken from its ``nodes.py``, ``comfy_extras/nodes_images.py`` and
``comfy_extras/nodes_mask.py``.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from engine.context import NodeContext, NodeResult, Services
from engine.events import NullSink
from engine.interrupt import InterruptFlag
from engine.inventory import StaticInventory
from engine.io import LocalFolderSink, LocalInputResolver
from engine.nodes.image import IMAGE_NODE_SPECS
from engine.ops.resample import composite
from engine.registry import NodeRegistry, default_registry, render_node_info
from engine.runtime import EngineRuntime
from engine.schema import MAX_RESOLUTION

# -- helpers -----------------------------------------------------------------------------------


@pytest.fixture
def ctx(tmp_path: Path) -> NodeContext:
    for name in ("input", "output", "temp"):
        (tmp_path / name).mkdir()
    services = Services(
        outputs=LocalFolderSink(tmp_path / "output", tmp_path / "temp"),
        inputs=LocalInputResolver(tmp_path / "input", tmp_path / "output", tmp_path / "temp"),
    )
    return NodeContext(
        node_id="1",
        class_type="test",
        prompt_id="p",
        services=services,
        events=NullSink(),
        interrupt=InterruptFlag(),
        saved=[],
    )


REGISTRY = default_registry()


def run(ctx: NodeContext, class_type: str, **inputs: Any) -> tuple[Any, ...]:
    """Call a node's implementation the way the executor does."""
    returned = REGISTRY.implementation(class_type)(ctx, **inputs)
    if isinstance(returned, NodeResult):
        returned = returned.result
    spec = REGISTRY.get(class_type)
    assert spec is not None
    assert isinstance(returned, tuple) and len(returned) == len(spec.outputs)
    return returned


def random_image(batch: int, height: int, width: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((batch, height, width, channels), generator=generator, dtype=torch.float32)


# -- independent resampling references (NCHW in float64; PyTorch's formulas, align_corners=False) --


def _scale(size_in: int, size_out: int) -> np.float32:
    # PyTorch computes the source/destination ratio in float for float inputs.
    return np.float32(size_in) / np.float32(size_out)


def _linear_weights(size_in: int, size_out: int) -> np.ndarray:
    weights = np.zeros((size_out, size_in))
    scale = _scale(size_in, size_out)
    for i in range(size_out):
        real = max(float(np.float32(scale * np.float32(i + 0.5)) - np.float32(0.5)), 0.0)
        low = math.floor(real)
        high = low + 1 if low < size_in - 1 else low
        frac = real - low
        weights[i, low] += 1.0 - frac
        weights[i, high] += frac
    return weights


def _cubic_weights(size_in: int, size_out: int, a: float = -0.75) -> np.ndarray:
    def near(x: float) -> float:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: float) -> float:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = np.zeros((size_out, size_in))
    scale = _scale(size_in, size_out)
    for i in range(size_out):
        real = float(np.float32(scale * np.float32(i + 0.5)) - np.float32(0.5))  # no clamp for cubic
        base = math.floor(real)
        t = real - base
        for offset, weight in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t)), strict=True):
            weights[i, min(max(base + offset, 0), size_in - 1)] += weight
    return weights


def _nearest_exact_weights(size_in: int, size_out: int) -> np.ndarray:
    weights = np.zeros((size_out, size_in))
    scale = _scale(size_in, size_out)
    for i in range(size_out):
        source = min(math.floor(np.float32(np.float32(i + 0.5) * scale)), size_in - 1)
        weights[i, source] = 1.0
    return weights


def _area_weights(size_in: int, size_out: int) -> np.ndarray:
    # Adaptive average pooling: window [floor(i*in/out), ceil((i+1)*in/out)).
    weights = np.zeros((size_out, size_in))
    for i in range(size_out):
        start = (i * size_in) // size_out
        end = -((-(i + 1) * size_in) // size_out)
        weights[i, start:end] = 1.0 / (end - start)
    return weights


WEIGHTS = {
    "bilinear": _linear_weights,
    "bicubic": _cubic_weights,
    "nearest-exact": _nearest_exact_weights,
    "area": _area_weights,
}


def reference_resize(nchw: torch.Tensor, width: int, height: int, method: str) -> torch.Tensor:
    """Separable resampling of [B,C,H,W] with the reference weight matrices."""
    if method == "lanczos":
        return reference_lanczos(nchw, width, height)
    rows = WEIGHTS[method](nchw.shape[2], height)
    cols = WEIGHTS[method](nchw.shape[3], width)
    out = np.einsum("yh,bchw,xw->bcyx", rows, nchw.double().numpy(), cols)
    return torch.from_numpy(out).float()


def reference_lanczos(nchw: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """ComfyUI's lanczos: 8-bit PIL images, LANCZOS resize, back to float."""
    out = []
    for image in nchw:
        pixels = np.clip(255.0 * image.permute(1, 2, 0).numpy(), 0, 255).astype(np.uint8)
        resized = Image.fromarray(pixels).resize((width, height), Image.Resampling.LANCZOS)
        out.append(torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(out)


def comfy_center_crop(nchw: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """ComfyUI's common_upscale crop="center", written out."""
    old_h, old_w = nchw.shape[2], nchw.shape[3]
    old_aspect, new_aspect = old_w / old_h, width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    return nchw[:, :, y : old_h - y, x : old_w - x]


def nhwc_reference(image: torch.Tensor, width: int, height: int, method: str, crop: str) -> torch.Tensor:
    nchw = image.permute(0, 3, 1, 2)
    if crop == "center":
        nchw = comfy_center_crop(nchw, width, height)
    return reference_resize(nchw, width, height, method).permute(0, 2, 3, 1)


# -- ComfyUI's declarations, as data -----------------------------------------------------------

M = MAX_RESOLUTION  # 16384 in ComfyUI's nodes.py
UPSCALE = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
SAVE_TOOLTIP = (
    "The prefix for the file to save. This may include formatting information such as %date:yyyy-MM-dd% "
    "or %Empty Latent Image.width% to include values from nodes."
)
HIDDEN_PNG = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
INPUT_FILES = ["a.png", "b.jpg"]


def _int(default: int, lo: int, hi: int, step: int | None = 1, **extra: Any) -> list[Any]:
    options: dict[str, Any] = {"default": default, "min": lo, "max": hi}
    if step is not None:
        options["step"] = step
    return ["INT", {**options, **extra}]


COMFY: dict[str, dict[str, Any]] = {
    "EmptyImage": {
        "required": {
            "width": _int(512, 1, M),
            "height": _int(512, 1, M),
            "batch_size": _int(1, 1, 4096, step=None),
            "color": _int(0, 0, 0xFFFFFF, display="color"),
        },
        "output": ["IMAGE"],
        "category": "image",
        "module": "nodes",
    },
    "LoadImage": {
        "required": {"image": [INPUT_FILES, {"image_upload": True}]},
        "output": ["IMAGE", "MASK"],
        "category": "image",
        "module": "nodes",
    },
    "LoadImageMask": {
        "required": {
            "image": [INPUT_FILES, {"image_upload": True}],
            "channel": [["alpha", "red", "green", "blue"]],
        },
        "output": ["MASK"],
        "category": "mask",
        "module": "nodes",
    },
    "SaveImage": {
        "required": {
            "images": ["IMAGE", {"tooltip": "The images to save."}],
            "filename_prefix": ["STRING", {"default": "ComfyUI", "tooltip": SAVE_TOOLTIP}],
        },
        "hidden": HIDDEN_PNG,
        "output": [],
        "output_node": True,
        "category": "image",
        "module": "nodes",
    },
    "PreviewImage": {
        "required": {"images": ["IMAGE"]},
        "hidden": HIDDEN_PNG,
        "output": [],
        "output_node": True,
        "category": "image",
        "module": "nodes",
    },
    "ImageScale": {
        "required": {
            "image": ["IMAGE"],
            "upscale_method": [UPSCALE],
            "width": _int(512, 0, M),
            "height": _int(512, 0, M),
            "crop": [["disabled", "center"]],
        },
        "output": ["IMAGE"],
        "category": "image/upscaling",
        "module": "nodes",
    },
    "ImageScaleBy": {
        "required": {
            "image": ["IMAGE"],
            "upscale_method": [UPSCALE],
            "scale_by": ["FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01}],
        },
        "output": ["IMAGE"],
        "category": "image/upscaling",
        "module": "nodes",
    },
    "ImageInvert": {
        "required": {"image": ["IMAGE"]},
        "output": ["IMAGE"],
        "category": "image",
        "module": "nodes",
    },
    "ImageBatch": {
        "required": {"image1": ["IMAGE"], "image2": ["IMAGE"]},
        "output": ["IMAGE"],
        "category": "image",
        "module": "nodes",
    },
    "ImageCrop": {
        "required": {
            "image": ["IMAGE"],
            "width": _int(512, 1, M),
            "height": _int(512, 1, M),
            "x": _int(0, 0, M),
            "y": _int(0, 0, M),
        },
        "output": ["IMAGE"],
        "category": "image/transform",
        "module": "comfy_extras.nodes_images",
    },
    "ImagePadForOutpaint": {
        "required": {
            "image": ["IMAGE"],
            "left": _int(0, 0, M, step=8),
            "top": _int(0, 0, M, step=8),
            "right": _int(0, 0, M, step=8),
            "bottom": _int(0, 0, M, step=8),
            "feathering": _int(40, 0, M),
        },
        "output": ["IMAGE", "MASK"],
        "category": "image",
        "module": "nodes",
    },
    "ImageCompositeMasked": {
        "required": {
            "destination": ["IMAGE"],
            "source": ["IMAGE"],
            "x": _int(0, 0, M),
            "y": _int(0, 0, M),
            "resize_source": ["BOOLEAN", {"default": False}],
        },
        "optional": {"mask": ["MASK"]},
        "output": ["IMAGE"],
        "category": "image",
        "module": "comfy_extras.nodes_mask",
    },
    "SolidMask": {
        "required": {
            "value": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}],
            "width": _int(512, 1, M),
            "height": _int(512, 1, M),
        },
        "output": ["MASK"],
        "category": "mask",
        "module": "comfy_extras.nodes_mask",
    },
    "InvertMask": {
        "required": {"mask": ["MASK"]},
        "output": ["MASK"],
        "category": "mask",
        "module": "comfy_extras.nodes_mask",
    },
    "MaskToImage": {
        "required": {"mask": ["MASK"]},
        "output": ["IMAGE"],
        "category": "mask",
        "module": "comfy_extras.nodes_mask",
    },
    "ImageToMask": {
        "required": {"image": ["IMAGE"], "channel": [["red", "green", "blue", "alpha"]]},
        "output": ["MASK"],
        "category": "mask",
        "module": "comfy_extras.nodes_mask",
    },
}


def _same_input(kiln: list[Any], comfy: list[Any]) -> bool:
    """One rendered input against ComfyUI's tuple. A combo may carry its first choice as default
    (the choice ComfyUI's front end preselects); nothing else may differ."""
    if isinstance(comfy[0], list):
        options = dict(kiln[1]) if len(kiln) > 1 else {}
        if (
            "default" in options
            and options["default"] == comfy[0][0]
            and "default" not in (comfy[1:] or [{}])[0]
        ):
            del options["default"]
        return kiln[0] == comfy[0] and options == (comfy[1] if len(comfy) > 1 else {})
    return kiln == comfy


def test_specs_cover_exactly_the_comfyui_nodes_listed():
    assert [spec.class_type for spec in IMAGE_NODE_SPECS] == list(COMFY)


@pytest.mark.parametrize("class_type", list(COMFY))
def test_spec_matches_comfyui_declaration(class_type: str):
    comfy = COMFY[class_type]
    spec = REGISTRY.get(class_type)
    assert spec is not None
    info = render_node_info(spec, StaticInventory({"input_images": INPUT_FILES}))
    for category in ("required", "optional"):
        kiln_inputs = info["input"].get(category, {})
        comfy_inputs = comfy.get(category, {})
        assert list(kiln_inputs) == list(comfy_inputs), f"{category} input names or order"
        for name, declared in comfy_inputs.items():
            assert _same_input(kiln_inputs[name], declared), f"{name}: {kiln_inputs[name]} != {declared}"
    assert info["input"].get("hidden", {}) == comfy.get("hidden", {})
    assert info["output"] == comfy["output"]
    assert info["output_node"] == comfy.get("output_node", False)
    assert info["category"] == comfy["category"]
    assert info["python_module"] == comfy["module"]


def test_same_input_helper_rejects_differences():
    # The comparison above must be able to fail.
    assert not _same_input(["INT", {"default": 0, "min": 0, "max": 8, "step": 1}], _int(0, 0, 8, step=8))
    assert not _same_input([["a", "b"], {"default": "b"}], [["a", "b"]])
    assert not _same_input([["a", "b"]], [["b", "a"]])
    assert _same_input([["a", "b"], {"default": "a"}], [["a", "b"]])


# -- EmptyImage --------------------------------------------------------------------------------


@pytest.mark.parametrize("color", [0x000000, 0xFFFFFF, 0xFF0000, 0x00FF00, 0x0000FF, 0x336699, 0x010203])
def test_empty_image_colour_channels_and_shape(ctx: NodeContext, color: int):
    (image,) = run(ctx, "EmptyImage", width=7, height=5, batch_size=3, color=color)
    assert image.shape == (3, 5, 7, 3)
    assert image.dtype == torch.float32
    red, green, blue = color // 65536, (color // 256) % 256, color % 256
    for channel, byte in enumerate((red, green, blue)):
        assert torch.equal(image[..., channel], torch.full((3, 5, 7), byte / 255.0, dtype=torch.float32))


# -- ImageScale / ImageScaleBy -----------------------------------------------------------------

METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("width", "height"), [(17, 11), (5, 3), (9, 14)])
def test_image_scale_methods(ctx: NodeContext, method: str, width: int, height: int):
    image = random_image(2, 10, 12, seed=1)
    (out,) = run(
        ctx, "ImageScale", image=image, upscale_method=method, width=width, height=height, crop="disabled"
    )
    assert out.shape == (2, height, width, 3)
    expected = nhwc_reference(image, width, height, method, "disabled")
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=0)


def test_image_scale_lanczos_works_on_8_bit_values(ctx: NodeContext):
    image = random_image(1, 6, 6, seed=2)
    (out,) = run(ctx, "ImageScale", image=image, upscale_method="lanczos", width=9, height=4, crop="disabled")
    assert torch.equal(out * 255.0, (out * 255.0).round())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("source_hw", "target_wh"), [((20, 40), (10, 10)), ((40, 20), (10, 10)), ((20, 45), (10, 10))]
)
def test_image_scale_center_crop(
    ctx: NodeContext, method: str, source_hw: tuple[int, int], target_wh: tuple[int, int]
):
    image = random_image(1, *source_hw, seed=3)
    width, height = target_wh
    (out,) = run(
        ctx, "ImageScale", image=image, upscale_method=method, width=width, height=height, crop="center"
    )
    torch.testing.assert_close(out, nhwc_reference(image, width, height, method, "center"), atol=2e-6, rtol=0)


def test_center_crop_offsets_follow_comfyui_rounding():
    # 45x20 to a square: x = round((45 - 45 * (1 / 2.25)) / 2) = round(12.5) = 12 (round half to even).
    cropped = comfy_center_crop(torch.zeros(1, 1, 20, 45), 10, 10)
    assert cropped.shape[-1] == 45 - 2 * 12
    assert comfy_center_crop(torch.zeros(1, 1, 40, 20), 10, 10).shape[-2:] == (20, 20)


@pytest.mark.parametrize(
    ("height_width", "width", "height", "expected_hw"),
    [
        ((10, 25), 0, 5, (5, 12)),  # 25 * 5 / 10 = 12.5 rounds half to even
        ((10, 25), 0, 7, (7, 18)),  # 17.5 -> 18
        ((5, 2), 1, 0, (2, 1)),  # 5 * 1 / 2 = 2.5 -> 2
        ((10, 1), 0, 1, (1, 1)),  # 0.1 rounds to 0, then max(1, ...)
        ((1, 10), 1, 0, (1, 1)),
        ((10, 20), 8, 0, (4, 8)),
    ],
)
def test_image_scale_keeps_aspect_when_one_side_is_zero(
    ctx: NodeContext, height_width, width, height, expected_hw
):
    image = random_image(1, *height_width, seed=4)
    (out,) = run(
        ctx, "ImageScale", image=image, upscale_method="bilinear", width=width, height=height, crop="disabled"
    )
    assert tuple(out.shape[1:3]) == expected_hw
    torch.testing.assert_close(
        out, nhwc_reference(image, expected_hw[1], expected_hw[0], "bilinear", "disabled"), atol=2e-6, rtol=0
    )


def test_image_scale_zero_by_zero_returns_the_input(ctx: NodeContext):
    image = random_image(1, 4, 5)
    (out,) = run(ctx, "ImageScale", image=image, upscale_method="bicubic", width=0, height=0, crop="center")
    assert out is image


@pytest.mark.parametrize(
    ("height_width", "scale", "expected_hw"),
    [((7, 10), 1.5, (10, 15)), ((6, 10), 0.25, (2, 2)), ((5, 9), 1.5, (8, 14)), ((4, 4), 2.0, (8, 8))],
)
@pytest.mark.parametrize("method", ["bilinear", "area", "lanczos"])
def test_image_scale_by_rounds_half_to_even(ctx: NodeContext, height_width, scale, expected_hw, method):
    image = random_image(1, *height_width, seed=5)
    (out,) = run(ctx, "ImageScaleBy", image=image, upscale_method=method, scale_by=scale)
    assert tuple(out.shape[1:3]) == expected_hw
    torch.testing.assert_close(
        out, nhwc_reference(image, expected_hw[1], expected_hw[0], method, "disabled"), atol=2e-6, rtol=0
    )


# -- ImageInvert / ImageBatch / ImageCrop ------------------------------------------------------


def test_image_invert(ctx: NodeContext):
    image = random_image(2, 3, 4)
    (out,) = run(ctx, "ImageInvert", image=image)
    assert torch.equal(out, 1.0 - image)


def test_image_batch_same_size_concatenates(ctx: NodeContext):
    first, second = random_image(1, 4, 6, seed=1), random_image(2, 4, 6, seed=2)
    (out,) = run(ctx, "ImageBatch", image1=first, image2=second)
    assert torch.equal(out, torch.cat((first, second)))


def test_image_batch_rescales_second_image_bilinear_center_crop(ctx: NodeContext):
    first, second = random_image(1, 8, 12, seed=1), random_image(2, 10, 10, seed=2)
    (out,) = run(ctx, "ImageBatch", image1=first, image2=second)
    assert out.shape == (3, 8, 12, 3)
    assert torch.equal(out[:1], first)
    # Aspect 1.5 from a square: y = round((10 - 10 / 1.5) / 2) = 2, rows 2..8, then bilinear.
    expected = reference_resize(second.permute(0, 3, 1, 2)[:, :, 2:8, :], 12, 8, "bilinear").permute(
        0, 2, 3, 1
    )
    torch.testing.assert_close(out[1:], expected, atol=2e-6, rtol=0)


def test_image_batch_gives_rgb_an_opaque_alpha_next_to_rgba(ctx: NodeContext):
    rgb, rgba = random_image(1, 4, 4, 3, seed=1), random_image(1, 4, 4, 4, seed=2)
    (out,) = run(ctx, "ImageBatch", image1=rgb, image2=rgba)
    assert out.shape == (2, 4, 4, 4)
    assert torch.equal(out[0, ..., :3], rgb[0]) and torch.equal(out[0, ..., 3], torch.ones(4, 4))
    assert torch.equal(out[1], rgba[0])


@pytest.mark.parametrize(
    ("width", "height", "x", "y", "rows", "cols"),
    [
        (3, 2, 1, 2, slice(2, 4), slice(1, 4)),
        (100, 100, 0, 0, slice(0, 6), slice(0, 8)),
        (4, 4, 50, 1, slice(1, 5), slice(7, 8)),  # x clamps to width - 1
        (2, 3, 6, 90, slice(5, 6), slice(6, 8)),  # y clamps to height - 1
    ],
)
def test_image_crop_clamps_origin(ctx: NodeContext, width, height, x, y, rows, cols):
    image = random_image(2, 6, 8)
    (out,) = run(ctx, "ImageCrop", image=image, width=width, height=height, x=x, y=y)
    assert torch.equal(out, image[:, rows, cols, :])


# -- ImagePadForOutpaint -----------------------------------------------------------------------


def comfy_outpaint_mask(
    height: int, width: int, left: int, top: int, right: int, bottom: int, feathering: int
):
    """ComfyUI's feathered mask, written as its double loop over the original pixels."""
    mask = torch.ones((height + top + bottom, width + left + right), dtype=torch.float32)
    inner = torch.zeros((height, width), dtype=torch.float32)
    if feathering > 0 and feathering * 2 < height and feathering * 2 < width:
        for i in range(height):
            for j in range(width):
                d = min(
                    i if top != 0 else height,
                    height - i if bottom != 0 else height,
                    j if left != 0 else width,
                    width - j if right != 0 else width,
                )
                if d < feathering:
                    v = (feathering - d) / feathering
                    inner[i, j] = v * v
    mask[top : top + height, left : left + width] = inner
    return mask


@pytest.mark.parametrize(
    ("pads", "feathering"),
    [
        ((8, 0, 16, 8), 5),
        ((0, 8, 0, 0), 7),
        ((8, 8, 8, 8), 3),
        ((0, 0, 0, 0), 4),
        ((8, 16, 0, 8), 0),
        ((8, 0, 8, 0), 10),  # 2 * feathering == height: no feathering
        ((8, 0, 8, 0), 40),
    ],
)
def test_image_pad_for_outpaint(ctx: NodeContext, pads: tuple[int, int, int, int], feathering: int):
    left, top, right, bottom = pads
    image = random_image(2, 20, 23, seed=6)
    out, mask = run(
        ctx,
        "ImagePadForOutpaint",
        image=image,
        left=left,
        top=top,
        right=right,
        bottom=bottom,
        feathering=feathering,
    )
    assert out.shape == (2, 20 + top + bottom, 23 + left + right, 3)
    assert out.dtype == torch.float32
    assert torch.equal(out[:, top : top + 20, left : left + 23], image)
    border = torch.ones(out.shape[1:3], dtype=torch.bool)
    border[top : top + 20, left : left + 23] = False
    assert torch.all(out[:, border] == 0.5)
    expected = comfy_outpaint_mask(20, 23, left, top, right, bottom, feathering)
    assert mask.shape == (1, *expected.shape)
    assert torch.equal(mask[0], expected)


# -- masks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.0, 0.3, 1.0])
def test_solid_mask(ctx: NodeContext, value: float):
    (mask,) = run(ctx, "SolidMask", value=value, width=6, height=4)
    assert mask.shape == (1, 4, 6) and mask.dtype == torch.float32
    assert torch.equal(mask, torch.full((1, 4, 6), value, dtype=torch.float32))


def test_invert_mask(ctx: NodeContext):
    mask = torch.rand(2, 3, 5)
    (out,) = run(ctx, "InvertMask", mask=mask)
    assert torch.equal(out, 1.0 - mask)


@pytest.mark.parametrize("shape", [(2, 3, 5), (3, 5)])
def test_mask_to_image(ctx: NodeContext, shape: tuple[int, ...]):
    mask = torch.rand(shape)
    (image,) = run(ctx, "MaskToImage", mask=mask)
    batched = mask.reshape(-1, 3, 5)
    assert image.shape == (batched.shape[0], 3, 5, 3)
    for channel in range(3):
        assert torch.equal(image[..., channel], batched)


@pytest.mark.parametrize(("channel", "index"), [("red", 0), ("green", 1), ("blue", 2), ("alpha", 3)])
def test_image_to_mask_each_channel(ctx: NodeContext, channel: str, index: int):
    image = random_image(2, 3, 4, channels=4)
    (mask,) = run(ctx, "ImageToMask", image=image, channel=channel)
    assert mask.shape == (2, 3, 4)
    assert torch.equal(mask, image[..., index])


def test_image_to_mask_alpha_of_rgb_is_an_error(ctx: NodeContext):
    with pytest.raises((ValueError, IndexError)):
        run(ctx, "ImageToMask", image=random_image(1, 2, 2), channel="alpha")


# -- ImageCompositeMasked ----------------------------------------------------------------------


def comfy_composite(destination, source, x, y, mask=None, resize_source=False):
    """ComfyUI's image composite, as a per-pixel loop over NHWC arrays (channels already matched)."""
    dest = destination.double().numpy().copy()
    src = source.double().numpy()
    if resize_source:
        src = reference_resize(source.permute(0, 3, 1, 2), dest.shape[2], dest.shape[1], "bilinear")
        src = src.permute(0, 2, 3, 1).double().numpy()
    src = np.concatenate([src] * math.ceil(dest.shape[0] / src.shape[0]))[: dest.shape[0]]
    if mask is None:
        weights = np.ones(src.shape[:3])
    else:
        m = mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1])
        m = reference_resize(m, src.shape[2], src.shape[1], "bilinear")[:, 0].double().numpy()
        weights = np.concatenate([m] * math.ceil(src.shape[0] / m.shape[0]))[: src.shape[0]]
    for b in range(dest.shape[0]):
        for row in range(dest.shape[1]):
            for col in range(dest.shape[2]):
                sy, sx = row - y, col - x
                if 0 <= sy < src.shape[1] and 0 <= sx < src.shape[2]:
                    w = weights[b, sy, sx]
                    dest[b, row, col] = w * src[b, sy, sx] + (1 - w) * dest[b, row, col]
    return torch.from_numpy(dest).float()


@pytest.mark.parametrize(
    ("x", "y"), [(0, 0), (2, 3), (7, 1), (9, 4), (11, 9), (12, 0), (0, 10), (500, 500), (3, 8)]
)
@pytest.mark.parametrize("with_mask", [False, True])
def test_image_composite_masked_offsets(ctx: NodeContext, x: int, y: int, with_mask: bool):
    destination = random_image(2, 10, 12, seed=1)
    source = random_image(2, 4, 5, seed=2)
    mask = torch.rand(2, 4, 5, generator=torch.Generator().manual_seed(3)) if with_mask else None
    before = destination.clone()
    (out,) = run(
        ctx,
        "ImageCompositeMasked",
        destination=destination,
        source=source,
        x=x,
        y=y,
        resize_source=False,
        mask=mask,
    )
    torch.testing.assert_close(out, comfy_composite(destination, source, x, y, mask), atol=1e-6, rtol=0)
    assert torch.equal(destination, before), "the destination input must not be modified"


def test_image_composite_masked_resizes_mask_and_repeats_batches(ctx: NodeContext):
    destination = random_image(3, 9, 11, seed=1)
    source = random_image(1, 5, 6, seed=2)
    mask = torch.rand(1, 3, 4, generator=torch.Generator().manual_seed(3))
    (out,) = run(
        ctx,
        "ImageCompositeMasked",
        destination=destination,
        source=source,
        x=7,
        y=2,
        resize_source=False,
        mask=mask,
    )
    torch.testing.assert_close(out, comfy_composite(destination, source, 7, 2, mask), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("x", "y"), [(0, 0), (3, 2)])
def test_image_composite_masked_resize_source(ctx: NodeContext, x: int, y: int):
    destination = random_image(1, 9, 11, seed=1)
    source = random_image(1, 4, 3, seed=2)
    mask = torch.rand(4, 3, generator=torch.Generator().manual_seed(3))
    (out,) = run(
        ctx,
        "ImageCompositeMasked",
        destination=destination,
        source=source,
        x=x,
        y=y,
        resize_source=True,
        mask=mask,
    )
    expected = comfy_composite(destination, source, x, y, mask, resize_source=True)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_image_composite_masked_matches_channels(ctx: NodeContext):
    rgb, rgba = random_image(1, 6, 6, 3, seed=1), random_image(1, 3, 3, 4, seed=2)
    # RGBA onto RGB: the source's alpha is dropped.
    (out,) = run(ctx, "ImageCompositeMasked", destination=rgb, source=rgba, x=1, y=1, resize_source=False)
    assert out.shape == (1, 6, 6, 3)
    assert torch.equal(out[:, 1:4, 1:4], rgba[..., :3])
    # RGB onto RGBA: the source is opaque.
    small = random_image(1, 2, 2, 3, seed=3)
    (out,) = run(
        ctx,
        "ImageCompositeMasked",
        destination=random_image(1, 4, 4, 4),
        source=small,
        x=0,
        y=0,
        resize_source=False,
    )
    assert torch.equal(out[:, :2, :2, :3], small) and torch.equal(out[:, :2, :2, 3], torch.ones(1, 2, 2))


# -- the executor path -------------------------------------------------------------------------


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_node_through_the_executor(runtime: EngineRuntime, engine_settings):
    """One prompt using all sixteen nodes; the saved PNG equals the ops applied by hand."""
    rgba = np.random.default_rng(7).integers(0, 256, (12, 16, 4), dtype=np.uint8)
    (engine_settings.input_dir / "in.png").write_bytes(_png(rgba))
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
        "2": {
            "class_type": "ImageScale",
            "inputs": {
                "image": ["1", 0],
                "upscale_method": "bilinear",
                "width": 0,
                "height": 6,
                "crop": "disabled",
            },
        },
        "3": {
            "class_type": "ImageScaleBy",
            "inputs": {"image": ["2", 0], "upscale_method": "area", "scale_by": 2.0},
        },
        "4": {"class_type": "ImageInvert", "inputs": {"image": ["3", 0]}},
        "5": {
            "class_type": "EmptyImage",
            "inputs": {"width": 24, "height": 12, "batch_size": 1, "color": 0x102030},
        },
        "6": {"class_type": "ImageBatch", "inputs": {"image1": ["4", 0], "image2": ["5", 0]}},
        "7": {
            "class_type": "ImageCrop",
            "inputs": {"image": ["6", 0], "width": 16, "height": 8, "x": 2, "y": 1},
        },
        "8": {
            "class_type": "ImagePadForOutpaint",
            "inputs": {"image": ["7", 0], "left": 8, "top": 0, "right": 0, "bottom": 8, "feathering": 3},
        },
        "9": {"class_type": "LoadImageMask", "inputs": {"image": "in.png", "channel": "alpha"}},
        "10": {"class_type": "InvertMask", "inputs": {"mask": ["9", 0]}},
        "11": {"class_type": "MaskToImage", "inputs": {"mask": ["10", 0]}},
        "12": {"class_type": "ImageToMask", "inputs": {"image": ["11", 0], "channel": "green"}},
        "13": {"class_type": "SolidMask", "inputs": {"value": 0.25, "width": 4, "height": 4}},
        "14": {
            "class_type": "ImageCompositeMasked",
            "inputs": {
                "destination": ["8", 0],
                "source": ["11", 0],
                "x": 3,
                "y": 2,
                "resize_source": False,
                "mask": ["12", 0],
            },
        },
        "15": {
            "class_type": "ImageCompositeMasked",
            "inputs": {
                "destination": ["14", 0],
                "source": ["8", 0],
                "x": 20,
                "y": 10,
                "resize_source": False,
                "mask": ["13", 0],
            },
        },
        "16": {"class_type": "SaveImage", "inputs": {"images": ["15", 0], "filename_prefix": "all/nodes"}},
        "17": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }
    assert {node["class_type"] for node in prompt.values()} == set(COMFY)
    result = runtime.execute(prompt)
    assert [entry["filename"] for entry in result.outputs["16"]["images"]] == [
        "nodes_00001_.png",
        "nodes_00002_.png",
    ]

    # The same computation, op by op.
    c = NodeContext("x", "x", "p", runtime.executor.services, NullSink(), InterruptFlag(), [])
    image, _ = run(c, "LoadImage", image="in.png")
    (image,) = run(
        c, "ImageScale", image=image, upscale_method="bilinear", width=0, height=6, crop="disabled"
    )
    assert image.shape == (1, 6, 8, 3)
    (image,) = run(c, "ImageScaleBy", image=image, upscale_method="area", scale_by=2.0)
    (image,) = run(c, "ImageInvert", image=image)
    (empty,) = run(c, "EmptyImage", width=24, height=12, batch_size=1, color=0x102030)
    (image,) = run(c, "ImageBatch", image1=image, image2=empty)
    (image,) = run(c, "ImageCrop", image=image, width=16, height=8, x=2, y=1)
    padded, outpaint_mask = run(
        c, "ImagePadForOutpaint", image=image, left=8, top=0, right=0, bottom=8, feathering=3
    )
    (alpha,) = run(c, "LoadImageMask", image="in.png", channel="alpha")
    assert torch.equal(alpha[0], 1.0 - torch.from_numpy(rgba[..., 3].astype(np.float32) / 255.0))
    (as_image,) = run(c, "MaskToImage", mask=1.0 - alpha)
    (green,) = run(c, "ImageToMask", image=as_image, channel="green")
    (solid,) = run(c, "SolidMask", value=0.25, width=4, height=4)
    (image,) = run(
        c,
        "ImageCompositeMasked",
        destination=padded,
        source=as_image,
        x=3,
        y=2,
        resize_source=False,
        mask=green,
    )
    (image,) = run(
        c,
        "ImageCompositeMasked",
        destination=image,
        source=padded,
        x=20,
        y=10,
        resize_source=False,
        mask=solid,
    )
    for index, saved in enumerate(result.outputs["16"]["images"]):
        written = np.asarray(Image.open(engine_settings.output_dir / "all" / saved["filename"]))
        expected = np.clip(255.0 * image[index].numpy(), 0, 255).astype(np.uint8)
        assert np.array_equal(written, expected)
    preview = result.outputs["17"]["images"][0]
    assert preview["type"] == "temp"
    written = np.asarray(Image.open(engine_settings.temp_dir / preview["filename"]))
    assert np.array_equal(written, np.clip(255.0 * padded[0].numpy(), 0, 255).astype(np.uint8))
    assert outpaint_mask.shape == (1, 16, 22)


def test_registry_builds_from_the_specs():
    registry = NodeRegistry(IMAGE_NODE_SPECS)
    for spec in registry:
        assert callable(registry.implementation(spec.class_type))


@pytest.mark.parametrize(("x", "y"), [(0, 0), (17, 9), (40, 8), (64, 0), (7, 63)])
def test_composite_offsets_are_pixels_divided_by_the_multiplier(x: int, y: int):
    # Latent compositing passes offsets in pixels with multiplier 8 (ComfyUI's x // 8, y // 8).
    destination = random_image(1, 8, 8, 4, seed=1).permute(0, 3, 1, 2)
    source = random_image(1, 4, 4, 4, seed=2).permute(0, 3, 1, 2)
    out = composite(destination, source, x, y, None, 8)
    expected = comfy_composite(destination.permute(0, 2, 3, 1), source.permute(0, 2, 3, 1), x // 8, y // 8)
    torch.testing.assert_close(out.permute(0, 2, 3, 1), expected, atol=1e-6, rtol=0)
