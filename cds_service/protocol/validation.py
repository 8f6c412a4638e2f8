"""JSON body parsing and JSON Schema validation with problems named by path."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from functools import cache
from typing import TYPE_CHECKING, Any

import orjson
from flask import Request
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from cds_service.protocol.errors import ApiError, problem
from cds_service.protocol.fast_validation import (
    FastCheck,
    UnsupportedSchemaError,
    compile_fast_check,
)
from cds_service.resources import load_schema

if TYPE_CHECKING:
    from cds_service.protocol.services import ServiceDefinition

MAX_PROBLEMS = 20


@cache
def validator(schema_name: str) -> Draft202012Validator:
    """Compiled once per process."""
    schema = load_schema(schema_name)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


@cache
def fast_check(schema_name: str) -> FastCheck | None:
    """The fast validity check of ``schema_name`` (compiled once per process), or None when
    the schema uses something it cannot check exactly as jsonschema: then jsonschema alone
    decides, as before (tests/test_fast_validation.py says which schemas have one)."""
    try:
        return compile_fast_check(
            load_schema(schema_name), schema_name, Draft202012Validator.FORMAT_CHECKER
        )
    except UnsupportedSchemaError:
        return None


REQUEST_SCHEMAS = ("hook-request.schema.json", "feedback.schema.json")


def compile_request_validators() -> None:
    """Compile the request schemas' checks now (create_app, before gunicorn forks), so that
    no first request pays for it and every worker shares the compiled code."""
    for schema_name in REQUEST_SCHEMAS:
        validator(schema_name)
        fast_check(schema_name)


def json_path(error: ValidationError) -> str:
    path = "$"
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def schema_problems(instance: Any, schema_name: str) -> list[dict[str, str]]:
    check = fast_check(schema_name)
    if check is not None and check(instance):
        # Almost every request is valid: answer it without jsonschema's costly iter_errors.
        # The fast check is never looser than jsonschema; when it says no, jsonschema below
        # finds (and words) the problems exactly as it always has.
        return []
    errors = sorted(
        validator(schema_name).iter_errors(instance), key=lambda e: list(map(str, e.absolute_path))
    )
    out: list[dict[str, str]] = []
    for error in errors:
        # A failed if/then or anyOf names the most specific sub-error, not the wrapper.
        leaf = error
        while leaf.context:
            leaf = max(leaf.context, key=lambda e: len(e.absolute_path))
        out.extend(_problems_of(leaf))
    return out[:MAX_PROBLEMS]


def _problems_of(error: ValidationError) -> list[dict[str, str]]:
    """A missing property is named by its own path ($.context.selections), not its parent's."""
    path = json_path(error)
    if error.validator in ("required", "dependentRequired") and isinstance(error.instance, dict):
        wanted = error.validator_value
        if isinstance(wanted, dict):  # dependentRequired: {"a": ["b"]}
            wanted = [
                name
                for trigger, names in wanted.items()
                if trigger in error.instance
                for name in names
            ]
        missing = [name for name in wanted if name not in error.instance]
        if missing:
            return [problem(f"{path}.{name}", "is required but missing") for name in missing]
    return [problem(path, _short(error.message))]


def _short(message: str, limit: int = 300) -> str:
    return message if len(message) <= limit else message[: limit - 1] + "…"


def read_json_body(request: Request) -> Any:
    """The request body as JSON, or ApiError 415/400 saying exactly what is wrong."""
    mimetype = request.mimetype or ""
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise ApiError(
            415,
            "unsupported-media-type",
            f"send the body as application/json, not {mimetype or 'no content type'}",
        )
    raw = request.get_data(cache=False)
    limit = request.max_content_length
    if limit is not None and request.content_length is None and len(raw) >= limit:
        # Werkzeug stops a chunked body at the limit without saying so; reading on raises
        # 413 (a chunked body of exactly the limit is refused too: harmless).
        request.stream.read(1)
    return parse_json_bytes(raw)


def parse_json_bytes(raw: bytes) -> Any:
    """``raw`` as strict JSON (RFC 8259), or ApiError 400 naming the problem.

    Shared by the HTTP endpoints and ``cds-service evaluate``, so that a file is refused
    exactly as the same body would be over HTTP.

    orjson reads the body (twice as fast as the stdlib on a 2 MB chart). It is at least as
    strict: it refuses NaN, Infinity, numbers beyond a double, invalid UTF-8 and lone
    surrogates. Whatever it refuses is read again by the stdlib, which words the error (or
    accepts what orjson alone cannot hold, such as an integer of 400 digits). Two differences
    remain: an integer beyond 64 bits that orjson accepts arrives as a float, and orjson reads
    nesting up to 1,024 levels where the stdlib stopped near 950 (the only request data walked
    recursively, draft orders sent back in suggestions, is bounded far below either).
    """
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _parse_json_bytes_stdlib(raw)


def _parse_json_bytes_stdlib(raw: bytes) -> Any:
    if not raw:
        raise ApiError(
            400, "invalid-json", "the request body is empty", [problem("$", "empty body")]
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(
            400,
            "invalid-json",
            "the request body is not UTF-8",
            [problem("$", f"byte {exc.start} is not valid UTF-8")],
        ) from None
    try:
        return json.loads(text, parse_float=_finite_float, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ApiError(
            400,
            "invalid-json",
            "the request body is not valid JSON",
            [problem("$", f"{exc.msg} at line {exc.lineno} column {exc.colno}")],
        ) from None
    except RecursionError:
        raise ApiError(
            400,
            "invalid-json",
            "the request body is nested too deeply",
            [problem("$", "JSON nesting exceeds what this service reads")],
        ) from None
    except ValueError as exc:  # NaN/Infinity, 1e400, or an integer longer than Python converts
        raise ApiError(
            400,
            "invalid-json",
            "the request body is not valid JSON",
            [problem("$", _short(str(exc), 160))],
        ) from None


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON (RFC 8259) does not, and a NaN dose would
    # slip past every numeric comparison in the rules.
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(literal: str) -> float:
    # JSON allows 1e400, but a double cannot hold it: Python reads inf, which the rules cannot
    # compare sensibly and which would be written back as Infinity (not JSON).
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(
            f"the number {_short(literal, 60)} is out of range (not a finite double-precision "
            "number)"
        )
    return value


def validate_or_400(instance: Any, schema_name: str, what: str) -> None:
    problems = schema_problems(instance, schema_name)
    if problems:
        raise ApiError(
            400, "invalid-request", f"the {what} does not conform to CDS Hooks 2.0", problems
        )


def check_hook(service: ServiceDefinition, body: Mapping[str, Any]) -> None:
    """ApiError 400 ``wrong-hook`` unless ``body`` (a valid hook request) is for ``service``'s
    hook: each service's rules are written for its hook's context (HTTP and evaluate alike)."""
    hook = body["hook"]
    if hook != service.hook:
        raise ApiError(
            400,
            "wrong-hook",
            f"service {service.id!r} answers the {service.hook!r} hook, not {hook!r}",
            [problem("$.hook", f"expected {service.hook!r}")],
        )
