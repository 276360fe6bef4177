"""Every error answer: `{"detail": "..."}` under /api, OpenAI's error object under /api/v1.

No answer ever carries a stack trace; unexpected errors are logged with theirs and answered with
one line.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.db import UNAVAILABLE_ERRORS, describe_db_error

log = logging.getLogger("zeus.api")

OPENAI_PREFIX = "/api/v1/"
OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_exceeded",
    503: "service_unavailable",
}


class ErrorBody(BaseModel):
    detail: str


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    error: OpenAIError


def error_response(
    path: str, status: int, message: str, headers: dict[str, str] | None = None, param: str | None = None
) -> JSONResponse:
    if path.startswith(OPENAI_PREFIX):
        body = {
            "error": {
                "message": message,
                "type": OPENAI_ERROR_TYPES.get(status, "server_error"),
                "param": param,
                "code": str(status),
            }
        }
    else:
        body = {"detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


def error_bytes(path: str, status: int, message: str) -> bytes:
    """The same body as error_response, for pure ASGI middleware."""
    return bytes(error_response(path, status, message).body)


def describe_validation_errors(errors: list[dict]) -> tuple[str, str | None]:
    """One line naming each bad field, e.g. "body.messages.0.role: Input should be ..."."""
    parts = []
    first_field = None
    for item in errors:
        location = [str(part) for part in item.get("loc", ())]
        if item.get("type") == "json_invalid":
            context = item.get("ctx", {}).get("error", "")
            parts.append(f"request body is not valid JSON: {context}".rstrip(": "))
            continue
        field = ".".join(location[1:] if location[:1] == ["body"] else location) or "body"
        first_field = first_field or field
        parts.append(f"{field}: {item.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request", first_field


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        detail = error.detail if isinstance(error.detail, str) else json.dumps(error.detail)
        return error_response(request.url.path, error.status_code, detail, dict(error.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        message, field = describe_validation_errors(list(error.errors()))
        return error_response(request.url.path, 422, message, param=field)

    for error_class in UNAVAILABLE_ERRORS:

        @app.exception_handler(error_class)
        async def database_unavailable(request: Request, error: Exception) -> JSONResponse:
            line = describe_db_error(error)
            log.warning("%s %s: %s", request.method, request.url.path, line)
            return error_response(request.url.path, 503, line, {"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=error)
        return error_response(request.url.path, 500, "internal error: the server log has the details")


# Documented on every route, so that the OpenAPI schema matches what can really come back.
COMMON_RESPONSES: dict[int | str, dict] = {
    401: {"model": ErrorBody, "description": "not authenticated"},
    403: {"model": ErrorBody, "description": "forbidden (role, or cross-origin request)"},
    413: {"model": ErrorBody, "description": "request body over ZEUS_MAX_BODY_BYTES"},
    422: {"model": ErrorBody, "description": "malformed JSON or parameters; names the field"},
    503: {"model": ErrorBody, "description": "database or engine unavailable"},
}
OPENAI_RESPONSES: dict[int | str, dict] = {
    status: {"model": OpenAIErrorBody, "description": description}
    for status, description in [
        (400, "invalid request"),
        (401, "not authenticated"),
        (403, "forbidden"),
        (404, "unknown model"),
        (413, "request body too large"),
        (422, "malformed parameters"),
        (429, "engine full; see Retry-After"),
        (503, "unavailable"),
    ]
}
