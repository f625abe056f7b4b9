"""``/object_info`` in ComfyUI's exact shape, from the registry."""

from __future__ import annotations

import json

import pytest

from engine.inventory import FolderInventory, StaticInventory
from engine.registry import NodeRegistry
from engine.schema import IMAGE, NodeSpec, OutputSpec, link


def test_node_entry_shape(registry):
    info = registry.object_info(StaticInventory({"input_images": ["a.png", "b/c.png"]}))
    json.dumps(info)
    save = info["SaveImage"]
    assert set(save) >= {
        "input",
        "input_order",
        "output",
        "output_is_list",
        "output_name",
        "name",
        "display_name",
        "description",
        "python_module",
        "category",
        "output_node",
    }
    assert save["input"]["required"]["images"] == ["IMAGE", {"tooltip": "The images to save."}]
    assert save["input"]["required"]["filename_prefix"][0] == "STRING"
    assert save["input"]["required"]["filename_prefix"][1]["default"] == "ComfyUI"
    assert save["input"]["hidden"] == {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
    assert save["output"] == [] and save["output_node"] is True
    assert save["input_order"] == {"required": ["images", "filename_prefix"]}

    load = info["LoadImage"]
    assert load["input"]["required"]["image"] == [["a.png", "b/c.png"], {"image_upload": True}]
    assert load["output"] == ["IMAGE", "MASK"]
    assert load["output_name"] == ["IMAGE", "MASK"]
    assert load["output_is_list"] == [False, False]

    empty = info["EmptyImage"]["input"]["required"]
    assert empty["width"] == ["INT", {"default": 512, "min": 1, "max": 16384, "step": 1}]
    scale = info["ImageScale"]["input"]["required"]["upscale_method"]
    assert scale[0] == ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]


def test_combo_lists_the_input_folder(tmp_path, registry):
    (tmp_path / "input" / "sub").mkdir(parents=True)
    for name in ("b.png", "a.jpg", "sub/c.webp", "notes.txt", ".hidden.png"):
        (tmp_path / "input" / name).write_bytes(b"x")
    info = registry.object_info(FolderInventory(tmp_path / "input"))
    assert info["LoadImage"]["input"]["required"]["image"][0] == ["a.jpg", "b.png", "sub/c.webp"]


def test_optional_inputs_and_list_outputs_render():
    registry = NodeRegistry(
        [
            NodeSpec(
                "Demo",
                "test",
                "tests.engine.test_executor:failing_node",
                required=(link("image", IMAGE),),
                optional=(link("mask", "MASK"),),
                outputs=(OutputSpec(IMAGE, name="images", is_list=True, tooltip="all"),),
            )
        ]
    )
    info = registry.object_info()["Demo"]
    assert info["input"]["optional"] == {"mask": ["MASK"]}
    assert info["input_order"] == {"required": ["image"], "optional": ["mask"]}
    assert info["output_is_list"] == [True] and info["output_name"] == ["images"]
    assert info["output_tooltips"] == ["all"]


def test_duplicate_registration_is_refused(registry):
    with pytest.raises(ValueError):
        registry.register(registry.get("SaveImage"))


def test_every_builtin_implementation_resolves(registry):
    for spec in registry:
        assert callable(registry.implementation(spec.class_type)), spec.class_type


def test_every_node_is_documented(registry):
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[2] / "docs" / "nodes.md").read_text()
    missing = [spec.class_type for spec in registry if f"`{spec.class_type}`" not in docs]
    assert missing == []
