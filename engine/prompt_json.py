"""Parsing prompt JSON safely: size cap, no NaN/Infinity, bounded nesting, clear errors."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.errors import PromptValidationError
from engine.limits import ValidationLimits
from engine.validation import prompt_error


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _fail(message: str, details: str = "") -> PromptValidationError:
    return PromptValidationError(prompt_error("invalid_prompt", message, details))


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), computed without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            deepest = max(deepest, depth + 1)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            deepest = max(deepest, depth + 1)
            stack.extend((v, depth + 1) for v in item)
    return deepest


def check_depth(value: Any, limits: ValidationLimits) -> None:
    if json_depth(value) > limits.max_json_depth:
        raise _fail(f"JSON is nested deeper than {limits.max_json_depth} levels")


def parse_json(text: str | bytes, limits: ValidationLimits | None = None) -> Any:
    """One JSON document, refusing NaN/Infinity, oversized bodies and deep nesting."""
    limits = limits or ValidationLimits()
    if len(text) > limits.max_body_bytes:
        raise _fail(f"Request body is larger than {limits.max_body_bytes} bytes")
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise _fail(f"JSON is nested deeper than {limits.max_json_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise _fail("Invalid JSON", str(exc)) from None
    check_depth(value, limits)
    return value


def iter_json_documents(text: str, limits: ValidationLimits | None = None) -> Iterator[Any]:
    """Concatenated JSON documents (``{...}{...}`` or one per line), one at a time."""
    limits = limits or ValidationLimits()
    decoder = json.JSONDecoder(parse_constant=_reject_constant)
    position = 0
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position >= len(text):
            return
        try:
            value, end = decoder.raw_decode(text, position)
        except RecursionError:
            raise _fail(f"JSON is nested deeper than {limits.max_json_depth} levels") from None
        except ValueError as exc:
            raise _fail("Invalid JSON", str(exc)) from None
        if end - position > limits.max_body_bytes:
            raise _fail(f"A prompt is larger than {limits.max_body_bytes} bytes")
        check_depth(value, limits)
        position = end
        yield value


@dataclass
class PromptRequest:
    """A prompt plus what ComfyUI's ``POST /prompt`` body carries beside it."""

    prompt: Any
    extra_data: dict[str, Any] = field(default_factory=dict)
    client_id: str | None = None
    prompt_id: str | None = None


def unwrap_prompt(document: Any) -> PromptRequest:
    """Accept a bare API-format prompt or a ``{"prompt": ..., "extra_data": ...}`` request body."""
    if isinstance(document, Mapping) and isinstance(document.get("nodes"), list) and "links" in document:
        raise _fail(
            "This is a ComfyUI UI workflow, not an API-format prompt",
            "Export it from ComfyUI with 'Save (API format)'",
        )
    inner = document.get("prompt") if isinstance(document, Mapping) else None
    # A node may be called "prompt" too; a wrapped body's "prompt" is not a node.
    if isinstance(inner, Mapping) and "class_type" not in inner:
        extra = document.get("extra_data") or {}
        if not isinstance(extra, Mapping):
            raise _fail("extra_data must be a JSON object")
        client_id = document.get("client_id")
        prompt_id = document.get("prompt_id")
        return PromptRequest(
            prompt=document["prompt"],
            extra_data=dict(extra),
            client_id=client_id if isinstance(client_id, str) else None,
            prompt_id=prompt_id if isinstance(prompt_id, str) else None,
        )
    return PromptRequest(prompt=document)
