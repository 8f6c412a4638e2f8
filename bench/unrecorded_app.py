"""Diagnostic only, never a production setting: the service without request log or card records.

The floor (``bench/floor_app.py``) neither writes a request log line nor records the cards it
issues; the service does both on every call (the operations log, and the issued-card rows the
feedback endpoint and ``cds-service report`` rely on). This is ``cds-service serve``'s app with
those two switched off, so that ``python -m bench --diagnose`` shows, in the same alternating
rounds, how much of the gap to the floor those two are (the rest: validation, the clinical
work, the bigger answer).
Run: ``python -m bench.unrecorded_app`` (binds ``CDS_HOST:CDS_PORT`` like the floor).
"""

from __future__ import annotations

import logging

from flask import Flask

from cds_service.app import create_app
from cds_service.logging_setup import REQUEST_LOGGER
from cds_service.protocol.blueprint import CARD_RECORDER_EXTENSION
from cds_service.server import run_wsgi_app
from cds_service.settings import Settings


def build_app(settings: Settings) -> Flask:
    app = create_app(settings)
    # The blueprint records only when a recorder is installed; the request log only at INFO.
    app.extensions.pop(CARD_RECORDER_EXTENSION)
    logging.getLogger(REQUEST_LOGGER).setLevel(logging.WARNING)
    return app


def main() -> None:
    settings = Settings.from_env()
    run_wsgi_app(build_app(settings), settings)


if __name__ == "__main__":
    main()
