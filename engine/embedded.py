"""Kiln in-process, no servers: ``async with Kiln() as kiln: result = await kiln.run(prompt)``.

The engine runs on one worker thread (prompts run one at a time, like a GPU worker); the asyncio
loop stays free. ``stream`` yields ComfyUI's events as they happen.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

from engine.events import CallbackSink, Event, EventSink
from engine.executor import ExecutionResult
from engine.interrupt import InterruptFlag
from engine.runtime import EngineRuntime
from engine.settings import EngineSettings, load_settings
from engine.validation import ValidatedPrompt

_DONE = object()


class Kiln:
    """An embedded engine. Settings come from ``settings`` or from ``load_settings(**overrides)``."""

    def __init__(
        self,
        settings: EngineSettings | None = None,
        *,
        config_file: Path | None = None,
        runtime: EngineRuntime | None = None,
        **overrides: Any,
    ) -> None:
        self._settings = settings or load_settings(config_file, **overrides)
        self._runtime = runtime
        self._pool: ThreadPoolExecutor | None = None
        self._interrupt = InterruptFlag()

    @property
    def runtime(self) -> EngineRuntime:
        if self._runtime is None:
            self._runtime = EngineRuntime(self._settings)
        return self._runtime

    async def __aenter__(self) -> Kiln:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-engine")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._pool is not None:
            self._interrupt.request()
            self._pool.shutdown(wait=True)
            self._pool = None

    def _require_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            raise RuntimeError("Use 'async with Kiln() as kiln:' before running prompts")
        return self._pool

    def validate(self, prompt: Mapping[str, Any]) -> ValidatedPrompt:
        """Validate without running; raises PromptValidationError."""
        return self.runtime.validate(prompt)

    def interrupt(self) -> None:
        """Stop the running prompt at its next check (between nodes or sampler steps)."""
        self._interrupt.request()

    async def run(
        self,
        prompt: Mapping[str, Any],
        *,
        extra_data: Mapping[str, Any] | None = None,
        prompt_id: str | None = None,
        events: EventSink | None = None,
    ) -> ExecutionResult:
        """Validate and run one prompt; raises PromptValidationError, NodeExecutionError or
        ExecutionInterrupted."""
        pool = self._require_pool()
        validated = self.validate(prompt)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            pool, self._execute, prompt, validated, extra_data, prompt_id, events
        )

    def _execute(
        self,
        prompt: Mapping[str, Any],
        validated: ValidatedPrompt,
        extra_data: Mapping[str, Any] | None,
        prompt_id: str | None,
        events: EventSink | None,
    ) -> ExecutionResult:
        self._interrupt.clear()
        return self.runtime.execute(
            prompt,
            prompt_id=prompt_id,
            extra_data=extra_data,
            events=events,
            interrupt=self._interrupt,
            validated=validated,
        )

    async def stream(
        self,
        prompt: Mapping[str, Any],
        *,
        extra_data: Mapping[str, Any] | None = None,
        prompt_id: str | None = None,
    ) -> AsyncIterator[Event]:
        """Yield each event while the prompt runs; re-raises the run's error after its event."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        sink = CallbackSink(lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
        task = asyncio.ensure_future(
            self.run(prompt, extra_data=extra_data, prompt_id=prompt_id, events=sink)
        )
        task.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, _DONE))
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                yield item
            await task
        finally:
            if not task.done():
                self.interrupt()
                await asyncio.gather(task, return_exceptions=True)
