"""The floor: the least a CDS service can do per call, under our exact gunicorn configuration.

It reads and parses the same request JSON, with the same parser as the service (orjson: a
floor on the stdlib parser would flatter the ratio), and answers ``{"cards": []}``. Whatever
the real service costs above this is ours; below it nothing can go. Run:
``python -m bench.floor_app`` (binds ``CDS_HOST:CDS_PORT`` through ``run_wsgi_app``, the same
gunicorn options and process settings as ``cds-service serve``).
"""

from __future__ import annotations

import orjson
from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue

from cds_service.server import run_wsgi_app
from cds_service.settings import Settings

app = Flask(__name__)


@app.post("/cds-services/<service_id>")
def call_service(service_id: str) -> ResponseReturnValue:
    orjson.loads(request.get_data(cache=False))
    return jsonify({"cards": []})


@app.get("/healthz")
def healthz() -> ResponseReturnValue:
    return jsonify({"status": "ok"})


def main() -> None:
    run_wsgi_app(app, Settings.from_env())  # exactly how `cds-service serve` runs ours


if __name__ == "__main__":
    main()
