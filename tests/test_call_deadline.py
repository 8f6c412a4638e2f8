"""Every hook call ends within CDS_CALL_DEADLINE_SECONDS, whatever the FHIR server does.

The service runs on a real socket; the FHIR servers are real listeners on 127.0.0.1 that drip
their response headers a byte at a time, never answer, or hang on hundreds of Medication reads.
What could not be had by the deadline is reported as any unavailable data is (412 for required
data, data issues for the rest), and no fetch thread is left waiting on the server.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import requests
from fhir_listeners import Server
from hook_calls import assert_conformant, call, data_issues, load_request
from processes import free_port, run_cds

from cds_service.app import create_app
from cds_service.fixture_server import serve_in_background
from cds_service.settings import Settings

DEADLINE = 1.5
# Scheduling slack on a shared, loaded test machine: the answer itself takes milliseconds.
SLACK = 1.0


class Stalling(Server):
    """A FHIR server that stalls every request; notes when the client has hung up on it."""

    def __init__(self) -> None:
        super().__init__()
        self.hung_up = threading.Event()
        self.release = threading.Event()  # set at teardown: the stalls end

    def drip_headers(self, h: BaseHTTPRequestHandler) -> None:
        """A status line, then one header byte every 50 ms, for as long as the client reads."""
        try:
            h.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            while not self.release.is_set():
                h.wfile.write(b"a")
                h.wfile.flush()
                time.sleep(0.05)
        except OSError:
            self.hung_up.set()

    def hang(self, h: BaseHTTPRequestHandler) -> None:
        """Never answer; notice when the client closes the connection."""
        h.connection.settimeout(0.05)
        while not self.release.is_set():
            try:
                if h.connection.recv(1) == b"":
                    self.hung_up.set()
                    return
            except TimeoutError:
                continue
            except OSError:
                self.hung_up.set()
                return


@pytest.fixture
def stalling() -> Iterator[Stalling]:
    server = Stalling()
    yield server
    server.release.set()
    server.close()


@pytest.fixture(scope="module")
def cds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    database = tmp_path_factory.mktemp("deadline") / "cds.sqlite3"
    settings = Settings(
        auth="off",
        database_url=f"sqlite:///{database}",
        fhir_server_allowlist="*",
        call_deadline_seconds=DEADLINE,
    )
    with serve_in_background(create_app(settings)) as url:
        yield url


def fetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("fhir-fetch")]


def timed_call(cds: str, service: str, body: dict[str, Any]) -> tuple[requests.Response, float]:
    started = time.monotonic()
    response = call(cds, service, body)
    return response, time.monotonic() - started


def no_fetch_thread_left(seconds: float = 2.0) -> bool:
    deadline = time.monotonic() + seconds
    while fetch_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not fetch_threads()


def test_the_default_deadline_is_at_most_five_seconds() -> None:
    assert 0 < Settings().call_deadline_seconds <= 5


@pytest.mark.parametrize("behaviour", ["drip_headers", "hang"])
def test_a_server_dripping_headers_or_hanging_gets_a_412_by_the_deadline(
    cds: str, stalling: Stalling, behaviour: str
) -> None:
    stalling.handler = getattr(stalling, behaviour)
    body = load_request("mg-pyridostigmine.order-select.noprefetch.json", stalling.base)
    response, took = timed_call(cds, "magnesium-order-select", body)
    assert response.status_code == 412, response.text
    assert took < DEADLINE + SLACK, took
    problems = response.json()["problems"]
    assert {p["prefetchKey"] for p in problems} >= {"patient", "medicationRequests"}
    assert all("did not answer in time" in p["reason"] for p in problems), problems
    # Every request was made, and the service hung up on each: no thread waits on it.
    assert stalling.seen
    assert stalling.hung_up.wait(2), "the service kept the stalled connection open"
    assert no_fetch_thread_left()


def test_hundreds_of_medication_reads_that_hang_end_at_the_deadline_as_data_issues(
    cds: str, stalling: Stalling
) -> None:
    stalling.handler = stalling.hang
    body = load_request("mg-pyridostigmine.order-select.json", stalling.base)
    orders = body["prefetch"]["medicationRequests"]["entry"]
    template = next(e for e in orders if "medicationCodeableConcept" in e["resource"])
    for n in range(300):
        entry = copy.deepcopy(template)
        resource = entry["resource"]
        resource["id"] = f"by-reference-{n}"
        del resource["medicationCodeableConcept"]
        resource["medicationReference"] = {"reference": f"Medication/hanging-{n}"}
        entry["fullUrl"] = f"{stalling.base}/MedicationRequest/by-reference-{n}"
        orders.append(entry)
    response, took = timed_call(cds, "magnesium-order-select", body)
    result = assert_conformant(response)
    assert took < DEADLINE + SLACK, took
    assert result["cards"], "the checks ran with the data that was had"
    issues = [i["problem"] for i in data_issues(result) if "Medication/hanging-" in i["problem"]]
    assert len(issues) == 300
    assert any("did not answer in time" in problem for problem in issues), issues[:3]
    # Reads are bounded (50) and concurrent (8 threads): the ones that started hung up.
    assert 0 < len(stalling.seen) <= 50
    assert no_fetch_thread_left()


def test_a_prefetched_call_is_not_slowed_by_a_stalling_server(
    cds: str, stalling: Stalling
) -> None:
    """Nothing to fetch, nothing waited for: the deadline is a ceiling, not a delay."""
    stalling.handler = stalling.hang
    body = load_request("mg-pyridostigmine.order-select.json", stalling.base)
    response, took = timed_call(cds, "magnesium-order-select", body)
    assert_conformant(response)
    assert took < DEADLINE / 2
    assert stalling.seen == []


def test_under_gunicorn_a_header_dripping_server_is_cut_off_at_the_deadline(
    stalling: Stalling, tmp_path: Path
) -> None:
    """``cds-service serve`` as deployed: the deadline holds in its worker threads too."""
    stalling.handler = stalling.drip_headers
    port = free_port()
    env = {
        "CDS_AUTH": "off",
        "CDS_WORKERS": "1",
        "CDS_DATABASE_URL": f"sqlite:///{tmp_path / 'cds.sqlite3'}",
        "CDS_FHIR_SERVER_ALLOWLIST": stalling.base,
        "CDS_CALL_DEADLINE_SECONDS": str(DEADLINE),
    }
    command = ["serve", "--host", "127.0.0.1", "--port", str(port)]
    with run_cds(command, env, tmp_path / "serve.log", port=port, workers=1) as served:
        body = load_request("mg-pyridostigmine.order-select.noprefetch.json", stalling.base)
        response, took = timed_call(served.url, "magnesium-order-select", body)
        assert response.status_code == 412, response.text
        assert took < DEADLINE + SLACK, took
        assert stalling.hung_up.wait(2), "the worker kept the stalled connection open"
        # The worker is free again: the next call is answered at once.
        prefetched = load_request("mg-pyridostigmine.order-select.json", stalling.base)
        response, took = timed_call(served.url, "magnesium-order-select", prefetched)
        assert response.status_code == 200 and took < DEADLINE / 2
