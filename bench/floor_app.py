"""The floor: the least a CDS service can do per call, under our exact gunicorn configuration.

It reads and parses the same request JSON and answers ``{"cards": []}``. Whatever the real
service costs above this is ours; below it nothing can go. Run: ``python -m bench.floor_app``
(binds ``CDS_HOST:CDS_PORT`` with ``gunicorn_options(Settings.from_env())`` and the same
process settings, ``tune_gc``, as ``cds-service serve``).
"""

from __future__ import annotations

import json
from typing import Any

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue
from gunicorn.app.base import BaseApplication

from cds_service.server import gunicorn_options, tune_gc
from cds_service.settings import Settings

app = Flask(__name__)


@app.post("/cds-services/<service_id>")
def call_service(service_id: str) -> ResponseReturnValue:
    json.loads(request.get_data(cache=False))
    return jsonify({"cards": []})


@app.get("/healthz")
def healthz() -> ResponseReturnValue:
    return jsonify({"status": "ok"})


class FloorServer(BaseApplication):  # type: ignore[misc]
    """Same loading as ``cds_service.server``: options set verbatim, the app preloaded."""

    def __init__(self, options: dict[str, Any]) -> None:
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            if key in self.cfg.settings and value is not None:
                self.cfg.set(key, value)

    def load(self) -> Flask:
        return app


def main() -> None:
    tune_gc()  # the same process settings as `cds-service serve`
    FloorServer(gunicorn_options(Settings.from_env())).run()


if __name__ == "__main__":
    main()
