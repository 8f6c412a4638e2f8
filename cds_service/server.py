"""Production serving: gunicorn with workers and threads from settings.

``run_gunicorn`` is what ``cds-service serve`` (and so the Docker image) runs: one
configuration, whether started by hand, by a test or by a container.

Nothing imported at module level here may import prometheus_client (``cds_service.metrics``):
``run_gunicorn`` first gives the instance its metrics directory, and prometheus_client reads
it when it is imported.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from cds_service.http_worker import BodyErrorsAs400, BufferingThreadWorker
from cds_service.settings import Settings

# A header line may hold "Authorization: Bearer " and a token of the longest length the
# service reads (protocol.auth.MAX_TOKEN_CHARS, 16,384), so that a longer token gets the
# service's own 401 (gunicorn's default, 8,190 bytes, answered first); past this, gunicorn
# refuses the header (431, in JSON).
LIMIT_REQUEST_FIELD_SIZE = 16_384 + 1024
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def gunicorn_options(settings: Settings) -> dict[str, Any]:
    return {
        "bind": f"{settings.host}:{settings.port}",
        "workers": settings.workers,
        "threads": settings.threads,
        # gthread, reading each request whole in its event loop before a thread runs it: slow
        # clients hold a socket, not a thread (http_worker.py).
        "worker_class": BufferingThreadWorker,
        "timeout": settings.worker_timeout,
        "graceful_timeout": 10,
        "keepalive": 5,
        # Load knowledge once in the master, shared copy-on-write by the workers.
        "preload_app": True,
        # Our own JSON request log replaces gunicorn's access log (which would log query strings).
        "accesslog": None,
        "errorlog": "-",
        "loglevel": settings.log_level.lower(),
        # Bounds on what a client can make a worker hold before Flask sees the request.
        "limit_request_line": 8190,
        "limit_request_fields": 100,
        "limit_request_field_size": LIMIT_REQUEST_FIELD_SIZE,
        # gunicorn >= 24 opens a control socket at one path per user ($XDG_RUNTIME_DIR or
        # ~/.gunicorn/gunicorn.ctl): every instance on a host would share it, the last started
        # taking it over. Nothing here uses it; signals manage the master.
        "control_socket_disable": True,
        "child_exit": _worker_exited,
    }


def _worker_exited(server: Any, worker: Any) -> None:
    from cds_service.metrics import worker_exited

    worker_exited(worker.pid)


def prepare_metrics_dir() -> Callable[[], None]:
    """This instance's own directory for the workers' metric values (prometheus_client's
    multiprocess mode), or the operator's ``PROMETHEUS_MULTIPROC_DIR`` emptied of a previous
    run's values; returns the clean-up for the master's exit."""
    given = os.environ.get(METRICS_DIR_ENV)
    if given:
        directory = Path(given)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            stale.unlink()
        return lambda: None
    made = tempfile.mkdtemp(prefix="cds-service-metrics-")
    os.environ[METRICS_DIR_ENV] = made
    master = os.getpid()

    def remove() -> None:
        if os.getpid() == master:  # a worker leaves through the same frames: not there
            shutil.rmtree(made, ignore_errors=True)

    return remove


class GunicornApp(BaseApplication):
    def __init__(self, app: Flask, options: dict[str, Any]) -> None:
        self._app = app
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            if key in self.cfg.settings and value is not None:
                self.cfg.set(key, value)

    def load(self) -> Flask:
        return self._app


# A request parses its JSON into thousands of containers (a large chart: ~40,000 dicts and
# lists) that all live until the answer is sent. CPython's default threshold (700 allocations)
# then runs collection after collection mid-request, full ones included, each walking what the
# request holds: that doubled a large chart's latency (bench/). Reference counting frees
# request data, so the cycle collector runs every GC_THRESHOLD allocations instead.
GC_THRESHOLD = 50_000


def tune_gc() -> None:
    """Process settings for serving; call once, after start-up loading and before forking.

    Freezing what start-up loaded (knowledge, schemas, modules) keeps every later collection
    from walking it again, and keeps those pages shared copy-on-write with forked workers.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD)


def run_wsgi_app(app: Flask, settings: Settings) -> None:
    """Serve any Flask app with the production gunicorn configuration (the benchmark's floor
    uses it too, so both are measured under identical settings)."""
    tune_gc()  # preload_app: the workers fork from this process
    # Inherited by the workers gunicorn forks from here.
    BufferingThreadWorker.request_read_timeout = settings.request_read_timeout_seconds
    app.wsgi_app = BodyErrorsAs400(app.wsgi_app)  # type: ignore[method-assign]
    GunicornApp(app, gunicorn_options(settings)).run()


def run_gunicorn(settings: Settings) -> None:
    remove_metrics_dir = prepare_metrics_dir()  # before create_app imports prometheus_client
    try:
        from cds_service.app import create_app

        run_wsgi_app(create_app(settings), settings)
    finally:
        remove_metrics_dir()
