"""Operating `cds-service serve`: Prometheus metrics summed over its workers, gunicorn's own
refusals in JSON, no control socket shared between instances. Real processes, real sockets."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from processes import Served, free_port, run_cds

ROOT = Path(__file__).resolve().parent.parent
MG_REQUEST = ROOT / "fixtures" / "requests" / "mg-pyridostigmine.order-select.json"
SELECT = "magnesium-order-select"
DEAD_FHIR_SERVER = "http://127.0.0.1:9"


def serve_env(directory: Path, **extra: str) -> dict[str, str]:
    return {
        "CDS_WORKERS": "2",
        "CDS_THREADS": "2",
        "CDS_DATABASE_URL": f"sqlite:///{directory / 'cds.sqlite3'}",
        "CDS_FHIR_CONNECT_TIMEOUT": "0.5",
        "CDS_FHIR_READ_TIMEOUT": "0.5",
        # Where the fhirServer allowlist exists: the dead server below may be tried.
        "CDS_FHIR_SERVER_ALLOWLIST": "*",
        # Each instance would otherwise share one control socket under these directories.
        "XDG_RUNTIME_DIR": str(directory / "runtime"),
        "HOME": str(directory / "home"),
        **extra,
    }


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    directory = tmp_path_factory.mktemp("operability")
    (directory / "runtime").mkdir()
    port = free_port()
    command = ["serve", "--host", "127.0.0.1", "--port", str(port)]
    env = serve_env(directory, CDS_AUTH="off")
    with run_cds(command, env, directory / "serve.log", port=port, workers=2) as process:
        yield process


def samples(text: str, name: str) -> dict[str, float]:
    """``{label set: value}`` of one metric in the Prometheus text format."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = re.fullmatch(re.escape(name) + r"(\{[^}]*\})? (\S+)", line)
        if match:
            found[match[1] or ""] = float(match[2])
    return found


def scrape(url: str) -> str:
    # A new connection each time, so that either worker may answer.
    response = requests.get(f"{url}/metrics", timeout=10, headers={"Connection": "close"})
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    return response.text


def test_metrics_add_up_every_worker(served: Served) -> None:
    body = json.loads(MG_REQUEST.read_text(encoding="utf-8"))
    body.pop("fhirServer", None)
    calls = 24
    cards: dict[tuple[str, str], int] = {}
    for _ in range(calls):
        with requests.post(f"{served.url}/cds-services/{SELECT}", json=body, timeout=30,
                           headers={"Connection": "close"}) as response:
            assert response.status_code == 200
            for card in response.json()["cards"]:
                key = (card["extension"]["org.magnesium-cds"]["ruleId"], card["indicator"])
                cards[key] = cards.get(key, 0) + 1
    assert requests.post(f"{served.url}/cds-services/no-such-service", json=body,
                         timeout=10).status_code == 404
    broken = {**body, "prefetch": {}, "fhirServer": DEAD_FHIR_SERVER}
    assert requests.post(f"{served.url}/cds-services/{SELECT}", json=broken,
                         timeout=30).status_code == 412

    # Whichever worker answers, the totals are the instance's.
    for text in [scrape(served.url) for _ in range(6)]:
        calls_seen = samples(text, "cds_service_calls_total")
        assert calls_seen[f'{{service="{SELECT}",status="200"}}'] == calls
        assert calls_seen['{service="unknown",status="404"}'] == 1
        assert calls_seen[f'{{service="{SELECT}",status="412"}}'] == 1
        latency = samples(text, "cds_service_call_seconds_count")
        assert latency[f'{{service="{SELECT}"}}'] == calls + 1
        issued = samples(text, "cds_cards_total")
        assert issued == {
            f'{{indicator="{indicator}",rule="{rule}"}}': float(count)
            for (rule, indicator), count in cards.items()
        }
        assert sum(samples(text, "cds_fhir_fetch_failures_total").values()) >= 1
        assert "cds_replay_shared_cache_unavailable_total" in text
    # The workers' card queues drain to the database within their group-commit window.
    deadline = time.monotonic() + 5
    while samples(scrape(served.url), "cds_card_writer_queue_cards") != {"": 0.0}:
        assert time.monotonic() < deadline, "issued cards still queued after 5 s"
        time.sleep(0.1)


def _raw_get(url: str, headers: bytes) -> tuple[int, dict[str, str], bytes]:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), 10) as raw:
        raw.sendall(b"GET /cds-services HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers + b"\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < int(
            re.search(rb"(?i)content-length: (\d+)", answer)[1]  # type: ignore[index]
            if re.search(rb"(?i)content-length: (\d+)", answer) else 10**9
        ):
            chunk = raw.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ", 2)[1]), fields, body


@pytest.fixture(scope="module")
def served_with_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    directory = tmp_path_factory.mktemp("operability-auth")
    (directory / "runtime").mkdir()
    port = free_port()
    command = ["serve", "--host", "127.0.0.1", "--port", str(port)]
    env = serve_env(directory, CDS_AUTH="on", CDS_TRUST_SANDBOX="true")
    with run_cds(command, env, directory / "serve.log", port=port, probe="/healthz",
                 workers=2) as process:
        yield process


@pytest.mark.parametrize("length", [9_000, 16_000, 16_385])
def test_a_long_token_reaches_the_services_own_check(served_with_auth: Served, length: int) -> None:
    # gunicorn's default header limit (8,190 bytes) used to answer these with its HTML 431.
    token = b"e" * length
    status, fields, body = _raw_get(served_with_auth.url, b"Authorization: Bearer " + token
                                    + b"\r\n")
    assert status == 401
    assert fields["content-type"] == "application/json"
    assert json.loads(body) == {"error": "unauthorized", "message": "authentication failed"}


@pytest.mark.parametrize(
    "headers",
    [
        b"Authorization: Bearer " + b"e" * 40_000 + b"\r\n",
        b"".join(b"X-Filler-%d: x\r\n" % n for n in range(150)),
    ],
    ids=["one-header-too-long", "too-many-headers"],
)
def test_oversized_headers_answer_json_not_html(served_with_auth: Served, headers: bytes) -> None:
    status, fields, body = _raw_get(served_with_auth.url, headers)
    assert status in (431, 400)
    assert fields["content-type"] == "application/json"
    answer: dict[str, Any] = json.loads(body)
    assert answer["error"] in ("request-headers-too-large", "bad-request")
    assert b"e" * 100 not in body
    log = served_with_auth.log_path.read_text(errors="replace")
    assert "e" * 100 not in log  # the token is never written to the log


def test_no_control_socket_is_shared_between_instances(served: Served,
                                                       served_with_auth: Served) -> None:
    for instance in (served, served_with_auth):
        directory = instance.log_path.parent
        found = [p for p in directory.rglob("*") if p.is_socket() or p.name.endswith(".ctl")]
        assert found == []


def test_the_metrics_directory_goes_with_the_instance(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "runtime").mkdir()
    env = serve_env(tmp_path, CDS_AUTH="off", TMPDIR=str(tmp_path))
    command = ["serve", "--host", "127.0.0.1", "--port", str(port)]
    with run_cds(command, env, tmp_path / "serve.log", port=port, workers=2) as process:
        assert requests.get(f"{process.url}/metrics", timeout=10).status_code == 200
        made = list(tmp_path.glob("cds-service-metrics-*"))
        assert len(made) == 1 and any(made[0].glob("*.db"))
    assert list(tmp_path.glob("cds-service-metrics-*")) == []
