"""Cooperative interruption: a flag set from outside, checked between nodes and sampler steps."""

from __future__ import annotations

import threading

from engine.errors import ExecutionInterrupted


class InterruptFlag:
    """Thread-safe "please stop" flag for one running prompt."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def request(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise ExecutionInterrupted if an interruption was requested."""
        if self._event.is_set():
            raise ExecutionInterrupted()
