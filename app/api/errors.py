"""Every error answer: `{"detail": "..."}` under /api, OpenAI's error object under /api/v1.

OpenAI's object is `{"error": {"message", "type", "param", "code"}}`; clients branch on the
status (the official SDKs raise BadRequestError, AuthenticationError, NotFoundError,
RateLimitError...) and on `code` (LangChain and LiteLLM trim the prompt and retry on
`context_length_exceeded`). Request validation answers 400 under /api/v1 as OpenAI and vLLM do
(422 elsewhere, FastAPI's default), with `param` naming the field as OpenAI writes it
(`messages[0].role`).

No answer ever carries a stack trace; unexpected errors are logged with theirs and answered with
one line.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.db import UNAVAILABLE_ERRORS, describe_db_error

log = logging.getLogger("zeus.api")

OPENAI_PREFIX = "/api/v1/"
# status -> (type, code) of OpenAI's error object, for errors that do not name their own code.
OPENAI_ERRORS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", None),
    405: ("invalid_request_error", None),
    409: ("invalid_request_error", None),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_exceeded", "rate_limit_exceeded"),
    500: ("server_error", None),
    502: ("server_error", None),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", None),
}


class ApiError(HTTPException):
    """An HTTP error that also names the request field at fault (`param`) and OpenAI's `code`
    (e.g. "context_length_exceeded", "model_not_found"); under /api only the message is sent."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status_code, message, headers)
        self.param = param
        self.code = code


class ErrorBody(BaseModel):
    detail: str


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    error: OpenAIError


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object (the body, and the `error` event of a broken stream)."""
    kind, default_code = OPENAI_ERRORS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None)
    )
    return {"error": {"message": message, "type": kind, "param": param, "code": code or default_code}}


def error_response(
    path: str,
    status: int,
    message: str,
    headers: dict[str, str] | None = None,
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    body: dict[str, Any]
    if path.startswith(OPENAI_PREFIX):
        body = openai_error(status, message, param, code)
    else:
        body = {"detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


def error_bytes(path: str, status: int, message: str) -> bytes:
    """The same body as error_response, for pure ASGI middleware."""
    return bytes(error_response(path, status, message).body)


# Pydantic names the member of a union it tried in the error's location ("str",
# "list[TextPart]", "function-after[...]") and, for tagged unions, the tag ("user"): the client
# named none of them.
_UNION_MEMBER = re.compile(r"^([a-z_-]+\[.*\]|str|int|float|bool|dict|list|none|model-fields)$")
_TAGS = frozenset({"system", "developer", "user", "assistant", "tool", "text", "json_object", "json_schema"})


def openai_param(location: list[Any]) -> str:
    """`("body", "messages", 0, "user", "content")` -> "messages[0].content", as OpenAI names fields."""
    parts = list(location[1:] if location[:1] == ["body"] else location)
    name = ""
    previous: Any = None
    for part in parts:
        if isinstance(part, int):
            name += f"[{part}]"
        elif isinstance(part, str) and (
            _UNION_MEMBER.match(part) or (part in _TAGS and isinstance(previous, int))
        ):
            continue
        else:
            name += f".{part}" if name else str(part)
        previous = part
    return name


def _validation_code(kind: str) -> str:
    if kind == "missing":
        return "missing_required_parameter"
    if kind == "extra_forbidden":
        return "unknown_parameter"
    if kind.endswith(("_type", "_parsing")) or kind in ("model_attributes_type", "union_tag_invalid"):
        return "invalid_type"
    return "invalid_value"


def describe_validation_errors(errors: list[dict]) -> tuple[str, str | None, str | None]:
    """One line naming each bad field, e.g. "messages[0].role: Input should be ...", the first
    field (OpenAI's `param`) and OpenAI's `code` for the first error."""
    parts: list[str] = []
    first_field: str | None = None
    first_code: str | None = None
    seen: set[str] = set()
    named: list[tuple[str, dict]] = []
    for item in errors:
        kind = str(item.get("type", ""))
        if kind == "json_invalid":
            context = item.get("ctx", {}).get("error", "")
            parts.append(f"request body is not valid JSON: {context}".rstrip(": "))
            first_code = first_code or "invalid_json"
            continue
        location = list(item.get("loc", ()))
        if kind in ("union_tag_invalid", "union_tag_not_found"):
            # The error sits on the message; the field at fault is its tag ("role", "type").
            location.append(str(item.get("ctx", {}).get("discriminator", "")).strip("'"))
        named.append((openai_param(location) or "body", item))
    # A value that matched one member of a union by type ("stop": a list of 17 strings) fails the
    # other members by type too: only the member's own complaint is worth reading.
    typed_right = [
        field for field, item in named if _validation_code(str(item.get("type"))) != "invalid_type"
    ]

    def matched_another_member(field: str) -> bool:
        return any(other == field or other.startswith((f"{field}.", f"{field}[")) for other in typed_right)

    for field, item in named:
        kind = str(item.get("type", ""))
        if _validation_code(kind) == "invalid_type" and matched_another_member(field):
            continue
        if kind == "extra_forbidden":
            line = f"Unrecognized request argument supplied: {field}"
        else:
            line = f"{field}: {item.get('msg', 'invalid')}"
        if line in seen:
            continue
        seen.add(line)
        first_field = first_field or field
        first_code = first_code or _validation_code(kind)
        parts.append(line)
    return "; ".join(parts) or "invalid request", first_field, first_code


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        detail = error.detail if isinstance(error.detail, str) else json.dumps(error.detail)
        return error_response(
            request.url.path,
            error.status_code,
            detail,
            dict(error.headers or {}),
            param=getattr(error, "param", None),
            code=getattr(error, "code", None),
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        message, field, code = describe_validation_errors(list(error.errors()))
        path = request.url.path
        status = 400 if path.startswith(OPENAI_PREFIX) else 422
        return error_response(path, status, message, param=field, code=code)

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


def drop_validation_422(schema: dict[str, Any]) -> dict[str, Any]:
    """FastAPI documents 422 on every route with parameters; under /api/v1 validation answers 400."""
    for path, operations in schema.get("paths", {}).items():
        if path.startswith(OPENAI_PREFIX):
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
    return schema


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
        (400, "invalid request (malformed JSON, a bad or unsupported field: `param` names it)"),
        (401, "not authenticated (invalid_api_key)"),
        (403, "forbidden"),
        (404, "unknown model (model_not_found)"),
        (413, "request body too large"),
        (429, "engine full (rate_limit_exceeded); see Retry-After"),
        (503, "unavailable"),
    ]
}
