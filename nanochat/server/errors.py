"""OpenAI-shaped errors: every failure answers `{"error": {"message", "type", "param", "code"}}`, so the
official clients raise their usual exception types (BadRequestError, AuthenticationError, RateLimitError, ...).
FastAPI's own 422 validation answer becomes OpenAI's 400.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error.status, error.message, error.code, error.param),
                        status_code=error.status, headers=error.headers)


def location_to_param(loc: tuple) -> str | None:
    """("body", "messages", 0, "role") -> "messages[0].role", the way OpenAI names a bad parameter."""
    parts = [p for p in loc if p != "body"]
    param = ""
    for part in parts:
        if isinstance(part, int):
            param += f"[{part}]"
        elif "[" in str(part) or "-" in str(part):
            continue  # pydantic's union-branch labels like "list[TextPart]" name no parameter
        else:
            param += f".{part}" if param else str(part)
    return param or None


def validation_message(error: dict) -> str:
    param = location_to_param(tuple(error.get("loc", ())))
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{param}: {message}" if param else message


def install_error_handlers(app: FastAPI) -> None:
    logger = logging.getLogger("nanochat.server")

    @app.exception_handler(APIError)
    async def handle_api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def handle_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        message = "; ".join(validation_message(e) for e in errors[:3])
        if len(errors) > 3:
            message += f" (and {len(errors) - 3} more)"
        param = location_to_param(tuple(first.get("loc", ())))
        return error_response(APIError(400, message or "invalid request", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def handle_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(APIError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal server error: {type(exc).__name__}"))
