"""Health, readiness, metrics, system stats, the worker pool, and signed file downloads."""

from __future__ import annotations

import asyncio
import contextlib
import json
import mimetypes
import platform
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from pydantic import BaseModel, Field

from api.deps import State, Tenant
from api.errors import ApiError, NotFound
from api.state import GatewayState
from worker.protocol import JOB_SECONDS_BUCKETS, LOAD_SECONDS_BUCKETS, Keys
from worker.storage import FileStorage, ObjectNotFound


@asynccontextmanager
async def rebalancing(app: FastAPI) -> AsyncIterator[None]:
    """Runs the routing service's rebalancing loop for the app's lifetime (inside the app's own
    lifespan, which builds the state and closes Redis after this ends)."""
    state: GatewayState = app.state.kiln
    stop = asyncio.Event()
    task = asyncio.create_task(state.router.run(stop), name="kiln-rebalance")
    try:
        yield
    finally:
        # A stop flag, not a cancel: the loop ends after its current round, whatever the Redis
        # client does with cancellations.
        stop.set()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(task, 10)


router = APIRouter(tags=["system"], lifespan=rebalancing)


class Forbidden(ApiError):
    """Raised when a tenant may not change the cluster's configuration."""

    status = 403
    type = "forbidden"


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: State) -> JSONResponse:
    """Readiness: Redis and the object store answer."""
    problems: dict[str, str] = {}
    try:
        await state.redis.ping()
    except Exception as exc:
        problems["redis"] = str(exc)
    try:
        await asyncio.to_thread(state.storage.check)
    except Exception as exc:
        problems["storage"] = str(exc)
    if problems:
        return JSONResponse({"status": "unavailable", "problems": problems}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.get("/metrics")
async def metrics(state: State) -> Response:
    """The gateway's own metrics, then the cluster's, read from Redis now (see docs/routing.md)."""
    cluster = CollectorRegistry(auto_describe=False)
    cluster.register(ClusterCollector(await cluster_figures(state)))
    body = generate_latest(state.metrics.exposition()) + generate_latest(cluster)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


async def cluster_figures(state: State) -> dict[str, Any]:
    """Counters the job scripts and the workers keep in Redis, queue depths, and heartbeats."""
    snapshot = await state.router.snapshot()
    async with state.redis.pipeline(transaction=False) as pipe:
        for name in ("jobs", "job-seconds", "model-loads", "load-seconds", "affinity"):
            pipe.hgetall(Keys.stats(name))
        rows = await pipe.execute()
    names = ("jobs", "job-seconds", "model-loads", "load-seconds", "affinity")
    stats = {
        name: {k.decode(): float(v) for k, v in row.items()} for name, row in zip(names, rows, strict=True)
    }
    return {"stats": stats, "depths": snapshot.depths, "heartbeats": snapshot.heartbeats}


class ClusterCollector:
    """Prometheus families built from one read of Redis (a fresh collector per scrape)."""

    def __init__(self, figures: dict[str, Any]) -> None:
        self.figures = figures

    def collect(self) -> Iterator[Metric]:
        stats = self.figures["stats"]
        jobs = CounterMetricFamily("kiln_jobs", "Jobs finished, by final status", labels=["status"])
        for status, count in sorted(stats["jobs"].items()):
            jobs.add_metric([status], count)
        yield jobs
        seconds = HistogramMetricFamily(
            "kiln_job_seconds",
            "Job seconds by phase: queued (submit to start), run (start to finish), total",
            labels=["phase"],
        )
        for phase in ("queued", "run", "total"):
            buckets = _buckets(stats["job-seconds"], f"{phase}:", JOB_SECONDS_BUCKETS)
            total = stats["job-seconds"].get(f"{phase}:sum", 0.0)
            seconds.add_metric([phase], buckets, total)
        yield seconds
        loads = CounterMetricFamily(
            "kiln_model_loads", "Model loads measured by the workers", labels=["model", "worker"]
        )
        for field_name, count in sorted(stats["model-loads"].items()):
            worker, model = json.loads(field_name)
            loads.add_metric([model, worker], count)
        yield loads
        load_seconds = HistogramMetricFamily("kiln_model_load_seconds", "Seconds each model load took")
        load_seconds.add_metric(
            [],
            _buckets(stats["load-seconds"], "", LOAD_SECONDS_BUCKETS),
            stats["load-seconds"].get("sum", 0.0),
        )
        yield load_seconds
        hits = CounterMetricFamily(
            "kiln_affinity_hits",
            "Jobs that found every model they needed resident on their worker",
            labels=["worker"],
        )
        misses = CounterMetricFamily(
            "kiln_affinity_misses", "Jobs that had to load at least one model", labels=["worker"]
        )
        for field_name, count in sorted(stats["affinity"].items()):
            kind, worker = field_name.split(":", 1)
            (hits if kind == "hit" else misses).add_metric([worker], count)
        yield hits
        yield misses
        depth = GaugeMetricFamily("kiln_queue_depth", "Task messages waiting, by queue", labels=["queue"])
        for queue, count in sorted(self.figures["depths"].items()):
            depth.add_metric([queue], count)
        yield depth
        memory = GaugeMetricFamily(
            "kiln_gpu_memory_bytes",
            "Device memory of live workers (kind: total, free)",
            labels=["worker", "kind"],
        )
        live = GaugeMetricFamily("kiln_workers_live", "Workers whose heartbeat has not expired")
        live.add_metric([], len(self.figures["heartbeats"]))
        for worker_id, beat in sorted(self.figures["heartbeats"].items()):
            for kind in ("total", "free"):
                value = beat.get(f"memory_{kind}")
                if value is not None:
                    memory.add_metric([worker_id, kind], float(value))
        yield memory
        yield live


def _buckets(table: dict[str, float], prefix: str, bounds: tuple[str, ...]) -> list[tuple[str, float]]:
    """Cumulative Prometheus buckets from per-bucket counts stored as ``<prefix><le>``."""
    running = 0.0
    buckets = []
    for bound in (*bounds, "+Inf"):
        running += table.get(f"{prefix}{bound}", 0.0)
        buckets.append((bound, running))
    return buckets


async def worker_heartbeats(state: State) -> list[dict[str, Any]]:
    """Live workers' heartbeats (expired ones are pruned from the index)."""
    ids = sorted(w.decode() for w in await state.redis.smembers(Keys.workers()))
    async with state.redis.pipeline(transaction=False) as pipe:
        for worker_id in ids:
            pipe.get(Keys.worker(worker_id))
        rows = await pipe.execute()
    alive = []
    for worker_id, row in zip(ids, rows, strict=True):
        if row is None:
            await state.redis.srem(Keys.workers(), worker_id)
            continue
        alive.append(json.loads(row))
    return alive


@router.get("/v1/workers")
async def workers(state: State, tenant: Tenant) -> dict[str, Any]:
    """The live pool: each worker's heartbeat (GPU, memory, resident models, queue, running job,
    job and load time averages) and its routing config (pinned models, allow-list)."""
    beats = await worker_heartbeats(state)
    for beat in beats:
        beat["config"] = await state.router.worker_config(beat["id"])
    return {"workers": beats}


class WorkerConfig(BaseModel):
    """``PUT /v1/workers/{id}/config``: models kept resident, and the models it may load."""

    pinned: list[str] | None = Field(None, description='Models kept resident ("checkpoints/x.safetensors")')
    allow: list[str] | None = Field(None, description="fnmatch patterns of models it may load; [] = any")


@router.put("/v1/workers/{worker_id}/config")
async def set_worker_config(
    worker_id: str, body: WorkerConfig, state: State, tenant: Tenant
) -> dict[str, Any]:
    if not (state.settings.insecure or tenant in state.router.settings.routing_admin_tenants):
        raise Forbidden("Only routing admin tenants (KILN_ROUTING_ADMIN_TENANTS) may change worker config")
    config = await state.router.set_worker_config(worker_id, pinned=body.pinned, allow=body.allow)
    return {"id": worker_id, "config": config}


@router.get("/system_stats")
@router.get("/api/system_stats", include_in_schema=False)
async def system_stats(state: State, tenant: Tenant) -> dict[str, Any]:
    beats = await worker_heartbeats(state)
    devices = [
        {
            "name": beat.get("gpu_name") or beat.get("device", "cpu"),
            "type": "cuda" if beat.get("gpu_index") is not None else "cpu",
            "index": beat.get("gpu_index") or 0,
            "vram_total": beat.get("memory_total", 0),
            "vram_free": beat.get("memory_free", 0),
            "torch_vram_total": beat.get("memory_total", 0),
            "torch_vram_free": beat.get("memory_free", 0),
            "worker": beat.get("id"),
        }
        for beat in beats
    ]
    torch_version = next((b.get("torch_version") for b in beats if b.get("torch_version")), None)
    return {
        "system": {
            "os": sys.platform,
            "python_version": sys.version,
            "embedded_python": False,
            "comfyui_version": "kiln",
            "pytorch_version": torch_version,
            "argv": sys.argv,
            "hostname": platform.node(),
        },
        "devices": devices,
    }


@router.get("/v1/files/{key:path}")
async def signed_file(key: str, expires: int, signature: str, state: State) -> Response:
    """Downloads for ``file://`` storage: the presigned URL's signature is the credential."""
    storage = state.storage
    if not isinstance(storage, FileStorage) or not storage.verify(key, expires, signature):
        raise NotFound("No such file, or the link expired")
    try:
        data = await asyncio.to_thread(storage.get, key)
    except ObjectNotFound as exc:
        raise NotFound("No such file") from exc
    return Response(data, media_type=mimetypes.guess_type(key)[0] or "application/octet-stream")
