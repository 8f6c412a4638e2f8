"""create_app(settings): the only place that wires the layers together."""

from __future__ import annotations

import logging
from collections.abc import Callable

from flask import Flask, jsonify
from flask.json.provider import DefaultJSONProvider
from flask.typing import ResponseReturnValue

from cds_service.context.builder import ClientFactory, default_client_factory
from cds_service.context.rxnav import client_from_settings
from cds_service.fhir_models import preload_models
from cds_service.knowledge import Knowledge, default_knowledge, load_knowledge
from cds_service.logging_setup import configure_logging, install_request_logging
from cds_service.metrics import counting_fetch_failures, install_metrics
from cds_service.pipeline import HookPipeline
from cds_service.protocol.auth import install_auth, issuer_fhir_servers, shared_replay_guard
from cds_service.protocol.blueprint import CARD_RECORDER_EXTENSION, PIPELINE_EXTENSION, bp
from cds_service.protocol.cors import install_cors
from cds_service.protocol.errors import register_error_handlers
from cds_service.protocol.feedback import STORE_EXTENSION, feedback_bp, make_card_recorder
from cds_service.protocol.guidance import guidance_bp
from cds_service.protocol.services import SERVICES_BY_ID
from cds_service.protocol.validation import compile_request_validators
from cds_service.settings import Settings
from cds_service.store import FeedbackStore

ReadinessCheck = Callable[[], str | None]  # None = ready, else what is wrong
READINESS_EXTENSION = "cds_readiness_checks"

log = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None,
    *,
    knowledge: Knowledge | None = None,
    client_factory: ClientFactory | None = None,
    store: FeedbackStore | None = None,
) -> Flask:
    settings = settings or Settings.from_env()
    configure_logging(settings.log_level)
    if knowledge is None:
        # A malformed knowledge file stops start-up here, with its name and entry.
        knowledge = (
            load_knowledge(settings.knowledge_path)
            if settings.knowledge_path
            else default_knowledge()
        )

    compile_request_validators()
    # Here, not in the first call that builds an update suggestion (130-290 ms); gunicorn
    # preloads the app, so its workers inherit the models.
    preload_models()

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    # "/cds-services//x" answers 404 JSON, not a bare 308 redirect (set before any route).
    app.url_map.merge_slashes = False
    if isinstance(app.json, DefaultJSONProvider):  # Flask's own, unless a subclass swaps it
        app.json.sort_keys = False  # keep the spec's field order readable
    app.extensions["cds_settings"] = settings
    app.extensions["cds_knowledge"] = knowledge
    pipeline = HookPipeline(
        knowledge,
        counting_fetch_failures(
            client_factory or default_client_factory(settings, issuer_fhir_servers(settings))
        ),
    )
    pipeline.rxnav = client_from_settings(settings)
    app.extensions[PIPELINE_EXTENSION] = pipeline
    # Migrates the schema here, once, before gunicorn forks its workers (preload_app).
    store = store or FeedbackStore.open(settings.database_url)
    app.extensions[STORE_EXTENSION] = store
    app.extensions[CARD_RECORDER_EXTENSION] = make_card_recorder(store)
    checks: dict[str, ReadinessCheck] = {
        "knowledge": lambda: None if knowledge.version else "not loaded",
        "store": store.readiness,
    }
    app.extensions[READINESS_EXTENSION] = checks

    register_error_handlers(app)
    install_request_logging(app)
    install_metrics(app, SERVICES_BY_ID)
    # CORS first: preflight is answered before authentication, which it cannot carry.
    install_cors(app, settings)
    # The store is shared by every worker and instance: so is the jti replay cache.
    install_auth(app, settings, replay_guard=shared_replay_guard(store.remember_token))
    app.register_blueprint(bp)
    app.register_blueprint(feedback_bp)
    app.register_blueprint(guidance_bp)  # the cards' explanation pages: public, no patient data

    @app.get("/healthz")
    def healthz() -> ResponseReturnValue:
        return jsonify({"status": "ok"})

    @app.get("/readyz")
    def readyz() -> ResponseReturnValue:
        results = {}
        for name, check in app.extensions[READINESS_EXTENSION].items():
            try:
                results[name] = check() or "ok"
            except Exception as exc:  # a readiness probe reports, it never raises
                results[name] = f"failed: {type(exc).__name__}"
        ready = all(value == "ok" for value in results.values())
        body = {
            "status": "ready" if ready else "not-ready",
            "checks": results,
            "knowledgeVersion": knowledge.version,
        }
        return jsonify(body), 200 if ready else 503

    return app
