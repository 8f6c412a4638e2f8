"""The jti replay cache shared through the database: a token is used once, whichever worker or
instance it reaches. Real SQLite and PostgreSQL, real gunicorn workers, real signed JWTs."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from auth_support import JwksServer, JwtIssuer, auth_on_serve_env, write_trusted_issuers
from processes import Served, free_port, run_cds
from sqlalchemy import select

from cds_service.store import FeedbackStore
from cds_service.store import store as store_module
from cds_service.store.engine import make_engine
from cds_service.store.models import SeenToken

CDS = str(Path(sys.executable).parent / "cds-service")
DISCOVERY = "http://localhost/cds-services"
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
# The two refusal reasons tell which level caught a replay: the process that accepted the
# token (memory), or another worker or instance (the database).
SAME_PROCESS = "authentication failed: jti was already used (replay)"
SHARED = "authentication failed: jti was already used (replay, seen by another worker or instance)"


def token_key(n: int | str) -> str:
    return hashlib.sha256(f"test-token-{n}".encode()).hexdigest()


def rows(store: FeedbackStore) -> dict[str, datetime]:
    with store.engine.connect() as connection:
        return dict(connection.execute(select(SeenToken.token_key, SeenToken.expires_at)).all())


@pytest.fixture(params=["upsert", "portable"])
def insert_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways remember_token decides: ON CONFLICT (SQLite, PostgreSQL) and the plain INSERT
    + IntegrityError that other backends get."""
    if request.param == "portable":
        monkeypatch.setattr(store_module, "_UPSERT_DIALECTS", frozenset())
    return str(request.param)


# --- the store: remember_token and its purge -----------------------------------------------


def test_concurrent_uses_of_one_token_key_give_exactly_one_first_use(
    store_url: str, insert_path: str
) -> None:
    store = FeedbackStore.open(store_url)
    threads_n, keys_n = 8, 15
    results: dict[int, list[bool]] = {k: [] for k in range(keys_n)}
    errors: list[BaseException] = []
    start = threading.Barrier(threads_n)
    expires = datetime.now(UTC) + timedelta(minutes=5)

    def work() -> None:
        try:
            for k in range(keys_n):
                start.wait()  # all threads on the same key at once, key after key
                results[k].append(store.remember_token(token_key(k), expires))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)
            start.abort()

    threads = [threading.Thread(target=work) for _ in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert {k: sorted(r) for k, r in results.items()} == {
        k: [False] * (threads_n - 1) + [True] for k in range(keys_n)
    }
    assert len(rows(store)) == keys_n
    store.close()


def test_a_token_key_is_a_replay_until_it_expires_then_free_again(
    store_url: str, insert_path: str
) -> None:
    store = FeedbackStore.open(store_url)
    key = token_key("reuse")
    expires = T0 + timedelta(seconds=300)
    assert store.remember_token(key, expires, now=T0) is True
    assert store.remember_token(key, expires, now=T0) is False
    # Still live at its expiry instant: the verifier accepts a token up to exp inclusive.
    assert store.remember_token(key, expires, now=expires) is False
    later = expires + timedelta(seconds=1)
    assert store.remember_token(key, later + timedelta(seconds=300), now=later) is True
    assert store.remember_token(key, later + timedelta(seconds=300), now=later) is False
    assert rows(store) == {key: later + timedelta(seconds=300)}  # taken over, not duplicated
    store.close()


def test_expired_rows_are_purged_now_and_then(store_url: str) -> None:
    store = FeedbackStore.open(store_url)
    for n in range(3):
        store.remember_token(token_key(n), T0 + timedelta(seconds=10), now=T0)
    store.remember_token(token_key("live"), T0 + timedelta(seconds=1000), now=T0)
    assert store.purge_expired_tokens(now=T0 + timedelta(seconds=10)) == 0  # exp is inclusive
    assert store.purge_expired_tokens(now=T0 + timedelta(seconds=11)) == 3
    assert set(rows(store)) == {token_key("live")}

    # Opportunistically: every token_purge_every-th token purges what has expired by then.
    store.token_purge_every = 3
    store._tokens_remembered = itertools.count(1)  # a fresh count
    later = T0 + timedelta(hours=1)
    store.remember_token(token_key("a"), T0 + timedelta(seconds=10), now=T0)
    store.remember_token(token_key("b"), later + timedelta(seconds=300), now=T0)
    assert len(rows(store)) == 3
    store.remember_token(token_key("c"), later + timedelta(seconds=300), now=later)
    assert set(rows(store)) == {token_key("b"), token_key("c")}  # "a" and "live" expired
    store.close()


def test_remember_token_on_an_unreachable_database_raises_store_unavailable() -> None:
    broken = FeedbackStore(make_engine("sqlite:////nonexistent-dir/for/sure/cds.sqlite3"))
    with pytest.raises(store_module.StoreUnavailable):
        broken.remember_token(token_key(1), T0)


# --- the verifier with the shared guard (in process, two app instances) ---------------------


def discover(client: Any, token: str) -> int:
    response = client.get("/cds-services", headers={"Authorization": f"Bearer {token}"})
    return int(response.status_code)


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("authentication failed")
    ]


