"""The FHIR fallback never carries the EHR's token to another origin, and never hangs or floods.

Real HTTP servers on loopback: 127.0.0.1 and 127.0.0.2 are different hosts, and another port
on the same host is another origin too.
"""

from __future__ import annotations

import gzip
import socket
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
from fhir_listeners import PATIENT, Server, redirect
from hook_calls import fhir_client, send_json

from cds_service.context.fhir_client import FhirClient

TOKEN = "ehr-access-token-that-must-stay-home"


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


# --- URLs two parsers read differently (the attack run's token leak) -----------------------


def ambiguous_urls(fhir: Server, attacker: Server, path: str) -> list[str]:
    """URLs Python's urlsplit reads as the fhirServer's origin, or that a lenient reading
    could send elsewhere: each must be refused, whatever the connecting library makes of it."""
    at, home = attacker.port, fhir.port
    return [
        # urlsplit: host 127.0.0.1, port ``home``; urllib3 connects to port ``at``.
        f"http://127.0.0.1:{at}\\@127.0.0.1:{home}{path}",
        f"http://127.0.0.1:{at}\\\\@127.0.0.1:{home}{path}",
        f"http://127.0.0.1:{at}\t@127.0.0.1:{home}{path}",
        f"http://127.0.0.1:{at} @127.0.0.1:{home}{path}",
        f"http://user:pass@127.0.0.1:{home}{path}",
        f"http://127.0.0.1:{home}:{at}{path}",
        f"http://127.0.0.1:{at}%5C@127.0.0.1:{home}{path}",
        f"//127.0.0.1:{at}{path}",
        f"\\\\127.0.0.1:{at}{path}",
    ]


def test_a_redirect_no_parser_agrees_on_is_refused_and_nothing_reaches_the_other_port(
    fhir: Server, other_port: Server
) -> None:
    for location in ambiguous_urls(fhir, other_port, "/Patient/p1"):
        fhir.seen.clear()
        fhir.handler = lambda h, location=location: redirect(h, location)  # type: ignore[misc]
        result = client(fhir.base).fetch("patient", "Patient/p1")
        assert result.resource is None, location
        assert "another origin" in (result.problem or ""), (location, result.problem)
        assert fhir.seen == [("/Patient/p1", f"Bearer {TOKEN}")]
    assert other_port.seen == [] and other_port.connections == 0


def test_a_next_link_no_parser_agrees_on_is_not_followed_and_nothing_reaches_the_other_port(
    fhir: Server, other_port: Server
) -> None:
    for link in ambiguous_urls(fhir, other_port, "/Patient?page=2"):
        page = {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [{"resource": PATIENT}],
            "link": [{"relation": "next", "url": link}],
        }
        fhir.handler = lambda h, page=page: send_json(h, page)  # type: ignore[misc]
        result = client(fhir.base).fetch("patients", "Patient?_id=p1")
        assert result.resource is not None and len(result.resource["entry"]) == 1, link
        assert result.incomplete is not None and "another origin" in result.incomplete, link
    assert other_port.seen == [] and other_port.connections == 0


def test_a_fhir_server_url_no_parser_agrees_on_gets_no_request_at_all(
    fhir: Server, other_port: Server
) -> None:
    for base in ambiguous_urls(fhir, other_port, "/fhir"):
        result = client(base).fetch("patient", "Patient/p1")
        assert result.resource is None and "fhirServer URL is refused" in (result.problem or "")
    assert fhir.seen == [] and other_port.seen == [] and other_port.connections == 0
