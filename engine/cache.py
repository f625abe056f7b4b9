"""A bounded LRU of node outputs keyed by node class and resolved inputs."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass
class CachedNode:
    """What one node produced: a list of values per output slot, and its UI output."""

    outputs: list[list[Any]]
    ui: dict[str, Any] | None = None


class OutputCache:
    """Least-recently-used cache of node outputs, bounded by entry count."""

    def __init__(self, max_entries: int = 128) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, CachedNode] = OrderedDict()

    def get(self, key: str) -> CachedNode | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def put(self, key: str, entry: CachedNode) -> None:
        if self.max_entries <= 0:
            return
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def node_cache_key(
    class_type: str, inputs: dict[str, Any], upstream_keys: dict[str, str], extra: str = ""
) -> str:
    """A stable key: class, constant inputs, and the keys of linked upstream nodes (not their ids)."""
    resolved = {
        name: ["@link", upstream_keys[value[0]], value[1]] if isinstance(value, list) else value
        for name, value in inputs.items()
    }
    text = json.dumps([class_type, resolved, extra], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()
