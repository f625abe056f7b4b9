"""One test per validation rule: the exact ComfyUI error type, and the node it is reported on."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from engine.errors import PromptValidationError
from engine.inventory import StaticInventory
from engine.limits import ValidationLimits
from engine.prompt_json import parse_json, unwrap_prompt
from engine.registry import NodeRegistry
from engine.validation import validate_prompt
from tests.engine.prompts import invert_prompt, two_branch_prompt

INVENTORY = StaticInventory({"input_images": ["cat.png", "sub/dog.png"]})


def fail(prompt: Any, registry: NodeRegistry, **limits: Any) -> PromptValidationError:
    with pytest.raises(PromptValidationError) as info:
        validate_prompt(prompt, registry, INVENTORY, ValidationLimits(**limits))
    body = info.value.to_dict()
    json.dumps(body)  # the error must be serialisable as the HTTP 400 body
    assert set(body) == {"error", "node_errors"}
    assert set(body["error"]) == {"type", "message", "details", "extra_info"}
    return info.value


def node_error_types(exc: PromptValidationError, node_id: str) -> list[str]:
    return [e["type"] for e in exc.node_errors[node_id]["errors"]]


def assert_node_error(exc: PromptValidationError, node_id: str, type_: str) -> dict[str, Any]:
    assert exc.error["type"] == "prompt_outputs_failed_validation"
    assert node_id in exc.node_errors, exc.node_errors
    entry = exc.node_errors[node_id]
    assert set(entry) == {"errors", "dependent_outputs", "class_type"}
    matching = [e for e in entry["errors"] if e["type"] == type_]
    assert matching, entry["errors"]
    assert set(matching[0]) == {"type", "message", "details", "extra_info"}
    return matching[0]


# -- whole-prompt structure ---------------------------------------------------------------


@pytest.mark.parametrize("prompt", [[], "text", 3, None, [{"class_type": "SaveImage"}]])
def test_prompt_that_is_not_an_object(registry, prompt):
    assert fail(prompt, registry).error["type"] == "invalid_prompt"


def test_node_that_is_not_an_object(registry):
    prompt = invert_prompt()
    prompt["2"] = ["ImageInvert"]
    exc = fail(prompt, registry)
    assert exc.error["type"] == "invalid_prompt"
    assert "#2" in exc.error["details"]


def test_missing_class_type(registry):
    prompt = invert_prompt()
    del prompt["2"]["class_type"]
    exc = fail(prompt, registry)
    assert exc.error["type"] == "invalid_prompt"
    assert exc.error["message"] == "Cannot execute because a node is missing the class_type property."
    assert exc.error["details"] == "Node ID '#2'"


@pytest.mark.parametrize("class_type", ["NoSuchNode", 42, None, ["SaveImage"]])
def test_unknown_class_type(registry, class_type):
    prompt = invert_prompt()
    prompt["2"]["class_type"] = class_type
    exc = fail(prompt, registry)
    assert exc.error["type"] == "invalid_prompt"
    assert exc.error["details"] == "Node ID '#2'"


def test_inputs_that_are_not_an_object(registry):
    prompt = invert_prompt()
    prompt["2"]["inputs"] = [["1", 0]]
    exc = fail(prompt, registry)
    assert exc.error["type"] == "invalid_prompt"
    assert exc.error["details"] == "Node ID '#2'"


def test_no_output_node(registry):
    prompt = invert_prompt()
    del prompt["3"]
    assert fail(prompt, registry).error["type"] == "prompt_no_outputs"


def test_node_count_limit(registry):
    prompt = invert_prompt()
    for i in range(10, 20):
        prompt[str(i)] = {"class_type": "EmptyImage", "inputs": {}}
    assert fail(prompt, registry, max_nodes=12).error["type"] == "prompt_too_large"


def test_node_id_length_limit(registry):
    prompt = invert_prompt()
    prompt["x" * 200] = prompt.pop("1")
    assert fail(prompt, registry).error["type"] == "invalid_prompt"


# -- inputs ---------------------------------------------------------------------------------


def test_required_input_missing(registry):
    prompt = invert_prompt()
    del prompt["1"]["inputs"]["width"]
    error = assert_node_error(fail(prompt, registry), "1", "required_input_missing")
    assert error["message"] == "Required input is missing"
    assert error["details"] == "width"
    assert error["extra_info"]["input_name"] == "width"


def test_optional_input_may_be_absent(registry):
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {
            "class_type": "ImageCompositeMasked",
            "inputs": {"destination": ["1", 0], "source": ["1", 0], "x": 0, "y": 0, "resize_source": False},
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    }
    assert validate_prompt(prompt, registry).outputs == ["3"]


@pytest.mark.parametrize("link", [["1"], ["1", 0, 0], []])
def test_link_of_wrong_length(registry, link):
    prompt = invert_prompt()
    prompt["2"]["inputs"]["image"] = link
    error = assert_node_error(fail(prompt, registry), "2", "bad_linked_input")
    assert error["message"] == "Bad linked input, must be a length-2 list of [node_id, slot_index]"


@pytest.mark.parametrize("link", [["1", "0"], ["1", 0.0], [None, 0], [{"a": 1}, 0], ["1", True]])
def test_link_with_wrong_element_types(registry, link):
    prompt = invert_prompt()
    prompt["2"]["inputs"]["image"] = link
    assert_node_error(fail(prompt, registry), "2", "bad_linked_input")


def test_link_to_missing_node(registry):
    prompt = invert_prompt()
    prompt["2"]["inputs"]["image"] = ["99", 0]
    assert_node_error(fail(prompt, registry), "2", "bad_linked_input")


@pytest.mark.parametrize("slot", [1, -1, 10**9])
def test_link_to_missing_output_slot(registry, slot):
    prompt = invert_prompt()
    prompt["2"]["inputs"]["image"] = ["1", slot]
    assert_node_error(fail(prompt, registry), "2", "bad_linked_input")


def test_integer_node_id_in_link_is_accepted(registry):
    prompt = invert_prompt()
    prompt["2"]["inputs"]["image"] = [1, 0]
    validated = validate_prompt(prompt, registry)
    assert validated.prompt["2"]["inputs"]["image"] == ["1", 0]


def test_return_type_mismatch(registry):
    prompt = {
        "1": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 8, "height": 8}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    }
    error = assert_node_error(fail(prompt, registry), "2", "return_type_mismatch")
    assert error["message"] == "Return type mismatch between linked nodes"
    assert error["details"] == "image, received_type(MASK) mismatch input_type(IMAGE)"
    assert error["extra_info"]["received_type"] == "MASK"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("width", "wide"),
        ("width", 8.5),  # a float where ComfyUI would silently truncate
        ("width", True),
        ("width", None),
        ("width", {"a": 1}),
        ("width", float("nan")),
        ("width", float("inf")),
        ("color", 2.0**60),  # not exactly representable as a JSON float
    ],
)
def test_invalid_int_values(registry, name, value):
    prompt = invert_prompt()
    prompt["1"]["inputs"][name] = value
    error = assert_node_error(fail(prompt, registry), "1", "invalid_input_type")
    assert error["message"] == "Failed to convert an input value to a INT value"
    assert error["extra_info"]["input_name"] == name


@pytest.mark.parametrize("value", [{"text": "x"}, ["a", "b", "c"], None, True, float("nan")])
def test_invalid_string_values(registry, value):
    prompt = invert_prompt()
    prompt["3"]["inputs"]["filename_prefix"] = value
    exc = fail(prompt, registry)
    types = node_error_types(exc, "3")
    assert types and set(types) <= {"invalid_input_type", "bad_linked_input"}


@pytest.mark.parametrize("value", ["yes", 2, None, 1.5])
def test_invalid_boolean_values(registry, value):
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {
            "class_type": "ImageCompositeMasked",
            "inputs": {"destination": ["1", 0], "source": ["1", 0], "x": 0, "y": 0, "resize_source": value},
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    }
    assert_node_error(fail(prompt, registry), "2", "invalid_input_type")


def test_float_nan_and_infinity(registry):
    prompt = {
        "1": {"class_type": "SolidMask", "inputs": {"value": float("nan"), "width": 8, "height": 8}},
        "2": {"class_type": "MaskToImage", "inputs": {"mask": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    }
    assert_node_error(fail(prompt, registry), "1", "invalid_input_type")
    prompt["1"]["inputs"]["value"] = float("-inf")
    assert_node_error(fail(prompt, registry), "1", "invalid_input_type")


def test_constant_given_to_a_linked_type(registry):
    prompt = invert_prompt()
    prompt["2"]["inputs"]["image"] = "cat.png"
    error = assert_node_error(fail(prompt, registry), "2", "invalid_input_type")
    assert "must be linked" in error["message"]


def test_coercions_comfyui_makes(registry):
    prompt = invert_prompt()
    prompt["1"]["inputs"].update(width="16", height=12.0, color={"__value__": 255})
    prompt["3"]["inputs"]["filename_prefix"] = 7
    validated = validate_prompt(prompt, registry)
    assert validated.prompt["1"]["inputs"]["width"] == 16
    assert validated.prompt["1"]["inputs"]["height"] == 12
    assert isinstance(validated.prompt["1"]["inputs"]["height"], int)
    assert validated.prompt["1"]["inputs"]["color"] == 255
    assert validated.prompt["3"]["inputs"]["filename_prefix"] == "7"


def test_boolean_coercions(registry):
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {
            "class_type": "ImageCompositeMasked",
            "inputs": {"destination": ["1", 0], "source": ["1", 0], "x": 0, "y": 0, "resize_source": "false"},
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    }
    assert validate_prompt(prompt, registry).prompt["2"]["inputs"]["resize_source"] is False
    prompt["2"]["inputs"]["resize_source"] = 1
    assert validate_prompt(prompt, registry).prompt["2"]["inputs"]["resize_source"] is True


def test_value_smaller_than_min(registry):
    prompt = invert_prompt()
    prompt["1"]["inputs"]["width"] = 0
    error = assert_node_error(fail(prompt, registry), "1", "value_smaller_than_min")
    assert error["message"] == "Value 0 smaller than min of 1"
    assert error["details"] == "width"


def test_value_bigger_than_max(registry):
    prompt = invert_prompt()
    prompt["1"]["inputs"]["height"] = 16385
    error = assert_node_error(fail(prompt, registry), "1", "value_bigger_than_max")
    assert error["message"] == "Value 16385 bigger than max of 16384"


def test_value_not_in_list(registry):
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "missing.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    }
    error = assert_node_error(fail(prompt, registry), "1", "value_not_in_list")
    assert error["message"] == "Value not in list"
    assert error["details"] == "image: 'missing.png' not in ['cat.png', 'sub/dog.png']"


def test_value_not_in_fixed_list(registry):
    prompt = invert_prompt()
    prompt["2"] = {
        "class_type": "ImageScale",
        "inputs": {"image": ["1", 0], "upscale_method": "magic", "width": 8, "height": 8, "crop": "disabled"},
    }
    assert_node_error(fail(prompt, registry), "2", "value_not_in_list")


def test_combo_accepts_listed_file(registry):
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "sub/dog.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    }
    assert validate_prompt(prompt, registry, INVENTORY).outputs == ["2"]


def test_self_link_is_a_cycle(registry):
    prompt = invert_prompt()
    prompt["2"]["inputs"]["image"] = ["2", 0]
    assert_node_error(fail(prompt, registry), "2", "dependency_cycle")


def test_longer_cycle(registry):
    prompt = {
        "1": {"class_type": "ImageInvert", "inputs": {"image": ["3", 0]}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}},
    }
    exc = fail(prompt, registry)
    cycle_nodes = [
        n for n, entry in exc.node_errors.items() if "dependency_cycle" in node_error_types(exc, n)
    ]
    assert len(cycle_nodes) == 1 and cycle_nodes[0] in {"1", "2", "3"}
    assert exc.node_errors[cycle_nodes[0]]["dependent_outputs"] == ["4"]


@pytest.mark.parametrize(
    "prefix",
    [
        "../escape",
        "a/../../escape",
        "/etc/passwd",
        "\\\\server\\share",
        "C:\\Windows\\x",
        "c:x",
        "~/x",
        "a\x00b",
    ],
)
def test_unsafe_output_prefix(registry, prefix):
    prompt = invert_prompt(prefix=prefix)
    assert_node_error(fail(prompt, registry), "3", "path_not_allowed")


@pytest.mark.parametrize("name", ["../cat.png", "/abs/cat.png", "D:/cat.png", "sub/../../cat.png"])
def test_unsafe_image_name(registry, name):
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    }
    inventory = StaticInventory({"input_images": [name]})  # even a listed name is refused
    with pytest.raises(PromptValidationError) as info:
        validate_prompt(prompt, registry, inventory)
    assert_node_error(info.value, "1", "path_not_allowed")


def test_safe_subfolder_prefix(registry):
    validated = validate_prompt(invert_prompt(prefix="runs/2024/img"), registry)
    assert validated.prompt["3"]["inputs"]["filename_prefix"] == "runs/2024/img"


def test_string_length_limit(registry):
    prompt = invert_prompt(prefix="p" * 101)
    assert_node_error(fail(prompt, registry, max_string_length=100), "3", "value_too_long")


def test_cost_limit(registry):
    prompt = invert_prompt(width=1024, height=1024)
    prompt["1"]["inputs"]["batch_size"] = 8
    exc = fail(prompt, registry, max_cost=1024 * 1024 * 8)  # EmptyImage + ImageInvert = 2x that
    assert exc.error["type"] == "cost_limit_exceeded"
    assert exc.error["extra_info"]["cost"] == 2 * 1024 * 1024 * 8
    assert validate_prompt(prompt, registry, limits=ValidationLimits(max_cost=2 * 1024 * 1024 * 8)).cost > 0


# -- graph scope ----------------------------------------------------------------------------


def test_nodes_no_output_needs_are_not_validated(registry):
    prompt = invert_prompt()
    prompt["9"] = {"class_type": "ImageInvert", "inputs": {"image": ["404", 7]}}
    validated = validate_prompt(prompt, registry)
    assert "9" not in validated.prompt
    assert validated.node_errors == {}


def test_one_bad_output_does_not_fail_the_good_one(registry):
    prompt = two_branch_prompt()
    prompt["5"]["inputs"]["image"] = ["404", 0]
    validated = validate_prompt(prompt, registry)
    assert validated.outputs == ["3"]
    assert set(validated.prompt) == {"1", "2", "3"}
    assert validated.node_errors["5"]["dependent_outputs"] == ["6"]


def test_dependent_outputs_lists_every_output(registry):
    prompt = invert_prompt()
    prompt["4"] = {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}
    prompt["1"]["inputs"]["width"] = -5
    exc = fail(prompt, registry)
    assert sorted(exc.node_errors["1"]["dependent_outputs"]) == ["3", "4"]
    assert exc.node_errors["1"]["class_type"] == "EmptyImage"
    # Downstream nodes are invalid too, but only the node with its own errors is reported.
    assert set(exc.node_errors) == {"1"}


def test_undeclared_inputs_are_dropped(registry):
    prompt = invert_prompt()
    prompt["2"]["inputs"]["unused"] = {"anything": [1, 2]}
    validated = validate_prompt(prompt, registry)
    assert "unused" not in validated.prompt["2"]["inputs"]


def test_validation_does_not_mutate_the_prompt(registry):
    prompt = invert_prompt()
    prompt["1"]["inputs"]["width"] = "16"
    before = copy.deepcopy(prompt)
    validate_prompt(prompt, registry)
    assert prompt == before


# -- raw JSON ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ['{"1": {"class_type": "SolidMask", "inputs": {"value": NaN}}}', '{"a": Infinity}']
)
def test_json_nan_and_infinity_refused(text):
    with pytest.raises(PromptValidationError) as info:
        parse_json(text)
    assert info.value.error["type"] == "invalid_prompt"


@pytest.mark.parametrize("depth", [65, 5000, 200_000])
def test_deeply_nested_json_refused(depth):
    with pytest.raises(PromptValidationError) as info:
        parse_json("[" * depth + "]" * depth)
    assert info.value.error["type"] == "invalid_prompt"


def test_body_size_limit():
    with pytest.raises(PromptValidationError):
        parse_json(json.dumps(invert_prompt()), ValidationLimits(max_body_bytes=50))


def test_ui_workflow_is_explained():
    with pytest.raises(PromptValidationError) as info:
        unwrap_prompt({"nodes": [], "links": [], "version": 0.4})
    assert "Save (API format)" in info.value.error["details"]


def test_wrapped_request_body_is_unwrapped():
    request = unwrap_prompt(
        {"prompt": invert_prompt(), "extra_data": {"extra_pnginfo": {"k": 1}}, "client_id": "c"}
    )
    assert request.prompt == invert_prompt()
    assert request.extra_data == {"extra_pnginfo": {"k": 1}}
    assert request.client_id == "c"
