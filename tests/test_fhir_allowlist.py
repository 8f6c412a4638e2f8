"""The service fetches only from fhirServer origins allowed on purpose, sends the EHR's token
nowhere else, and never repeats what a FHIR server said.

Real listeners on 127.0.0.1: the fixture FHIR server, scripted FHIR servers, and an "attacker"
on another port that records every connection made to it. The service answers over HTTP
(Flask's test client, a socket, or ``cds-service demo`` as a real process).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import requests
from auth_support import JwtIssuer
from fhir_listeners import Server, redirect
from flask import Flask
from hook_calls import data_issues, load_request, send_json
from processes import demo_env, free_port, run_cds, wait_until_up

from cds_service.app import create_app
from cds_service.context.fhir_origin import UnsafeUrl, origin_of
from cds_service.protocol.auth import TrustedIssuersError, load_trusted_issuers
from cds_service.settings import Settings, SettingsError

SERVICE = "magnesium-order-select"
SERVICE_PATH = f"/cds-services/{SERVICE}"
SERVICE_URL = f"http://localhost{SERVICE_PATH}"
TOKEN = "ehr-fhir-token-that-must-stay-home"
NO_PREFETCH = "mg-pyridostigmine.order-select.noprefetch.json"
NOT_ALLOWED = "is not one this service is allowed to fetch from"


@pytest.fixture
def attacker() -> Iterator[Server]:
    server = Server()
    yield server
    server.close()


@pytest.fixture
def home() -> Iterator[Server]:
    server = Server()
    yield server
    server.close()


def open_app(tmp_path: Path, **settings: Any) -> Flask:
    return create_app(
        Settings(auth="off", database_url=f"sqlite:///{tmp_path / 'cds.sqlite3'}", **settings)
    )


def hook_call(fhir_server: str, prefetched: bool = False) -> dict[str, Any]:
    name = "mg-pyridostigmine.order-select.json" if prefetched else NO_PREFETCH
    body = load_request(name, fhir_server)
    body["fhirAuthorization"] = {
        "access_token": TOKEN, "token_type": "Bearer", "expires_in": 300,
        "scope": "patient/*.read", "subject": "cds-service",
    }
    return body


def refused_keys(response: Any) -> dict[str, str]:
    assert response.status_code == 412, response.get_data(as_text=True)
    return {p["prefetchKey"]: p["reason"] for p in response.get_json()["problems"]}


# --- authentication off -------------------------------------------------------------------


def test_with_no_allowlist_the_service_fetches_from_nowhere(
    tmp_path: Path, fixture_fhir_server: str, attacker: Server
) -> None:
    client = open_app(tmp_path).test_client()
    for target in (fixture_fhir_server, attacker.base):
        reasons = refused_keys(client.post(SERVICE_PATH, json=hook_call(target)))
        assert "medicationRequests" in reasons
        assert all(NOT_ALLOWED in reason for reason in reasons.values()), reasons
    assert attacker.connections == 0
    # What the client prefetched is still checked: only fetching is refused.
    answer = client.post(SERVICE_PATH, json=hook_call(attacker.base, prefetched=True))
    assert answer.status_code == 200 and answer.get_json()["cards"]


def test_an_allowlisted_origin_is_fetched_from_and_no_other(
    tmp_path: Path, fixture_fhir_server: str, attacker: Server
) -> None:
    client = open_app(tmp_path, fhir_server_allowlist=f" {fixture_fhir_server}/ ").test_client()
    answer = client.post(SERVICE_PATH, json=hook_call(fixture_fhir_server))
    assert answer.status_code == 200, answer.get_json()
    assert answer.get_json()["cards"][0]["indicator"] == "warning"
    reasons = refused_keys(client.post(SERVICE_PATH, json=hook_call(attacker.base)))
    assert all(NOT_ALLOWED in reason for reason in reasons.values()), reasons
    assert attacker.connections == 0


def test_a_star_allows_any_origin(tmp_path: Path, attacker: Server) -> None:
    client = open_app(tmp_path, fhir_server_allowlist="*").test_client()
    client.post(SERVICE_PATH, json=hook_call(attacker.base))
    assert attacker.seen and all(auth == f"Bearer {TOKEN}" for _, auth in attacker.seen)


def test_an_allowlist_entry_that_is_not_an_origin_stops_start_up() -> None:
    for value in ("https://fhir.example.org/fhir", "fhir.example.org", "http://u@h", "ftp://h"):
        with pytest.raises(SettingsError, match="CDS_FHIR_SERVER_ALLOWLIST"):
            Settings(fhir_server_allowlist=value)
    allowed = Settings(fhir_server_allowlist="https://A.example.org:443, http://b:8080").fhir_server_origins
    assert allowed is not None and {str(o) for o in allowed} == {
        "https://a.example.org", "http://b:8080"
    }


# --- what the caller is told --------------------------------------------------------------


def test_a_412_never_repeats_what_the_fhir_server_said(tmp_path: Path, home: Server) -> None:
    def answer(h: BaseHTTPRequestHandler) -> None:
        outcome = {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "processing",
                       "diagnostics": "SSH-2.0-OpenSSH_9.6 internal banner"}],
        }
        payload = json.dumps(outcome).encode()
        h.send_response(404, "Internal Reason Phrase")
        h.send_header("Content-Type", "application/fhir+json")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)

    home.handler = answer
    client = open_app(tmp_path, fhir_server_allowlist=home.base).test_client()
    response = client.post(SERVICE_PATH, json=hook_call(home.base))
    reasons = refused_keys(response)
    text = response.get_data(as_text=True)
    assert "OpenSSH" not in text and "Internal Reason" not in text and "404" not in text
    assert all("answered with an error (HTTP 4xx)" in r for r in reasons.values()), reasons

    home.handler = lambda h: send_json(h, json.loads(json.dumps({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "x", "diagnostics": "Redis 7.2 banner"}],
    })))
    response = client.post(SERVICE_PATH, json=hook_call(home.base))
    assert "Redis" not in response.get_data(as_text=True)
    assert "answered with an OperationOutcome" in response.get_data(as_text=True)


# --- the token never reaches another origin, whatever the URL looks like ------------------


def ambiguous(home: Server, attacker: Server, path: str) -> str:
    """Python's urlsplit reads the home origin; urllib3 would connect to the attacker."""
    return f"http://127.0.0.1:{attacker.port}\\@127.0.0.1:{home.port}{path}"


