"""Safe handling of user-supplied file names: no traversal, no absolute paths, no drive letters."""

from __future__ import annotations

import re
from pathlib import Path

from engine.errors import UnsafePathError

_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f]")


def unsafe_path_reason(name: str) -> str | None:
    """Why ``name`` is not a safe relative file name, or None when it is."""
    if _CONTROL.search(name):
        return "contains control characters"
    if name.startswith(("/", "\\")):
        return "is an absolute path"
    if _DRIVE.match(name):
        return "starts with a drive letter"
    if name.startswith("~"):
        return "starts with '~'"
    parts = re.split(r"[\\/]", name)
    if any(part == ".." for part in parts):
        return "contains '..'"
    return None


def safe_relative(name: str) -> str:
    """``name`` with backslashes turned into slashes; raises UnsafePathError if it is unsafe."""
    reason = unsafe_path_reason(name)
    if reason is not None:
        raise UnsafePathError(f"File name {name!r} {reason}")
    return "/".join(part for part in re.split(r"[\\/]", name) if part not in ("", "."))


def join_inside(root: Path, name: str) -> Path:
    """``root / name``, refusing any result that resolves outside ``root`` (symlinks included)."""
    relative = safe_relative(name)
    root_resolved = root.resolve()
    target = (root_resolved / relative).resolve()
    if target != root_resolved and root_resolved not in target.parents:
        raise UnsafePathError(f"File name {name!r} resolves outside its folder")
    return target
