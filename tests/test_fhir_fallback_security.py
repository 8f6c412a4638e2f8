"""The FHIR fallback never carries the EHR's token to another origin, and never hangs or floods.

Real HTTP servers on loopback: 127.0.0.1 and 127.0.0.2 are different hosts, and another port
on the same host is another origin too.
"""

from __future__ import annotations

import contextlib
import gzip
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from hook_calls import fhir_client, send_json

from cds_service.context.fhir_client import FhirClient

TOKEN = "ehr-access-token-that-must-stay-home"
PATIENT = {"resourceType": "Patient", "id": "p1"}

Handler = Callable[[BaseHTTPRequestHandler], None]


class Server:
    """An HTTP server whose GET behaviour is a function; records every request's headers."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.handler: Handler = lambda h: send_json(h, PATIENT)
        self.seen: list[tuple[str, str | None]] = []  # (path, Authorization)
        server = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                server.seen.append((self.path, self.headers.get("Authorization")))
                with contextlib.suppress(OSError):  # the client gave up, as it should
                    server.handler(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, 0), _Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://{host}:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def redirect(h: BaseHTTPRequestHandler, location: str) -> None:
    h.send_response(302)
    h.send_header("Location", location)
    h.send_header("Content-Length", "0")
    h.end_headers()


@pytest.fixture
def fhir() -> Iterator[Server]:
    server = Server("127.0.0.1")
    yield server
    server.close()


@pytest.fixture
def elsewhere() -> Iterator[Server]:
    server = Server("127.0.0.2")
    yield server
    server.close()


@pytest.fixture
def other_port() -> Iterator[Server]:
    server = Server("127.0.0.1")
    yield server
    server.close()


def client(base: str, **config: Any) -> FhirClient:
    return fhir_client(base, TOKEN, **{"read_timeout": 1.0, **config})


@pytest.mark.parametrize("target", ["elsewhere", "other_port"])
def test_a_redirect_to_another_origin_is_not_followed_with_the_token(
    fhir: Server, target: str, request: pytest.FixtureRequest
) -> None:
    other: Server = request.getfixturevalue(target)
    fhir.handler = lambda h: redirect(h, f"{other.base}/Patient/p1")
    result = client(fhir.base).fetch("patient", "Patient/p1")
    assert result.resource is None and "another origin" in (result.problem or "")
    assert fhir.seen == [("/Patient/p1", f"Bearer {TOKEN}")]
    assert all(auth is None for _, auth in other.seen)  # never carried there


def test_a_same_origin_redirect_is_followed_with_the_token(fhir: Server) -> None:
    def handler(h: BaseHTTPRequestHandler) -> None:
        if h.path == "/old/Patient/p1":
            redirect(h, "/new/Patient/p1")
        else:
            send_json(h, PATIENT)

    fhir.handler = handler
    result = client(fhir.base + "/old").fetch("patient", "Patient/p1")
    assert result.resource == PATIENT
    assert [auth for _, auth in fhir.seen] == [f"Bearer {TOKEN}"] * 2


def test_a_redirect_loop_ends_in_a_problem_not_a_crash(fhir: Server) -> None:
    fhir.handler = lambda h: redirect(h, h.path)
    started = time.monotonic()
    result = client(fhir.base).fetch("patient", "Patient/p1")
    assert result.resource is None and result.problem
    assert len(fhir.seen) <= 10
    assert time.monotonic() - started < 5


def test_a_next_link_to_another_origin_is_not_followed(fhir: Server, elsewhere: Server) -> None:
    page = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": PATIENT}],
        "link": [{"relation": "next", "url": f"{elsewhere.base}/Patient?page=2"}],
    }
    fhir.handler = lambda h: send_json(h, page)
    result = client(fhir.base).fetch("patients", "Patient?_id=p1")
    assert result.resource is not None and len(result.resource["entry"]) == 1
    assert elsewhere.seen == []


def test_a_silent_server_times_out(fhir: Server) -> None:
    def silent(h: BaseHTTPRequestHandler) -> None:
        time.sleep(3)
        send_json(h, PATIENT)

    fhir.handler = silent
    started = time.monotonic()
    result = client(fhir.base, read_timeout=0.5).fetch("patient", "Patient/p1")
    assert result.resource is None and "in time" in (result.problem or "")
    assert time.monotonic() - started < 2


def test_an_unreachable_server_fails_fast() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    result = client(dead).fetch("patient", "Patient/p1")
    assert result.resource is None and "could not be reached" in (result.problem or "")


def test_a_dripping_server_is_cut_off_at_the_read_timeout(fhir: Server) -> None:
    # Each byte arrives well within the read timeout; the whole answer never would.
    def drip(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/fhir+json")
        h.send_header("Content-Length", "100000")
        h.end_headers()
        for _ in range(100):
            h.wfile.write(b" ")
            h.wfile.flush()
            time.sleep(0.1)

    fhir.handler = drip
    started = time.monotonic()
    result = client(fhir.base, read_timeout=0.5).fetch("patient", "Patient/p1")
    assert result.resource is None and result.problem
    assert time.monotonic() - started < 2


def test_a_huge_answer_is_abandoned_at_the_byte_bound(fhir: Server) -> None:
    big = {**PATIENT, "text": {"div": "x" * 3_000_000}}
    fhir.handler = lambda h: send_json(h, big)
    result = client(fhir.base, max_response_bytes=100_000).fetch("patient", "Patient/p1")
    assert result.resource is None and "exceeds 100000 bytes" in (result.problem or "")


def test_a_compressed_bomb_is_bounded_by_its_decoded_size(fhir: Server) -> None:
    bomb = gzip.compress(b'{"resourceType":"Patient","pad":"' + b"0" * 50_000_000 + b'"}')

    def handler(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/fhir+json")
        h.send_header("Content-Encoding", "gzip")
        h.send_header("Content-Length", str(len(bomb)))
        h.end_headers()
        h.wfile.write(bomb)

    fhir.handler = handler
    result = client(fhir.base, max_response_bytes=1_000_000).fetch("patient", "Patient/p1")
    assert result.resource is None and "exceeds" in (result.problem or "")


def test_pages_are_bounded(fhir: Server) -> None:
    def page(h: BaseHTTPRequestHandler) -> None:
        send_json(
            h,
            {
                "resourceType": "Bundle",
                "type": "searchset",
                "entry": [{"resource": PATIENT}],
                "link": [{"relation": "next", "url": f"{fhir.base}/Patient?page={len(fhir.seen)}"}],
            },
        )

    fhir.handler = page
    result = client(fhir.base, max_pages=3).fetch("patients", "Patient?_id=p1")
    assert result.resource is not None and len(result.resource["entry"]) == 3
    assert len(fhir.seen) == 3
