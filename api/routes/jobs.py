"""Kiln's native job API under ``/v1``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from api.deps import State, Tenant, caller
from api.errors import InvalidRequest, NotFound
from api.submit import Submission, invalid, read_json_body, submit
from api.views import native_job
from worker.celery_wire import DEFAULT_PRIORITY, MAX_PRIORITY
from worker.protocol import JobStatus

router = APIRouter(prefix="/v1", tags=["jobs"])


class JobRequest(BaseModel):
    """``POST /v1/jobs`` body (documented in the OpenAPI schema; parsed by Kiln's safe JSON reader)."""

    prompt: dict[str, Any] = Field(description="An API-format ComfyUI prompt")
    priority: int = Field(DEFAULT_PRIORITY, ge=0, le=MAX_PRIORITY, description="0 lowest .. 9 most urgent")
    webhook: str | None = Field(None, description="URL that receives a POST when the job finishes")
    extra_data: dict[str, Any] = Field(
        default_factory=dict, description="ComfyUI extra_data (extra_pnginfo, ...)"
    )
    client_id: str | None = Field(None, description="ComfyUI websocket client id that receives the events")


class JobAccepted(BaseModel):
    id: str
    status: str
    status_url: str


IDEMPOTENCY_KEY_MAX = 200


@router.post(
    "/jobs",
    status_code=202,
    response_model=JobAccepted,
    openapi_extra={
        "requestBody": {"content": {"application/json": {"schema": JobRequest.model_json_schema()}}},
        "parameters": [
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "maxLength": IDEMPOTENCY_KEY_MAX},
                "description": "A retried request with the same key returns the first job",
            }
        ],
    },
)
async def create_job(request: Request) -> JSONResponse:
    # The submit hot path: state, tenant and header by hand (see api/deps.py caller).
    state, tenant = caller(request)
    idempotency_key = request.headers.get("idempotency-key")
    if idempotency_key is not None and len(idempotency_key) > IDEMPOTENCY_KEY_MAX:
        raise InvalidRequest(f"Idempotency-Key is longer than {IDEMPOTENCY_KEY_MAX} characters")
    body = await read_json_body(request, state)
    if not isinstance(body, dict) or "prompt" not in body:
        raise invalid("No prompt provided", "The body must be {'prompt': {...}}")
    priority = body.get("priority", DEFAULT_PRIORITY)
    webhook = body.get("webhook")
    extra_data = body.get("extra_data") or {}
    client_id = body.get("client_id")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise invalid("priority must be an integer")
    if webhook is not None and not isinstance(webhook, str):
        raise invalid("webhook must be an http(s) URL", "webhook")
    if not isinstance(extra_data, dict) or (client_id is not None and not isinstance(client_id, str)):
        raise invalid("extra_data must be an object and client_id a string")
    created = await submit(
        state,
        tenant,
        Submission(
            prompt=body["prompt"],
            extra_data=extra_data,
            client_id=client_id,
            priority=priority,
            webhook=webhook,
            idempotency_key=idempotency_key,
        ),
    )
    job = created.job
    status_url = f"{state.settings.public_url.rstrip('/')}/v1/jobs/{job.id}"
    return JSONResponse(
        {"id": job.id, "status": job.status.value, "status_url": status_url},
        status_code=202 if created.created else 200,
        headers={"Location": status_url},
    )


@router.get("/jobs/{job_id}")
async def get_job(job_id: str, state: State, tenant: Tenant) -> dict[str, Any]:
    job = await state.jobs.get_for(tenant, job_id)
    if job is None:
        raise NotFound(f"Job {job_id} not found")
    position = await state.jobs.queue_position(job.id) if job.status == JobStatus.QUEUED else None
    return native_job(
        job,
        position=position,
        storage=state.storage,
        expiry_s=state.settings.presign_expiry_s,
        public_url=state.settings.public_url,
    )


@router.get("/jobs")
async def list_jobs(
    state: State,
    tenant: Tenant,
    status: Annotated[list[JobStatus] | None, Query()] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> dict[str, Any]:
    jobs, total = await state.jobs.list_for(tenant, statuses=set(status or []), offset=offset, limit=limit)
    return {
        "jobs": [
            {"id": j.id, "status": j.status.value, "created_at": j.created_at, "number": j.number}
            for j in jobs
        ],
        "offset": offset,
        "limit": limit,
        "total": total,
    }


@router.delete("/jobs/{job_id}", status_code=202)
async def cancel_job(job_id: str, state: State, tenant: Tenant) -> dict[str, str]:
    job = await state.jobs.get_for(tenant, job_id)
    if job is None:
        raise NotFound(f"Job {job_id} not found")
    outcome = await state.jobs.cancel(job)
    return {"id": job.id, "status": outcome}
