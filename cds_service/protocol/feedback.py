"""CDS Hooks feedback: ``POST /cds-services/{id}/feedback`` (spec: Feedback).

Clients report what the clinician did with a card: accepted a suggestion, or overrode the
card (with a reason, a comment, or neither). Each entry is stored, joined later to the rule
that produced the card. An entry for a card uuid we never issued, or issued under another
service id, is stored all the same and flagged: the client's report is evidence either way.

The spec defines no response body; we answer 200 with our own counts under ``extension``
(the spec's reserved name), so a client or an operator can see what was flagged.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, current_app, g, jsonify, request
from flask.typing import ResponseReturnValue

from cds_service.cards.builder import EXTENSION_KEY
from cds_service.pipeline import PipelineResult
from cds_service.protocol.errors import ApiError, problem
from cds_service.protocol.services import SERVICES_BY_ID
from cds_service.protocol.validation import read_json_body, validate_or_400
from cds_service.store import CardRecord, FeedbackEntry, FeedbackStore, StoreUnavailable

feedback_bp = Blueprint("cds_feedback", __name__)

STORE_EXTENSION = "cds_feedback_store"

log = logging.getLogger(__name__)

# Another worker's writer commits within milliseconds of its answer; feedback can arrive
# before that (a client that acts at once, or a test). Look again for this long, this often.
UNKNOWN_CARD_GRACE_S = 0.25
UNKNOWN_CARD_POLL_S = 0.01
# The local writer normally flushes in milliseconds; past this the database is in trouble and
# store_feedback will say so (503) or flag what is missing.
LOCAL_FLUSH_TIMEOUT_S = 2.0

# Bounds on what one request may make the store keep (a client reports what one clinician did
# with the cards of a few calls; 60,000 entries or a 9 MB comment is not feedback).
MAX_FEEDBACK_ENTRIES = 100
MAX_USER_COMMENT_CHARS = 2_000

_RFC3339 = re.compile(
    r"^(?P<date>\d{4}-\d{2}-\d{2})[Tt](?P<hms>\d{2}:\d{2}):(?P<sec>\d{2})(?:\.(?P<frac>\d+))?"
    r"(?P<zone>[Zz]|[+-]\d{2}:\d{2})$"
)


@feedback_bp.post("/cds-services/<service_id>/feedback")
def post_feedback(service_id: str) -> ResponseReturnValue:
    g.service_id = service_id
    if service_id not in SERVICES_BY_ID:
        raise ApiError(
            404, "unknown-service", f"no CDS service with id {service_id!r}; see /cds-services"
        )
    body = read_json_body(request)
    _check_bounds(body)
    validate_or_400(body, "feedback.schema.json", "feedback")
    entries = [_entry(item, index) for index, item in enumerate(body["feedback"])]
    store: FeedbackStore = current_app.extensions[STORE_EXTENSION]
    try:
        _wait_for_issued_cards(store, [entry.card_uuid for entry in entries])
        receipt = store.store_feedback(service_id, entries)
    except StoreUnavailable as exc:
        log.error("feedback not stored: database unavailable (%s)", exc)
        raise ApiError(
            503, "store-unavailable", "the feedback could not be stored now; send it again later"
        ) from None
    if receipt.unknown_cards or receipt.other_service_cards:
        log.warning(
            "feedback for cards not issued here: %d unknown, %d issued by another service",
            len(receipt.unknown_cards), len(receipt.other_service_cards),
        )
    summary: dict[str, Any] = {"stored": receipt.stored}
    if receipt.duplicates:
        summary["duplicates"] = receipt.duplicates
    # Omitted when empty: CDS Hooks JSON never carries empty arrays.
    if receipt.unknown_cards:
        summary["unknownCards"] = list(receipt.unknown_cards)
    if receipt.other_service_cards:
        summary["otherServiceCards"] = list(receipt.other_service_cards)
    return jsonify({"extension": {EXTENSION_KEY: summary}})


def _wait_for_issued_cards(store: FeedbackStore, card_uuids: list[str]) -> None:
    """Give cards still on their way to the database the time to get there.

    Issued cards are written by a background thread per process: this process's queue is
    flushed here, and a card issued moments ago by another worker (or instance) is looked up
    again for up to UNKNOWN_CARD_GRACE_S before its feedback is flagged unknown-card. Feedback
    for a card truly never issued pays that delay; that is rare and only costs the client.
    """
    if not store.flush_recorder(LOCAL_FLUSH_TIMEOUT_S):
        log.warning("issued-card writer did not flush within %.1f s", LOCAL_FLUSH_TIMEOUT_S)
    missing = set(card_uuids) - set(store.issued_by(card_uuids))
    deadline = time.monotonic() + UNKNOWN_CARD_GRACE_S
    while missing and time.monotonic() < deadline:
        time.sleep(UNKNOWN_CARD_POLL_S)
        missing -= set(store.issued_by(missing))


def _check_bounds(body: Any) -> None:
    """400 for a body over the bounds, worded for a person and found before the schema check
    (which would walk every one of 60,000 entries and quote them back)."""
    entries = body.get("feedback") if isinstance(body, dict) else None
    if not isinstance(entries, list):
        return  # the schema check words it
    if len(entries) > MAX_FEEDBACK_ENTRIES:
        raise _invalid(
            "$.feedback",
            f"{len(entries)} entries; send at most {MAX_FEEDBACK_ENTRIES} per request",
        )
    for index, item in enumerate(entries):
        reason = item.get("overrideReason") if isinstance(item, dict) else None
        comment = reason.get("userComment") if isinstance(reason, dict) else None
        if isinstance(comment, str) and len(comment) > MAX_USER_COMMENT_CHARS:
            raise _invalid(
                f"$.feedback[{index}].overrideReason.userComment",
                f"{len(comment)} characters; at most {MAX_USER_COMMENT_CHARS} are kept",
            )


def _invalid(path: str, message: str) -> ApiError:
    return ApiError(
        400, "invalid-request", "the feedback does not conform to CDS Hooks 2.0",
        [problem(path, message)],
    )


def _entry(item: dict[str, Any], index: int) -> FeedbackEntry:
    reason = item.get("overrideReason", {})
    coding = reason.get("reason", {})
    where = f"$.feedback[{index}]"
    # JSON can escape a lone surrogate ("\ud800"): valid JSON, but not text any database
    # stores (UTF-8 cannot encode it).
    for path, value in (
        (f"{where}.overrideReason.userComment", reason.get("userComment")),
        (f"{where}.overrideReason.reason.system", coding.get("system")),
        (f"{where}.overrideReason.reason.code", coding.get("code")),
        (f"{where}.overrideReason.reason.display", coding.get("display")),
        *(
            (f"{where}.acceptedSuggestions[{n}].id", s["id"])
            for n, s in enumerate(item.get("acceptedSuggestions", ()))
        ),
    ):
        if value is not None and not _is_text(value):
            raise _invalid(path, "holds a lone UTF-16 surrogate (\\ud800-\\udfff), not text")
    return FeedbackEntry(
        card_uuid=item["card"].lower(),
        outcome=item["outcome"],
        outcome_at=_timestamp(item["outcomeTimestamp"], f"$.feedback[{index}].outcomeTimestamp"),
        accepted_suggestions=tuple(s["id"] for s in item.get("acceptedSuggestions", ())),
        reason_system=coding.get("system"),
        reason_code=coding.get("code"),
        reason_display=coding.get("display"),
        user_comment=reason.get("userComment"),
    )


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _timestamp(value: str, path: str) -> datetime:
    """RFC 3339 §5.6 → aware UTC datetime (the schema has checked the shape already)."""
    match = _RFC3339.match(value)
    try:
        if match is None:
            raise ValueError(value)
        # A leap second (…:60) is kept as the last instant of that minute; fractions beyond
        # microseconds are cut, because datetime holds no more.
        second = min(int(match["sec"]), 59)
        fraction = (match["frac"] or "0")[:6].ljust(6, "0")
        if int(match["sec"]) == 60:
            fraction = "999999"
        zone = "+00:00" if match["zone"] in ("Z", "z") else match["zone"]
        parsed = datetime.fromisoformat(
            f"{match['date']}T{match['hms']}:{second:02d}.{fraction}{zone}"
        )
    except ValueError:
        raise _invalid(path, f"{value!r} is not an RFC 3339 date-time") from None
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:59:59-23:59 is in year 10000 in UTC
        raise _invalid(path, f"{value!r} is outside the years 1-9999 in UTC") from None


def make_card_recorder(store: FeedbackStore) -> Callable[[str, str, PipelineResult], None]:
    """The ``CARD_RECORDER_EXTENSION`` callable: stores every card a service call returned.

    It only queues them for the store's background writer (``store.card_writer``), so a call
    never waits for the database's write lock; ``store.flush_recorder()`` waits for the writes.
    The clinical answer comes first: if the database is unavailable, the cards are still
    returned and the writer logs the failure (their feedback will then be flagged unknown-card).
    """

    def record(service_id: str, hook_instance: str, result: PipelineResult) -> None:
        if not result.cards:
            return
        cards = [CardRecord(c.uuid, c.rule_id, c.indicator) for c in result.cards]
        try:
            store.card_writer.submit(service_id, hook_instance, cards)
        except Exception as exc:  # never fail the clinical answer over bookkeeping
            log.error("issued cards not recorded (%d): %s", len(cards), type(exc).__name__)

    return record
