"""Shared pytest fixtures. Keep each fixture documented; group them by the layer they serve."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from auth_support import JwksServer, JwtIssuer, serve_jwks_server, write_trusted_issuers
from flask import Flask

from cds_service.app import create_app
from cds_service.fixture_server import create_fixture_app, serve_in_background
from cds_service.pipeline import HookPipeline
from cds_service.protocol.blueprint import PIPELINE_EXTENSION
from cds_service.settings import Settings

# --- fixture FHIR server -------------------------------------------------------------------


@pytest.fixture(scope="session")
def fixture_fhir_app() -> Flask:
    """The fixture FHIR server app over the bundled patients (no delay).

    ``fixture_state(app).seen_requests`` records what clients sent (method, path, query,
    headers of interest); it is shared by the whole session, so look for your own request.
    """
    # Plain Settings(), not from_env(): a CDS_FIXTURE_SERVER_DELAY_MS in the environment
    # must not slow the test suite down.
    return create_fixture_app(Settings())


@pytest.fixture(scope="session")
def fixture_fhir_server(fixture_fhir_app: Flask) -> Iterator[str]:
    """Base URL (``http://127.0.0.1:<port>``) of the fixture FHIR server on a real socket."""
    with serve_in_background(fixture_fhir_app) as base_url:
        yield base_url


# --- authentication (JWTs signed with keys made in the test; JWKS over real HTTP) -----------


@pytest.fixture(scope="session")
def jwks_server() -> Iterator[JwksServer]:
    """A real HTTP server on 127.0.0.1 serving JWK Sets; see ``tests/auth_support.py``."""
    yield from serve_jwks_server()


@pytest.fixture
def jwt_issuer(jwks_server: JwksServer) -> JwtIssuer:
    """A fresh trusted EHR (own iss and JWKS URL) with an EC P-384 and an RSA 2048 key.

    ``jwt_issuer.token_for(url, **claims)`` signs a valid CDS Hooks JWT for a call to
    ``url``; ``jwt_issuer.auth(url)`` gives the ``Authorization`` header for it.
    """
    return JwtIssuer(jwks_server)


AppFactory = Callable[..., Flask]


@pytest.fixture
def auth_app_factory(jwt_issuer: JwtIssuer, tmp_path: Path) -> AppFactory:
    """``make(**settings) -> Flask``: create_app with auth ON, trusting ``jwt_issuer`` only.

    Keyword arguments override Settings fields; ``issuers=[entry, ...]`` replaces the
    trusted-issuers file's entries; ``create_app_kwargs={...}`` passes through (e.g.
    ``client_factory``). Each app gets its own SQLite file. Its ``external_base_url`` is
    ``http://localhost`` (what the test client calls), so sign tokens for
    ``http://localhost/...``; the default (the bind address) would not match the test client.
    """
    from cds_service.app import create_app

    counter = iter(range(1_000_000))

    def make(
        *,
        issuers: list[dict[str, Any]] | None = None,
        create_app_kwargs: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> Flask:
        n = next(counter)
        trusted = write_trusted_issuers(
            tmp_path / f"trusted-issuers-{n}.json",
            *(issuers if issuers is not None else [jwt_issuer.issuer_entry()]),
        )
        values: dict[str, Any] = {
            "auth": "on",
            "trusted_issuers_file": str(trusted),
            "database_url": f"sqlite:///{tmp_path / f'auth-{n}.sqlite3'}",
            "external_base_url": "http://localhost",
        }
        values.update(overrides)
        return create_app(Settings(**values), **(create_app_kwargs or {}))

    return make


# --- feedback store (SQLite always; PostgreSQL when one is running or can be started) --------

START_TEST_POSTGRES = Path(__file__).resolve().parent.parent / "scripts" / "start-test-postgres.sh"


@pytest.fixture(scope="session")
def postgres_server_url() -> str:
    """SQLAlchemy URL of a PostgreSQL server for the store tests (a superuser's database).

    ``CDS_TEST_POSTGRES_URL`` when set (``.ci/run`` sets it); otherwise
    ``scripts/start-test-postgres.sh`` starts a throw-away cluster. Skips, saying why, only
    when neither gives a server.
    """
    import os
    import subprocess

    url = os.environ.get("CDS_TEST_POSTGRES_URL")
    if url:
        return url
    try:
        result = subprocess.run(
            ["bash", str(START_TEST_POSTGRES)], capture_output=True, text=True, timeout=240,
            stdin=subprocess.DEVNULL, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"no PostgreSQL for the store tests: {START_TEST_POSTGRES.name} failed ({exc})")
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        why = (result.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"no PostgreSQL for the store tests: {START_TEST_POSTGRES.name}: {why}")
    return lines[-1]


@pytest.fixture
def postgres_url(postgres_server_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database for one test, dropped afterwards."""
    import uuid

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"cds_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(postgres_server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database for the feedback store, once per backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.sqlite3'}"
    return str(request.getfixturevalue("postgres_url"))


# --- the CDS service ------------------------------------------------------------------------

# The day the request fixtures describe (fixtures/scenarios.json "today"): lab recency and
# ages are judged as on that day, so the fixtures do not drift as the calendar moves on.
FIXTURES_TODAY = date.fromisoformat(
    json.loads((Path(__file__).resolve().parent.parent / "fixtures" / "scenarios.json")
               .read_text(encoding="utf-8"))["today"]
)


@pytest.fixture(scope="session")
def cds_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of the CDS service on a real socket: auth off, fresh SQLite, clock pinned.

    It may fetch from any fhirServer (``CDS_FHIR_SERVER_ALLOWLIST=*``): the tests' FHIR servers
    listen on ports chosen at random. ``tests/test_fhir_allowlist.py`` tests the allowlist.
    """
    database = tmp_path_factory.mktemp("cds-db") / "cds.sqlite3"
    app = create_app(
        Settings(
            auth="off",
            database_url=f"sqlite:///{database}",
            fhir_read_timeout=5,
            fhir_server_allowlist="*",
        )
    )
    pipeline: HookPipeline = app.extensions[PIPELINE_EXTENSION]
    pipeline.clock = lambda: FIXTURES_TODAY
    with serve_in_background(app) as url:
        yield url
