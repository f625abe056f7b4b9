"""Runs a validated prompt: dependency order, cross-prompt output cache, events, interruption.

Node values follow ComfyUI's list semantics: every output slot holds a list of values, and a node
runs once per item of its longest input list (or once with whole lists when it declares
``input_is_list``).
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.cache import CachedNode, OutputCache, node_cache_key
from engine.context import NodeContext, NodeResult, Services
from engine.errors import ExecutionInterrupted, NodeExecutionError
from engine.events import (
    EXECUTED,
    EXECUTING,
    EXECUTION_CACHED,
    EXECUTION_ERROR,
    EXECUTION_INTERRUPTED,
    EXECUTION_START,
    EXECUTION_SUCCESS,
    EventSink,
    NullSink,
    timestamp_ms,
)
from engine.interrupt import InterruptFlag
from engine.io import SavedOutput
from engine.registry import NodeRegistry, resolve_import_path
from engine.schema import NodeSpec
from engine.validation import ValidatedPrompt

log = logging.getLogger(__name__)


@dataclass
class ExecutionResult:
    """What one prompt produced, with ComfyUI's history ``outputs`` shape."""

    prompt_id: str
    outputs: dict[str, dict[str, list[Any]]]
    saved: list[SavedOutput]
    executed: list[str]
    cached: list[str]
    node_seconds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


class Executor:
    """Executes validated prompts one at a time, keeping node outputs in an LRU across prompts."""

    def __init__(self, registry: NodeRegistry, services: Services, cache: OutputCache | None = None) -> None:
        self.registry = registry
        self.services = services
        self.cache = cache if cache is not None else OutputCache()

    def execute(
        self,
        validated: ValidatedPrompt,
        *,
        prompt_id: str | None = None,
        original_prompt: Mapping[str, Any] | None = None,
        extra_data: Mapping[str, Any] | None = None,
        events: EventSink | None = None,
        interrupt: InterruptFlag | None = None,
    ) -> ExecutionResult:
        run = _Run(
            executor=self,
            validated=validated,
            prompt_id=prompt_id or str(uuid.uuid4()),
            original_prompt=original_prompt if original_prompt is not None else validated.prompt,
            extra_data=extra_data or {},
            events=events or NullSink(),
            interrupt=interrupt or InterruptFlag(),
        )
        with torch.inference_mode():
            return run.execute()


