"""The node catalogue: an object holding node specs, rendering ComfyUI's ``/object_info``.

A registry is built and passed around (``default_registry()`` makes a fresh one); there is no
module-level catalogue to mutate.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from engine.inventory import Inventory, StaticInventory
from engine.schema import COMBO, ChoiceSource, InputSpec, NodeSpec


class NodeRegistry:
    """Node specs by class name, plus their lazily imported implementations."""

    def __init__(self, specs: Iterable[NodeSpec] = ()) -> None:
        self._specs: dict[str, NodeSpec] = {}
        self._impls: dict[str, Callable[..., Any]] = {}
        for spec in specs:
            self.register(spec)

    def register(self, spec: NodeSpec) -> None:
        if spec.class_type in self._specs:
            raise ValueError(f"Node {spec.class_type!r} is already registered")
        self._specs[spec.class_type] = spec

    def get(self, class_type: str) -> NodeSpec | None:
        return self._specs.get(class_type)

    def __contains__(self, class_type: object) -> bool:
        return class_type in self._specs

    def __iter__(self) -> Iterator[NodeSpec]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def implementation(self, class_type: str) -> Callable[..., Any]:
        """The function that runs ``class_type``; imported on first use (this may import torch)."""
        impl = self._impls.get(class_type)
        if impl is None:
            impl = resolve_import_path(self._specs[class_type].impl)
            self._impls[class_type] = impl
        return impl

    def object_info(self, inventory: Inventory | None = None) -> dict[str, Any]:
        """``GET /object_info``: every node in ComfyUI's shape."""
        inv = inventory or StaticInventory()
        return {name: render_node_info(spec, inv) for name, spec in sorted(self._specs.items())}


def resolve_import_path(path: str) -> Callable[..., Any]:
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def combo_choices(spec: InputSpec, inventory: Inventory) -> list[Any]:
    if isinstance(spec.choices, ChoiceSource):
        return list(inventory.list_choices(spec.choices.kind))
    return list(spec.choices or ())


def render_input(spec: InputSpec, inventory: Inventory) -> list[Any]:
    options = spec.object_info_options()
    if spec.type == COMBO:
        return [combo_choices(spec, inventory), options]
    return [spec.type, options] if options else [spec.type]


def render_node_info(spec: NodeSpec, inventory: Inventory) -> dict[str, Any]:
    """One node's entry of ``/object_info``, as ComfyUI writes it."""
    inputs: dict[str, Any] = {"required": {i.name: render_input(i, inventory) for i in spec.required}}
    if spec.optional:
        inputs["optional"] = {i.name: render_input(i, inventory) for i in spec.optional}
    if spec.hidden:
        inputs["hidden"] = dict(spec.hidden)
    input_order: dict[str, list[str]] = {"required": [i.name for i in spec.required]}
    if spec.optional:
        input_order["optional"] = [i.name for i in spec.optional]
    info: dict[str, Any] = {
        "input": inputs,
        "input_order": input_order,
        "output": [o.type for o in spec.outputs],
        "output_is_list": [o.is_list for o in spec.outputs],
        "output_name": [o.display_name for o in spec.outputs],
        "name": spec.class_type,
        "display_name": spec.display_name or spec.class_type,
        "description": spec.description,
        "python_module": spec.python_module,
        "category": spec.category,
        "output_node": spec.output_node,
    }
    tooltips = [o.tooltip for o in spec.outputs]
    if any(tooltips):
        info["output_tooltips"] = [t or "" for t in tooltips]
    return info


def default_registry(node_modules: Iterable[str] = ()) -> NodeRegistry:
    """A new registry with every built-in node, plus the nodes of each module in ``node_modules``.

    A node module (Kiln's custom nodes) exposes ``NODE_SPECS``: a sequence of NodeSpec. It is
    imported here, so it must stay torch-free; its implementations are imported when they run.
    """
    from engine.nodes import builtin_specs

    registry = NodeRegistry(builtin_specs())
    for module_name in node_modules:
        module = importlib.import_module(module_name)
        specs = getattr(module, "NODE_SPECS", None)
        if specs is None:
            raise ValueError(f"Node module {module_name!r} has no NODE_SPECS")
        for spec in specs:
            registry.register(spec)
    return registry
