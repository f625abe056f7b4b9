"""The gateway application: ``create_app(settings)`` (uvicorn runs it through ``kiln serve``)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import redis.asyncio as aioredis
from fastapi import FastAPI
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_body, install_error_handlers
from api.jobs import GatewayJobs
from api.routes import comfy, jobs, system, ws
from api.settings import GatewaySettings
from api.state import GatewayState, Metrics
from engine.registry import default_registry
from engine.settings import EngineSettings
from worker.storage import storage_from_url


class BodyLimit:
    """Answers 413 to bodies over ``limit`` bytes, whether or not they declare a Content-Length."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(send)
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(send)

    async def _reject(self, send: Send) -> None:
        body = json.dumps(error_body("payload_too_large", f"Body is larger than {self.limit} bytes")).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class RequestTimer:
    """Observes each HTTP request's latency by route template (a pure ASGI middleware: cheaper than
    Starlette's BaseHTTPMiddleware on the submit path)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            route = scope.get("route")
            state = getattr(scope["app"].state, "kiln", None) if "app" in scope else None
            if state is not None:
                path = getattr(route, "path", "unmatched")
                state.metrics.request_seconds.labels(path, scope["method"]).observe(
                    time.perf_counter() - started
                )


def create_app(settings: GatewaySettings, engine_settings: EngineSettings | None = None) -> FastAPI:
    engine_settings = engine_settings or EngineSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # A Redis restart or failover closes pooled connections: retry commands on a fresh one.
        client = aioredis.from_url(
            settings.redis_url,
            health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=6),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        storage = storage_from_url(
            settings.storage_url,
            create_bucket=settings.storage_create_bucket,
            public_url=settings.public_url,
            signing_secret=settings.download_secret() if settings.storage_url.startswith("file") else "",
            s3_endpoint_url=settings.s3_endpoint_url,
            s3_public_endpoint_url=settings.s3_public_endpoint_url,
            s3_region=settings.s3_region,
        )
        app.state.kiln = GatewayState(
            settings=settings,
            engine_settings=engine_settings,
            redis=client,
            jobs=GatewayJobs(
                client,
                history_ttl_s=settings.history_ttl_s,
                idempotency_ttl_s=settings.idempotency_ttl_s,
                max_queued_per_tenant=settings.max_queued_per_tenant,
            ),
            storage=storage,
            registry=default_registry(engine_settings.node_modules),
            metrics=Metrics(),
            api_keys=settings.all_api_keys(),
        )
        try:
            yield
        finally:
            await client.aclose()

    app = FastAPI(
        title="Kiln",
        version="0.1.0",
        description="Run ComfyUI API-format workflows at scale. ComfyUI's API plus a native /v1 API.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    # Routes are matched in order, one by one: the native jobs API first, the /api copies of
    # ComfyUI's routes last (POST /prompt is first of ComfyUI's).
    app.include_router(jobs.router)
    app.include_router(comfy.router)
    app.include_router(system.router)
    app.include_router(ws.router)
    app.include_router(comfy.router, prefix="/api", include_in_schema=False)

    app.add_middleware(BodyLimit, limit=engine_settings.max_body_bytes)
    app.add_middleware(RequestTimer)
    return app


def app_from_environment() -> FastAPI:
    """The app of one of several gateway processes (``kiln serve`` with ``gateway_processes`` > 1):
    the flags ``kiln serve`` was given, then the environment and the config file, as there."""
    from api.cli import SERVE_FLAGS_ENV
    from api.settings import load_gateway_settings
    from engine.settings import load_settings

    flags = json.loads(os.environ.get(SERVE_FLAGS_ENV) or "{}")
    config = Path(flags["config"]) if flags.get("config") else None
    return create_app(
        load_gateway_settings(config, **flags.get("gateway", {})),
        load_settings(config, **flags.get("engine", {})),
    )
