"""Structured JSON log lines; one per request with what an operator needs and nothing more.

A request line carries hookInstance, service id, status, latency and the rule ids that fired.
It never carries request bodies, query strings, headers, tokens or patient data.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from flask import Flask, Response, g, request

REQUEST_LOGGER = "cds_service.request"
_FIELDS = (
    "event",
    "method",
    "path",
    "status",
    "latency_ms",
    "hookInstance",
    "serviceId",
    "ruleIds",
    "timings_ms",
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        attributes = record.__dict__  # `extra` lands here; cheaper than hasattr + getattr
        for name in _FIELDS:
            if name in attributes:
                entry[name] = attributes[name]
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = record.exc_info[0].__name__
        # orjson: a line per request is on every call's path. What it cannot write (a lone
        # surrogate in a third party's message) is written by the stdlib, as before.
        try:
            return orjson.dumps(entry, default=str).decode()
        except TypeError:
            return json.dumps(entry, separators=(",", ":"), default=str)


class LineWriteHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that writes each formatted line with one ``os.write`` and no lock.

    The standard handler holds its lock across the write and flush, and the write releases the
    GIL: under gunicorn's threads another request thread then takes the GIL only to block on
    that lock, a forced thread switch on a line written for every call. One ``write(2)`` of a
    whole line needs no lock: the kernel does not interleave it with another line written to
    the same file or pipe (a request line is far under the pipe's atomic 4 KiB). A stream
    without a file descriptor (a test's StringIO) is written as the standard handler does.
    """

    def createLock(self) -> None:
        self.lock = None  # acquire/release (setStream) become no-ops

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
            try:
                descriptor = self.stream.fileno()
            except (AttributeError, OSError, ValueError):  # no descriptor: io.UnsupportedOperation
                self.stream.write(line)
                self.flush()
                return
            data = memoryview(line.encode("utf-8", "backslashreplace"))
            while data:
                data = data[os.write(descriptor, data):]
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def configure_logging(level: str) -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_cds_handler", False) for h in root.handlers):
        # Anything Python wrote to stderr before is out before our first line.
        sys.stderr.flush()
        handler = LineWriteHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler._cds_handler = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level.upper())
    # urllib3's DEBUG lines hold FHIR query URLs, i.e. patient ids, even at CDS_LOG_LEVEL=DEBUG.
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def install_request_logging(app: Flask) -> None:
    logger = logging.getLogger(REQUEST_LOGGER)

    @app.before_request
    def _start_timer() -> None:
        g.request_started = time.perf_counter()

    @app.after_request
    def _log_request(response: Response) -> Response:
        if not logger.isEnabledFor(logging.INFO):
            return response
        # Each access through the request/g proxies is a context lookup: resolve them once.
        req = request._get_current_object()  # type: ignore[attr-defined]
        values = g._get_current_object()
        method = req.method
        path = req.path if req.path.startswith("/cds-services") else req.path[:64]
        status = response.status_code
        started = values.get("request_started")
        extra: dict[str, Any] = {
            "event": "request",
            "method": method,
            "path": path,
            "status": status,
            "latency_ms": round((time.perf_counter() - started) * 1000, 2) if started else None,
        }
        for attribute, name in (
            ("hook_instance", "hookInstance"),
            ("service_id", "serviceId"),
            ("rule_ids", "ruleIds"),
            ("timings_ms", "timings_ms"),
        ):
            value = values.get(attribute)
            if value is not None:
                extra[name] = value
        # logger.info(...), without its walk up the stack for the caller's file and line: the
        # line never carries them, and the walk cost a few µs of every request.
        args = (method, path, status)
        logger.handle(
            logger.makeRecord(
                logger.name, logging.INFO, "(unknown file)", 0, "%s %s %s", args, None,
                "_log_request", extra,
            )
        )
        return response
