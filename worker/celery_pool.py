"""Celery's threads pool, able to stop the running job when the soft shutdown times out.

Celery's own threads pool cannot terminate a job, so its cold shutdown fails. Kiln's job runs in
the engine host subprocess; stopping it means: interrupt it (killing the host if it does not stop
within the cancel grace) and put the job back in the queue.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from celery.concurrency.thread import ApplyResult, TaskPool


class StoppableResult(ApplyResult):
    def terminate(self, signal: int | None = None) -> None:
        """The job itself is stopped by ``KilnThreadPool.terminate_job``; nothing more to do here."""


class KilnThreadPool(TaskPool):
    """One job thread; ``terminate_job`` stops the running job and puts it back in the queue."""

    def terminate_job(self, pid: int, signal: int | None = None) -> None:
        process = getattr(self.app, "kiln_process", None)
        if process is not None and process.runner is not None:
            process.runner.abort()

    def on_apply(self, *args: Any, **kwargs: Any) -> StoppableResult:
        result = super().on_apply(*args, **kwargs)
        future: Future = result.f
        return StoppableResult(future)
