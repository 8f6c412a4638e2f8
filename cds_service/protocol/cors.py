"""CORS for browser-based CDS clients (the public sandbox runs in the browser).

Preflight ``OPTIONS`` under ``/cds-services`` is answered here, before authentication: it
carries no JWT by design. Every other ``/cds-services`` answer (401s included, so the page
can read them) gets ``Access-Control-Allow-Origin``.

``CDS_CORS_ALLOW_ORIGIN`` is ``*`` or a comma-separated list of origins; with a list, a
listed request ``Origin`` is echoed (with ``Vary: Origin``) and others get no CORS header.
"""

from __future__ import annotations

from flask import Flask, Response, request

from cds_service.settings import Settings

CORS_PREFIX = "/cds-services"
ALLOW_METHODS = "GET, POST, OPTIONS"
ALLOW_HEADERS = "Content-Type, Authorization"
MAX_AGE_SECONDS = "600"


def install_cors(app: Flask, settings: Settings) -> None:
    allowed = [origin.strip() for origin in settings.cors_allow_origin.split(",") if origin.strip()]
    wildcard = "*" in allowed

    def allow_origin() -> str | None:
        if wildcard:
            return "*"
        origin = request.headers.get("Origin")
        return origin if origin in allowed else None

    def add_origin(response: Response) -> Response:
        origin = allow_origin()
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
        if not wildcard:
            # The answer depends on the Origin header: keep caches from mixing them up.
            response.vary.add("Origin")
        return response

    @app.before_request
    def _preflight() -> Response | None:
        if request.method != "OPTIONS" or not request.path.startswith(CORS_PREFIX):
            return None
        response = Response(status=204)
        response.headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
        response.headers["Access-Control-Allow-Headers"] = ALLOW_HEADERS
        response.headers["Access-Control-Max-Age"] = MAX_AGE_SECONDS
        return response  # after_request adds the origin

    @app.after_request
    def _cors_headers(response: Response) -> Response:
        if request.path.startswith(CORS_PREFIX):
            add_origin(response)
        return response
