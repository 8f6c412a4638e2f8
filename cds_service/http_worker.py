"""The gunicorn worker ``cds-service serve`` runs: gunicorn's threaded worker, answering what
gunicorn refuses before the application sees it (oversized headers, broken framing) in JSON
like every other error of the service, never gunicorn's HTML page; and ``BodyErrorsAs400``, the
WSGI wrapper for body framing gunicorn finds broken while the application reads it.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from gunicorn import util
from gunicorn.http import errors as http_errors
from gunicorn.workers.gthread import ThreadWorker
from werkzeug.exceptions import BadRequest

log = logging.getLogger(__name__)

# Exception class -> (status, reason phrase, error code, message for the client). Only
# gunicorn's own words about the request's shape: never a header value (a token) echoed.
_REFUSALS: tuple[tuple[type[Exception], int, str, str, str], ...] = (
    (http_errors.LimitRequestHeaders, 431, "Request Header Fields Too Large",
     "request-headers-too-large", "a request header, or the headers together, are larger than "
     "this service accepts"),
    (http_errors.LimitRequestLine, 414, "URI Too Long", "request-line-too-long",
     "the request line is longer than this service accepts"),
    (http_errors.UnsupportedTransferCoding, 501, "Not Implemented", "unsupported-transfer-coding",
     "the request's Transfer-Encoding is not supported; send chunked or a Content-Length"),
    (http_errors.ForbiddenProxyRequest, 403, "Forbidden", "forbidden", "request forbidden"),
    (http_errors.ParseException, 400, "Bad Request", "bad-request",
     "the request is not well-formed HTTP/1.1"),
)


def refusal_for(exc: BaseException) -> tuple[int, str, dict[str, str]]:
    """(status, reason phrase, JSON body) for an error gunicorn raised reading a request."""
    for kind, status, reason, code, message in _REFUSALS:
        if isinstance(exc, kind):
            return status, reason, {"error": code, "message": message}
    return 500, "Internal Server Error", {
        "error": "internal-error", "message": "the service failed to answer"
    }


def write_json_error(sock: socket.socket, status: int, reason: str, body: dict[str, str]) -> None:
    payload = json.dumps(body).encode("utf-8")
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + payload)


class JsonErrorThreadWorker(ThreadWorker):  # type: ignore[misc]  # gunicorn is untyped
    def handle_error(self, req: Any, client: socket.socket, addr: Any, exc: Exception) -> None:
        status, reason, body = refusal_for(exc)
        if status == 500:
            log.error("error handling a request outside the application: %s",
                      type(exc).__name__, exc_info=exc)
        else:
            # The class only: gunicorn's message can quote a header, and headers hold tokens.
            log.warning("request refused before the application: %s (%d)",
                        type(exc).__name__, status)
        try:
            write_json_error(client, status, reason, body)
        except OSError:
            log.debug("could not send the error answer")



class _CheckedInput:
    """``wsgi.input`` whose framing errors (a bad chunk size, a missing chunk terminator, a
    client gone mid-body) are a 400 for the application, not an unexpected exception."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    def _guard(self, read: Callable[..., Any], *args: Any) -> Any:
        try:
            return read(*args)
        except (http_errors.ParseException, http_errors.NoMoreData) as exc:
            raise BadRequest(
                f"the request body's framing is broken ({type(exc).__name__})"
            ) from None

    def read(self, *args: Any) -> bytes:
        return self._guard(self._raw.read, *args)  # type: ignore[no-any-return]

    def readline(self, *args: Any) -> bytes:
        return self._guard(self._raw.readline, *args)  # type: ignore[no-any-return]

    def readlines(self, *args: Any) -> list[bytes]:
        return self._guard(self._raw.readlines, *args)  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line


WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class BodyErrorsAs400:
    def __init__(self, app: WsgiApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if "wsgi.input" in environ:
            environ["wsgi.input"] = _CheckedInput(environ["wsgi.input"])
        return self.app(environ, start_response)
