"""What a running node may use: its identity, the services, progress reporting and interruption."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.events import PREVIEW, PROGRESS, EventSink
from engine.interrupt import InterruptFlag
from engine.io import InputResolver, OutputRequest, OutputSink, SavedOutput
from engine.limits import DecodeLimits

if TYPE_CHECKING:
    from engine.models.manager import ModelManager


@dataclass
class Services:
    """Long-lived collaborators shared by every node run: storage, inputs, models, device."""

    outputs: OutputSink
    inputs: InputResolver
    # The model manager (engine.models.manager.ModelManager): loads models, lends them to nodes.
    models: ModelManager | None = None
    device: str = "cpu"
    decode_limits: DecodeLimits = field(default_factory=DecodeLimits)
    # Send a latent preview every N sampler steps (0 disables previews).
    preview_interval: int = 0


@dataclass
class NodeResult:
    """A node's return value when it also has UI output (saved images) for history."""

    result: tuple[Any, ...] = ()
    ui: dict[str, list[Any]] | None = None


@dataclass
class NodeContext:
    """Passed as the first argument to every node implementation."""

    node_id: str
    class_type: str
    prompt_id: str
    services: Services
    events: EventSink
    interrupt: InterruptFlag
    saved: list[SavedOutput]

    def check_interrupted(self) -> None:
        """Raise ExecutionInterrupted if the prompt was asked to stop."""
        self.interrupt.check()

    def progress(self, value: int, maximum: int) -> None:
        """Report step ``value`` of ``maximum``; also the point where interruption is honoured."""
        self.interrupt.check()
        self.events.emit(
            PROGRESS, {"value": value, "max": maximum, "prompt_id": self.prompt_id, "node": self.node_id}
        )

    def preview(self, image_bytes: bytes, image_format: str = "JPEG") -> None:
        self.events.emit(
            PREVIEW,
            {"image": image_bytes, "format": image_format, "prompt_id": self.prompt_id, "node": self.node_id},
        )

    def save_output(self, request: OutputRequest, data: bytes) -> SavedOutput:
        saved = self.services.outputs.save(request, data)
        self.saved.append(saved)
        return saved
