"""ComfyUI's HTTP API, so that clients written for ComfyUI work unchanged (also under ``/api``)."""

from __future__ import annotations

import asyncio
import io
import mimetypes
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response

from api.deps import State, Tenant, caller
from api.errors import NotFound, PayloadTooLarge
from api.submit import Submission, invalid, read_json_body, submit
from api.views import comfy_job, history_entry, queue_item
from engine.errors import ImageDecodeError, UnsafePathError
from engine.limits import DecodeLimits
from engine.paths import safe_relative
from worker.protocol import FINISHED, JobStatus, Keys
from worker.storage import ObjectNotFound, object_key

router = APIRouter(tags=["ComfyUI"])

MODEL_FOLDERS = (
    "checkpoints",
    "loras",
    "vae",
    "upscale_models",
    "embeddings",
    "controlnet",
    "clip",
    "clip_vision",
    "unet",
    "diffusion_models",
    "text_encoders",
)


@router.post("/prompt")
async def post_prompt(request: Request) -> JSONResponse:
    """ComfyUI's answer: ``{"prompt_id", "number", "node_errors"}``, where ``node_errors`` holds the
    outputs refused while the others run; a prompt with no valid output is a 400 with
    ``{"error", "node_errors"}``."""
    # The submit hot path: state and tenant by hand (see api/deps.py caller).
    state, tenant = caller(request)
    body = await read_json_body(request, state)
    if not isinstance(body, dict) or "prompt" not in body:
        raise invalid("No prompt provided", "The body must be {'prompt': {...}}")
    extra_data = body.get("extra_data") or {}
    if not isinstance(extra_data, dict):
        raise invalid("extra_data must be a JSON object")
    client_id = body.get("client_id")
    if client_id is not None:
        if not isinstance(client_id, str):
            raise invalid("client_id must be a string")
        extra_data = {**extra_data, "client_id": client_id}
    front = body.get("front") is True
    created = await submit(
        state,
        tenant,
        Submission(
            prompt=body["prompt"],
            extra_data=extra_data,
            client_id=client_id,
            job_id=body.get("prompt_id") if isinstance(body.get("prompt_id"), str) else None,
            priority=9 if front else 5,
        ),
    )
    return JSONResponse(
        {"prompt_id": created.job.id, "number": created.job.number, "node_errors": created.node_errors}
    )


@router.get("/prompt")
async def get_prompt(state: State, tenant: Tenant) -> dict[str, Any]:
    return {"exec_info": {"queue_remaining": await state.jobs.active_count(tenant)}}


@router.get("/queue")
async def get_queue(state: State, tenant: Tenant) -> dict[str, Any]:
    running, queued = await state.jobs.queued_and_running(tenant)
    return {
        "queue_running": [queue_item(j) for j in running],
        "queue_pending": [queue_item(j) for j in queued],
    }


@router.post("/queue")
async def post_queue(request: Request, state: State, tenant: Tenant) -> Response:
    body = await read_json_body(request, state)
    if not isinstance(body, dict):
        raise invalid("Body must be a JSON object")
    _, queued = await state.jobs.queued_and_running(tenant)
    targets = {j.id: j for j in queued}
    if body.get("clear") is True:
        chosen = list(targets.values())
    else:
        ids = body.get("delete") or []
        if not isinstance(ids, list):
            raise invalid("delete must be a list of prompt ids")
        chosen = [targets[i] for i in ids if isinstance(i, str) and i in targets]
    for job in chosen:
        await state.jobs.cancel(job)
    return Response(status_code=200)


@router.post("/interrupt")
async def post_interrupt(request: Request, state: State, tenant: Tenant) -> Response:
    body: Any = {}
    if await request.body():
        body = await read_json_body(request, state)
    prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
    running, _ = await state.jobs.queued_and_running(tenant)
    for job in running:
        if prompt_id is None or job.id == prompt_id:
            await state.jobs.cancel(job)
    return Response(status_code=200)


@router.get("/history")
async def get_history(
    state: State, tenant: Tenant, max_items: int | None = None, offset: int = 0
) -> dict[str, Any]:
    jobs, _ = await state.jobs.list_for(
        tenant, statuses=set(FINISHED), offset=offset, limit=max_items or 10_000
    )
    # ComfyUI lists history oldest first.
    return {job.id: history_entry(job) for job in reversed(jobs)}


