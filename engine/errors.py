"""The engine's exceptions. Every failure the engine reports is one of these.

The gateway maps them to HTTP responses in one place (``api/errors.py``); the CLI prints their
``to_dict()`` as JSON.
"""

from __future__ import annotations

from typing import Any


class KilnError(Exception):
    """Base of every error Kiln raises on purpose."""

    type_name = "kiln_error"

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type_name, "message": str(self)}


class ConfigError(KilnError):
    """Raised when settings or a config file are invalid."""

    type_name = "config_error"


class PromptValidationError(KilnError):
    """Raised when a prompt fails validation; carries ComfyUI's ``error`` and ``node_errors``."""

    type_name = "prompt_validation_error"

    def __init__(self, error: dict[str, Any], node_errors: dict[str, Any] | None = None) -> None:
        super().__init__(error.get("message", "Prompt failed validation"))
        self.error = error
        self.node_errors = node_errors or {}

    def to_dict(self) -> dict[str, Any]:
        """ComfyUI's 400 body for ``POST /prompt``."""
        return {"error": self.error, "node_errors": self.node_errors}


class UnsafePathError(KilnError):
    """Raised when a file name would escape its folder (``..``, absolute path, drive letter)."""

    type_name = "unsafe_path"


class InputNotFoundError(KilnError):
    """Raised when a node asks for an input file that does not exist."""

    type_name = "input_not_found"


class ImageDecodeError(KilnError):
    """Raised when image bytes are not an accepted format, are corrupt, or exceed the caps."""

    type_name = "image_decode_error"


class ModelError(KilnError):
    """Raised when a model file cannot be found, read or understood."""

    type_name = "model_error"


class ExecutionInterrupted(KilnError):
    """Raised inside a node when an interruption was requested; stops the prompt."""

    type_name = "execution_interrupted"

    def __init__(self, node_id: str | None = None, class_type: str | None = None) -> None:
        super().__init__("Execution was interrupted")
        self.node_id = node_id
        self.class_type = class_type

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type_name, "message": str(self), "node_id": self.node_id}


class NodeExecutionError(KilnError):
    """Raised when a node fails while running: carries the node, its class and the traceback."""

    type_name = "execution_error"

    def __init__(
        self,
        node_id: str,
        class_type: str,
        message: str,
        exception_type: str,
        traceback: list[str],
    ) -> None:
        super().__init__(f"{class_type} (node {node_id}): {message}")
        self.node_id = node_id
        self.class_type = class_type
        self.exception_message = message
        self.exception_type = exception_type
        self.traceback = traceback

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type_name,
            "message": self.exception_message,
            "node_id": self.node_id,
            "class_type": self.class_type,
            "exception_type": self.exception_type,
            "traceback": self.traceback,
        }
