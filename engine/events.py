"""Where the engine reports progress: ComfyUI's event names and payloads, to a sink passed in."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

# ComfyUI's websocket message types, as the executor emits them.
EXECUTION_START = "execution_start"
EXECUTION_CACHED = "execution_cached"
EXECUTING = "executing"
PROGRESS = "progress"
EXECUTED = "executed"
EXECUTION_SUCCESS = "execution_success"
EXECUTION_ERROR = "execution_error"
EXECUTION_INTERRUPTED = "execution_interrupted"
# A latent preview: ``data["image"]`` holds encoded image bytes (ComfyUI sends it as a binary frame).
PREVIEW = "preview"


@dataclass(frozen=True)
class Event:
    type: str
    data: dict[str, Any]


class EventSink(Protocol):
    def emit(self, event: str, data: dict[str, Any]) -> None: ...


class NullSink:
    """Drops every event."""

    def emit(self, event: str, data: dict[str, Any]) -> None:
        return None


class ListSink:
    """Keeps every event in order; for tests and for collecting a run's messages."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def emit(self, event: str, data: dict[str, Any]) -> None:
        self.events.append(Event(event, data))

    def of_type(self, event: str) -> list[dict[str, Any]]:
        return [e.data for e in self.events if e.type == event]


class CallbackSink:
    """Calls ``callback(event)`` for each event."""

    def __init__(self, callback: Callable[[Event], None]) -> None:
        self._callback = callback

    def emit(self, event: str, data: dict[str, Any]) -> None:
        self._callback(Event(event, data))


class FanOutSink:
    """Sends each event to several sinks."""

    def __init__(self, *sinks: EventSink) -> None:
        self._sinks = sinks

    def emit(self, event: str, data: dict[str, Any]) -> None:
        for sink in self._sinks:
            sink.emit(event, data)


def timestamp_ms() -> int:
    return int(time.time() * 1000)
