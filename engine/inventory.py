"""What files a combo input may name: input images and models, listed for validation and object_info.

An inventory answers by *kind*: ``"input_images"`` or ``"models:<folder>"`` (ComfyUI's folder
names: ``checkpoints``, ``loras``, ``vae``, ...). The gateway passes a live inventory; tests pass a
static one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
MODEL_EXTENSIONS = (".safetensors", ".sft")


class Inventory(Protocol):
    def list_choices(self, kind: str) -> Sequence[str]:
        """The names a combo input of this kind accepts, sorted."""
        ...


class StaticInventory:
    """A fixed inventory: ``{"input_images": [...], "models:checkpoints": [...]}``."""

    def __init__(self, choices: Mapping[str, Iterable[str]] | None = None) -> None:
        self._choices = {kind: sorted(names) for kind, names in (choices or {}).items()}

    def list_choices(self, kind: str) -> Sequence[str]:
        return self._choices.get(kind, [])


def list_files(root: Path, extensions: tuple[str, ...]) -> list[str]:
    """Files under ``root`` with one of ``extensions``, as sorted slash-separated relative names."""
    if not root.is_dir():
        return []
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        for filename in filenames:
            if filename.startswith(".") or not filename.lower().endswith(extensions):
                continue
            found.append((rel / filename).as_posix())
    return sorted(found)


class FolderInventory:
    """Lists an input folder and model folders (``<root>/<folder>/...`` for each models root)."""

    def __init__(self, input_dir: Path, model_roots: Sequence[Path] = ()) -> None:
        self.input_dir = input_dir
        self.model_roots = list(model_roots)

    def list_choices(self, kind: str) -> Sequence[str]:
        if kind == "input_images":
            return list_files(self.input_dir, IMAGE_EXTENSIONS)
        if kind.startswith("models:"):
            folder = kind.split(":", 1)[1]
            names: set[str] = set()
            for root in self.model_roots:
                names.update(list_files(root / folder, MODEL_EXTENSIONS))
            return sorted(names)
        return []
