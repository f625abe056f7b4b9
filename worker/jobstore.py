"""The worker's side of the job store: claim, progress, finish, requeue (synchronous Redis)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis

from worker import lua
from worker.protocol import Channels, JobError, JobRecord, JobStatus, Keys, OutputRecord, Progress

log = logging.getLogger(__name__)


T = TypeVar("T")


class JobStore:
    """Job state changes for one worker; every change is one atomic script.

    State changes that must not be lost (claim, finish, requeue) are retried while Redis is
    unreachable (a restart, a failover) for up to ``retry_for_s``; progress and events are best
    effort.
    """

    def __init__(
        self, client: redis.Redis, history_ttl: int = 7 * 24 * 3600, retry_for_s: float = 300.0
    ) -> None:
        self.redis = client
        self.history_ttl = history_ttl
        self.retry_for_s = retry_for_s
        self._claim = client.register_script(lua.CLAIM_JOB)
        self._finish = client.register_script(lua.FINISH_JOB)
        self._requeue = client.register_script(lua.REQUEUE_JOB)
        self._progress = client.register_script(lua.SET_PROGRESS)

    def _retrying(self, what: str, operation: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.retry_for_s
        delay = 0.2
        while True:
            try:
                return operation()
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("Redis unavailable during %s (%s); retrying in %.1fs", what, exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def get(self, job_id: str) -> JobRecord | None:
        fields = self._retrying("read", lambda: self.redis.hgetall(Keys.job(job_id)))
        if not fields:
            return None
        return JobRecord.from_redis({k.decode(): v.decode() for k, v in fields.items()})

    def claim(self, job_id: str, worker_id: str) -> str:
        """Mark the job running on this worker; returns the status it had ("missing", "cancel" too)."""
        result = self._claim(
            keys=[Keys.job(job_id), Keys.pending(), Keys.running()], args=[worker_id, time.time()]
        )
        return result.decode() if isinstance(result, bytes) else str(result)

    def set_progress(self, job_id: str, progress: Progress) -> None:
        try:
            self._progress(keys=[Keys.job(job_id)], args=[progress.model_dump_json()])
        except redis.RedisError as exc:
            log.warning("Progress of %s not recorded: %s", job_id, exc)

    def finish(
        self,
        job: JobRecord,
        status: JobStatus,
        *,
        outputs: list[OutputRecord] | None = None,
        history: dict[str, Any] | None = None,
        error: JobError | None = None,
        messages: list[Any] | None = None,
    ) -> bool:
        """Record the final state; False when the job had already finished (nothing changes)."""
        fields: list[str] = []
        if outputs is not None:
            fields += ["outputs", json.dumps([o.model_dump() for o in outputs])]
        if history is not None:
            fields += ["history", json.dumps(history)]
        if error is not None:
            fields += ["error", error.model_dump_json()]
        if messages is not None:
            fields += ["messages", json.dumps(messages, default=str)]
        done = self._retrying(
            "finish",
            lambda: self._finish(
                keys=[Keys.job(job.id), Keys.pending(), Keys.running(), Keys.tenant_active(job.tenant)],
                args=[status.value, time.time(), self.history_ttl, *fields],
            ),
        )
        if done:
            self.publish(job, "kiln_job_finished", {"status": status.value})
        return bool(done)

    def requeue(self, job: JobRecord) -> bool:
        """Put a running job back in the queue (the worker is shutting down)."""
        done = self._retrying(
            "requeue",
            lambda: self._requeue(
                keys=[Keys.job(job.id), Keys.pending(), Keys.running()],
                args=[lua.priority_base(job.priority)],
            ),
        )
        return bool(done)

    def publish(self, job: JobRecord, event: str, data: dict[str, Any]) -> None:
        """An event for the job's listeners and, when it has one, its ComfyUI websocket client."""
        message = json.dumps({"type": event, "data": data, "job_id": job.id}, default=str)
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.publish(Channels.job_events(job.id), message)
                if job.client_id:
                    pipe.publish(Channels.client_events(job.tenant, job.client_id), message)
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("Event %s of %s not published: %s", event, job.id, exc)
