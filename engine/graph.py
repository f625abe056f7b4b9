"""Build API-format prompts in code.

g = GraphBuilder()
ckpt = g.node("CheckpointLoaderSimple", ckpt_name="sd15.safetensors")
g.node("KSampler", seed=1, model=ckpt.out(0), ...)
prompt = g.to_prompt()
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from engine.registry import NodeRegistry


@dataclass
class NodeRef:
    """A node added to a GraphBuilder; ``out(i)`` links to its i-th output."""

    id: str
    class_type: str
    inputs: dict[str, Any]
    builder: GraphBuilder = field(repr=False)

    def out(self, slot: int | str = 0) -> list[Any]:
        """A link to output ``slot`` (an index, or an output name when the builder has a registry)."""
        if isinstance(slot, str):
            slot = self.builder.output_index(self.class_type, slot)
        return [self.id, slot]

    def set_input(self, name: str, value: Any) -> None:
        self.inputs[name] = _as_value(value)


def _as_value(value: Any) -> Any:
    return value.out(0) if isinstance(value, NodeRef) else value


class GraphBuilder:
    """Accumulates nodes with sequential string ids ("1", "2", ...)."""

    def __init__(self, registry: NodeRegistry | None = None, prefix: str = "") -> None:
        self.registry = registry
        self.prefix = prefix
        self._nodes: dict[str, NodeRef] = {}
        self._next = 1

    def node(self, class_type: str, id: str | None = None, **inputs: Any) -> NodeRef:
        """Add a node; a NodeRef passed as an input value links to that node's first output."""
        if self.registry is not None and class_type not in self.registry:
            raise KeyError(f"Unknown node class {class_type!r}")
        node_id = id or f"{self.prefix}{self._next}"
        self._next += 1
        if node_id in self._nodes:
            raise ValueError(f"Node id {node_id!r} is already used")
        ref = NodeRef(node_id, class_type, {k: _as_value(v) for k, v in inputs.items()}, self)
        self._nodes[node_id] = ref
        return ref

    def output_index(self, class_type: str, name: str) -> int:
        if self.registry is None:
            raise ValueError("Output names need a registry; pass GraphBuilder(registry)")
        spec = self.registry.get(class_type)
        assert spec is not None
        names = [o.display_name for o in spec.outputs]
        if name not in names:
            raise KeyError(f"{class_type} has no output {name!r}; it has {names}")
        return names.index(name)

    def to_prompt(self) -> dict[str, dict[str, Any]]:
        """The API-format prompt (a deep copy: later edits do not leak into it)."""
        return {
            node_id: {"class_type": ref.class_type, "inputs": copy.deepcopy(ref.inputs)}
            for node_id, ref in self._nodes.items()
        }
