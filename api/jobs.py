"""The gateway's side of the job store: create, read, list, cancel (asyncio Redis)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from worker import lua
from worker.celery_wire import redis_list_for, task_message
from worker.protocol import DEFAULT_QUEUE, FINISHED, Channels, JobRecord, JobStatus, Keys
from worker.webhooks import delivery_for


class QueueFull(Exception):
    """Raised when a tenant already has its maximum of queued and running jobs."""


class JobIdTaken(Exception):
    """Raised when a job is created with the id of a job that exists (a reused ``prompt_id``)."""


@dataclass(frozen=True)
class Created:
    job: JobRecord
    created: bool  # False when an Idempotency-Key matched an earlier job
    # The validator's errors for outputs refused while others run (ComfyUI's ``node_errors``).
    node_errors: dict[str, Any] = field(default_factory=dict)


class GatewayJobs:
    """Job operations the gateway performs. Each state change is one atomic script."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        history_ttl_s: int,
        idempotency_ttl_s: int,
        max_queued_per_tenant: int,
    ) -> None:
        self.redis = client
        self.history_ttl_s = history_ttl_s
        self.idempotency_ttl_s = idempotency_ttl_s
        self.max_queued_per_tenant = max_queued_per_tenant
        self._create = client.register_script(lua.CREATE_JOB)
        self._cancel = client.register_script(lua.CANCEL_JOB)
        self._take_token = client.register_script(lua.TAKE_TOKEN)

    async def create(
        self,
        record: JobRecord,
        *,
        queue: str = DEFAULT_QUEUE,
        idempotency_key: str | None = None,
    ) -> Created:
        """Record the job and queue its task in one step; raises QueueFull over the tenant's cap."""
        fields = record.to_redis()
        fields.pop("number", None)
        flat = json.dumps([item for pair in fields.items() for item in pair], ensure_ascii=False)
        job_id, number, created = await self._create(
            keys=[
                Keys.job(record.id),
                Keys.pending(),
                Keys.tenant_jobs(record.tenant),
                Keys.tenant_active(record.tenant),
                Keys.sequence(),
                Keys.idempotency(record.tenant, idempotency_key) if idempotency_key else "",
                redis_list_for(queue, record.priority),
            ],
            args=[
                record.id,
                self.max_queued_per_tenant,
                self.idempotency_ttl_s,
                lua.priority_base(record.priority),
                record.created_at,
                task_message(record.id, queue, record.priority),
                flat,
            ],
        )
        if int(number) == -2:
            raise JobIdTaken(f"prompt_id {record.id} is already used")
        if int(number) < 0:
            raise QueueFull(f"Tenant {record.tenant} has {self.max_queued_per_tenant} jobs queued or running")
        job_id = job_id.decode() if isinstance(job_id, bytes) else job_id
        if not created:
            existing = await self.get(job_id)
            if existing is None:  # expired between the two reads: treat as new next time
                raise QueueFull("Idempotent job expired; retry")
            return Created(existing, False)
        record.number = int(number)
        return Created(record, True)

    async def get(self, job_id: str) -> JobRecord | None:
        fields = await self.redis.hgetall(Keys.job(job_id))
        if not fields:
            return None
        return JobRecord.from_redis({k.decode(): v.decode() for k, v in fields.items()})

    async def get_for(self, tenant: str, job_id: str) -> JobRecord | None:
        """The job if it belongs to ``tenant`` (another tenant's job does not exist for you)."""
        job = await self.get(job_id)
        return job if job is not None and job.tenant == tenant else None

    async def get_many(self, job_ids: list[str]) -> list[JobRecord]:
        if not job_ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(Keys.job(job_id))
            rows = await pipe.execute()
        return [JobRecord.from_redis({k.decode(): v.decode() for k, v in row.items()}) for row in rows if row]

    async def list_for(
        self, tenant: str, *, statuses: set[JobStatus] | None = None, offset: int = 0, limit: int = 50
    ) -> tuple[list[JobRecord], int]:
        """A tenant's jobs, newest first, filtered by status; also the number that matched."""
        ids = [i.decode() for i in await self.redis.zrevrange(Keys.tenant_jobs(tenant), 0, -1)]
        jobs = await self.get_many(ids)
        if len(jobs) < len(ids):
            await self._prune_expired(tenant, ids, jobs)
        if statuses:
            jobs = [job for job in jobs if job.status in statuses]
        return jobs[offset : offset + limit], len(jobs)

    async def _prune_expired(self, tenant: str, ids: list[str], alive: list[JobRecord]) -> None:
        gone = set(ids) - {job.id for job in alive}
        if gone:
            await self.redis.zrem(Keys.tenant_jobs(tenant), *gone)

    async def queue_position(self, job_id: str) -> int | None:
        """0 = next to run; None when the job is not queued."""
        rank = await self.redis.zrank(Keys.pending(), job_id)
        return None if rank is None else int(rank)

    async def queued_count(self) -> int:
        return int(await self.redis.zcard(Keys.pending()))

    async def active_count(self, tenant: str) -> int:
        """How many of a tenant's jobs are queued or running (ComfyUI's ``queue_remaining``)."""
        return int(await self.redis.scard(Keys.tenant_active(tenant)))

    async def queued_and_running(self, tenant: str) -> tuple[list[JobRecord], list[JobRecord]]:
        """A tenant's (running, queued) jobs, each in queue order."""
        ids = [i.decode() for i in await self.redis.smembers(Keys.tenant_active(tenant))]
        jobs = await self.get_many(ids)
        running = sorted((j for j in jobs if j.status == JobStatus.RUNNING), key=lambda j: j.number)
        queued = sorted(
            (j for j in jobs if j.status == JobStatus.QUEUED),
            key=lambda j: (lua.priority_base(j.priority), j.number),
        )
        return running, queued

    async def cancel(self, job: JobRecord) -> str:
        """Cancel a queued job now, or ask the running job's worker to stop it. Returns the outcome."""
        error = json.dumps({"type": "cancelled", "message": "Cancelled by request"})
        # A job cancelled while queued is finished by the script: its webhook is queued there too.
        webhook = delivery_for(job, JobStatus.CANCELLED).to_json() if job.webhook else ""
        outcome = await self._cancel(
            keys=[
                Keys.job(job.id),
                Keys.pending(),
                Keys.running(),
                Keys.tenant_active(job.tenant),
                Keys.webhooks(),
            ],
            args=[time.time(), self.history_ttl_s, error, webhook],
        )
        outcome = outcome.decode() if isinstance(outcome, bytes) else str(outcome)
        if outcome == "cancelling" and job.worker:
            await self.redis.publish(Channels.control(job.worker), json.dumps({"cancel": job.id}))
        return outcome

    async def delete(self, job: JobRecord) -> bool:
        """Forget a finished job (``POST /history`` delete). Running or queued jobs are kept."""
        if job.status not in FINISHED:
            return False
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(Keys.job(job.id))
            pipe.zrem(Keys.tenant_jobs(job.tenant), job.id)
            await pipe.execute()
        return True

    async def take_token(self, tenant: str, rate: float, burst: int) -> float:
        """0 when the tenant may submit now; otherwise seconds to wait."""
        allowed, wait = await self._take_token(keys=[Keys.rate(tenant)], args=[burst, rate, time.time()])
        return 0.0 if int(allowed) else float(wait)


def new_job_id() -> str:
    return str(uuid.uuid4())


def job_summary(job: JobRecord) -> dict[str, Any]:
    return {"id": job.id, "status": job.status.value, "number": job.number}