@dataclass
class _Run:
    """State of one prompt's execution."""

    executor: Executor
    validated: ValidatedPrompt
    prompt_id: str
    original_prompt: Mapping[str, Any]
    extra_data: Mapping[str, Any]
    events: EventSink
    interrupt: InterruptFlag
    values: dict[str, CachedNode] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    saved: list[SavedOutput] = field(default_factory=list)

    def emit(self, event: str, **data: Any) -> None:
        self.events.emit(event, {**data, "prompt_id": self.prompt_id})

    def execute(self) -> ExecutionResult:
        started = time.perf_counter()
        prompt = self.validated.prompt
        cache = self.executor.cache
        self.emit(EXECUTION_START, timestamp=timestamp_ms())
        current: str | None = None
        try:
            for node_id in prompt:
                current = node_id
                self.keys[node_id] = self.cache_key(node_id)
            current = None
            cached = [
                node_id
                for node_id in prompt
                if self.spec(node_id).cacheable
                and not self.spec(node_id).output_node
                and self.keys[node_id] in cache
            ]
            for node_id in cached:
                entry = cache.get(self.keys[node_id])
                assert entry is not None
                self.values[node_id] = entry
            self.emit(EXECUTION_CACHED, nodes=cached, timestamp=timestamp_ms())

            node_seconds: dict[str, float] = {}
            ui_outputs: dict[str, dict[str, list[Any]]] = {}
            for node_id in prompt:
                if node_id in self.values:
                    continue
                current = node_id
                self.interrupt.check()
                self.emit(EXECUTING, node=node_id, display_node=node_id)
                node_started = time.perf_counter()
                entry = self.run_node(node_id)
                node_seconds[node_id] = time.perf_counter() - node_started
                self.values[node_id] = entry
                self.executed.append(node_id)
                spec = self.spec(node_id)
                if spec.cacheable and not spec.output_node:
                    cache.put(self.keys[node_id], entry)
                if entry.ui:
                    ui_outputs[node_id] = entry.ui
                    self.emit(EXECUTED, node=node_id, display_node=node_id, output=entry.ui)
        except ExecutionInterrupted as exc:
            node_id = current or exc.node_id
            class_type = prompt[node_id]["class_type"] if node_id in prompt else None
            self.emit(
                EXECUTION_INTERRUPTED,
                node_id=node_id,
                node_type=class_type,
                executed=list(self.executed),
                timestamp=timestamp_ms(),
            )
            self.emit(EXECUTING, node=None)
            raise ExecutionInterrupted(node_id, class_type) from None
        except Exception as exc:
            assert current is not None
            error = self.node_error(current, exc)
            self.emit(
                EXECUTION_ERROR,
                node_id=error.node_id,
                node_type=error.class_type,
                executed=list(self.executed),
                exception_message=error.exception_message,
                exception_type=error.exception_type,
                traceback=error.traceback,
                current_inputs=_describe_inputs(prompt[current]["inputs"]),
                current_outputs={},
                timestamp=timestamp_ms(),
            )
            self.emit(EXECUTING, node=None)
            raise error from exc
        self.emit(EXECUTION_SUCCESS, timestamp=timestamp_ms())
        self.emit(EXECUTING, node=None)
        return ExecutionResult(
            prompt_id=self.prompt_id,
            outputs=ui_outputs,
            saved=self.saved,
            executed=self.executed,
            cached=cached,
            node_seconds=node_seconds,
            seconds=time.perf_counter() - started,
        )

    def spec(self, node_id: str) -> NodeSpec:
        spec = self.executor.registry.get(self.validated.prompt[node_id]["class_type"])
        assert spec is not None, "validated prompts only hold registered nodes"
        return spec

    def context(self, node_id: str) -> NodeContext:
        return NodeContext(
            node_id=node_id,
            class_type=self.validated.prompt[node_id]["class_type"],
            prompt_id=self.prompt_id,
            services=self.executor.services,
            events=self.events,
            interrupt=self.interrupt,
            saved=self.saved,
        )

    def cache_key(self, node_id: str) -> str:
        spec = self.spec(node_id)
        inputs = self.validated.prompt[node_id]["inputs"]
        extra = ""
        if spec.fingerprint is not None:
            extra = resolve_import_path(spec.fingerprint)(self.context(node_id), **inputs)
        if "UNIQUE_ID" in spec.hidden.values():
            extra += f"#{node_id}"
        key = node_cache_key(spec.class_type, inputs, self.keys, extra)
        if not spec.cacheable or spec.output_node:
            # Never reused, and neither is anything computed from it.
            key += f":{uuid.uuid4().hex}"
        return key

    def hidden_values(self, node_id: str, spec: NodeSpec) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, kind in spec.hidden.items():
            if kind == "PROMPT":
                values[name] = self.original_prompt
            elif kind == "EXTRA_PNGINFO":
                values[name] = self.extra_data.get("extra_pnginfo")
            elif kind == "UNIQUE_ID":
                values[name] = node_id
        return values

    def run_node(self, node_id: str) -> CachedNode:
        spec = self.spec(node_id)
        impl = self.executor.registry.implementation(spec.class_type)
        ctx = self.context(node_id)
        lists: dict[str, list[Any]] = {}
        for name, value in self.validated.prompt[node_id]["inputs"].items():
            if isinstance(value, list):
                upstream, slot = value
                lists[name] = self.values[upstream].outputs[slot]
            else:
                lists[name] = [value]
        for name, value in self.hidden_values(node_id, spec).items():
            lists[name] = [value]

        if spec.input_is_list:
            calls = [lists]
        else:
            if any(len(v) == 0 for v in lists.values()):
                raise ValueError("an input list is empty")
            count = max((len(v) for v in lists.values()), default=1)
            calls = [{name: v[min(i, len(v) - 1)] for name, v in lists.items()} for i in range(count)]

        results: list[tuple[Any, ...]] = []
        uis: list[dict[str, list[Any]]] = []
        for kwargs in calls:
            self.interrupt.check()
            returned = impl(ctx, **kwargs)
            if isinstance(returned, NodeResult):
                if returned.ui:
                    uis.append(returned.ui)
                returned = returned.result
            if not isinstance(returned, tuple) or len(returned) != len(spec.outputs):
                raise TypeError(
                    f"{spec.class_type} returned {type(returned).__name__} "
                    f"instead of a tuple of {len(spec.outputs)} outputs"
                )
            results.append(returned)

        outputs: list[list[Any]] = []
        for slot, output in enumerate(spec.outputs):
            if output.is_list:
                outputs.append([item for r in results for item in r[slot]])
            else:
                outputs.append([r[slot] for r in results])
        ui: dict[str, list[Any]] | None = None
        if uis:
            ui = {}
            for part in uis:
                for key, items in part.items():
                    ui.setdefault(key, []).extend(items)
        return CachedNode(outputs=outputs, ui=ui)

    def node_error(self, node_id: str, exc: Exception) -> NodeExecutionError:
        if isinstance(exc, NodeExecutionError):
            return exc
        _, _, tb = sys.exc_info()
        exception_type = type(exc).__qualname__
        module = type(exc).__module__
        if module != "builtins":
            exception_type = f"{module}.{exception_type}"
        log.error("Node %s (%s) failed: %s", node_id, self.validated.prompt[node_id]["class_type"], exc)
        return NodeExecutionError(
            node_id=node_id,
            class_type=self.validated.prompt[node_id]["class_type"],
            message=str(exc),
            exception_type=exception_type,
            traceback=traceback.format_tb(tb),
        )


def _describe_inputs(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Inputs as ComfyUI reports them in ``execution_error``: scalars as is, links as text."""
    described: dict[str, Any] = {}
    for name, value in inputs.items():
        described[name] = [
            value if isinstance(value, int | float | bool | str) or value is None else str(value)
        ]
    return described
