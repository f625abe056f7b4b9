"""What a worker does with one job: claim it, run it on the engine host, store its outputs, record
the outcome. Plain code; the Celery task only calls ``JobRunner.run``.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from worker.engine_host import (
    EngineHost,
    EngineHostError,
    HostCrashed,
    HostJob,
    HostResult,
    JobDeadlineExceeded,
    JobFailed,
    JobInterrupted,
)
from worker.heartbeat import WorkerStats
from worker.host_io import MODELS_EVENT
from worker.jobstore import JobStore
from worker.protocol import MODEL_LOADED_EVENT, JobError, JobRecord, JobStatus, OutputRecord, Progress
from worker.settings import WorkerSettings
from worker.storage import Storage, object_key
from worker.webhooks import enqueue as enqueue_webhook

log = logging.getLogger(__name__)

# Events kept in the job record as ComfyUI's history "status.messages".
STATUS_MESSAGES = (
    "execution_start",
    "execution_cached",
    "execution_success",
    "execution_error",
    "execution_interrupted",
)


class WorkerStopping(BaseException):
    """Raised when the worker shuts down while a job runs; the job is requeued, not failed."""


@dataclass
class RunOutcome:
    job_id: str
    status: str
    attempts: int = 0
    seconds: float = 0.0


@dataclass
class JobRunner:
    """Runs jobs one at a time on this worker's engine host."""

    settings: WorkerSettings
    store: JobStore
    storage: Storage
    host: EngineHost
    current_job: str | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    stopping: threading.Event = field(default_factory=threading.Event)
    aborting: threading.Event = field(default_factory=threading.Event)
    jobs_run: int = 0
    # Job and load times, resident models: what the heartbeat reports for routing.
    stats: WorkerStats = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.stats is None:
            self.stats = WorkerStats(self.store.redis, self.settings.worker_id)

    def abort(self) -> None:
        """Stop the running job without failing it: it goes back to the queue (Celery cancels a job
        when the broker connection is lost, and at the end of a soft shutdown)."""
        if self.current_job is not None:
            self.aborting.set()
            self.cancel_event.set()

    def shutdown(self) -> None:
        """The worker is stopping: the running job (if any) is requeued, then the host ends."""
        self.stopping.set()
        self.abort()
        self.host.close()

    def cancel(self, job_id: str) -> None:
        """Ask the running job to stop (a cancel command from the gateway)."""
        if self.current_job == job_id:
            self.cancel_event.set()

    def run(self, job_id: str) -> RunOutcome:
        started = time.monotonic()
        previous = self.store.claim(job_id, self.settings.worker_id)
        if previous == "missing":
            log.warning("Job %s does not exist (expired or deleted); dropping its message", job_id)
            return RunOutcome(job_id, "missing")
        job = self.store.get(job_id)
        if job is None:
            return RunOutcome(job_id, "missing")
        if previous == "cancel":
            self._finish(job, JobStatus.CANCELLED, error=JobError(type="cancelled", message="Cancelled"))
            return RunOutcome(job_id, JobStatus.CANCELLED.value)
        if previous not in (JobStatus.QUEUED.value, JobStatus.RUNNING.value):
            log.info("Job %s is already %s; nothing to do", job_id, previous)
            if job.webhook and job.status.finished:
                # Cancelled by the gateway while queued (no worker finished it), or finished by a
                # worker that died before queueing the webhook: queue it now (once per job).
                enqueue_webhook(self.store.redis, job, job.status)
            return RunOutcome(job_id, previous)
        if previous == JobStatus.RUNNING.value:
            log.warning(
                "Job %s was running elsewhere and is redelivered here (attempt %d)", job_id, job.attempts
            )
        self.current_job = job_id
        self.cancel_event.clear()
        self.aborting.clear()
        self.stats.job_started(job_id, job.models, self._host_pid())
        status = JobStatus.FAILED
        try:
            status = self._run_attempts(job)
        except Exception as exc:  # storage outage after retries, or a bug: the job fails visibly
            log.exception("Job %s failed outside the engine", job_id)
            self._finish(job, JobStatus.FAILED, error=JobError(type="internal_error", message=str(exc)))
            status = JobStatus.FAILED
        except BaseException:
            # The worker is shutting down mid-job: put the job back for another worker.
            if self.store.requeue(job):
                log.warning("Worker stopping: job %s goes back to the queue", job_id)
            raise
        finally:
            self.current_job = None
            self.stats.job_finished(job_id, status == JobStatus.SUCCEEDED)
        self.jobs_run += 1
        seconds = time.monotonic() - started
        return RunOutcome(job_id, status.value, job.attempts, seconds)

    def preload(self, model: str) -> bool:
        """Load ``model`` on the engine host ahead of a job (the router asked; it does so only for
        an idle worker). Skipped while a job runs: the router asks again if it still wants it."""
        try:
            if self.current_job is not None or self.stopping.is_set():
                log.info("Preload of %s skipped: the worker is busy", model)
                return False
            started = time.monotonic()
            self.host.preload(
                model, self._on_model_event, deadline_s=self.settings.job_timeout_s, cancel=self.stopping
            )
            log.info("Preloaded %s in %.2f s", model, time.monotonic() - started)
            return True
        except EngineHostError as exc:
            log.warning("Preload of %s failed: %s", model, exc)
            return False
        finally:
            self.stats.preload_finished(model)

    def _run_attempts(self, job: JobRecord) -> JobStatus:
        messages: list[Any] = []
        host_job = HostJob.from_record(job)
        attempt = 0
        while True:
            attempt += 1
            messages.clear()
            try:
                result = self.host.run(
                    host_job,
                    lambda event, data: self._on_event(job, event, data, messages),
                    deadline_s=self.settings.job_timeout_s,
                    cancel=self.cancel_event,
                    cancel_grace_s=self.settings.cancel_grace_s,
                )
            except HostCrashed as exc:
                if self.stopping.is_set() or self.aborting.is_set():
                    raise WorkerStopping(job.id) from exc
                if attempt < self.settings.job_max_attempts:
                    log.warning(
                        "Engine host crashed on job %s (attempt %d): %s; retrying", job.id, attempt, exc
                    )
                    continue
                return self._fail(job, "host_crashed", f"The engine crashed {attempt} times: {exc}", messages)
            except JobDeadlineExceeded as exc:
                # A prompt that hung once will hang again: no retry.
                return self._fail(job, "deadline_exceeded", str(exc), messages)
            except JobInterrupted as exc:
                if self.aborting.is_set():
                    raise WorkerStopping(job.id) from exc
                self._finish(
                    job,
                    JobStatus.CANCELLED,
                    error=JobError(type="cancelled", message="Cancelled while running"),
                    messages=messages,
                )
                return JobStatus.CANCELLED
            except JobFailed as exc:
                if exc.retryable and attempt < self.settings.job_max_attempts:
                    log.warning(
                        "Job %s ran out of memory (attempt %d); retrying on a fresh host", job.id, attempt
                    )
                    continue
                return self._record_failure(job, exc, messages)
            return self._succeed(job, result, messages)

    def _finish(self, job: JobRecord, status: JobStatus, **fields: Any) -> bool:
        """Record the final state; the job's webhook (if any) is queued once the state is final.

        Then the closing ``executing`` (node None) goes out: ComfyUI sends it after the prompt's
        history is stored, and clients (its script_examples among them) read /history as soon as
        they see it, so it must not overtake the final state (see ``_on_event``).
        """
        done = self.store.finish(job, status, **fields)
        if done:
            if job.webhook:
                enqueue_webhook(self.store.redis, job, status)
            self.store.publish(job, "executing", {"node": None, "prompt_id": job.id})
        return done

    def _record_failure(self, job: JobRecord, exc: JobFailed, messages: list[Any]) -> JobStatus:
        error = exc.error
        self._finish(
            job,
            JobStatus.FAILED,
            error=JobError(
                type=exc.type,
                message=error.get("message") or error.get("exception_message") or str(exc),
                node_id=exc.node_id,
                class_type=exc.class_type,
                traceback=exc.traceback,
            ),
            messages=messages,
        )
        return JobStatus.FAILED

    def _fail(self, job: JobRecord, type_: str, message: str, messages: list[Any]) -> JobStatus:
        self._finish(job, JobStatus.FAILED, error=JobError(type=type_, message=message), messages=messages)
        return JobStatus.FAILED

    def _succeed(self, job: JobRecord, result: HostResult, messages: list[Any]) -> JobStatus:
        """Upload every file (deterministic keys: a retry overwrites), then record success."""
        outputs: list[OutputRecord] = []
        for produced in result.produced:
            key = object_key(job.tenant, produced.subfolder, produced.filename)
            stored = self.storage.put(key, produced.data, produced.content_type)
            outputs.append(
                OutputRecord(
                    node_id=produced.node_id,
                    index=produced.index,
                    key=key,
                    filename=produced.filename,
                    subfolder=produced.subfolder,
                    type=produced.type,
                    content_type=produced.content_type,
                    bytes=stored.bytes,
                    sha256=stored.sha256,
                )
            )
        self._finish(job, JobStatus.SUCCEEDED, outputs=outputs, history=result.outputs, messages=messages)
        return JobStatus.SUCCEEDED

    def _host_pid(self) -> int | None:
        try:
            return self.host.pid
        except Exception:  # a host being replaced
            return None

    def _on_model_event(self, event: str, data: dict[str, Any]) -> bool:
        """Record the engine host's model events (for the heartbeat and metrics, never for
        clients); False for any other event."""
        if event == MODEL_LOADED_EVENT:
            self.stats.model_loaded(
                str(data["model"]), float(data.get("seconds") or 0.0), data.get("hash"), self._host_pid()
            )
        elif event == MODELS_EVENT:
            self.stats.models_reported(data, self._host_pid())
        else:
            return False
        return True

    def _on_event(self, job: JobRecord, event: str, data: dict[str, Any], messages: list[Any]) -> None:
        if self._on_model_event(event, data):
            return
        if event == "executing" and data.get("node") is None:
            return  # the engine's "prompt done": sent by _finish once the final state is stored
        if event in STATUS_MESSAGES:
            messages.append([event, data])
        if event == "progress":
            self.store.set_progress(
                job.id, Progress(node=data.get("node"), value=data["value"], max=data["max"])
            )
        elif event == "executing" and data.get("node") is not None:
            self.store.set_progress(job.id, Progress(node=data["node"], value=0, max=0))
        if event == "preview":
            data = {
                "image_b64": base64.b64encode(data["image"]).decode(),
                "format": data.get("format", "JPEG"),
                "node": data.get("node"),
                "prompt_id": data.get("prompt_id"),
            }
        self.store.publish(job, event, data)
