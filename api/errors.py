"""The gateway's exceptions and the one place that maps them (and the engine's) to HTTP responses."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException

from api.jobs import QueueFull
from engine.errors import KilnError, PromptValidationError, UnsafePathError

# Kiln's error types for the framework's own answers on the native API (``/v1``).
HTTP_ERROR_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
}


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


class InvalidRequest(ApiError):
    """Raised when a header or parameter fails its checks (as the framework's own 422s)."""

    status = 422
    type = "invalid_request"


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


def error_body(
    type_: str, message: str, details: str = "", extra_info: dict[str, Any] | None = None
) -> dict[str, object]:
    """Kiln's error shape, compatible with ComfyUI's ``{"error": {...}, "node_errors": {}}``."""
    error = {"type": type_, "message": message, "details": details, "extra_info": extra_info or {}}
    return {"error": error, "node_errors": {}}


def native_api(request: Request) -> bool:
    """Whether a request is for Kiln's native API, whose every error has Kiln's shape. The other
    paths are ComfyUI's (also unknown ones: the server stands in for ComfyUI there)."""
    path = request.url.path
    return path == "/v1" or path.startswith("/v1/")


def http_error(request: Request, status: int, detail: Any, headers: dict[str, str] | None = None) -> Response:
    """The framework's own errors (no route, wrong method, a malformed parameter): Kiln's shape on
    ``/v1``; elsewhere what ComfyUI's server (aiohttp) answers: ``404: Not Found`` as text."""
    if native_api(request):
        message = detail if isinstance(detail, str) else HTTPStatus(status).phrase
        type_ = HTTP_ERROR_TYPES.get(status, "server_error" if status >= 500 else "bad_request")
        return JSONResponse(error_body(type_, message), status_code=status, headers=headers)
    return PlainTextResponse(f"{status}: {HTTPStatus(status).phrase}", status_code=status, headers=headers)


def validation_error_body(exc: RequestValidationError) -> dict[str, object]:
    """A request that fails the framework's checks (a query, header or body field), in Kiln's shape:
    ``details`` names the first field at fault, ``extra_info.errors`` lists them all."""
    errors = [
        {"loc": [str(part) for part in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": e.get("type")}
        for e in exc.errors()
    ]
    first = errors[0] if errors else {"loc": [], "msg": "Invalid request"}
    return error_body(
        "invalid_request", f"Invalid request: {first['msg']}", ".".join(first["loc"]), {"errors": errors}
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def framework_error(request: Request, exc: HTTPException) -> Response:
        return http_error(request, exc.status_code, exc.detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        if native_api(request):
            return JSONResponse(validation_error_body(exc), status_code=422)
        # ComfyUI's routes keep the framework's answer (documented in docs/api.md).
        return await request_validation_exception_handler(request, exc)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> Response:
        # Starlette logs the exception and re-raises it after this answer.
        return http_error(request, 500, "Internal server error")

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
