"""Calling the CDS service over HTTP in tests, and stub FHIR servers to answer its fallback.

One place for what the HTTP tests share: loading request fixtures, posting them, checking a
response against the response schema, and FHIR servers with scripted answers.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests
from jsonschema import Draft202012Validator

from cds_service.context.fhir_client import FhirClient, FhirClientConfig
from cds_service.resources import load_schema

REQUESTS_DIR = Path(__file__).resolve().parent.parent / "fixtures" / "requests"
RESPONSE_SCHEMA = Draft202012Validator(
    load_schema("response.schema.json"), format_checker=Draft202012Validator.FORMAT_CHECKER
)


def load_request(name: str, fhir_server: str | None = None) -> dict[str, Any]:
    body = json.loads((REQUESTS_DIR / name).read_text(encoding="utf-8"))
    if fhir_server is not None:
        body["fhirServer"] = fhir_server
    return body


def call(cds_url: str, service_id: str, body: Any, **kwargs: Any) -> requests.Response:
    return requests.post(f"{cds_url}/cds-services/{service_id}", json=body, timeout=30, **kwargs)


def assert_conformant(response: requests.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    errors = [f"{e.json_path}: {e.message}" for e in RESPONSE_SCHEMA.iter_errors(body)]
    assert not errors, errors
    return body


def only_card(body: dict[str, Any]) -> dict[str, Any]:
    assert len(body["cards"]) == 1, [c["summary"] for c in body["cards"]]
    return body["cards"][0]


def data_issues(body: dict[str, Any]) -> list[dict[str, str]]:
    return body.get("extension", {}).get("org.magnesium-cds", {}).get("dataIssues", [])


def fhir_client(base: str, token: str | None = None, **config: Any) -> FhirClient:
    """A FhirClient with test-sized limits; keyword arguments override them."""
    values: dict[str, Any] = {
        "connect_timeout": 1.0,
        "read_timeout": 5.0,
        "max_pages": 5,
        "max_workers": 4,
        "max_response_bytes": 1_000_000,
    }
    values.update(config)
    return FhirClient(base, FhirClientConfig(**values), access_token=token)


def searchset(*resources: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": resource} for resource in resources],
    }


def send_json(handler: BaseHTTPRequestHandler, body: Any, status: int = 200) -> None:
    payload = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/fhir+json")
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)


class StubFhirServer(ThreadingHTTPServer):
    """A FHIR server with fixed answers, recording every path and Authorization header.

    ``by_path`` answers an exact path with query; ``by_type`` answers any request for a
    resource type; anything else is 404. With ``parties`` > 1 it answers only once that many
    requests are in flight at the same time (a sequential client then times out: 503).
    """

    def __init__(
        self,
        by_type: dict[str, Any] | None = None,
        by_path: dict[str, Any] | None = None,
        parties: int = 1,
    ) -> None:
        self.by_type = by_type or {}
        self.by_path = by_path or {}
        self.barrier = threading.Barrier(parties, timeout=5)
        self.paths: list[str] = []
        self.auth: list[str | None] = []
        super().__init__(("127.0.0.1", 0), _StubHandler)
        self.base = f"http://127.0.0.1:{self.server_port}"

    @contextmanager
    def running(self) -> Iterator[str]:
        thread = threading.Thread(target=self.serve_forever, daemon=True)
        thread.start()
        try:
            yield self.base
        finally:
            self.shutdown()
            self.server_close()


class _StubHandler(BaseHTTPRequestHandler):
    server: StubFhirServer

    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        self.server.auth.append(self.headers.get("Authorization"))
        try:
            self.server.barrier.wait()
        except threading.BrokenBarrierError:
            self.send_error(503)
            return
        resource_type = self.path.lstrip("/").split("?")[0].split("/")[0]
        body = self.server.by_path.get(self.path, self.server.by_type.get(resource_type))
        if body is None:
            self.send_error(404)
            return
        send_json(self, body)

    def log_message(self, *args: Any) -> None:
        pass
