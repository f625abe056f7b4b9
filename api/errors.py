"""The gateway's exceptions and the one place that maps them (and the engine's) to HTTP responses."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from api.jobs import QueueFull
from engine.errors import KilnError, PromptValidationError, UnsafePathError


class ApiError(Exception):
    """Raised by a route for a client error; ``status`` and ``type`` become the response."""

    status = 400
    type = "bad_request"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.headers = headers or {}


class Unauthorized(ApiError):
    """Raised when a request has no valid API key."""

    status = 401
    type = "unauthorized"


class NotFound(ApiError):
    """Raised when a job, output or upload does not exist for the caller's tenant."""

    status = 404
    type = "not_found"


class PayloadTooLarge(ApiError):
    """Raised when a body is over the size limit."""

    status = 413
    type = "payload_too_large"


class RateLimited(ApiError):
    """Raised when a tenant submits faster than its rate, or has too many jobs queued."""

    status = 429
    type = "rate_limited"


class ServiceUnavailable(ApiError):
    """Raised when Redis or storage cannot be reached."""

    status = 503
    type = "unavailable"


def error_body(type_: str, message: str) -> dict[str, object]:
    """Kiln's error shape, compatible with ComfyUI's ``{"error": {...}, "node_errors": {}}``."""
    return {"error": {"type": type_, "message": message, "details": "", "extra_info": {}}, "node_errors": {}}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.type, str(exc)), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(PromptValidationError)
    async def invalid_prompt(request: Request, exc: PromptValidationError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=400)

    @app.exception_handler(UnsafePathError)
    async def unsafe_path(request: Request, exc: UnsafePathError) -> JSONResponse:
        return JSONResponse(error_body(exc.type_name, str(exc)), status_code=400)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        return JSONResponse(error_body("queue_full", str(exc)), status_code=429, headers={"Retry-After": "5"})

    @app.exception_handler(RedisError)
    async def redis_down(request: Request, exc: RedisError) -> JSONResponse:
        return JSONResponse(
            error_body("unavailable", "The job store is unavailable; retry shortly"),
            status_code=503,
            headers={"Retry-After": "2"},
        )

    @app.exception_handler(KilnError)
    async def kiln_error(request: Request, exc: KilnError) -> JSONResponse:
        return JSONResponse(error_body(exc.type_name, str(exc)), status_code=400)
