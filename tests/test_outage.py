"""A database outage does not stop decision support: a real `cds-service serve` (two workers,
JWT authentication on) on a private PostgreSQL cluster that is stopped mid-load and started
again. Every call is answered, replay protection falls back to each process's own cache (an
ERROR line, a metric), no issued card is lost, and feedback answers 503 meanwhile."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from auth_support import JwksServer, JwtIssuer, auth_on_serve_env, write_trusted_issuers
from processes import free_port, run_cds
from sqlalchemy import select

from cds_service.store.engine import make_engine
from cds_service.store.models import IssuedCard

ROOT = Path(__file__).resolve().parent.parent
START_TEST_POSTGRES = ROOT / "scripts" / "start-test-postgres.sh"
MG_REQUEST = json.loads(
    (ROOT / "fixtures" / "requests" / "mg-pyridostigmine.order-select.json").read_text("utf-8")
)
SELECT = "magnesium-order-select"


@dataclass
class PrivateCluster:
    """A PostgreSQL cluster of this test's own (the shared one must never be stopped)."""

    directory: Path
    url: str

    def _pg_ctl(self, *args: str) -> None:
        pg_ctl = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        command = [str(pg_ctl[-1]) if pg_ctl else "pg_ctl", "-D", str(self.directory / "data"),
                   *args]
        if os.getuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "-w", "stop")

    def start(self) -> None:
        port = (self.directory / "port").read_text().strip()
        self._pg_ctl(
            "-l", str(self.directory / "server.log"), "-w", "-t", "60", "start", "-o",
            f"-c listen_addresses=127.0.0.1 -p {port} -k {self.directory} -c fsync=off "
            "-c full_page_writes=off -c max_connections=200",
        )


@pytest.fixture(scope="module")
def cluster() -> Iterator[PrivateCluster]:
    # Under /tmp itself: the postgres user must reach it when the tests run as root.
    directory = Path(tempfile.gettempdir() if os.getuid() else "/tmp") / (
        f"cds-outage-test-{uuid.uuid4().hex[:8]}"
    )
    env = {**os.environ, "CDS_TEST_POSTGRES_DIR": str(directory)}
    try:
        result = subprocess.run(["bash", str(START_TEST_POSTGRES)], env=env, capture_output=True,
                                text=True, timeout=240, stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"no private PostgreSQL cluster: {exc}")
    if result.returncode != 0:
        pytest.skip(f"no private PostgreSQL cluster: {result.stderr.strip()[-300:]}")
    try:
        yield PrivateCluster(directory, result.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["bash", str(START_TEST_POSTGRES), "--stop"], env=env,
                       capture_output=True, timeout=120, check=False)


def test_stopping_postgresql_mid_load_loses_no_call_and_no_card(
    cluster: PrivateCluster, jwks_server: JwksServer, tmp_path: Path
) -> None:
    issuer = JwtIssuer(jwks_server)
    trusted = write_trusted_issuers(tmp_path / "trusted-issuers.json", issuer.issuer_entry())
    port = free_port()
    env = auth_on_serve_env(trusted, cluster.url)
    command = ["serve", "--host", "127.0.0.1", "--port", str(port)]
    with run_cds(command, env, tmp_path / "serve.log", port=port, workers=2) as served:
        call_url = f"{served.url}/cds-services/{SELECT}"
        statuses: list[int] = []
        cards: list[str] = []
        slowest = 0.0
        lock = threading.Lock()
        stop_load = threading.Event()

        def client() -> None:
            nonlocal slowest
            with requests.Session() as session:
                while not stop_load.is_set():
                    body = {**MG_REQUEST, "hookInstance": str(uuid.uuid4())}
                    started = time.monotonic()
                    response = session.post(call_url, json=body, headers=issuer.auth(call_url),
                                            timeout=30)
                    took = time.monotonic() - started
                    with lock:
                        statuses.append(response.status_code)
                        slowest = max(slowest, took)
                        if response.status_code == 200:
                            cards.extend(card["uuid"] for card in response.json()["cards"])

        clients = [threading.Thread(target=client) for _ in range(6)]
        for thread in clients:
            thread.start()
        try:
            time.sleep(1.5)
            cluster.stop()
            stopped_at = len(statuses)
            time.sleep(1.0)
            feedback_url = f"{call_url}/feedback"
            with lock:
                a_card = cards[-1]
            entry = {"card": a_card, "outcome": "overridden",
                     "outcomeTimestamp": "2025-03-01T10:00:00Z"}
            feedback = requests.post(feedback_url, timeout=30, headers=issuer.auth(feedback_url),
                                     json={"feedback": [entry]})
            time.sleep(3.0)
            during_outage = len(statuses) - stopped_at
            cluster.start()
            time.sleep(2.0)
        finally:
            stop_load.set()
            for thread in clients:
                thread.join(timeout=60)

        assert during_outage > 20, "too few calls reached the service during the outage"
        assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
        assert feedback.status_code == 503
        assert feedback.json()["error"] == "store-unavailable"

        # Every card answered is written once the database is back (the queue's bound, 10,000
        # cards per worker, is far above this run's).
        engine = make_engine(cluster.url)
        deadline = time.monotonic() + 30
        try:
            while True:
                with engine.connect() as connection:
                    stored = set(connection.scalars(
                        select(IssuedCard.card_uuid).where(IssuedCard.card_uuid.in_(cards))
                    ))
                if stored == set(cards) or time.monotonic() > deadline:
                    break
                time.sleep(0.25)
        finally:
            engine.dispose()
        assert len(cards) == len(statuses)  # one card per call for this patient
        assert set(cards) - stored == set(), f"{len(set(cards) - stored)} of {len(cards)} lost"

        log = served.log_path.read_text(errors="replace")
        assert "shared replay cache unavailable" in log
        assert "issued cards not written yet" in log
        metrics = requests.get(f"{served.url}/metrics", timeout=10).text
        unshared = re.search(r"^cds_replay_shared_cache_unavailable_total (\S+)$", metrics, re.M)
        assert unshared is not None and float(unshared[1]) > 0
        print(f"calls {len(statuses)} ({during_outage} during the outage), slowest "
              f"{slowest:.2f} s, cards {len(cards)} all stored")