def test_instances_sharing_a_database_refuse_each_others_replays(
    auth_app_factory: Any, jwt_issuer: JwtIssuer, store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    first = auth_app_factory(database_url=store_url).test_client()
    second = auth_app_factory(database_url=store_url).test_client()
    jti = "jti-shared-1"
    token = jwt_issuer.token_for(DISCOVERY, jti=jti)
    assert discover(first, token) == 200
    assert discover(second, token) == 401
    assert discover(first, token) == 401
    assert refusals(caplog) == [SHARED, SAME_PROCESS]
    # The same jti from another issuer is another token.
    other_issuer = JwtIssuer(jwt_issuer.server)
    third = auth_app_factory(
        database_url=store_url, issuers=[other_issuer.issuer_entry()]
    ).test_client()
    assert discover(third, other_issuer.token_for(DISCOVERY, jti=jti)) == 200
    # Only digests are kept: neither the jti nor the token.
    store = FeedbackStore.open(store_url)
    kept = rows(store)
    expected = hashlib.sha256(f"{jwt_issuer.iss}\n{jti}".encode()).hexdigest()
    assert expected in kept and len(kept) == 2
    assert not any(jti in key or key in token for key in kept)
    store.close()


def test_any_string_jti_is_guarded(auth_app_factory: Any, jwt_issuer: JwtIssuer) -> None:
    client = auth_app_factory().test_client()
    for jti in ("\ud800 lone surrogate", "é\n" * 300):  # JSON allows both; both must hash
        token = jwt_issuer.token_for(DISCOVERY, jti=jti)
        assert (discover(client, token), discover(client, token)) == (200, 401)


def test_an_unreachable_database_degrades_to_the_process_cache_and_says_so(
    auth_app_factory: Any, jwt_issuer: JwtIssuer, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cds_service.metrics import REPLAY_SHARED_CACHE_UNAVAILABLE
    from cds_service.protocol import auth

    monkeypatch.setattr(auth, "SHARED_REPLAY_RETRY_S", 0.2)
    broken = FeedbackStore(make_engine("sqlite:////nonexistent-dir/for/sure/cds.sqlite3"))
    client = auth_app_factory(create_app_kwargs={"store": broken}).test_client()
    counted = REPLAY_SHARED_CACHE_UNAVAILABLE._value.get()
    tokens = [jwt_issuer.token_for(DISCOVERY) for _ in range(5)]
    # Decision support goes on: each token passes once, on this process's cache alone.
    assert [discover(client, token) for token in tokens] == [200] * 5
    assert discover(client, tokens[0]) == 401  # a replay to the same process is still caught
    assert refusals(caplog) == [SAME_PROCESS]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # once per outage, not once per call
    assert errors[0].getMessage().startswith("shared replay cache unavailable (StoreUnavailable")
    assert REPLAY_SHARED_CACHE_UNAVAILABLE._value.get() - counted == 5
    logged = "\n".join(r.getMessage() + json.dumps(r.__dict__, default=str) for r in caplog.records)
    for part in tokens[1].split("."):
        assert part not in logged
    # The database is back: the shared cache is used again (tried at most every 0.2 s).
    working = FeedbackStore.open(f"sqlite:///{tmp_path / 'back.sqlite3'}")
    broken.engine = working.engine
    time.sleep(0.25)
    token = jwt_issuer.token_for(DISCOVERY)
    assert discover(client, token) == 200
    assert token_key_of(jwt_issuer.iss, token) in rows(working)
    assert any(r.getMessage().startswith("shared replay cache available again") for r in
               caplog.records)
    working.close()


def token_key_of(iss: str, token: str) -> str:
    import jwt as pyjwt

    jti = pyjwt.decode(token, options={"verify_signature": False})["jti"]
    return hashlib.sha256(f"{iss}\n{jti}".encode()).hexdigest()


# --- the real thing: one gunicorn, two workers, one SQLite file ----------------------------


@dataclass
class Service:
    served: Served
    issuer: JwtIssuer

    @property
    def url(self) -> str:
        return self.served.url

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.served.process

    def count(self, message: str) -> int:
        return sum(1 for line in self.served.log_lines() if _message(line) == message)

    def wait_for_log(self, message: str, at_least: int, seconds: float = 10) -> int:
        deadline = time.monotonic() + seconds
        while self.count(message) < at_least and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.count(message)


def _message(line: str) -> str | None:
    try:
        entry = json.loads(line)
    except ValueError:
        return None  # gunicorn's own lines
    return entry.get("message") if isinstance(entry, dict) else None


@pytest.fixture(scope="module")
def two_workers(
    jwks_server: JwksServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    workdir = tmp_path_factory.mktemp("replay-shared")
    issuer = JwtIssuer(jwks_server)
    trusted = write_trusted_issuers(workdir / "trusted-issuers.json", issuer.issuer_entry())
    port = free_port()
    env = auth_on_serve_env(trusted, f"sqlite:///{workdir / 'cds.sqlite3'}")
    command = ["serve", "--host", "127.0.0.1", "--port", str(port)]
    with run_cds(command, env, workdir / "serve.log", port=port, workers=2) as served:
        yield Service(served, issuer)


def send(service: Service, token: str) -> int:
    # A new TCP connection each time, so that either worker may accept it.
    response = requests.get(
        f"{service.url}/cds-services",
        headers={"Authorization": f"Bearer {token}", "Connection": "close"},
        timeout=15,
    )
    return response.status_code


def test_a_token_replayed_to_another_worker_is_refused(two_workers: Service) -> None:
    service = two_workers
    shared_before = service.count(SHARED)
    same_before = service.count(SAME_PROCESS)
    token = service.issuer.token_for(f"{service.url}/cds-services")
    statuses = [send(service, token) for _ in range(20)]
    # The kernel picks the worker for each new connection: keep sending (bounded) until the
    # second worker has had the token at least once.
    while service.wait_for_log(SHARED, shared_before + 1, seconds=0.5) == shared_before:
        assert len(statuses) < 400, "every connection went to one worker"
        statuses += [send(service, token) for _ in range(20)]
    assert statuses.count(200) == 1 and statuses.count(401) == len(statuses) - 1, statuses
    same = service.wait_for_log(SAME_PROCESS, same_before + len(statuses) - 2) - same_before
    shared = service.count(SHARED) - shared_before
    # The other worker refused it through the database (once: it then remembers it itself),
    # so both workers saw the token; without the shared cache that call would have passed.
    assert shared == 1, (shared, same)
    assert same + shared == len(statuses) - 1


def test_a_burst_of_one_token_across_workers_passes_once(two_workers: Service) -> None:
    service = two_workers
    token = service.issuer.token_for(f"{service.url}/cds-services")
    start = threading.Barrier(20)
    statuses: list[int | BaseException] = []

    def fire() -> None:
        start.wait()
        try:
            statuses.append(send(service, token))
        except BaseException as exc:  # asserted below
            statuses.append(exc)

    threads = [threading.Thread(target=fire) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(statuses, key=str) == [200] + [401] * 19  # type: ignore[arg-type]
    assert service.process.poll() is None
