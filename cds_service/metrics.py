"""Prometheus metrics, served at ``GET /metrics`` in the text exposition format.

Under ``cds-service serve`` every gunicorn worker is a process with its own counters: ``serve``
points ``PROMETHEUS_MULTIPROC_DIR`` at a directory of its own before anything imports
prometheus_client, each process writes its values there, and ``/metrics`` (whichever worker
answers) adds them up. Without that variable (tests, an embedding caller) the process's own
registry is served. Labels never carry request data: a service id outside the catalogue is
``unknown``, and no patient, user or token ever becomes a label.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from typing import Any, Protocol

from flask import Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# prometheus_client chose single- or multi-process values when it was imported, from this.
MULTIPROCESS = bool(os.environ.get(MULTIPROC_ENV))

SERVICE_CALLS = Counter(
    "cds_service_calls_total",
    "CDS Hooks service calls answered, by service id and HTTP status.",
    ["service", "status"],
)
SERVICE_CALL_SECONDS = Histogram(
    "cds_service_call_seconds",
    "Time from the request reaching the application to its answer, per service call.",
    ["service"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
FEEDBACK_REQUESTS = Counter(
    "cds_feedback_requests_total", "Feedback requests answered, by HTTP status.", ["status"]
)
CARDS_ISSUED = Counter(
    "cds_cards_total", "Cards returned by service calls, by rule and indicator.",
    ["rule", "indicator"],
)
FHIR_FETCH_FAILURES = Counter(
    "cds_fhir_fetch_failures_total",
    "FHIR reads that gave nothing usable (or a Bundle cut short), by kind: http (the server "
    "answered an error status), failed (no usable answer: unreachable, timeout, not FHIR, an "
    "OperationOutcome) or incomplete (a next page not read).",
    ["kind"],
)
REPLAY_SHARED_CACHE_UNAVAILABLE = Counter(
    "cds_replay_shared_cache_unavailable_total",
    "JWTs accepted on the per-process replay cache alone because the shared (database) one "
    "could not answer.",
)
REPLAY_SHARED_CACHE_DEGRADED = Gauge(
    "cds_replay_shared_cache_degraded",
    "1 while a process's last shared replay check failed (replay protection is per process).",
    multiprocess_mode="max",
)
CARD_WRITER_QUEUE = Gauge(
    "cds_card_writer_queue_cards",
    "Issued cards waiting to be written to the database, summed over the live processes.",
    multiprocess_mode="livesum",
)
CARD_WRITER_DROPPED = Counter(
    "cds_card_writer_dropped_cards_total",
    "Issued cards never recorded: the queue was full while the database was unavailable.",
)


# The labelled children, looked up once per label set (labels() costs more than inc()); every
# label set is bounded: known service ids, HTTP statuses, the knowledge's rules.
call_counter = lru_cache(maxsize=512)(SERVICE_CALLS.labels)
call_timer = lru_cache(maxsize=64)(SERVICE_CALL_SECONDS.labels)
card_counter = lru_cache(maxsize=512)(CARDS_ISSUED.labels)


def metrics_text() -> bytes:
    if MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return bytes(generate_latest(registry))
    return bytes(generate_latest(REGISTRY))


def install_metrics(app: Flask, service_ids: Iterable[str]) -> None:
    """Count service calls and feedback by status (401s included: hooks run before
    authentication), time service calls, and serve ``GET /metrics``."""
    known = frozenset(service_ids)

    @app.before_request
    def _start_clock() -> None:
        g.metrics_started = time.perf_counter()

    @app.after_request
    def _count(response: Response) -> Response:
        endpoint = request.endpoint
        if endpoint == "cds_hooks.call_service":
            service = (request.view_args or {}).get("service_id")
            label = service if service in known else "unknown"
            call_counter(label, str(response.status_code)).inc()
            started = g.get("metrics_started")
            if started is not None:
                call_timer(label).observe(time.perf_counter() - started)
        elif endpoint == "cds_feedback.post_feedback":
            FEEDBACK_REQUESTS.labels(str(response.status_code)).inc()
        return response

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(metrics_text(), mimetype=None, content_type=CONTENT_TYPE_LATEST)


class _FetchResult(Protocol):
    problem: str | None
    status: int | None
    incomplete: str | None


def count_fetch_failures(results: Mapping[str, _FetchResult]) -> None:
    for result in results.values():
        if result.problem is not None:
            FHIR_FETCH_FAILURES.labels("http" if result.status else "failed").inc()
        elif result.incomplete is not None:
            FHIR_FETCH_FAILURES.labels("incomplete").inc()


def counting_fetch_failures(make_client: Callable[..., Any]) -> Callable[..., Any]:
    """A FHIR client factory whose clients count their failed reads (the context layer
    reports them to the caller as data issues or 412; this counts them for the operator)."""

    def make(*args: Any, **kwargs: Any) -> Any:
        client = make_client(*args, **kwargs)
        fetch_all = client.fetch_all

        def counted_fetch_all(*a: Any, **kw: Any) -> Any:
            results = fetch_all(*a, **kw)
            count_fetch_failures(results)
            return results

        client.fetch_all = counted_fetch_all
        return client

    return make


def worker_exited(pid: int) -> None:
    """gunicorn's ``child_exit``: a dead worker's live gauges stop counting."""
    if MULTIPROCESS:
        multiprocess.mark_process_dead(pid)