@router.get("/history/{prompt_id}")
async def get_history_item(prompt_id: str, state: State, tenant: Tenant) -> dict[str, Any]:
    job = await state.jobs.get_for(tenant, prompt_id)
    if job is None or job.status not in FINISHED:
        return {}
    return {job.id: history_entry(job)}


@router.post("/history")
async def post_history(request: Request, state: State, tenant: Tenant) -> Response:
    body = await read_json_body(request, state)
    if not isinstance(body, dict):
        raise invalid("Body must be a JSON object")
    if body.get("clear") is True:
        jobs, _ = await state.jobs.list_for(tenant, statuses=set(FINISHED), limit=100_000)
    else:
        ids = body.get("delete") or []
        if not isinstance(ids, list):
            raise invalid("delete must be a list of prompt ids")
        jobs = [
            j for i in ids if isinstance(i, str) and (j := await state.jobs.get_for(tenant, i)) is not None
        ]
    for job in jobs:
        await state.jobs.delete(job)
    return Response(status_code=200)


def view_key(tenant: str, filename: str, subfolder: str, type_: str) -> str:
    if type_ == "input":
        return object_key(tenant, "inputs", subfolder, filename)
    if type_ in ("output", "temp"):
        return object_key(tenant, subfolder, filename)
    raise NotFound(f"Unknown type {type_!r}")


@router.get("/view")
async def view(
    state: State,
    tenant: Tenant,
    filename: str,
    subfolder: str = "",
    type: Annotated[str, Query()] = "output",
) -> Response:
    try:
        key = view_key(tenant, filename, subfolder, type)
    except UnsafePathError as exc:
        raise NotFound(str(exc)) from exc
    try:
        data = await asyncio.to_thread(state.storage.get, key)
    except ObjectNotFound as exc:
        raise NotFound(f"No file {subfolder}/{filename}") from exc
    content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    return Response(
        data,
        media_type=content_type,
        headers={"Content-Disposition": f'filename="{filename.rsplit("/", 1)[-1]}"'},
    )


async def store_upload(
    state: State, tenant: str, data: bytes, name: str, subfolder: str, overwrite: bool
) -> dict[str, str]:
    """Check an uploaded image and store it as the tenant's input; returns ComfyUI's answer."""
    from engine.imageio import open_image  # PIL only; the gateway never imports torch

    if len(data) > state.settings.max_upload_bytes:
        raise PayloadTooLarge(f"Upload is larger than {state.settings.max_upload_bytes} bytes")
    try:
        open_image(
            data,
            DecodeLimits(
                max_bytes=state.engine_settings.max_image_bytes,
                max_pixels=state.engine_settings.max_image_pixels,
            ),
        )
    except ImageDecodeError as exc:
        raise invalid(str(exc)) from exc
    # Only the file name counts (browsers may send a path); the folder is the subfolder field.
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    if name in ("", ".", ".."):
        raise invalid("The upload has no file name")
    name = safe_relative(name)
    subfolder = safe_relative(subfolder) if subfolder else ""
    relative = f"{subfolder}/{name}" if subfolder else name
    if not overwrite and await state.redis.sismember(Keys.uploads(tenant), relative):
        stem, dot, ext = name.rpartition(".")
        counter = 1
        while True:
            candidate = f"{stem} ({counter}).{ext}" if dot else f"{name} ({counter})"
            relative = f"{subfolder}/{candidate}" if subfolder else candidate
            if not await state.redis.sismember(Keys.uploads(tenant), relative):
                name = candidate
                break
            counter += 1
    await asyncio.to_thread(
        state.storage.put,
        object_key(tenant, "inputs", relative),
        data,
        mimetypes.guess_type(name)[0] or "image/png",
    )
    await state.redis.sadd(Keys.uploads(tenant), relative)
    return {"name": name, "subfolder": subfolder, "type": "input"}


@router.post("/upload/image")
async def upload_image(
    state: State,
    tenant: Tenant,
    image: Annotated[UploadFile, File()],
    overwrite: Annotated[str, Form()] = "false",
    subfolder: Annotated[str, Form()] = "",
    type: Annotated[str, Form()] = "input",
) -> dict[str, str]:
    data = await image.read()
    return await store_upload(
        state, tenant, data, image.filename or "", subfolder, overwrite.lower() == "true"
    )


