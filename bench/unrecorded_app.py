"""Diagnostic only, never a production setting: the service without request log, card records
or both.

The floor (``bench/floor_app.py``) neither writes a request log line nor records the cards it
issues; the service does both on every call (the operations log, and the issued-card rows the
feedback endpoint and ``cds-service report`` rely on). This is ``cds-service serve``'s app with
one or both of those switched off, so that ``python -m bench --diagnose`` shows, in the same
alternating rounds, how much of the gap to the floor each is (the rest: validation, the
clinical work, the bigger answer).
Run: ``python -m bench.unrecorded_app [log] [cards]`` (what to skip; both when none is named;
binds ``CDS_HOST:CDS_PORT`` like the floor).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Collection

from flask import Flask

from cds_service.app import create_app
from cds_service.logging_setup import REQUEST_LOGGER
from cds_service.protocol.blueprint import CARD_RECORDER_EXTENSION
from cds_service.server import run_wsgi_app
from cds_service.settings import Settings

SKIPPABLE = ("log", "cards")


def build_app(settings: Settings, skip: Collection[str] = SKIPPABLE) -> Flask:
    unknown = set(skip) - set(SKIPPABLE)
    if unknown or not skip:
        raise ValueError(f"skip one or more of {SKIPPABLE}, not {sorted(skip)}")
    app = create_app(settings)
    # The blueprint records only when a recorder is installed; the request log only at INFO.
    if "cards" in skip:
        app.extensions.pop(CARD_RECORDER_EXTENSION)
    if "log" in skip:
        logging.getLogger(REQUEST_LOGGER).setLevel(logging.WARNING)
    return app


def parse_skip(argv: list[str] | None = None) -> tuple[str, ...]:
    """What the command line says to skip; exits with a usage error for anything else."""
    parser = argparse.ArgumentParser(prog="python -m bench.unrecorded_app")
    # No `choices`: with nargs="*" Python 3.11 checks an empty list against them and fails.
    parser.add_argument("skip", nargs="*", help=f"any of {', '.join(SKIPPABLE)} (default: all)")
    skip = tuple(parser.parse_args(argv).skip) or SKIPPABLE
    unknown = sorted(set(skip) - set(SKIPPABLE))
    if unknown:
        parser.error(f"cannot skip {', '.join(unknown)}: choose from {', '.join(SKIPPABLE)}")
    return skip


def main(argv: list[str] | None = None) -> None:
    skip = parse_skip(argv)
    settings = Settings.from_env()
    run_wsgi_app(build_app(settings, skip), settings)


if __name__ == "__main__":
    main()
