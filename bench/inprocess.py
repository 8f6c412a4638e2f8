"""In-process latency: the real app (``create_app``) driven through Flask's test client.

Stage timings come from what the service itself records in ``flask.g.timings_ms`` (parse and
validation in the blueprint, context/rules/cards from ``PipelineResult``, record = the
feedback store); the benchmark only reads them back with an ``after_request`` hook of its own.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from flask import Flask, Response, g

from bench.workloads import BodyTemplate, Workload
from cds_service import server
from cds_service.app import create_app
from cds_service.settings import Settings

STAGES = ("parse", "validation", "context", "rules", "cards", "record")
JWT_ISSUER = "https://ehr.bench.invalid"
JWT_KID = "bench-es256"
TIMINGS_EXTENSION = "bench_timings"
# Every run in this process gets its own hookInstances, as a new EHR call would.
_RUNS = itertools.count(1)


@dataclass
class InProcessResult:
    workload: str
    variant: str
    body_bytes: int
    latencies_ms: list[float] = field(default_factory=list)
    # CPU time of the calling thread: what the call cost, without the time spent waiting for
    # a CPU that other processes held (the machine is shared); FHIR fetch threads not included.
    cpu_ms: list[float] = field(default_factory=list)
    stages_ms: dict[str, list[float]] = field(default_factory=dict)
    statuses: Counter[int] = field(default_factory=Counter)
    rule_ids: tuple[str, ...] = ()
    data_issues: int = 0


@functools.cache
def _devnull() -> TextIO:
    return open(os.devnull, "w")  # lives as long as the process


def silence_service_logs() -> None:
    """Keep the JSON request log (INFO, as in production: it is formatted and written) off the
    terminal: the handler ``configure_logging`` installed writes to /dev/null instead."""
    for handler in logging.getLogger().handlers:
        if getattr(handler, "_cds_handler", False) and isinstance(handler, logging.StreamHandler):
            handler.setStream(_devnull())


def make_app(workdir: Path, name: str, *, process_wide: bool = True, **overrides: Any) -> Flask:
    """The service as production builds it, auth off unless overridden, SQLite in ``workdir``.

    ``process_wide``: also apply the process settings ``cds-service serve`` applies (garbage
    collector) and send the service's logs to /dev/null; off inside a test session.
    """
    values: dict[str, Any] = {
        "auth": "off",
        "database_url": f"sqlite:///{workdir / f'{name}.sqlite3'}",
        "fhir_server_allowlist": "*",  # the benchmark's own fixture servers
        **overrides,
    }
    settings = Settings(**values)
    if not process_wide:
        app = create_app(settings)
    else:
        with contextlib.redirect_stderr(_devnull()):  # start-up logs (migrations, auth)
            app = create_app(settings)
        silence_service_logs()
        server.tune_gc()
    # Registered before the first request (Flask refuses set-up after it).
    timings: list[dict[str, float]] = []
    app.extensions[TIMINGS_EXTENSION] = timings

    @app.after_request
    def _keep_timings(response: Response) -> Response:
        timings.append(dict(g.get("timings_ms") or {}))
        return response

    return app


def rule_ids_of(response_json: dict[str, Any]) -> tuple[str, ...]:
    return tuple(
        card.get("extension", {}).get("org.magnesium-cds", {}).get("ruleId", "?")
        for card in response_json.get("cards", [])
    )


def run(
    app: Flask,
    workload: Workload,
    iterations: int,
    warmup: int,
    *,
    fhir_server: str | None = None,
    variant: str = "",
    headers: Iterator[dict[str, str]] | None = None,
    template: BodyTemplate | None = None,
) -> InProcessResult:
    """POST the workload ``warmup + iterations`` times, each with a new hookInstance."""
    template = template or BodyTemplate(workload.request, fhir_server)
    path = f"/cds-services/{workload.service_id}"
    timings: list[dict[str, float]] = app.extensions[TIMINGS_EXTENSION]
    client = app.test_client()
    result = InProcessResult(workload.name, variant, template.size)
    base = next(_RUNS) * 10**7
    for index in range(warmup + iterations):
        body = template.render(base + index)  # outside the timed window: the client's work
        extra = next(headers) if headers is not None else {}
        timings.clear()
        cpu_started = time.thread_time()
        started = time.perf_counter()
        response = client.post(path, data=body, content_type="application/json", headers=extra)
        elapsed = (time.perf_counter() - started) * 1000
        cpu = (time.thread_time() - cpu_started) * 1000
        if index == 0:
            answer = response.get_json(silent=True) or {}
            result.rule_ids = rule_ids_of(answer)
            issues = answer.get("extension", {}).get("org.magnesium-cds", {}).get("dataIssues")
            result.data_issues = len(issues or [])
        if index < warmup:
            continue
        result.statuses[response.status_code] += 1
        result.latencies_ms.append(elapsed)
        result.cpu_ms.append(cpu)
        stages = timings[-1] if timings else {}
        for stage in STAGES:
            if stage in stages:
                result.stages_ms.setdefault(stage, []).append(stages[stage])
        # What the stages do not cover: Flask/werkzeug, test client, logging, JSON response.
        covered = stages.get("total")
        if covered is not None:
            result.stages_ms.setdefault("other", []).append(elapsed - covered)
    return result


# ------------------------------------------------------------------------ optional: real JWTs


@dataclass
class JwtIssuer:
    """A trusted issuer with an inline ES256 key: what a production EHR's JWT costs us."""

    key: ec.EllipticCurvePrivateKey
    issuers_file: Path

    @classmethod
    def create(cls, workdir: Path) -> JwtIssuer:
        key = ec.generate_private_key(ec.SECP256R1())
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
        jwk.update({"kid": JWT_KID, "use": "sig", "alg": "ES256"})
        document = {
            "issuers": [
                {
                    "iss": JWT_ISSUER,
                    "description": "benchmark issuer (key generated per run)",
                    "jwks": {"keys": [jwk]},
                }
            ]
        }
        path = workdir / "trusted-issuers.bench.json"
        path.write_text(json.dumps(document), encoding="utf-8")
        return cls(key, path)

    def headers(self, audience: str, count: int) -> Iterator[dict[str, str]]:
        """Pre-signed tokens (signing is the EHR's cost, not ours), one jti each."""
        now = int(time.time())
        tokens = [
            jwt.encode(
                {
                    "iss": JWT_ISSUER,
                    "aud": audience,
                    "exp": now + 600,
                    "iat": now,
                    "jti": str(uuid.uuid4()),
                },
                self.key,
                algorithm="ES256",
                headers={"kid": JWT_KID, "typ": "JWT"},
            )
            for _ in range(count)
        ]
        return iter([{"Authorization": f"Bearer {token}"} for token in tokens])