@router.post("/upload/mask")
async def upload_mask(
    state: State,
    tenant: Tenant,
    image: Annotated[UploadFile, File()],
    original_ref: Annotated[str, Form()],
    overwrite: Annotated[str, Form()] = "false",
    subfolder: Annotated[str, Form()] = "",
) -> dict[str, str]:
    """ComfyUI's mask editor: the upload's alpha becomes the original image's alpha."""
    import json

    from PIL import Image

    try:
        ref = json.loads(original_ref)
        original_key = view_key(tenant, ref["filename"], ref.get("subfolder", ""), ref.get("type", "input"))
    except (ValueError, KeyError, TypeError) as exc:
        raise invalid("original_ref must be JSON with filename, subfolder and type") from exc
    try:
        original_bytes = await asyncio.to_thread(state.storage.get, original_key)
    except ObjectNotFound as exc:
        raise NotFound("The original image does not exist") from exc
    mask_bytes = await image.read()
    limits = DecodeLimits(max_pixels=state.engine_settings.max_image_pixels)
    from engine.imageio import open_image

    try:
        original = open_image(original_bytes, limits).convert("RGBA")
        mask = open_image(mask_bytes, limits).convert("RGBA")
    except ImageDecodeError as exc:
        raise invalid(str(exc)) from exc
    alpha = mask.getchannel("A").resize(original.size, Image.Resampling.LANCZOS)
    original.putalpha(alpha)
    buffer = io.BytesIO()
    original.save(buffer, format="PNG")
    return await store_upload(
        state, tenant, buffer.getvalue(), image.filename or "mask.png", subfolder, overwrite.lower() == "true"
    )


@router.get("/object_info")
async def object_info(state: State, tenant: Tenant) -> dict[str, Any]:
    return state.registry.object_info(await state.inventory_for(tenant))


@router.get("/object_info/{node_class}")
async def object_info_node(node_class: str, state: State, tenant: Tenant) -> dict[str, Any]:
    from engine.registry import render_node_info

    spec = state.registry.get(node_class)
    if spec is None:
        return {}
    return {node_class: render_node_info(spec, await state.inventory_for(tenant))}


@router.get("/models")
async def models(state: State, tenant: Tenant) -> list[str]:
    known = {kind.split(":", 1)[1] for kind in await state.model_choices()}
    return sorted(known | set(MODEL_FOLDERS))


@router.get("/models/{folder}")
async def models_in(folder: str, state: State, tenant: Tenant) -> JSONResponse:
    choices = await state.model_choices()
    if folder not in MODEL_FOLDERS and f"models:{folder}" not in choices:
        return JSONResponse({"error": f"Unknown model folder {folder}"}, status_code=404)
    return JSONResponse(choices.get(f"models:{folder}", []))


@router.get("/embeddings")
async def embeddings(state: State, tenant: Tenant) -> list[str]:
    names = (await state.model_choices()).get("models:embeddings", [])
    return [name.rsplit(".", 1)[0] for name in names]


@router.get("/jobs")
async def comfy_jobs(
    state: State,
    tenant: Tenant,
    status: str | None = None,
    sort_order: str = "desc",
    limit: int | None = None,
    offset: int = 0,
) -> dict[str, Any]:
    wanted = {s.strip() for s in status.split(",")} if status else None
    jobs, _ = await state.jobs.list_for(tenant, limit=100_000)
    items = [comfy_job(job) for job in jobs]
    if wanted is not None:
        items = [item for item in items if item["status"] in wanted]
    if sort_order == "asc":
        items.reverse()
    total = len(items)
    page = items[offset : offset + limit] if limit is not None else items[offset:]
    return {
        "jobs": page,
        "pagination": {
            "offset": offset,
            "limit": limit,
            "total": total,
            "has_more": offset + len(page) < total,
        },
    }


@router.get("/jobs/{job_id}")
async def comfy_job_detail(job_id: str, state: State, tenant: Tenant) -> dict[str, Any]:
    job = await state.jobs.get_for(tenant, job_id)
    if job is None:
        raise NotFound(f"Job {job_id} not found")
    return comfy_job(job, include_outputs=job.status == JobStatus.SUCCEEDED)
