"""The fixture FHIR server: the synthetic patients over FHIR R4 REST, for tests and the sandbox.

Read and type search only (GET, and POST ``_search`` as the CDS Hooks sandbox sends it), CORS
for browsers, an optional artificial delay for benchmarks, and a record of the last requests'
headers so tests can check what a client sent. Never use it for real data.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException
from werkzeug.serving import make_server, run_simple

from cds_service import __version__
from cds_service.fixture_server.store import (
    DEFAULT_COUNT,
    MAX_COUNT,
    OFFSET_PARAM,
    SEARCH_PARAMS,
    FhirError,
    FixtureStore,
    operation_outcome,
)
from cds_service.settings import Settings

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
EXTENSION_KEY = "fixture_server"
SEEN_REQUESTS_MAX = 200
# Headers tests may want to assert on; everything else is dropped from the record.
HEADERS_OF_INTEREST = ("Authorization", "Accept", "Content-Type", "Origin")
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
}
PREFLIGHT_HEADERS = {
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, Accept",
    "Access-Control-Max-Age": "600",
}
_STATUS_ISSUE_CODES = {400: "invalid", 404: "not-found", 405: "not-supported", 413: "too-costly"}


class SeenRequest(NamedTuple):
    """One request as the server saw it. ``query`` is the URL query string, plus the form body
    for ``POST _search`` (joined with ``&``); ``headers`` holds only HEADERS_OF_INTEREST."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]

    def __repr__(self) -> str:
        # Keep bearer tokens out of assertion messages and logs.
        shown = {k: ("<redacted>" if k == "Authorization" else v) for k, v in self.headers.items()}
        return f"SeenRequest({self.method} {self.path}?{self.query} headers={shown})"


@dataclass
class FixtureServerState:
    """What ``app.extensions["fixture_server"]`` holds."""

    settings: Settings
    store: FixtureStore
    seen_requests: deque[SeenRequest]


def fixture_state(app: Flask) -> FixtureServerState:
    state: FixtureServerState = app.extensions[EXTENSION_KEY]
    return state


def _fhir_response(body: Mapping[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype=FHIR_JSON)


def _base_url() -> str:
    return request.url_root.rstrip("/")


def capability_statement(base_url: str) -> dict[str, Any]:
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-25",
        "publisher": "magnesium-cds",
        "kind": "instance",
        "software": {"name": "magnesium-cds fixture FHIR server", "version": __version__},
        "implementation": {
            "description": "Synthetic test patients for magnesium-cds (no real data)",
            "url": base_url,
        },
        "fhirVersion": "4.0.1",
        "format": [FHIR_JSON, "json"],
        "rest": [{
            "mode": "server",
            "documentation": (
                f"Read and type search (GET, or POST _search form-encoded). Paging: _count "
                f"(default {DEFAULT_COUNT}, at most {MAX_COUNT}) and {OFFSET_PARAM}; follow "
                "link next. _sort=date or -date on Observation. Comma = OR within a "
                "parameter. Unknown search parameters are ignored."
            ),
            "security": {
                "cors": True,
                "description": "No authentication: an Authorization header is accepted and "
                "ignored.",
            },
            "resource": [
                {
                    "type": resource_type,
                    "interaction": [{"code": "read"}, {"code": "search-type"}],
                    "searchParam": [
                        {"name": p.name, "type": p.type, "documentation": p.documentation}
                        for p in params
                    ],
                }
                for resource_type, params in SEARCH_PARAMS.items()
            ],
        }],
    }


def create_fixture_app(settings: Settings, fixtures_dir: Path | None = None) -> Flask:
    """The fixture server as a Flask app; patients from ``fixtures_dir`` or the bundled ones."""
    store = FixtureStore.from_directory(fixtures_dir)
    app = Flask(__name__)
    # Only form-encoded searches are posted; anything bigger is not a search.
    app.config["MAX_CONTENT_LENGTH"] = 1_000_000
    app.url_map.strict_slashes = False
    state = FixtureServerState(settings, store, deque(maxlen=SEEN_REQUESTS_MAX))
    app.extensions[EXTENSION_KEY] = state

    @app.before_request
    def record_delay_and_preflight() -> Response | None:
        query = request.query_string.decode("latin-1")
        if request.method == "POST" and request.mimetype == "application/x-www-form-urlencoded":
            body = request.get_data(as_text=True)
            query = "&".join(part for part in (query, body) if part)
        headers = {name: request.headers[name] for name in HEADERS_OF_INTEREST
                   if name in request.headers}
        state.seen_requests.append(SeenRequest(request.method, request.path, query, headers))
        if settings.fixture_server_delay_ms > 0:
            time.sleep(settings.fixture_server_delay_ms / 1000)
        if request.method == "OPTIONS":
            # Preflights carry no credentials and need no route: answer them all here.
            preflight = Response(status=204, headers=PREFLIGHT_HEADERS)
            del preflight.headers["Content-Type"]  # an empty 204 has no media type
            return preflight
        return None

    @app.after_request
    def add_cors(response: Response) -> Response:
        response.headers.update(CORS_HEADERS)
        return response

    @app.errorhandler(FhirError)
    def fhir_error(error: FhirError) -> Response:
        return _fhir_response(error.outcome(), error.status)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        code = _STATUS_ISSUE_CODES.get(status, "exception")
        response = _fhir_response(operation_outcome(code, error.description or error.name), status)
        if "Allow" in (allow := dict(error.get_headers())):
            response.headers["Allow"] = allow["Allow"]
        return response

    @app.get("/metadata")
    def metadata() -> Response:
        return _fhir_response(capability_statement(_base_url()))

    @app.get("/<resource_type>")
    def search_get(resource_type: str) -> Response:
        params = list(request.args.items(multi=True))
        return _fhir_response(store.searchset(resource_type, params, _base_url()))

    @app.route("/<resource_type>/_search", methods=["GET", "POST"])
    def search_post(resource_type: str) -> Response:
        # FHIR allows parameters in both the URL and the form body of a _search.
        params = list(request.args.items(multi=True)) + list(request.form.items(multi=True))
        return _fhir_response(store.searchset(resource_type, params, _base_url()))

    @app.get("/<resource_type>/<resource_id>")
    def read(resource_type: str, resource_id: str) -> Response:
        return _fhir_response(store.read(resource_type, resource_id))

    return app


def run_fixture_server(settings: Settings, host: str, port: int) -> None:
    """Serve the bundled patients in the foreground until interrupted."""
    app = create_fixture_app(settings)
    counts = ", ".join(f"{n} {t}" for t, n in fixture_state(app).store.counts().items())
    log.info("fixture FHIR server on http://%s:%d (%s)", host, port, counts)
    run_simple(host, port, app, threaded=True, use_reloader=False, use_debugger=False)


@contextmanager
def serve_in_background(app: Flask, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` on a real socket in a daemon thread; yields its base URL (port 0 = any)."""
    server = make_server(host, port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="fixture-fhir-server", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
