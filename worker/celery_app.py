"""The Celery application of a Kiln worker: one process per GPU, one job at a time.

Configuration that matters for not losing jobs:
- ``task_acks_late`` + ``task_reject_on_worker_lost``: a job is acknowledged only after it ran, and
  redelivered when the worker dies mid-job;
- ``worker_prefetch_multiplier = 1`` with concurrency 1: a worker holds one job, never a backlog;
- ``visibility_timeout`` longer than a job's attempts: Redis never redelivers a job that still runs;
- ``worker_cancel_long_running_tasks_on_connection_loss``: a job whose broker connection was lost is
  cancelled (it will be redelivered) instead of finishing unacknowledgeable;
- soft shutdown (``REMAP_SIGTERM=SIGQUIT`` + ``worker_soft_shutdown_timeout``): on SIGTERM the running
  job gets that long, then it is put back in the queue.

The task runs on Celery's ``threads`` pool (one thread): the engine host is a spawned subprocess,
which a daemonic prefork child may not start, and the main thread stays free for Celery's signal
handling during the soft shutdown.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from engine.settings import EngineSettings
from worker.engine_host import EngineHost
from worker.heartbeat import ControlListener, Heartbeat, Preloader
from worker.jobstore import JobStore
from worker.protocol import DEFAULT_QUEUE, TASK_RUN_JOB, worker_queue
from worker.runner import JobRunner
from worker.settings import WorkerSettings
from worker.storage import storage_from_url
from worker.webhooks import deliverer_for_worker

log = logging.getLogger(__name__)


@dataclass
class WorkerProcess:
    """The per-process parts of a worker, built in the pool process that runs the jobs."""

    settings: WorkerSettings
    engine_settings: EngineSettings
    runner: JobRunner | None = None
    threads: list[Any] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        with self._lock:
            if self.runner is None:
                self._start()

    def _start(self) -> None:
        client = redis.Redis.from_url(self.settings.redis_url, health_check_interval=30)
        # Webhooks flow from the start, even while the engine host is still loading.
        deliverer = deliverer_for_worker(
            client,
            self.settings.webhook_secret,
            self.settings.webhook_attempts,
            self.settings.storage_url,
            **self.settings.storage_options(),
        )
        deliverer.start()
        self.threads = [deliverer]
        storage = storage_from_url(self.settings.storage_url, **self.settings.storage_options())
        host = EngineHost(
            self.engine_settings,
            storage_url=self.settings.storage_url,
            storage_options=self.settings.storage_options(),
            isolation=self.settings.isolation,
            start_timeout_s=self.settings.host_start_timeout_s,
        )
        host.start()
        self.runner = JobRunner(
            settings=self.settings,
            store=JobStore(client, self.settings.history_ttl_s),
            storage=storage,
            host=host,
        )
        heartbeat = Heartbeat(client, self.settings, self.engine_settings, self.runner)
        preloader = Preloader(self.runner)
        listener = ControlListener(client, self.settings.worker_id, self.runner, preloader)
        for thread in (heartbeat, preloader, listener):
            thread.start()
        self.threads = [deliverer, heartbeat, preloader, listener]

    def stop(self) -> None:
        """Worker shutdown: a job still running goes back to the queue, then the host stops."""
        for thread in self.threads:
            thread.stop()
        if self.runner is not None and not self.runner.stopping.is_set():
            self.runner.shutdown()

    def run(self, job_id: str) -> str:
        self.start()
        assert self.runner is not None
        return self.runner.run(job_id).status


def create_celery_app(settings: WorkerSettings, engine_settings: EngineSettings) -> Celery:
    """A Celery app whose single task hands a job id to this worker's JobRunner."""
    app = Celery("kiln", broker=settings.redis_url)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        # The task only raises when the worker stops mid-job: leave the message for redelivery.
        task_acks_on_failure_or_timeout=False,
        task_default_queue=DEFAULT_QUEUE,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_soft_shutdown_timeout=settings.soft_shutdown_timeout_s,
        worker_enable_soft_shutdown_on_idle=False,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "queue_order_strategy": "priority",
        },
    )
    process = WorkerProcess(settings, engine_settings)

    @app.task(name=TASK_RUN_JOB, acks_late=True, reject_on_worker_lost=True)
    def run_job(job_id: str) -> str:
        return process.run(job_id)

    @worker_ready.connect(weak=False)
    def _start(**_: Any) -> None:
        # Start the engine host before the first job arrives, so the first job does not wait.
        threading.Thread(target=process.start, name="kiln-start", daemon=True).start()

    @worker_shutdown.connect(weak=False)
    def _stop(**_: Any) -> None:
        process.stop()

    app.kiln_process = process  # type: ignore[attr-defined]
    return app


def worker_queues(settings: WorkerSettings) -> list[str]:
    """The shared queue, this worker's own queue (model affinity), and any configured extras."""
    return [DEFAULT_QUEUE, worker_queue(settings.worker_id), *settings.queues]
