"""Request dependencies: the gateway state and the caller's tenant."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from starlette.requests import HTTPConnection

from api.errors import Unauthorized
from api.state import GatewayState

LOCAL_TENANT = "local"


async def get_state(request: Request) -> GatewayState:
    return request.app.state.kiln


State = Annotated[GatewayState, Depends(get_state)]


def api_key_from(request: HTTPConnection) -> str | None:
    """``Authorization: Bearer KEY``, ``X-API-Key: KEY``, or ``?token=KEY`` (for websockets and
    ComfyUI clients that can only add a query parameter)."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.headers.get("x-api-key") or request.query_params.get("token")


def tenant_for_key(state: GatewayState, key: str | None) -> str:
    if state.settings.insecure:
        return LOCAL_TENANT
    if not key:
        raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'")
    for known, tenant in state.api_keys.items():
        if hmac.compare_digest(known.encode(), key.encode()):
            return tenant
    raise Unauthorized("Invalid API key")


async def authenticate(request: Request, state: State) -> str:
    return tenant_for_key(state, api_key_from(request))


def caller(request: Request) -> tuple[GatewayState, str]:
    """The gateway state and the caller's tenant, as ``State`` and ``Tenant`` give them, for the
    submit routes: resolving FastAPI dependencies costs more there than the rest of the request
    apart from validation (docs/performance.md)."""
    state: GatewayState = request.app.state.kiln
    return state, tenant_for_key(state, api_key_from(request))


Tenant = Annotated[str, Depends(authenticate)]
