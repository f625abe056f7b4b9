"""Prompt validation: every check ComfyUI makes, in its error shape, plus the ones it misses.

``validate_prompt`` never raises anything but ``PromptValidationError`` on bad input, and it never
imports torch. It returns a normalised prompt (only the nodes the valid outputs need, inputs
coerced to their declared types, links as ``[str, int]``) that the executor runs as is.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.errors import PromptValidationError
from engine.inventory import Inventory, StaticInventory
from engine.limits import ValidationLimits
from engine.paths import unsafe_path_reason
from engine.registry import NodeRegistry, combo_choices
from engine.schema import ANY, BOOLEAN, COMBO, FLOAT, INT, STRING, ChoiceSource, InputSpec, NodeSpec, Shape

# Integers beyond this lose precision as JSON floats; ComfyUI seeds go up to 2**64 - 1 as ints.
_MAX_EXACT_FLOAT_INT = 2**53
_INT_TEXT = re.compile(r"^\s*[+-]?\d+\s*$")
_COMBO_LIST_IN_ERROR = 20


@dataclass
class ValidatedPrompt:
    """A prompt that passed validation, ready for the executor."""

    prompt: dict[str, dict[str, Any]]
    outputs: list[str]
    # Errors of outputs that failed while others passed (ComfyUI runs the good ones).
    node_errors: dict[str, Any] = field(default_factory=dict)
    cost: int = 0


def prompt_error(type_: str, message: str, details: str = "", **extra: Any) -> dict[str, Any]:
    return {"type": type_, "message": message, "details": details, "extra_info": extra}


def _fail(type_: str, message: str, details: str = "", **extra: Any) -> PromptValidationError:
    return PromptValidationError(prompt_error(type_, message, details, **extra))


def types_compatible(received: str, expected: str) -> bool:
    """ComfyUI's link type rule: equal, either side ``*``, or comma-separated unions that overlap."""
    if received == expected or ANY in (received, expected):
        return True
    got = {t.strip() for t in received.split(",")}
    want = {t.strip() for t in expected.split(",")}
    return bool(got & want)


class _Coercion(Exception):
    """A constant input could not be turned into its declared type."""


def _coerce_int(value: Any) -> int:
    if isinstance(value, bool):
        raise _Coercion("a boolean is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Coercion("value is not finite")
        if not value.is_integer():
            raise _Coercion("value has a fractional part")
        if abs(value) > _MAX_EXACT_FLOAT_INT:
            raise _Coercion("float is too large to be an exact integer; send it as a JSON integer")
        return int(value)
    if isinstance(value, str) and _INT_TEXT.match(value):
        return int(value)
    raise _Coercion(f"expected an integer, got {type(value).__name__}")


def _coerce_float(value: Any) -> float:
    if isinstance(value, bool):
        raise _Coercion("a boolean is not a number")
    if isinstance(value, int | float):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value)
        except ValueError as exc:
            raise _Coercion(f"{value!r} is not a number") from exc
    else:
        raise _Coercion(f"expected a number, got {type(value).__name__}")
    if not math.isfinite(result):
        raise _Coercion("value is not finite (NaN or Infinity)")
    return result


