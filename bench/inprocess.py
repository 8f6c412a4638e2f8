"""In process: the real app (``create_app``) driven through Flask's test client.

Stage timings are what the service itself records in ``flask.g.timings_ms`` (parse and
validation in the blueprint, context/rules/cards from the pipeline, record = queuing the issued
cards); the benchmark only reads them back with an ``after_request`` hook of its own.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from flask import Flask, Response, g

from bench.workloads import BodyTemplate, Workload
from cds_service import server
from cds_service.app import create_app
from cds_service.settings import Settings

STAGES = ("parse", "validation", "context", "rules", "cards", "record")
TIMINGS_EXTENSION = "bench_timings"
# Every run in this process gets its own hookInstances, as a new EHR call would.
_RUNS = itertools.count(1)


@dataclass
class InProcessResult:
    workload: str
    body_bytes: int
    latencies_ms: list[float] = field(default_factory=list)
    # CPU time of the calling thread: the call's cost without the time spent waiting for a CPU
    # other processes held (the machine is shared); background threads are not in it.
    cpu_ms: list[float] = field(default_factory=list)
    stages_ms: dict[str, list[float]] = field(default_factory=dict)
    statuses: Counter[int] = field(default_factory=Counter)
    rule_ids: tuple[str, ...] = ()


@functools.cache
def _devnull() -> TextIO:
    return open(os.devnull, "w")  # lives as long as the process


def make_app(workdir: Path, name: str, *, process_wide: bool = True, **overrides: Any) -> Flask:
    """The service as production builds it, auth off, SQLite in ``workdir``.

    ``process_wide``: also apply the process settings ``cds-service serve`` applies (garbage
    collector) and send the service's logs (formatted and written, as in production) to
    /dev/null; off inside a test session.
    """
    settings = Settings(
        **{
            "auth": "off",
            "database_url": f"sqlite:///{workdir / f'{name}.sqlite3'}",
            "fhir_server_allowlist": "*",  # the benchmark's own fixture servers
            **overrides,
        }
    )
    if not process_wide:
        app = create_app(settings)
    else:
        with contextlib.redirect_stderr(_devnull()):  # start-up logs (migrations, auth)
            app = create_app(settings)
        for handler in logging.getLogger().handlers:
            if getattr(handler, "_cds_handler", False) and isinstance(
                handler, logging.StreamHandler
            ):
                handler.setStream(_devnull())
        server.tune_gc()
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
) -> InProcessResult:
    """POST the workload ``warmup + iterations`` times, each with a new hookInstance."""
    template = BodyTemplate(workload.request, fhir_server)
    path = f"/cds-services/{workload.service_id}"
    timings: list[dict[str, float]] = app.extensions[TIMINGS_EXTENSION]
    client = app.test_client()
    result = InProcessResult(workload.name, template.size)
    base = next(_RUNS) * 10**7
    for index in range(warmup + iterations):
        body = template.render(base + index)  # outside the timed window: the client's work
        timings.clear()
        cpu_started = time.thread_time()
        started = time.perf_counter()
        response = client.post(path, data=body, content_type="application/json")
        elapsed = (time.perf_counter() - started) * 1000
        cpu = (time.thread_time() - cpu_started) * 1000
        if index == 0:
            result.rule_ids = rule_ids_of(response.get_json(silent=True) or {})
        if index < warmup:
            continue
        result.statuses[response.status_code] += 1
        result.latencies_ms.append(elapsed)
        result.cpu_ms.append(cpu)
        stages = timings[-1] if timings else {}
        for stage in STAGES:
            if stage in stages:
                result.stages_ms.setdefault(stage, []).append(stages[stage])
        # What the stages do not cover: Flask/werkzeug, test client, request line, answer.
        if "total" in stages:
            result.stages_ms.setdefault("other", []).append(elapsed - stages["total"])
    return result