def test_no_redirect_next_link_or_medication_read_takes_the_token_elsewhere(
    tmp_path: Path, fixture_fhir_server: str, home: Server, attacker: Server
) -> None:
    """A FHIR server (allowed) that redirects every read, pages every search and names its
    drugs by references, all pointing at the attacker in URLs two parsers read differently."""
    prefetched = hook_call(home.base, prefetched=True)["prefetch"]
    orders = prefetched["medicationRequests"]
    for entry in orders["entry"]:
        concept = entry["resource"].pop("medicationCodeableConcept", None)
        if concept is not None:
            entry["resource"]["medicationReference"] = {
                "reference": ambiguous(home, attacker, f"/Medication/{entry['resource']['id']}")
            }

    def handler(h: BaseHTTPRequestHandler) -> None:
        if h.path.startswith("/Medication/"):
            redirect(h, ambiguous(home, attacker, h.path))
        elif h.path.startswith("/MedicationRequest"):
            send_json(h, {**orders, "link": [
                {"relation": "next", "url": ambiguous(home, attacker, "/MedicationRequest?p=2")}
            ]})
        elif h.path.startswith("/Patient/"):
            send_json(h, prefetched["patient"])
        else:
            redirect(h, ambiguous(home, attacker, h.path))

    home.handler = handler
    client = open_app(tmp_path, fhir_server_allowlist=home.base).test_client()
    body = hook_call(home.base)
    body["prefetch"] = {"conditions": prefetched["conditions"],
                        "observations": prefetched["observations"]}
    response = client.post(SERVICE_PATH, json=body)
    assert response.status_code == 200, response.get_json()
    problems = " ".join(i["problem"] for i in data_issues(response.get_json()))
    assert "next page on another origin" in problems
    assert "redirected to another origin" in problems
    paths = [path for path, _ in home.seen]
    assert any(p.startswith("/Medication/") for p in paths), paths  # the reads were tried
    assert all(auth == f"Bearer {TOKEN}" for _, auth in home.seen)
    assert attacker.connections == 0 and attacker.seen == []

    # The fhirServer itself written that way: allowed by its look, refused by its reading.
    reasons = refused_keys(client.post(SERVICE_PATH, json=hook_call(ambiguous(home, attacker, ""))))
    assert all("fhirServer URL is refused" in r for r in reasons.values()), reasons
    assert attacker.connections == 0


# --- authentication on: each trusted issuer's own FHIR servers ----------------------------