def _coerce_string(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise _Coercion("value is not finite (NaN or Infinity)")
        return str(value)
    raise _Coercion(f"expected a string, got {type(value).__name__}")


def _coerce_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _Coercion(f"expected a boolean, got {value!r}")


_COERCERS = {INT: _coerce_int, FLOAT: _coerce_float, STRING: _coerce_string, BOOLEAN: _coerce_bool}


class _PromptChecker:
    """One validation run. Holds the per-run memo tables; discarded afterwards."""

    def __init__(
        self,
        prompt: Mapping[str, Any],
        registry: NodeRegistry,
        inventory: Inventory,
        limits: ValidationLimits,
    ) -> None:
        self.prompt = prompt
        self.registry = registry
        self.inventory = inventory
        self.limits = limits
        self.specs: dict[str, NodeSpec] = {}
        self.own_errors: dict[str, list[dict[str, Any]]] = {}
        self.coerced: dict[str, dict[str, Any]] = {}
        # node id -> [(input name, upstream node id)] for links that are well formed and typed.
        self.links: dict[str, list[tuple[str, str]]] = {}
        self._choices_cache: dict[str, set[Any]] = {}

    # -- whole-prompt structure -------------------------------------------------------------

    def check_structure(self) -> list[str]:
        """ComfyUI's first pass over every node; returns the output node ids."""
        if not isinstance(self.prompt, Mapping):
            raise _fail("invalid_prompt", "Prompt must be a JSON object of nodes", type(self.prompt).__name__)
        if len(self.prompt) > self.limits.max_nodes:
            raise _fail(
                "prompt_too_large",
                f"Prompt has {len(self.prompt)} nodes; the limit is {self.limits.max_nodes}",
                max_nodes=self.limits.max_nodes,
            )
        outputs = []
        for node_id, node in self.prompt.items():
            details = f"Node ID '#{node_id}'"
            if not isinstance(node_id, str) or not node_id or len(node_id) > self.limits.max_node_id_length:
                raise _fail("invalid_prompt", "Node ids must be non-empty strings of bounded length", details)
            if not isinstance(node, Mapping):
                raise _fail("invalid_prompt", "Cannot execute because a node is not a JSON object.", details)
            if "class_type" not in node:
                raise _fail(
                    "invalid_prompt",
                    "Cannot execute because a node is missing the class_type property.",
                    details,
                )
            class_type = node["class_type"]
            spec = self.registry.get(class_type) if isinstance(class_type, str) else None
            if spec is None:
                shown = class_type if isinstance(class_type, str) else repr(class_type)
                raise _fail(
                    "invalid_prompt", f"Cannot execute because node {shown[:200]} does not exist.", details
                )
            inputs = node.get("inputs", {})
            if not isinstance(inputs, Mapping):
                raise _fail(
                    "invalid_prompt", "Cannot execute because a node's inputs are not a JSON object.", details
                )
            self.specs[node_id] = spec
            if spec.output_node:
                outputs.append(node_id)
        if not outputs:
            raise _fail("prompt_no_outputs", "Prompt has no outputs")
        return sorted(outputs, key=_node_sort_key)

    # -- one node's inputs --------------------------------------------------------------------

    def check_node(self, node_id: str) -> None:
        spec = self.specs[node_id]
        inputs: Mapping[str, Any] = self.prompt[node_id].get("inputs", {})
        errors: list[dict[str, Any]] = []
        coerced: dict[str, Any] = {}
        links: list[tuple[str, str]] = []
        for input_spec in spec.declared_inputs:
            name = input_spec.name
            if name not in inputs:
                if input_spec in spec.required:
                    errors.append(
                        _node_error("required_input_missing", "Required input is missing", name, name)
                    )
                continue
            value = inputs[name]
            if isinstance(value, dict) and "__value__" in value:
                value = value["__value__"]
            if isinstance(value, list):
                error, upstream = self._check_link(input_spec, value)
                if error is not None:
                    errors.append(error)
                    continue
                assert upstream is not None
                coerced[name] = [upstream[0], upstream[1]]
                links.append((name, upstream[0]))
                continue
            error, converted = self._check_constant(input_spec, value)
            if error is not None:
                errors.append(error)
                continue
            coerced[name] = converted
        self.own_errors[node_id] = errors
        self.coerced[node_id] = coerced
        self.links[node_id] = links

    def _check_link(
        self, spec: InputSpec, value: list[Any]
    ) -> tuple[dict[str, Any] | None, tuple[str, int] | None]:
        name = spec.name
        if len(value) != 2:
            return _node_error(
                "bad_linked_input",
                "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                name,
                input_config=_input_config(spec),
                received_value=_clip(value),
                input_name=name,
            ), None
        upstream_id, slot = value
        if isinstance(upstream_id, int) and not isinstance(upstream_id, bool):
            upstream_id = str(upstream_id)
        if not isinstance(upstream_id, str) or isinstance(slot, bool) or not isinstance(slot, int):
            return _node_error(
                "bad_linked_input",
                "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                name,
                input_config=_input_config(spec),
                received_value=_clip(value),
                input_name=name,
            ), None
        upstream_spec = self.specs.get(upstream_id)
        if upstream_spec is None:
            return _node_error(
                "bad_linked_input",
                f"Linked node '{upstream_id[:128]}' does not exist in the prompt",
                name,
                input_config=_input_config(spec),
                received_value=_clip(value),
                input_name=name,
            ), None
        if not 0 <= slot < len(upstream_spec.outputs):
            return _node_error(
                "bad_linked_input",
                f"Linked node '{upstream_id}' ({upstream_spec.class_type}) has no output slot {slot}",
                name,
                input_config=_input_config(spec),
                received_value=_clip(value),
                input_name=name,
            ), None
        received = upstream_spec.outputs[slot].type
        expected = spec.type
        if not types_compatible(received, expected):
            return _node_error(
                "return_type_mismatch",
                "Return type mismatch between linked nodes",
                f"{name}, received_type({received}) mismatch input_type({expected})",
                input_config=_input_config(spec),
                received_type=received,
                linked_node=[upstream_id, slot],
                input_name=name,
            ), None
        return None, (upstream_id, slot)

    def _check_constant(self, spec: InputSpec, value: Any) -> tuple[dict[str, Any] | None, Any]:
        name = spec.name
        if not spec.is_widget:
            return _node_error(
                "invalid_input_type",
                f"Input of type {spec.type} must be linked to another node's output",
                f"{name}, {_clip(value)!s}",
                input_config=_input_config(spec),
                received_value=_clip(value),
                input_name=name,
            ), None
        if spec.type == COMBO:
            return self._check_combo(spec, value)
        try:
            converted = _COERCERS[spec.type](value)
        except _Coercion as exc:
            return _node_error(
                "invalid_input_type",
                f"Failed to convert an input value to a {spec.type} value",
                f"{name}, {_clip(value)!s}, {exc}",
                input_config=_input_config(spec),
                received_value=_clip(value),
                exception_message=str(exc),
                input_name=name,
            ), None
        if isinstance(converted, str):
            error = self._check_string(spec, converted)
            if error is not None:
                return error, None
        elif spec.type in (INT, FLOAT):
            if spec.min is not None and converted < spec.min:
                return _node_error(
                    "value_smaller_than_min",
                    f"Value {converted} smaller than min of {spec.min}",
                    name,
                    input_config=_input_config(spec),
                    received_value=converted,
                    input_name=name,
                ), None
            if spec.max is not None and converted > spec.max:
                return _node_error(
                    "value_bigger_than_max",
                    f"Value {converted} bigger than max of {spec.max}",
                    name,
                    input_config=_input_config(spec),
                    received_value=converted,
                    input_name=name,
                ), None
        return None, converted

    def _check_string(self, spec: InputSpec, value: str) -> dict[str, Any] | None:
        if len(value) > self.limits.max_string_length:
            return _node_error(
                "value_too_long",
                f"String of {len(value)} characters is over the limit of {self.limits.max_string_length}",
                spec.name,
                input_config=_input_config(spec),
                max_length=self.limits.max_string_length,
                input_name=spec.name,
            )
        if spec.is_path:
            reason = unsafe_path_reason(value)
            if reason is not None:
                return _node_error(
                    "path_not_allowed",
                    f"File name {reason}",
                    f"{spec.name}: '{_clip(value)}'",
                    input_config=_input_config(spec),
                    received_value=_clip(value),
                    input_name=spec.name,
                )
        return None

    def _check_combo(self, spec: InputSpec, value: Any) -> tuple[dict[str, Any] | None, Any]:
        name = spec.name
        if not isinstance(value, str | int | float) or (
            isinstance(value, float) and not math.isfinite(value)
        ):
            return _node_error(
                "invalid_input_type",
                "Failed to convert an input value to a COMBO value",
                f"{name}, {_clip(value)!s}, expected one of the listed values",
                input_config=_input_config(spec),
                received_value=_clip(value),
                input_name=name,
            ), None
        if isinstance(value, str):
            error = self._check_string(spec, value)
            if error is None and isinstance(spec.choices, ChoiceSource):
                error = self._check_string(_as_path(spec), value)
            if error is not None:
                return error, None
        options = self._choices(spec)
        if value not in options:
            listing = combo_choices(spec, self.inventory)
            long_list = len(listing) > _COMBO_LIST_IN_ERROR
            list_info = f"(list of length {len(listing)})" if long_list else str(listing)
            return _node_error(
                "value_not_in_list",
                "Value not in list",
                f"{name}: '{_clip(value)}' not in {list_info}",
                input_config=None if long_list else [listing, spec.object_info_options()],
                received_value=_clip(value),
                input_name=name,
            ), None
        return None, value

    def _choices(self, spec: InputSpec) -> set[Any]:
        if isinstance(spec.choices, ChoiceSource):
            key = spec.choices.kind
            if key not in self._choices_cache:
                self._choices_cache[key] = set(self.inventory.list_choices(key))
            return self._choices_cache[key]
        return set(spec.choices or ())

    # -- the graph ------------------------------------------------------------------------

    def reachable(self, output_id: str) -> list[str]:
        """Nodes ``output_id`` depends on, itself included, in dependency order (post-order).

        Checks each node on first sight and reports a link that closes a cycle as an error of the
        node that holds it.
        """
        order: list[str] = []
        state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
        stack: list[tuple[str, int]] = [(output_id, 0)]
        while stack:
            node_id, next_link = stack.pop()
            if next_link == 0:
                if state.get(node_id) == 2:
                    continue
                state[node_id] = 1
                if node_id not in self.own_errors:
                    self.check_node(node_id)
            links = self.links[node_id]
            if next_link < len(links):
                stack.append((node_id, next_link + 1))
                input_name, upstream = links[next_link]
                if state.get(upstream) == 1:
                    self.own_errors[node_id].append(
                        _node_error(
                            "dependency_cycle",
                            "Dependency cycle detected",
                            f"{input_name}: node '{upstream}' depends on this node's output",
                            input_name=input_name,
                            linked_node=upstream,
                        )
                    )
                    self.links[node_id] = [link for link in links if link[1] != upstream]
                    stack[-1] = (node_id, next_link)
                elif state.get(upstream) != 2:
                    stack.append((upstream, 0))
                continue
            state[node_id] = 2
            order.append(node_id)
        return order

    # -- cost ----------------------------------------------------------------------------

    def cost(self, order: list[str]) -> int:
        """Pixels x batch of every image and latent made, plus steps x pixels x batch per sampler."""
        shapes: dict[str, Shape | None] = {}
        total = 0
        unknown = Shape(self.limits.unknown_image_pixels, 1)
        for node_id in order:
            spec = self.specs[node_id]
            inputs = self.coerced[node_id]
            constants = {k: v for k, v in inputs.items() if not isinstance(v, list)}
            linked = {k: shapes.get(v[0]) for k, v in inputs.items() if isinstance(v, list)}
            shape = spec.shape(constants, linked) if spec.shape is not None else None
            shapes[node_id] = shape
            if shape is not None:
                total += shape.volume
            if spec.steps_input is not None:
                steps = constants.get(spec.steps_input, 1)
                latent = next((s for s in linked.values() if s is not None), unknown)
                total += int(steps) * latent.volume
        return total


def _as_path(spec: InputSpec) -> InputSpec:
    return InputSpec(name=spec.name, type=STRING, is_path=True)


def _node_sort_key(node_id: str) -> tuple[int, int | str]:
    return (0, int(node_id)) if node_id.isdigit() else (1, node_id)


def _node_error(type_: str, message: str, details: str, input_name: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": type_,
        "message": message,
        "details": details,
        "extra_info": {"input_name": input_name, **extra},
    }


def _input_config(spec: InputSpec) -> list[Any]:
    return [spec.type, spec.object_info_options()]


def _clip(value: Any, limit: int = 200) -> Any:
    """A value small enough to echo back in an error."""
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + "..."
    if isinstance(value, list | dict):
        text = repr(value)
        return text if len(text) <= limit else text[:limit] + "..."
    return value


def validate_prompt(
    prompt: Any,
    registry: NodeRegistry,
    inventory: Inventory | None = None,
    limits: ValidationLimits | None = None,
) -> ValidatedPrompt:
    """Validate an API-format prompt; raise PromptValidationError with ComfyUI's error shape."""
    checker = _PromptChecker(prompt, registry, inventory or StaticInventory(), limits or ValidationLimits())
    outputs = checker.check_structure()

    needed: dict[str, list[str]] = {output: checker.reachable(output) for output in outputs}

    # A node is valid when it has no errors of its own and everything it links to is valid.
    valid: dict[str, bool] = {}
    for order in needed.values():
        for node_id in order:
            if node_id not in valid:
                valid[node_id] = not checker.own_errors[node_id] and all(
                    valid.get(upstream, False) for _, upstream in checker.links[node_id]
                )

    node_errors: dict[str, Any] = {}
    good_outputs: list[str] = []
    for output, order in needed.items():
        if valid[output]:
            good_outputs.append(output)
            continue
        for node_id in order:
            errors = checker.own_errors[node_id]
            if errors:
                entry = node_errors.setdefault(
                    node_id,
                    {
                        "errors": errors,
                        "dependent_outputs": [],
                        "class_type": checker.specs[node_id].class_type,
                    },
                )
                entry["dependent_outputs"].append(output)

    if not good_outputs:
        details = "\n".join(
            f"{error['message']}: {error['details']}"
            for entry in node_errors.values()
            for error in entry["errors"]
        )
        raise PromptValidationError(
            prompt_error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details),
            node_errors,
        )

    kept: dict[str, None] = {}
    for output in good_outputs:
        kept.update(dict.fromkeys(needed[output]))
    order = list(kept)
    cost = checker.cost(order)
    if cost > checker.limits.max_cost:
        raise _fail(
            "cost_limit_exceeded",
            f"Prompt costs {cost:,} pixel-steps; the limit is {checker.limits.max_cost:,}",
            "Lower the image size, batch size or steps",
            cost=cost,
            max_cost=checker.limits.max_cost,
        )
    normalised = {
        node_id: {"class_type": checker.specs[node_id].class_type, "inputs": checker.coerced[node_id]}
        for node_id in order
    }
    return ValidatedPrompt(prompt=normalised, outputs=good_outputs, node_errors=node_errors, cost=cost)
