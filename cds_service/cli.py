"""``cds-service``: serve, fixture-server, evaluate, knowledge, report."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cds_service.settings import Settings, SettingsError

if TYPE_CHECKING:
    from cds_service.protocol.errors import ApiError

EXIT_INVALID = 2
EXIT_DATA_UNAVAILABLE = 3


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"cds-service: {exc}", file=sys.stderr)
        return EXIT_INVALID
    try:
        return int(args.handler(args, settings) or 0)
    except SettingsError as exc:
        # Found at start-up (trusted issuers, aud base URLs): one line naming it, no traceback.
        print(f"cds-service: {exc}", file=sys.stderr)
        return EXIT_INVALID


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cds-service",
        description="magnesium-cds: a CDS Hooks 2.0 service for magnesium safety.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the CDS service under gunicorn (foreground)")
    serve.add_argument("--host", help="interface to bind (CDS_HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (CDS_PORT)")
    serve.add_argument("--workers", type=int, help="gunicorn workers (CDS_WORKERS)")
    serve.add_argument("--threads", type=int, help="threads per worker (CDS_THREADS)")
    serve.set_defaults(handler=_serve)

    fixture = commands.add_parser(
        "fixture-server", help="run the local fixture FHIR server (foreground)"
    )
    fixture.add_argument("--host", help="interface to bind (CDS_FIXTURE_SERVER_HOST)")
    fixture.add_argument("--port", type=int, help="port to listen on (CDS_FIXTURE_SERVER_PORT)")
    fixture.set_defaults(handler=_fixture_server)

    demo = commands.add_parser(
        "demo", help="run the fixture FHIR server and the CDS service together (foreground)"
    )
    demo.set_defaults(handler=_demo)

    evaluate = commands.add_parser("evaluate", help="print the cards a hook request file would get")
    evaluate.add_argument("request", type=Path, help="a CDS Hooks request JSON file")
    evaluate.add_argument("--fhir-server", help="FHIR base URL to fetch what is not prefetched")
    evaluate.add_argument(
        "--service", help="service id (default: the service for the request's hook)"
    )
    evaluate.set_defaults(handler=_evaluate)

    knowledge = commands.add_parser(
        "knowledge", help="list the loaded rules, value sets and versions"
    )
    knowledge.set_defaults(handler=_knowledge)

    report = commands.add_parser(
        "report", help="feedback report: cards shown, accepted and overridden, per rule and service"
    )
    report.add_argument(
        "--since", type=_iso_date, help="only cards issued on or after YYYY-MM-DD (UTC)"
    )
    report.add_argument("--format", choices=("text", "json", "html"), default="text")
    report.add_argument("--output", type=Path, help="write to FILE instead of standard output")
    report.set_defaults(handler=_report)
    return parser


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from cds_service.server import run_gunicorn

    settings = settings.with_overrides(
        host=args.host, port=args.port, workers=args.workers, threads=args.threads
    )
    run_gunicorn(settings)
    return 0


def _fixture_server(args: argparse.Namespace, settings: Settings) -> int:
    from cds_service.fixture_server import run_fixture_server

    run_fixture_server(
        settings,
        args.host or settings.fixture_server_host,
        args.port or settings.fixture_server_port,
    )
    return 0


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    import os
    import threading

    from cds_service.fixture_server import run_fixture_server
    from cds_service.server import run_gunicorn

    if "CDS_AUTH" not in os.environ:
        # The demo serves synthetic patients on this machine: without JWTs, so that curl and
        # the public sandbox work out of the box. Saying CDS_AUTH=on keeps authentication.
        settings = settings.with_overrides(auth="off")
    fixture_url = f"http://{settings.fixture_server_host}:{settings.fixture_server_port}"
    # The one FHIR server the demo fetches from: its own fixture server (plus any origins the
    # environment already allows).
    settings = settings.with_overrides(
        fhir_server_allowlist=_allow_origin(settings.fhir_server_allowlist, fixture_url)
    )
    threading.Thread(
        target=run_fixture_server,
        args=(settings, settings.fixture_server_host, settings.fixture_server_port),
        name="fixture-fhir-server",
        daemon=True,
    ).start()
    print(
        f"CDS service:         http://{settings.host}:{settings.port}/cds-services"
        f" (authentication {settings.auth})\n"
        f"Fixture FHIR server: {fixture_url} (patients: see fixtures/README.md; the only "
        "fhirServer the demo fetches from)",
        file=sys.stderr,
        flush=True,
    )
    run_gunicorn(settings)
    return 0


def _allow_origin(allowlist: str, url: str) -> str:
    """``CDS_FHIR_SERVER_ALLOWLIST`` with ``url``'s origin added (unchanged when ``url`` is not
    one the service can use: fetching from it is then refused, saying why)."""
    from cds_service.context.fhir_origin import UnsafeUrl, origin_of

    try:
        origin = str(origin_of(url))
    except UnsafeUrl:
        return allowlist
    return ",".join(part for part in (allowlist.strip(), origin) if part)


def _evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from cds_service.context.builder import default_client_factory
    from cds_service.context.model import DataUnavailable
    from cds_service.knowledge import default_knowledge, load_knowledge
    from cds_service.pipeline import HookPipeline
    from cds_service.protocol.errors import ApiError
    from cds_service.protocol.guidance import configured_base_url
    from cds_service.protocol.hook_request import HookRequest
    from cds_service.protocol.services import SERVICES, SERVICES_BY_ID
    from cds_service.protocol.validation import check_hook, parse_json_bytes, validate_or_400

    if args.service and args.service not in SERVICES_BY_ID:
        print(f"cds-service: unknown service {args.service!r}", file=sys.stderr)
        return EXIT_INVALID
    try:
        raw = args.request.read_bytes()
    except OSError as exc:
        print(f"cds-service: cannot read {args.request}: {exc.strerror}", file=sys.stderr)
        return EXIT_INVALID
    # The same parsing, schema and hook check as POST /cds-services/{id}: a file is refused
    # exactly when that body would get 400 over HTTP, with the same messages.
    try:
        body: Any = parse_json_bytes(raw)
        if isinstance(body, dict) and args.fhir_server:
            body["fhirServer"] = args.fhir_server
        validate_or_400(body, "hook-request.schema.json", "hook request")
        service = (
            SERVICES_BY_ID[args.service]
            if args.service
            else next((s for s in SERVICES if s.hook == body["hook"]), None)
        )
        if service is None:
            print(f"cds-service: no service answers the {body['hook']!r} hook", file=sys.stderr)
            return EXIT_INVALID
        check_hook(service, body)
    except ApiError as exc:
        _print_api_error(args.request, exc)
        return EXIT_INVALID
    knowledge = (
        load_knowledge(settings.knowledge_path) if settings.knowledge_path else default_knowledge()
    )
    if args.fhir_server:  # named on the command line: allowed on purpose
        settings = settings.with_overrides(
            fhir_server_allowlist=_allow_origin(settings.fhir_server_allowlist, args.fhir_server)
        )
    pipeline = HookPipeline(knowledge, default_client_factory(settings))
    try:
        result = pipeline.run(service, HookRequest.from_json(body), configured_base_url(settings))
    except DataUnavailable as exc:
        for missing in exc.missing:
            print(f"required data unavailable: {missing.key}: {missing.reason}", file=sys.stderr)
        return EXIT_DATA_UNAVAILABLE
    _print_json(result.response)
    return 0


def _print_json(value: Any) -> None:
    """UTF-8 JSON on stdout whatever the locale, as the HTTP answer is: "§ 4 — ..." reads as
    written, not as \\u escapes. The one thing UTF-8 cannot hold, a lone surrogate (the
    stdlib parser accepts one in a draft order, and an update suggestion copies it back), is
    written as its JSON escape (\\udc80), which means the same character."""
    text = json.dumps(value, indent=2, ensure_ascii=False) + "\n"
    binary = getattr(sys.stdout, "buffer", None)
    if binary is None:  # stdout replaced by a text-only stream (an embedding caller)
        sys.stdout.write(text)
        return
    sys.stdout.flush()
    binary.write(text.encode("utf-8", "backslashreplace"))
    binary.flush()


def _print_api_error(source: Path, exc: ApiError) -> None:
    """An ApiError as HTTP would give it (code, message, each problem's path), on stderr."""
    print(f"cds-service: {source}: {exc.message} ({exc.error})", file=sys.stderr)
    for item in exc.problems:
        print(f"invalid request: {item['path']}: {item['message']}", file=sys.stderr)


def _knowledge(args: argparse.Namespace, settings: Settings) -> int:
    from cds_service.knowledge import default_knowledge, load_knowledge

    knowledge = (
        load_knowledge(settings.knowledge_path) if settings.knowledge_path else default_knowledge()
    )
    print(knowledge.describe())
    return 0


def _iso_date(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a date like 2025-01-31") from None


def _report(args: argparse.Namespace, settings: Settings) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from cds_service.store.report import build_report, render
    from cds_service.store.store import FeedbackStore, check_reportable

    problem = check_reportable(settings.database_url)
    if problem:
        print(f"cds-service: {problem}", file=sys.stderr)
        return EXIT_INVALID
    store = FeedbackStore.open(settings.database_url, migrate_schema=False)
    try:
        rule_titles, reason_names = _catalogue_names(settings)
        report = build_report(
            store.engine, args.since, rule_titles=rule_titles, reason_names=reason_names
        )
    except SQLAlchemyError as exc:
        print(f"cds-service: cannot read {store.url}: {type(exc).__name__}", file=sys.stderr)
        return EXIT_INVALID
    finally:
        store.close()
    text = render(report, args.format)
    if args.output:
        args.output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def _catalogue_names(
    settings: Settings,
) -> tuple[dict[str, str], dict[tuple[str, str], str]]:
    """Rule titles and override-reason displays from the knowledge, for a readable report."""
    from cds_service.knowledge import default_knowledge, load_knowledge

    knowledge = (
        load_knowledge(settings.knowledge_path) if settings.knowledge_path else default_knowledge()
    )
    rules = [knowledge.rule(rule_id) for rule_id in knowledge.rule_ids]
    rule_titles = {rule.id: rule.title for rule in rules}
    reason_names = {
        (reason.system, reason.code): reason.display
        for rule in rules
        for reason in rule.override_reasons
        if reason.display
    }
    return rule_titles, reason_names


if __name__ == "__main__":
    raise SystemExit(main())
