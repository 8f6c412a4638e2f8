"""Every error leaves as JSON with a status, a code and the problems it found; never a trace."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, jsonify
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


@dataclass
class ApiError(Exception):
    status: int
    error: str  # short machine-readable code, e.g. "invalid-request"
    message: str
    problems: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.error, "message": self.message}
        if self.problems:
            body["problems"] = self.problems
        return body


def problem(path: str, message: str) -> dict[str, str]:
    return {"path": path, "message": message}


_HTTP_CODES = {
    400: "bad-request",
    401: "unauthorized",
    404: "not-found",
    405: "method-not-allowed",
    413: "request-too-large",
    415: "unsupported-media-type",
}


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> ResponseReturnValue:
        return jsonify(exc.to_json()), exc.status

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> ResponseReturnValue:
        status = exc.code or 500
        message = exc.description or exc.name
        if status == 413:
            message = "the request body is larger than this service accepts"
        response = jsonify({"error": _HTTP_CODES.get(status, "http-error"), "message": message})
        response.status_code = status
        if status == 405 and exc.get_response().headers.get("Allow"):
            response.headers["Allow"] = exc.get_response().headers["Allow"]
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> ResponseReturnValue:
        # The detail goes to the log (no request data), the client gets a generic answer.
        log.exception("unhandled error: %s", type(exc).__name__)
        return jsonify({"error": "internal-error", "message": "the service failed to answer"}), 500
