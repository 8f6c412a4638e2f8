"""CDS Hooks HTTP endpoints: discovery and service calls.

The blueprint knows the protocol (JSON, statuses, schemas) and nothing clinical: it hands a
validated ``HookRequest`` to the pipeline and returns what comes back.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from flask import Blueprint, Response, current_app, g, jsonify, request
from flask.typing import ResponseReturnValue

from cds_service.context.model import DataUnavailable
from cds_service.metrics import card_counter
from cds_service.pipeline import HookPipeline
from cds_service.protocol.errors import ApiError
from cds_service.protocol.guidance import public_base_url
from cds_service.protocol.hook_request import HookRequest
from cds_service.protocol.services import SERVICES_BY_ID, discovery_document
from cds_service.protocol.validation import check_hook, read_json_body, validate_or_400

bp = Blueprint("cds_hooks", __name__)

PIPELINE_EXTENSION = "cds_pipeline"
# Optional: a callable (service_id, hook_instance, PipelineResult) -> None that records the
# cards issued (the feedback store registers one).
CARD_RECORDER_EXTENSION = "cds_card_recorder"


@bp.get("/cds-services")
def discovery() -> ResponseReturnValue:
    # The prefetch the pipeline uses, built from the knowledge loaded at start-up.
    pipeline: HookPipeline = current_app.extensions[PIPELINE_EXTENSION]
    return jsonify(discovery_document(pipeline.prefetch_keys))


@bp.post("/cds-services/<service_id>")
def call_service(service_id: str) -> ResponseReturnValue:
    # Each access through the g/request/current_app proxies is a context lookup: every call
    # pays for them, so each is resolved once.
    values = g._get_current_object()
    values.service_id = service_id
    service = SERVICES_BY_ID.get(service_id)
    if service is None:
        raise ApiError(
            404, "unknown-service", f"no CDS service with id {service_id!r}; see /cds-services"
        )
    received = time.perf_counter()
    body = read_json_body(request._get_current_object())  # type: ignore[attr-defined]
    parsed = time.perf_counter()
    validate_or_400(body, "hook-request.schema.json", "hook request")
    validated = time.perf_counter()
    check_hook(service, body)
    hook_request = HookRequest.from_json(body, issuer=values.get("auth_issuer"))
    values.hook_instance = hook_request.hook_instance
    extensions = current_app.extensions
    pipeline: HookPipeline = extensions[PIPELINE_EXTENSION]
    base_url = public_base_url(extensions["cds_settings"], request.host_url)
    try:
        result = pipeline.run(service, hook_request, base_url)
    except DataUnavailable as exc:
        raise ApiError(
            412,
            "required-data-unavailable",
            "data the magnesium checks require could neither be prefetched nor fetched "
            "from the FHIR server",
            [_missing_problem(m.to_json()) for m in exc.missing],
        ) from None
    values.rule_ids = result.rule_ids
    for card in result.cards:
        card_counter(card.rule_id, card.indicator).inc()
    recorded = time.perf_counter()
    recorder = extensions.get(CARD_RECORDER_EXTENSION)
    if recorder is not None:
        recorder(service.id, hook_request.hook_instance, result)
    finished = time.perf_counter()
    # Per stage, for the request log and the benchmark (bench/).
    values.timings_ms = {
        "parse": (parsed - received) * 1000,
        "validation": (validated - parsed) * 1000,
        **result.timings_ms,
        "record": (finished - recorded) * 1000,
        "total": (finished - received) * 1000,
    }
    return json_response(result.response)


def json_response(body: dict[str, Any]) -> Response:
    """orjson: a tenth of jsonify's cost for a card response. What it cannot write (a lone
    surrogate or an integer beyond 64 bits copied from a draft order, which the stdlib parser
    accepts) is written by jsonify, as before."""
    try:
        return Response(orjson.dumps(body), mimetype="application/json")
    except TypeError:  # orjson.JSONEncodeError
        return jsonify(body)


def _missing_problem(missing: dict[str, Any]) -> dict[str, Any]:
    return {"path": f"$.prefetch.{missing['prefetchKey']}", "message": missing["reason"], **missing}
