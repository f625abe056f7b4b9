"""The job protocol shared by the gateway and the workers: statuses, the job record, Redis key
names, queue names and channel names. Every Redis key Kiln uses is built here.

Imports nothing heavy (no torch, no celery, no redis): the gateway imports it.
"""

from __future__ import annotations

import json
import time
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

PREFIX = "kiln"

# Celery queues: the shared queue every worker consumes, plus one per worker for affinity.
DEFAULT_QUEUE = "kiln.jobs"
TASK_RUN_JOB = "kiln.run_job"


def worker_queue(worker_id: str) -> str:
    return f"kiln.worker.{worker_id}"


class JobStatus(StrEnum):
    """A job's life: queued -> running -> succeeded | failed | cancelled (one way)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED


FINISHED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class Keys:
    """Redis key names. One place, so that nothing else spells a key by hand."""

    @staticmethod
    def job(job_id: str) -> str:
        """Hash: the job record (source of truth for status)."""
        return f"{PREFIX}:job:{job_id}"

    @staticmethod
    def pending() -> str:
        """Sorted set of queued job ids, scored by (priority, sequence): rank = queue position."""
        return f"{PREFIX}:pending"

    @staticmethod
    def running() -> str:
        """Set of running job ids."""
        return f"{PREFIX}:running"

    @staticmethod
    def sequence() -> str:
        """Counter: the ComfyUI ``number`` of each job, in submission order."""
        return f"{PREFIX}:sequence"

    @staticmethod
    def tenant_jobs(tenant: str) -> str:
        """Sorted set of a tenant's job ids by creation time (history, listings)."""
        return f"{PREFIX}:tenant:{tenant}:jobs"

    @staticmethod
    def tenant_active(tenant: str) -> str:
        """Set of a tenant's queued and running job ids (the queued-jobs cap)."""
        return f"{PREFIX}:tenant:{tenant}:active"

    @staticmethod
    def idempotency(tenant: str, key: str) -> str:
        return f"{PREFIX}:idem:{tenant}:{key}"

    @staticmethod
    def rate(tenant: str) -> str:
        return f"{PREFIX}:rate:{tenant}"

    @staticmethod
    def uploads(tenant: str) -> str:
        """Set of a tenant's uploaded input names."""
        return f"{PREFIX}:uploads:{tenant}"

    @staticmethod
    def worker(worker_id: str) -> str:
        """Hash with a TTL: a worker's heartbeat."""
        return f"{PREFIX}:worker:{worker_id}"

    @staticmethod
    def workers() -> str:
        """Set of worker ids that have ever heartbeated (expired ones are pruned on read)."""
        return f"{PREFIX}:workers"

    @staticmethod
    def inventory(folder: str) -> str:
        """Set of model file names available to the workers in a ComfyUI model folder."""
        return f"{PREFIX}:inventory:{folder}"

    @staticmethod
    def inventory_folders() -> str:
        """Set of model folder names that have an inventory set."""
        return f"{PREFIX}:inventory-folders"

    @staticmethod
    def webhooks() -> str:
        """List of webhook deliveries waiting to be sent."""
        return f"{PREFIX}:webhooks"


class Channels:
    """Redis pub/sub channels."""

    @staticmethod
    def job_events(job_id: str) -> str:
        return f"{PREFIX}:events:job:{job_id}"

    @staticmethod
    def client_events(tenant: str, client_id: str) -> str:
        """Events for a ComfyUI websocket client (``clientId``), scoped to its tenant."""
        return f"{PREFIX}:events:client:{tenant}:{client_id}"

    @staticmethod
    def broadcast() -> str:
        """Queue status changes, sent to every websocket."""
        return f"{PREFIX}:events:status"

    @staticmethod
    def control(worker_id: str) -> str:
        """Commands to one worker (cancel the running job)."""
        return f"{PREFIX}:control:{worker_id}"


class OutputRecord(BaseModel):
    """One stored output of a job."""

    node_id: str
    index: int
    key: str
    filename: str
    subfolder: str
    type: str = "output"
    content_type: str
    bytes: int
    sha256: str


class JobError(BaseModel):
    type: str
    message: str
    node_id: str | None = None
    class_type: str | None = None
    traceback: list[str] | None = None


class Progress(BaseModel):
    node: str | None = None
    value: int = 0
    max: int = 0


class JobRecord(BaseModel):
    """The job record as stored in Redis (one hash field per attribute, JSON for structures)."""

    id: str
    tenant: str
    status: JobStatus
    number: int
    priority: int = 0
    prompt: dict[str, Any]
    extra_data: dict[str, Any] = Field(default_factory=dict)
    outputs_to_execute: list[str] = Field(default_factory=list)
    client_id: str | None = None
    webhook: str | None = None
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    attempts: int = 0
    progress: Progress | None = None
    outputs: list[OutputRecord] = Field(default_factory=list)
    # ComfyUI's history "outputs" ({node_id: {"images": [...]}}) and status "messages".
    history: dict[str, Any] = Field(default_factory=dict)
    messages: list[Any] = Field(default_factory=list)
    error: JobError | None = None
    cancel_requested: bool = False
    models: list[str] = Field(default_factory=list)

    def to_redis(self) -> dict[str, str]:
        """Hash fields: scalars as text, structures as JSON; None fields are left out."""
        fields: dict[str, str] = {}
        for name, value in self.model_dump(mode="json").items():
            if value is None:
                continue
            fields[name] = value if isinstance(value, str) else json.dumps(value)
        return fields

    @classmethod
    def from_redis(cls, fields: dict[str, str]) -> JobRecord:
        data: dict[str, Any] = {}
        for name, raw in fields.items():
            annotation = cls.model_fields.get(name)
            if annotation is None:
                continue
            if name in _TEXT_FIELDS:
                data[name] = raw
            else:
                data[name] = json.loads(raw)
        return cls.model_validate(data)


# Fields stored as plain text in the hash; every other field is JSON.
_TEXT_FIELDS = frozenset({"id", "tenant", "status", "client_id", "webhook", "worker"})
