"""Errors sent to clients, rendered in one place as API.md's JSON error shape."""
from __future__ import annotations

import json
import logging
import uuid

from bottle import HTTPResponse

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """Raised by routes; turned into `{"error": {"code", "message"}}` with `status`."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def invalid_field(field: str, problem: str) -> ApiError:
    """A 400 naming the field and what is wrong with it."""
    return ApiError(400, "invalid_field", f"{field}: {problem}")


def not_found(what: str) -> ApiError:
    """A 404 for a missing chat, message, device or user."""
    return ApiError(404, "not_found", f"{what} not found")


def forbidden(message: str) -> ApiError:
    """A 403: authenticated, but not allowed."""
    return ApiError(403, "forbidden", message)


def error_body(code: str, message: str) -> str:
    """The JSON text of an error."""
    return json.dumps({"error": {"code": code, "message": message}})


def error_response(error: ApiError) -> HTTPResponse:
    """An HTTPResponse carrying the error's JSON body."""
    headers = {"Content-Type": "application/json", **error.headers}
    return HTTPResponse(error_body(error.code, error.message), status=error.status, headers=headers)


def internal_error_response(exc: BaseException | None) -> HTTPResponse:
    """A 500 with a request id; the stack trace goes to the log only."""
    request_id = uuid.uuid4().hex[:12]
    logger.error("chat_app: internal error, request %s", request_id, exc_info=exc)
    return error_response(ApiError(500, "internal", f"internal error (request id {request_id})"))


def unknown_token() -> ApiError:
    """The 401 for a well-formed bearer token that belongs to nobody."""
    return ApiError(401, "unauthorized", "unknown bearer token", {"WWW-Authenticate": "Bearer"})
