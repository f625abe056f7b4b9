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


WORKER_QUEUE_PREFIX = "kiln.worker."


def worker_queue(worker_id: str) -> str:
    return f"{WORKER_QUEUE_PREFIX}{worker_id}"


def queue_worker(queue: str) -> str | None:
    """The worker whose own queue this is; None for the shared queue (or any other)."""
    return queue[len(WORKER_QUEUE_PREFIX) :] if queue.startswith(WORKER_QUEUE_PREFIX) else None


# kombu's Redis transport keeps each message a worker took and has not acknowledged in this hash
# (delivery tag -> JSON [message, exchange, routing key]), and its delivery time in this sorted
# set; it redelivers one only after the visibility timeout. The gateway redelivers the running
# job of a worker whose heartbeat is gone sooner (api/routing.py).
KOMBU_UNACKED = "unacked"
KOMBU_UNACKED_INDEX = "unacked_index"

# The event the engine host sends after the model manager loaded a model file (one per file: a
# checkpoint's parts loaded together are one load); the worker records it for its heartbeat and
# metrics and does not forward it to clients. Data: {"model": "checkpoints/x.safetensors",
# "seconds": float, "hash": "sha256 hex" | None, "bytes": int, "parts": ["unet", "clip", ...]}.
# (Residency travels host -> worker only, as worker.host_io.MODELS_EVENT.)
MODEL_LOADED_EVENT = "kiln_model_loaded"

# Histogram buckets (seconds) of the job and model-load metrics kept in Redis (see Keys.stats).
JOB_SECONDS_BUCKETS = ("0.5", "1", "2", "5", "10", "30", "60", "120", "300", "600", "1800")
LOAD_SECONDS_BUCKETS = ("0.5", "1", "2", "5", "10", "20", "30", "60", "120")

# The folders whose files count as models for routing, most significant first: the first of a
# job's models found in this order is its "primary" model, the key of its job-time statistics.
PRIMARY_MODEL_FOLDERS = ("checkpoints", "unet", "diffusion_models")


def primary_model(models: list[str] | tuple[str, ...]) -> str:
    """The model whose statistics stand for the job: its checkpoint (or diffusion model), else the
    first model it names, else "" (a job that loads no model)."""
    for folder in PRIMARY_MODEL_FOLDERS:
        for model in models:
            if model.startswith(f"{folder}/"):
                return model
    return min(models) if models else ""


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
    def worker_queues() -> str:
        """Sorted set of per-worker queue names, scored by when each was last routed to or seen
        alive: where the gateway's reaper looks for jobs stranded on dead workers."""
        return f"{PREFIX}:worker-queues"

    @staticmethod
    def worker_config(worker_id: str) -> str:
        """Hash: routing configuration of a worker (``pinned``, ``allow``: JSON lists), set through
        the API or the gateway's settings; the worker reports it in its heartbeat."""
        return f"{PREFIX}:worker-config:{worker_id}"

    @staticmethod
    def rebalance_lock() -> str:
        """Short lease held by the one gateway that applies a rebalancing round."""
        return f"{PREFIX}:rebalance-lock"

    @staticmethod
    def stats(name: str) -> str:
        """Hashes of cluster-wide counters and histogram buckets that /metrics reports:
        ``jobs`` (status -> count), ``job-seconds``, ``model-loads``, ``load-seconds``,
        ``affinity`` (written atomically by the job scripts and by the workers)."""
        return f"{PREFIX}:stats:{name}"

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
        """List: the webhook outbox, deliveries not yet attempted (LPUSH, claimed from the right)."""
        return f"{PREFIX}:webhooks"

    @staticmethod
    def webhooks_scheduled() -> str:
        """Sorted set: claimed webhook deliveries (score = lease end) and retries (score = due time)."""
        return f"{PREFIX}:webhooks:scheduled"

    @staticmethod
    def webhooks_failed() -> str:
        """List: webhook deliveries given up, newest first (capped)."""
        return f"{PREFIX}:webhooks:failed"


# The message on ``Channels.broadcast()`` when a job is queued, cancelled or finished (published by
# the scripts that make those changes, worker/lua.py).
QUEUE_CHANGED = json.dumps({"type": "queue_changed"})


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
        """Commands to one worker: ``{"cancel": job_id}``, ``{"preload": model}``."""
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
    # Model files the prompt loads ("folder/name"), derived by the gateway for routing.
    models: list[str] = Field(default_factory=list)
    # Where the task message was queued last (the shared queue or a worker's own queue).
    queue: str | None = None
    # Placement constraints from extra_data["kiln"]: {"worker": id} and/or {"gpu_class": name}.
    pin: dict[str, str] = Field(default_factory=dict)

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
_TEXT_FIELDS = frozenset({"id", "tenant", "status", "client_id", "webhook", "worker", "queue"})