def test_a_trusted_issuer_may_send_the_service_to_its_own_fhir_servers_only(
    auth_app_factory: Any, jwt_issuer: JwtIssuer, fixture_fhir_server: str,
    attacker: Server,
) -> None:
    other = JwtIssuer(jwt_issuer.server)
    app = auth_app_factory(issuers=[
        jwt_issuer.issuer_entry(fhirServers=[fixture_fhir_server]),
        other.issuer_entry(),
    ])
    client = app.test_client()

    def post(issuer: JwtIssuer, fhir_server: str) -> Any:
        headers = issuer.auth(SERVICE_URL)
        return client.post(SERVICE_PATH, json=hook_call(fhir_server), headers=headers)

    assert post(jwt_issuer, fixture_fhir_server).status_code == 200
    for issuer, target in ((jwt_issuer, attacker.base), (other, fixture_fhir_server)):
        reasons = refused_keys(post(issuer, target))
        assert all(NOT_ALLOWED in r for r in reasons.values()), reasons
    assert attacker.connections == 0

    # The global allowlist still applies to every issuer, listed servers or not.
    app = auth_app_factory(
        issuers=[jwt_issuer.issuer_entry(fhirServers=[fixture_fhir_server]), other.issuer_entry()],
        fhir_server_allowlist=attacker.base,
    )
    client = app.test_client()
    assert post(other, attacker.base).status_code in {200, 412}
    assert attacker.seen and attacker.seen[-1][1] == f"Bearer {TOKEN}"


def test_an_issuer_entry_with_a_fhir_server_that_is_not_an_origin_stops_start_up(
    tmp_path: Path, jwt_issuer: JwtIssuer
) -> None:
    for value in (["*"], ["https://fhir.example.org/r4"], ["https://u@fhir.example.org"]):
        path = tmp_path / "issuers.json"
        entry = jwt_issuer.issuer_entry(fhirServers=value)
        path.write_text(json.dumps({"issuers": [entry]}))
        with pytest.raises(TrustedIssuersError):
            load_trusted_issuers(path)


# --- the demo: its fixture server and nothing else -----------------------------------------


def test_the_demo_fetches_from_its_fixture_server_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, attacker: Server
) -> None:
    port, fhir_port = free_port(), free_port()
    env = demo_env(tmp_path, port, fhir_port)
    monkeypatch.delenv("CDS_AUTH", raising=False)
    monkeypatch.delenv("CDS_FHIR_SERVER_ALLOWLIST", raising=False)
    with run_cds(["demo"], env, tmp_path / "demo.log", port=port) as served:
        wait_until_up(f"http://127.0.0.1:{fhir_port}/metadata", served.process)
        url = f"{served.url}{SERVICE_PATH}"
        fixture = requests.post(url, json=hook_call(f"http://127.0.0.1:{fhir_port}"), timeout=15)
        assert fixture.status_code == 200, fixture.text
        # A web page driving the demo (CORS is open) cannot make it fetch anything else.
        elsewhere = requests.post(url, json=hook_call(attacker.base), timeout=15)
        assert elsewhere.status_code == 412, elsewhere.text
        assert NOT_ALLOWED in elsewhere.text
    assert attacker.connections == 0


# --- the reading itself --------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:1\\@127.0.0.1:2/",  # urlsplit: port 2; urllib3: port 1
        "http://a.example\\.b.example/",
        "http://user@fhir.example.org/",
        "http://fhir.example.org:1:2/",
        "http://fhir.example.org:0/",
        "http://fhir.example.org:99999/",
        "http://fhir.example.org:+80/",
        "http://127.0.0.1%3A9999/",
        "http://fhir.example.org\t/",
        "http://fhir.example.org /",
        "http://fhïr.example.org/",
        "http://fhir.example.org:８０/",
        "ftp://fhir.example.org/",
        "//fhir.example.org/",
        "http:///fhir.example.org/",
    ],
)
def test_a_url_that_could_be_read_two_ways_is_refused(url: str) -> None:
    with pytest.raises(UnsafeUrl):
        origin_of(url)


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("HTTPS://Fhir.Example.org:443/r4/Patient?x=1#f", "https://fhir.example.org"),
        ("http://127.0.0.1:8090", "http://127.0.0.1:8090"),
        ("http://[::1]:8090/fhir", "http://[::1]:8090"),
        ("http://fhir.example.org:80/a%20b", "http://fhir.example.org"),
    ],
)
def test_an_unambiguous_url_reads_as_its_origin(url: str, origin: str) -> None:
    assert str(origin_of(url)) == origin
