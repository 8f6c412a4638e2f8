"""The log of a full authenticated request: what an operator needs, and nothing secret.

One request line per call with hookInstance, service id, status, latency and rule ids; never
the CDS Hooks JWT, the EHR's FHIR access token, the patient's name or identifiers.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from auth_support import JwtIssuer

from cds_service.logging_setup import REQUEST_LOGGER, JsonFormatter, LineWriteHandler

REQUESTS_DIR = Path(__file__).resolve().parent.parent / "fixtures" / "requests"
SERVICE_PATH = "/cds-services/magnesium-order-select"
SERVICE_URL = "http://localhost" + SERVICE_PATH
FHIR_ACCESS_TOKEN = "ehr-fhir-access-token-7b1f9e2c"
# Loggers of the test's own fixture FHIR server (it plays the EHR): not the service's log.
EHR_SIDE = ("werkzeug", "cds_service.fixture_server")


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Every log line the process writes, formatted exactly as in production (JSON)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(lambda record: not record.name.startswith(EHR_SIDE))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    yield stream
    root.removeHandler(handler)
    root.setLevel(old_level)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


@pytest.mark.parametrize("log_level", ["INFO", "DEBUG"])
def test_a_full_request_logs_what_is_needed_and_no_secret(
    auth_app_factory: Any,
    jwt_issuer: JwtIssuer,
    fixture_fhir_server: str,
    captured: io.StringIO,
    log_level: str,
) -> None:
    # No prefetch: the service fetches from the FHIR server with the EHR's access token.
    body = json.loads((REQUESTS_DIR / "mg-pyridostigmine.order-select.noprefetch.json").read_text())
    body["fhirServer"] = fixture_fhir_server
    body["fhirAuthorization"]["access_token"] = FHIR_ACCESS_TOKEN
    patient = json.loads((REQUESTS_DIR / "mg-pyridostigmine.order-select.json").read_text())[
        "prefetch"
    ]["patient"]
    # The EHR's entry lists its FHIR server: the only one the service fetches from for it.
    app = auth_app_factory(
        log_level=log_level,
        issuers=[{**jwt_issuer.issuer_entry(), "fhirServers": [fixture_fhir_server]}],
    )
    logging.getLogger().setLevel(log_level)  # create_app set it; keep it for the request
    jwt_token = jwt_issuer.token_for(SERVICE_URL)
    response = app.test_client().post(
        SERVICE_PATH, json=body, headers={"Authorization": f"Bearer {jwt_token}"}
    )
    assert response.status_code == 200, response.get_json()
    cards = response.get_json()["cards"]
    assert cards

    text = captured.getvalue()
    secrets = {
        "JWT": jwt_token,
        "JWT signature": jwt_token.rsplit(".", 1)[1],
        "JWT payload": jwt_token.split(".")[1],
        "FHIR access token": FHIR_ACCESS_TOKEN,
        "patient id": body["context"]["patientId"],
        "patient family name": patient["name"][0]["family"],
        "patient given name": patient["name"][0]["given"][0],
        "patient identifier": patient["identifier"][0]["value"],
        "birth date": patient["birthDate"],
    }
    leaked = [what for what, value in secrets.items() if value in text]
    assert not leaked, f"the log holds: {leaked}"

    [request_line] = [e for e in lines(captured) if e.get("event") == "request"]
    assert request_line["logger"] == REQUEST_LOGGER
    assert request_line["hookInstance"] == body["hookInstance"]
    assert request_line["serviceId"] == "magnesium-order-select"
    assert request_line["status"] == 200
    assert isinstance(request_line["latency_ms"], float | int)
    assert request_line["ruleIds"] and all(isinstance(r, str) for r in request_line["ruleIds"])


def test_a_refused_request_logs_the_reason_and_no_token(
    auth_app_factory: Any, jwt_issuer: JwtIssuer, captured: io.StringIO
) -> None:
    app = auth_app_factory()
    token = jwt_issuer.token_for("http://localhost/somewhere-else")
    response = app.test_client().post(
        SERVICE_PATH, json={}, headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 401
    entries = lines(captured)
    assert any(e["message"].startswith("authentication failed: aud") for e in entries)
    assert [e["status"] for e in entries if e.get("event") == "request"] == [401]
    for part in token.split("."):
        assert part not in captured.getvalue()


def test_a_message_orjson_cannot_write_is_still_logged() -> None:
    # A lone surrogate (possible in a third party's message) is written by the stdlib.
    message = "odd \ud800 text"
    record = logging.LogRecord("other.lib", logging.WARNING, __file__, 1, message, (), None)
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == message and line["level"] == "WARNING"


def test_the_request_line_has_its_fields_in_order(tmp_path: Path, captured: io.StringIO) -> None:
    from cds_service.app import create_app
    from cds_service.settings import Settings

    app = create_app(Settings(auth="off", database_url=f"sqlite:///{tmp_path / 'log.sqlite3'}"))
    logging.getLogger().setLevel("INFO")
    body = json.loads((REQUESTS_DIR / "mg-pyridostigmine.order-select.json").read_text())
    client = app.test_client()
    assert client.post(SERVICE_PATH, json=body).status_code == 200
    assert client.post("/cds-services/no-such-service", json=body).status_code == 404
    long_path = "/" + "x" * 100
    assert client.get(long_path).status_code == 404

    ok, unknown, elsewhere = [e for e in lines(captured) if e.get("event") == "request"]
    assert list(ok) == [
        "time", "level", "logger", "message", "event", "method", "path", "status", "latency_ms",
        "hookInstance", "serviceId", "ruleIds", "timings_ms",
    ]
    assert ok["level"] == "INFO" and ok["logger"] == REQUEST_LOGGER
    assert ok["message"] == f"POST {SERVICE_PATH} 200"
    assert (ok["method"], ok["path"], ok["status"]) == ("POST", SERVICE_PATH, 200)
    assert ok["hookInstance"] == body["hookInstance"]
    assert ok["serviceId"] == "magnesium-order-select"
    assert ok["ruleIds"] and ok["latency_ms"] >= 0
    assert {"parse", "validation", "record", "total"} <= set(ok["timings_ms"])
    # Refused before the service ran: no hookInstance, rules or timings.
    assert list(unknown)[4:] == ["event", "method", "path", "status", "latency_ms", "serviceId"]
    assert unknown["serviceId"] == "no-such-service" and unknown["status"] == 404
    # Outside /cds-services the path is cut (it is whatever a scanner sent).
    assert elsewhere["path"] == long_path[:64]
    assert elsewhere["message"] == f"GET {long_path[:64]} 404"


def test_no_request_line_below_its_level(tmp_path: Path, captured: io.StringIO) -> None:
    from cds_service.app import create_app
    from cds_service.settings import Settings

    app = create_app(Settings(auth="off", database_url=f"sqlite:///{tmp_path / 'log.sqlite3'}"))
    logging.getLogger().setLevel("WARNING")
    assert app.test_client().get("/healthz").status_code == 200
    assert not [e for e in lines(captured) if e.get("event") == "request"]


def _json_line_handler(stream: Any) -> LineWriteHandler:
    handler = LineWriteHandler(stream)
    handler.setFormatter(JsonFormatter())
    return handler


def test_lines_written_by_many_threads_at_once_stay_whole(tmp_path: Path) -> None:
    # The service's handler writes without a lock: each line must still arrive whole, one per
    # record, through a pipe (how a container runtime reads stderr) as to a file.
    logger = logging.getLogger("cds_service.test.concurrent-lines")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    reader, writer = os.pipe()
    received: list[bytes] = []

    def drain_pipe() -> None:
        received.extend(iter(lambda: os.read(reader, 65536), b""))

    drain = threading.Thread(target=drain_pipe)
    drain.start()
    log_file = (tmp_path / "service.log").open("a")
    handlers = [_json_line_handler(os.fdopen(writer, "w")), _json_line_handler(log_file)]
    for handler in handlers:
        logger.addHandler(handler)
    padding = "x" * 300  # a line of request size, not a few bytes

    def write_lines(thread: int) -> None:
        for number in range(500):
            logger.info("line %d %d", thread, number, extra={"path": padding})

    threads = [threading.Thread(target=write_lines, args=(t,)) for t in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.stream.close()
    drain.join(timeout=10)
    for text in (b"".join(received).decode(), (tmp_path / "service.log").read_text()):
        lines = text.splitlines()
        messages = {json.loads(line)["message"] for line in lines}  # each line is whole JSON
        assert len(lines) == len(messages) == 8 * 500


def test_a_stream_without_a_descriptor_still_gets_every_line() -> None:
    stream = io.StringIO()
    record = logging.LogRecord("cds_service.x", logging.INFO, "", 0, "hello %s", ("é",), None)
    _json_line_handler(stream).handle(record)
    assert json.loads(stream.getvalue())["message"] == "hello é"
