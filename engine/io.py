"""Interfaces through which nodes read inputs and write outputs, and their local-folder versions.

Nodes never open paths themselves: an ``InputResolver`` hands them bytes of a named input and an
``OutputSink`` stores the bytes they produce. The worker swaps in object-storage versions.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from engine.errors import InputNotFoundError, UnsafePathError
from engine.inventory import IMAGE_EXTENSIONS, list_files
from engine.paths import join_inside, safe_relative

OutputKind = Literal["output", "temp"]


@dataclass(frozen=True)
class OutputRequest:
    """What a node wants stored: the sink decides the final name."""

    node_id: str
    index: int
    filename_prefix: str
    kind: OutputKind = "output"
    extension: str = "png"
    content_type: str = "image/png"


@dataclass(frozen=True)
class SavedOutput:
    """One stored file. ``location`` is an absolute path or an object URL, per sink."""

    filename: str
    subfolder: str
    type: OutputKind
    node_id: str
    index: int
    location: str
    content_type: str
    bytes: int
    sha256: str

    def ui(self) -> dict[str, str]:
        """The entry ComfyUI puts in history and in ``executed`` events."""
        return {"filename": self.filename, "subfolder": self.subfolder, "type": self.type}


class OutputSink(Protocol):
    def save(self, request: OutputRequest, data: bytes) -> SavedOutput: ...


class InputResolver(Protocol):
    def read(self, name: str) -> bytes:
        """The bytes of a named input; raises InputNotFoundError or UnsafePathError."""
        ...

    def fingerprint(self, name: str) -> str:
        """A string that changes when the named input's content changes."""
        ...

    def list_images(self) -> list[str]: ...


def split_prefix(prefix: str) -> tuple[str, str]:
    """``"a/b/name"`` -> (``"a/b"``, ``"name"``), refusing traversal and absolute paths."""
    relative = safe_relative(prefix)
    if not relative:
        raise UnsafePathError(f"Filename prefix {prefix!r} is empty")
    subfolder, _, name = relative.rpartition("/")
    return subfolder, name


class LocalFolderSink:
    """Writes outputs the way ComfyUI does: ``<output>/<subfolder>/<prefix>_00001_.png``.

    The counter continues after the highest one already in the folder; files are created
    exclusively, so concurrent writers never overwrite each other.
    """

    def __init__(self, output_dir: Path, temp_dir: Path) -> None:
        self.roots: dict[OutputKind, Path] = {"output": output_dir, "temp": temp_dir}

    def save(self, request: OutputRequest, data: bytes) -> SavedOutput:
        subfolder, name = split_prefix(request.filename_prefix)
        root = self.roots[request.kind]
        folder = join_inside(root, subfolder) if subfolder else root.resolve()
        folder.mkdir(parents=True, exist_ok=True)
        counter = next_counter(folder, name)
        while True:
            filename = f"{name}_{counter:05}_.{request.extension}"
            path = folder / filename
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                counter += 1
                continue
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            break
        return SavedOutput(
            filename=filename,
            subfolder=subfolder,
            type=request.kind,
            node_id=request.node_id,
            index=request.index,
            location=str(path),
            content_type=request.content_type,
            bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )


def next_counter(folder: Path, name: str) -> int:
    """One past the highest ``<name>_NNNNN_`` counter in ``folder`` (ComfyUI's numbering)."""
    pattern = re.compile(re.escape(name) + r"_(\d+)_", re.IGNORECASE)
    highest = 0
    for entry in os.listdir(folder):
        match = pattern.match(entry)
        if match:
            highest = max(highest, int(match.group(1)))
    return highest + 1


# ComfyUI lets an image name carry its folder: "cat.png [output]".
_ANNOTATION = re.compile(r"^(.*) \[(input|output|temp)\]$")


class LocalInputResolver:
    """Reads named inputs from the input folder (or, when annotated, the output/temp folders)."""

    def __init__(
        self,
        input_dir: Path,
        output_dir: Path | None = None,
        temp_dir: Path | None = None,
        max_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.folders: dict[str, Path] = {"input": input_dir}
        if output_dir is not None:
            self.folders["output"] = output_dir
        if temp_dir is not None:
            self.folders["temp"] = temp_dir
        self.max_bytes = max_bytes

    def _path(self, name: str) -> Path:
        folder = "input"
        match = _ANNOTATION.match(name)
        if match:
            name, folder = match.group(1), match.group(2)
        root = self.folders.get(folder)
        if root is None:
            raise InputNotFoundError(f"Input folder '{folder}' is not available here")
        path = join_inside(root, name)
        if not path.is_file():
            raise InputNotFoundError(f"Input file not found: {name!r}")
        return path

    def read(self, name: str) -> bytes:
        path = self._path(name)
        size = path.stat().st_size
        if size > self.max_bytes:
            raise InputNotFoundError(f"Input file {name!r} is {size} bytes; the limit is {self.max_bytes}")
        return path.read_bytes()

    def fingerprint(self, name: str) -> str:
        stat = self._path(name).stat()
        return f"{stat.st_size}:{stat.st_mtime_ns}"

    def list_images(self) -> list[str]:
        return list_files(self.folders["input"], IMAGE_EXTENSIONS)
