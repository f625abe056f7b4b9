"""ComfyUI's websocket: ``/ws?clientId=...`` receives the events of the prompts that client submitted."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import struct
import time
import uuid
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from api.deps import api_key_from, tenant_for_key
from api.errors import Unauthorized
from api.state import GatewayState
from worker.protocol import Channels

router = APIRouter()

# ComfyUI's binary frame: big-endian event type (1 = preview image), then image type (1 JPEG, 2 PNG).
PREVIEW_IMAGE = 1
IMAGE_TYPES = {"JPEG": 1, "PNG": 2}


def preview_frame(data: dict[str, Any]) -> bytes:
    image = base64.b64decode(data["image_b64"])
    image_type = IMAGE_TYPES.get(str(data.get("format", "JPEG")).upper(), 1)
    return struct.pack(">II", PREVIEW_IMAGE, image_type) + image


# Queue changes arrive once per submit, cancel and finish (hundreds a second under load): each
# websocket sends at most one status per interval, with the count as it is when it is sent.
STATUS_INTERVAL_S = 0.1


async def status_message(state: GatewayState, tenant: str, sid: str | None = None) -> dict[str, Any]:
    remaining = await state.jobs.active_count(tenant)
    data: dict[str, Any] = {"status": {"exec_info": {"queue_remaining": remaining}}}
    if sid is not None:
        data["sid"] = sid
    return {"type": "status", "data": data}


@router.websocket("/ws")
@router.websocket("/api/ws")
async def websocket(websocket: WebSocket) -> None:
    state: GatewayState = websocket.app.state.kiln
    try:
        tenant = tenant_for_key(state, api_key_from(websocket))
    except Unauthorized:
        await websocket.close(code=4401)
        return
    sid = websocket.query_params.get("clientId") or uuid.uuid4().hex
    await websocket.accept()
    pubsub = state.redis.pubsub()
    await pubsub.subscribe(Channels.client_events(tenant, sid), Channels.broadcast())
    try:
        await websocket.send_json(await status_message(state, tenant, sid))
        receiver = asyncio.create_task(_drain(websocket))
        status_due, status_sent = False, 0.0
        while not receiver.done():
            wait = 1.0
            if status_due:
                wait = status_sent + STATUS_INTERVAL_S - time.monotonic()
                if wait <= 0:
                    await websocket.send_json(await status_message(state, tenant))
                    status_due, status_sent = False, time.monotonic()
                    continue
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
            if message is None:
                continue
            if message["channel"].decode() == Channels.broadcast():
                status_due = True
                continue
            event = json.loads(message["data"])
            if event["type"] == "preview":
                await websocket.send_bytes(preview_frame(event["data"]))
            elif not event["type"].startswith("kiln_"):
                await websocket.send_json({"type": event["type"], "data": event["data"]})
        receiver.cancel()
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        with contextlib.suppress(Exception):
            await pubsub.unsubscribe()
            await pubsub.aclose()


async def _drain(websocket: WebSocket) -> None:
    """Read (and ignore) what the client sends, so that a disconnect is noticed."""
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
