"""Health, readiness, metrics, system stats, the worker pool, and signed file downloads."""

from __future__ import annotations

import asyncio
import json
import mimetypes
import platform
import sys
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import State, Tenant
from api.errors import NotFound
from worker.protocol import Keys
from worker.storage import FileStorage, ObjectNotFound

router = APIRouter(tags=["system"])


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
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


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
    return {"workers": await worker_heartbeats(state)}


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
