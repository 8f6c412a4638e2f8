"""The floor: the least a CDS service can do per call, served exactly as ``cds-service serve``
serves ours (``run_wsgi_app``: same gunicorn options and process settings, on CDS_HOST:CDS_PORT).
It parses the request with the service's parser (orjson: the stdlib's would flatter the ratio)
and answers ``{"cards": []}``: what the service costs above this is ours."""

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
