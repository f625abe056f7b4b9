"""Random malformed prompts get Kiln's validation errors, never another exception."""

from __future__ import annotations

import contextlib
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import PromptValidationError
from engine.inventory import StaticInventory
from engine.prompt_json import parse_json
from engine.registry import default_registry
from engine.validation import validate_prompt
from tests.engine.prompts import invert_prompt, two_branch_prompt

REGISTRY = default_registry()
INVENTORY = StaticInventory({"input_images": ["cat.png"]})
CLASS_NAMES = [spec.class_type for spec in REGISTRY]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["1", "2", "3", "cat.png", "../x", "C:\\x", "nearest-exact", "center"]),
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
links = st.tuples(st.one_of(st.sampled_from(["1", "2", "3", "4", "99"]), json_values), json_values).map(list)
input_values = st.one_of(json_values, links)
input_names = st.sampled_from(
    ["image", "images", "width", "height", "color", "batch_size", "filename_prefix", "x"]
)
nodes = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {
            "class_type": st.one_of(st.sampled_from(CLASS_NAMES), json_values),
            "inputs": st.one_of(st.dictionaries(input_names, input_values, max_size=6), json_values),
        }
    ),
)
prompts = st.one_of(
    json_values,
    st.dictionaries(st.sampled_from(["1", "2", "3", "4", "5"]), nodes, max_size=5),
)


def check(prompt: object) -> None:
    try:
        validate_prompt(prompt, REGISTRY, INVENTORY)
    except PromptValidationError as exc:
        json.dumps(exc.to_dict())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompts)
def test_random_prompts_only_raise_validation_errors(prompt):
    check(prompt)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["1", "2", "3"]), input_names, input_values)
def test_mutated_valid_prompts_only_raise_validation_errors(node_id, name, value):
    prompt = invert_prompt()
    prompt[node_id]["inputs"][name] = value
    check(prompt)
    branches = two_branch_prompt()
    branches[node_id]["inputs"][name] = value
    check(branches)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_random_text_only_raises_validation_errors(text):
    with contextlib.suppress(PromptValidationError):
        check(parse_json(text))
