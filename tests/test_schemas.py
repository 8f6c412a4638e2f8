"""The JSON Schemas under ``schemas/`` accept what they should and reject what they should.

Every example is written here as a Python dict (no fixture files). Each negative case names
the JSON path of the offending field and the test checks that a validation error points at it,
so a schema that rejects the document for some unrelated reason does not pass by accident.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from cds_service.resources import load_schema

SCHEMA_FILES = (
    "hook-request.schema.json",
    "response.schema.json",
    "discovery.schema.json",
    "feedback.schema.json",
)

_DELETE = object()


def _validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(
        load_schema(name), format_checker=Draft202012Validator.FORMAT_CHECKER
    )


def _errors(name: str, document: Any) -> list[ValidationError]:
    return list(_validator(name).iter_errors(document))


def _paths_named(errors: Iterable[ValidationError]) -> set[str]:
    """JSON paths the errors point at; a missing required member counts as its own path."""
    paths: set[str] = set()
    for error in errors:
        paths.add(error.json_path)
        instance = error.instance
        if not isinstance(instance, dict):
            continue
        if error.validator == "required":
            missing = [name for name in error.validator_value if name not in instance]
        elif error.validator == "dependentRequired":
            missing = [
                dependency
                for trigger, dependencies in error.validator_value.items()
                if trigger in instance
                for dependency in dependencies
                if dependency not in instance
            ]
        else:
            missing = []
        paths.update(f"{error.json_path}.{name}" for name in missing)
    return paths


def _edited(document: dict[str, Any], *edits: tuple[tuple[str | int, ...], Any]) -> dict[str, Any]:
    """A deep copy of ``document`` with each ``(path, value)`` set, or deleted for _DELETE."""
    result = copy.deepcopy(document)
    for path, value in edits:
        parent = result
        for step in path[:-1]:
            parent = parent[step]
        if value is _DELETE:
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    return result


def _assert_valid(name: str, document: Any) -> None:
    errors = _errors(name, document)
    assert not errors, [f"{e.json_path}: {e.message}" for e in errors]


def _assert_rejected_at(name: str, document: Any, expected_path: str) -> None:
    errors = _errors(name, document)
    assert errors, f"{name} accepted a document it should reject at {expected_path}"
    named = _paths_named(errors)
    assert expected_path in named, f"expected an error at {expected_path}, got " + "; ".join(
        f"{e.json_path}: {e.message}" for e in errors
    )


# --------------------------------------------------------------------------------------------
# The schemas themselves
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEMA_FILES)
def test_schema_is_a_valid_draft_2020_12_schema(name: str) -> None:
    schema = load_schema(name)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"https://magnesium-cds.example/schemas/{name}"
    assert schema["title"].strip()
    assert schema["description"].strip()


# --------------------------------------------------------------------------------------------
# Hook requests
# --------------------------------------------------------------------------------------------

HOOK_INSTANCE = "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea"


def _magnesium_request(resource_id: str = "mg-1") -> dict[str, Any]:
    return {
        "resourceType": "MedicationRequest",
        "id": resource_id,
        "status": "draft",
        "intent": "order",
        "subject": {"reference": "Patient/1288992"},
        "medicationCodeableConcept": {
            "coding": [
                {
                    "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                    "code": "6585",
                    "display": "magnesium sulfate",
                }
            ],
            "text": "magnesium sulfate",
        },
    }


def _draft_orders() -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": _magnesium_request()}],
    }


def _order_select() -> dict[str, Any]:
    return {
        "hook": "order-select",
        "hookInstance": HOOK_INSTANCE,
        "fhirServer": "https://fhir.example.org/r4",
        "fhirAuthorization": {
            "access_token": "some-opaque-fhir-access-token",
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "user/Patient.read user/Observation.read",
            "subject": "magnesium-cds",
            "patient": "1288992",
        },
        "context": {
            "userId": "PractitionerRole/123",
            "patientId": "1288992",
            "encounterId": "89284",
            "selections": ["MedicationRequest/mg-1"],
            "draftOrders": _draft_orders(),
        },
        "prefetch": {
            "patient": {"resourceType": "Patient", "id": "1288992", "gender": "female"},
            "renalLabs": {"resourceType": "Bundle", "type": "searchset", "total": 0},
            "magnesiumLabs": None,
        },
    }


def _order_sign() -> dict[str, Any]:
    return {
        "hook": "order-sign",
        "hookInstance": HOOK_INSTANCE,
        "context": {
            "userId": "Practitioner/example",
            "patientId": "1288992",
            "draftOrders": _draft_orders(),
        },
    }


def _patient_view() -> dict[str, Any]:
    return {
        "hook": "patient-view",
        "hookInstance": HOOK_INSTANCE,
        "fhirServer": "http://hooks.smarthealthit.org:9080",
        "context": {"userId": "Practitioner/abc", "patientId": "1288992", "encounterId": "456"},
    }


def _medication_prescribe() -> dict[str, Any]:
    # CDS Hooks 1.0, DSTU2 MedicationOrder; userId left out (older clients send none).
    order = {
        "resourceType": "MedicationOrder",
        "id": "smart-MedicationOrder-103",
        "status": "draft",
        "patient": {"reference": "Patient/1288992"},
    }
    return {
        "hook": "medication-prescribe",
        "hookInstance": HOOK_INSTANCE,
        "context": {
            "patientId": "1288992",
            "medications": {"resourceType": "Bundle", "entry": [{"resource": order}]},
        },
    }


def _sandbox_order_sign() -> dict[str, Any]:
    """Shaped like the public sandbox's Rx Sign call: no Bundle.type, no fhirAuthorization,
    single-object category/reasonCode, no intent or medication[x] yet."""
    return {
        "hook": "order-sign",
        "hookInstance": "0b6f8f2e-5c1a-4f1e-9a7e-2f1d9c3b4a55",
        "fhirServer": "https://launch.smarthealthit.org/v/r2/fhir",
        "context": {
            "userId": "Practitioner/COREPRACTITIONER1",
            "patientId": "smart-1288992",
            "draftOrders": {
                "resourceType": "Bundle",
                "entry": [
                    {
                        "resource": {
                            "resourceType": "MedicationRequest",
                            "id": "request-123",
                            "status": "draft",
                            "category": {"coding": [{"code": "outpatient"}]},
                            "reasonCode": {"text": "hypomagnesaemia"},
                            "subject": {"reference": "Patient/smart-1288992"},
                        }
                    }
                ],
            },
        },
        "prefetch": {"patient": {"resourceType": "Patient", "id": "smart-1288992"}},
    }


def _with_extensions() -> dict[str, Any]:
    request = _patient_view()
    request["extension"] = {"com.example.timestamp": "2017-11-27T22:13:25Z"}
    request["com.example.futureField"] = True
    request["context"]["com.example.specialty"] = "nephrology"
    return request


@pytest.mark.parametrize(
    "document",
    [
        pytest.param(_order_select(), id="order-select"),
        pytest.param(_order_sign(), id="order-sign"),
        pytest.param(_patient_view(), id="patient-view"),
        pytest.param(_medication_prescribe(), id="medication-prescribe-1.0"),
        pytest.param(_sandbox_order_sign(), id="sandbox-draftOrders-without-Bundle.type"),
        pytest.param(
            _edited(_order_select(), (("context", "draftOrders", "type"), _DELETE)),
            id="order-select-without-Bundle.type",
        ),
        pytest.param(
            _edited(_order_select(), (("hookInstance",), HOOK_INSTANCE.upper())),
            id="upper-case-hookInstance",
        ),
        pytest.param(
            _edited(_order_select(), (("fhirAuthorization", "patient"), _DELETE)),
            id="fhirAuthorization-without-patient",
        ),
        pytest.param(
            _edited(_order_sign(), (("context", "draftOrders", "entry"), _DELETE)),
            id="bundle-without-entry",
        ),
        pytest.param(_with_extensions(), id="extension-and-unknown-fields"),
        pytest.param(
            _edited(_patient_view(), (("hook",), "org.example.patient-transmogrify")),
            id="unknown-hook-with-minimal-context",
        ),
    ],
)
def test_valid_hook_requests_are_accepted(document: dict[str, Any]) -> None:
    _assert_valid("hook-request.schema.json", document)


REQUEST_REJECTIONS: list[tuple[str, dict[str, Any], str]] = [
    (
        "hookInstance-not-a-uuid",
        _edited(_order_select(), (("hookInstance",), "not-a-uuid")),
        "$.hookInstance",
    ),
    (
        "hookInstance-without-hyphens",
        _edited(_order_select(), (("hookInstance",), HOOK_INSTANCE.replace("-", ""))),
        "$.hookInstance",
    ),
    (
        "hookInstance-with-braces",
        _edited(_order_select(), (("hookInstance",), "{" + HOOK_INSTANCE + "}")),
        "$.hookInstance",
    ),
    (
        "missing-hookInstance",
        _edited(_order_sign(), (("hookInstance",), _DELETE)),
        "$.hookInstance",
    ),
    ("missing-context", _edited(_patient_view(), (("context",), _DELETE)), "$.context"),
    ("context-not-an-object", _edited(_patient_view(), (("context",), "1288992")), "$.context"),
    ("missing-hook", _edited(_patient_view(), (("hook",), _DELETE)), "$.hook"),
    ("empty-hook", _edited(_patient_view(), (("hook",), "")), "$.hook"),
    (
        "fhirAuthorization-without-fhirServer",
        _edited(_order_select(), (("fhirServer",), _DELETE)),
        "$.fhirServer",
    ),
    (
        "token_type-not-Bearer",
        _edited(_order_select(), (("fhirAuthorization", "token_type"), "MAC")),
        "$.fhirAuthorization.token_type",
    ),
    (
        "token_type-lower-case",
        _edited(_order_select(), (("fhirAuthorization", "token_type"), "bearer")),
        "$.fhirAuthorization.token_type",
    ),
    (
        "fhirAuthorization-without-scope",
        _edited(_order_select(), (("fhirAuthorization", "scope"), _DELETE)),
        "$.fhirAuthorization.scope",
    ),
    (
        "fhirAuthorization-without-subject",
        _edited(_order_select(), (("fhirAuthorization", "subject"), _DELETE)),
        "$.fhirAuthorization.subject",
    ),
    (
        "expires_in-a-string",
        _edited(_order_select(), (("fhirAuthorization", "expires_in"), "300")),
        "$.fhirAuthorization.expires_in",
    ),
    (
        "expires_in-negative",
        _edited(_order_select(), (("fhirAuthorization", "expires_in"), -1)),
        "$.fhirAuthorization.expires_in",
    ),
    (
        "fhirServer-not-http",
        _edited(_patient_view(), (("fhirServer",), "ftp://fhir.example.org")),
        "$.fhirServer",
    ),
    (
        "fhirServer-relative",
        _edited(_patient_view(), (("fhirServer",), "/fhir")),
        "$.fhirServer",
    ),
    (
        "order-select-without-selections",
        _edited(_order_select(), (("context", "selections"), _DELETE)),
        "$.context.selections",
    ),
    (
        "order-select-empty-selections",
        _edited(_order_select(), (("context", "selections"), [])),
        "$.context.selections",
    ),
    (
        "order-select-selections-not-strings",
        _edited(_order_select(), (("context", "selections"), [103])),
        "$.context.selections[0]",
    ),
    (
        "order-select-without-draftOrders",
        _edited(_order_select(), (("context", "draftOrders"), _DELETE)),
        "$.context.draftOrders",
    ),
    (
        "order-sign-without-draftOrders",
        _edited(_order_sign(), (("context", "draftOrders"), _DELETE)),
        "$.context.draftOrders",
    ),
    (
        "order-sign-without-userId",
        _edited(_order_sign(), (("context", "userId"), _DELETE)),
        "$.context.userId",
    ),
    (
        "patient-view-without-patientId",
        _edited(_patient_view(), (("context", "patientId"), _DELETE)),
        "$.context.patientId",
    ),
    (
        "medication-prescribe-without-medications",
        _edited(_medication_prescribe(), (("context", "medications"), _DELETE)),
        "$.context.medications",
    ),
    (
        "medication-prescribe-medications-as-array",
        _edited(_medication_prescribe(), (("context", "medications"), [_magnesium_request()])),
        "$.context.medications",
    ),
    (
        "patientId-a-number",
        _edited(_patient_view(), (("context", "patientId"), 1288992)),
        "$.context.patientId",
    ),
    (
        "userId-empty",
        _edited(_patient_view(), (("context", "userId"), "")),
        "$.context.userId",
    ),
    (
        "encounterId-null",
        _edited(_patient_view(), (("context", "encounterId"), None)),
        "$.context.encounterId",
    ),
    (
        "draftOrders-not-a-Bundle",
        _edited(_order_sign(), (("context", "draftOrders", "resourceType"), "MedicationRequest")),
        "$.context.draftOrders.resourceType",
    ),
    (
        "draftOrders-entry-not-an-array",
        _edited(_order_sign(), (("context", "draftOrders", "entry"), {"resource": {}})),
        "$.context.draftOrders.entry",
    ),
    (
        "draftOrders-entry-resource-without-resourceType",
        _edited(
            _order_sign(),
            (("context", "draftOrders", "entry", 0, "resource", "resourceType"), _DELETE),
        ),
        "$.context.draftOrders.entry[0].resource.resourceType",
    ),
    (
        "prefetch-value-a-string",
        _edited(_order_select(), (("prefetch", "patient"), "Patient/1288992")),
        "$.prefetch.patient",
    ),
    ("prefetch-not-an-object", _edited(_order_select(), (("prefetch",), [])), "$.prefetch"),
    (
        "extension-not-an-object",
        _edited(_patient_view(), (("extension",), "com.example")),
        "$.extension",
    ),
]


@pytest.mark.parametrize(
    ("document", "expected_path"),
    [pytest.param(doc, path, id=case) for case, doc, path in REQUEST_REJECTIONS],
)
def test_invalid_hook_requests_are_rejected_at_the_offending_field(
    document: dict[str, Any], expected_path: str
) -> None:
    _assert_rejected_at("hook-request.schema.json", document, expected_path)


# --------------------------------------------------------------------------------------------
# Service responses
# --------------------------------------------------------------------------------------------

CARD_UUID = "4e0a3a1e-3283-4575-ab82-028d55fe2719"
SUGGESTION_UUID = "e56e1945-20b3-4393-8503-a1a20fd73152"


def _full_response() -> dict[str, Any]:
    reduced_dose = _magnesium_request()
    reduced_dose["dosageInstruction"] = [{"text": "1 g IV over 1 hour, once"}]
    return {
        "cards": [
            {
                "uuid": CARD_UUID,
                "summary": "Magnesium sulfate ordered with eGFR 12 mL/min/1.73m2: risk of toxicity",
                "detail": "**Severe renal impairment.** Reduce the dose and monitor serum Mg.",
                "indicator": "critical",
                "source": {
                    "label": "Magnesium safety rules",
                    "url": "https://magnesium-cds.example/rules",
                    "icon": "https://magnesium-cds.example/icon-100.png",
                    "topic": {
                        "system": "https://magnesium-cds.example/CodeSystem/topics",
                        "code": "renal-dosing",
                        "display": "Renal dose adjustment",
                    },
                },
                "suggestions": [
                    {
                        "label": "Reduce to 1 g once",
                        "uuid": SUGGESTION_UUID,
                        "isRecommended": True,
                        "actions": [
                            {
                                "type": "update",
                                "description": "Replace the draft order with a reduced dose",
                                "resource": reduced_dose,
                            }
                        ],
                    },
                    {
                        "label": "Cancel the magnesium order",
                        "uuid": "0f3c2b1a-9d8e-4f7a-b6c5-d4e3f2a1b0c9",
                        "actions": [
                            {
                                "type": "delete",
                                "description": "Remove the magnesium order",
                                "resourceId": "MedicationRequest/mg-1",
                            }
                        ],
                    },
                ],
                "selectionBehavior": "at-most-one",
                "overrideReasons": [
                    {
                        "system": "https://magnesium-cds.example/CodeSystem/override-reasons",
                        "code": "level-monitored",
                        "display": "Serum magnesium is being monitored",
                    }
                ],
                "links": [
                    {
                        "label": "Renal dosing guidance",
                        "url": "https://magnesium-cds.example/guidance#renal",
                        "type": "absolute",
                    },
                    {
                        "label": "Open the dosing calculator",
                        "url": "https://apps.example.org/mg-calc/launch",
                        "type": "smart",
                        "appContext": '{"order":"MedicationRequest/mg-1"}',
                    },
                ],
                "extension": {"com.magnesium-cds.ruleId": "MG-RENAL-1"},
            },
            {
                "uuid": "9368d37b-283f-44a0-93ea-547cebab93ed",
                "summary": "x" * 139,
                "indicator": "info",
                "source": {"label": "Magnesium safety rules"},
            },
        ],
        "systemActions": [
            {
                "type": "create",
                "description": "Order a serum magnesium level",
                "resource": {
                    "resourceType": "ServiceRequest",
                    "status": "draft",
                    "intent": "proposal",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "19123-9"}]},
                    "subject": {"reference": "Patient/1288992"},
                },
            }
        ],
        "extension": {"com.magnesium-cds.version": "0.1.0"},
    }


@pytest.mark.parametrize(
    "document",
    [
        pytest.param(_full_response(), id="full-card"),
        pytest.param({"cards": []}, id="no-guidance"),
        pytest.param(
            _edited(
                _full_response(),
                (("cards", 0, "selectionBehavior"), "any"),
                (("cards", 0, "suggestions", 1, "isRecommended"), True),
            ),
            id="two-recommended-with-any",
        ),
        pytest.param(
            _edited(_full_response(), (("cards", 0, "source", "topic", "display"), _DELETE)),
            id="topic-without-display",
        ),
    ],
)
def test_valid_responses_are_accepted(document: dict[str, Any]) -> None:
    _assert_valid("response.schema.json", document)


RESPONSE_REJECTIONS: list[tuple[str, dict[str, Any], str]] = [
    ("missing-cards", {"systemActions": _full_response()["systemActions"]}, "$.cards"),
    ("cards-null", {"cards": None}, "$.cards"),
    (
        "summary-140-characters",
        _edited(_full_response(), (("cards", 1, "summary"), "x" * 140)),
        "$.cards[1].summary",
    ),
    (
        "summary-empty",
        _edited(_full_response(), (("cards", 1, "summary"), "")),
        "$.cards[1].summary",
    ),
    (
        "missing-summary",
        _edited(_full_response(), (("cards", 1, "summary"), _DELETE)),
        "$.cards[1].summary",
    ),
    (
        "missing-card-uuid",
        _edited(_full_response(), (("cards", 1, "uuid"), _DELETE)),
        "$.cards[1].uuid",
    ),
    (
        "card-uuid-not-a-uuid",
        _edited(_full_response(), (("cards", 1, "uuid"), "card-1")),
        "$.cards[1].uuid",
    ),
    (
        "card-uuid-upper-case",
        _edited(_full_response(), (("cards", 1, "uuid"), CARD_UUID.upper())),
        "$.cards[1].uuid",
    ),
    (
        "missing-indicator",
        _edited(_full_response(), (("cards", 1, "indicator"), _DELETE)),
        "$.cards[1].indicator",
    ),
    (
        "indicator-hard-stop",
        _edited(_full_response(), (("cards", 1, "indicator"), "hard-stop")),
        "$.cards[1].indicator",
    ),
    (
        "missing-source",
        _edited(_full_response(), (("cards", 1, "source"), _DELETE)),
        "$.cards[1].source",
    ),
    (
        "source-without-label",
        _edited(_full_response(), (("cards", 1, "source"), {"url": "https://example.org"})),
        "$.cards[1].source.label",
    ),
    (
        "source-url-relative",
        _edited(_full_response(), (("cards", 0, "source", "url"), "/rules")),
        "$.cards[0].source.url",
    ),
    (
        "suggestions-without-selectionBehavior",
        _edited(_full_response(), (("cards", 0, "selectionBehavior"), _DELETE)),
        "$.cards[0].selectionBehavior",
    ),
    (
        "selectionBehavior-unknown",
        _edited(_full_response(), (("cards", 0, "selectionBehavior"), "all")),
        "$.cards[0].selectionBehavior",
    ),
    (
        "two-recommended-with-at-most-one",
        _edited(_full_response(), (("cards", 0, "suggestions", 1, "isRecommended"), True)),
        "$.cards[0].suggestions",
    ),
    ("detail-null", _edited(_full_response(), (("cards", 0, "detail"), None)), "$.cards[0].detail"),
    (
        "detail-empty-string",
        _edited(_full_response(), (("cards", 0, "detail"), "")),
        "$.cards[0].detail",
    ),
    (
        "suggestion-label-empty-string",
        _edited(_full_response(), (("cards", 0, "suggestions", 0, "label"), "")),
        "$.cards[0].suggestions[0].label",
    ),
    (
        "empty-suggestions-array",
        _edited(_full_response(), (("cards", 0, "suggestions"), [])),
        "$.cards[0].suggestions",
    ),
    (
        "empty-actions-array-in-suggestion",
        _edited(_full_response(), (("cards", 0, "suggestions", 0, "actions"), [])),
        "$.cards[0].suggestions[0].actions",
    ),
    (
        "empty-links-array",
        _edited(_full_response(), (("cards", 0, "links"), [])),
        "$.cards[0].links",
    ),
    ("empty-systemActions", _edited(_full_response(), (("systemActions",), [])), "$.systemActions"),
    (
        "isRecommended-a-string",
        _edited(_full_response(), (("cards", 0, "suggestions", 0, "isRecommended"), "true")),
        "$.cards[0].suggestions[0].isRecommended",
    ),
    (
        "delete-action-without-resourceId",
        _edited(
            _full_response(),
            (("cards", 0, "suggestions", 1, "actions", 0, "resourceId"), _DELETE),
        ),
        "$.cards[0].suggestions[1].actions[0].resourceId",
    ),
    (
        "delete-action-with-deprecated-resource",
        _edited(
            _full_response(),
            (("cards", 0, "suggestions", 1, "actions", 0, "resource"), _magnesium_request()),
        ),
        "$.cards[0].suggestions[1].actions[0].resource",
    ),
    (
        "resourceId-an-array",
        _edited(
            _full_response(),
            (
                ("cards", 0, "suggestions", 1, "actions", 0, "resourceId"),
                ["MedicationRequest/mg-1"],
            ),
        ),
        "$.cards[0].suggestions[1].actions[0].resourceId",
    ),
    (
        "resourceId-not-a-relative-reference",
        _edited(
            _full_response(),
            (("cards", 0, "suggestions", 1, "actions", 0, "resourceId"), "mg-1"),
        ),
        "$.cards[0].suggestions[1].actions[0].resourceId",
    ),
    (
        "update-action-without-resource",
        _edited(
            _full_response(),
            (("cards", 0, "suggestions", 0, "actions", 0, "resource"), _DELETE),
        ),
        "$.cards[0].suggestions[0].actions[0].resource",
    ),
    (
        "action-without-description",
        _edited(
            _full_response(),
            (("cards", 0, "suggestions", 0, "actions", 0, "description"), _DELETE),
        ),
        "$.cards[0].suggestions[0].actions[0].description",
    ),
    (
        "action-type-unknown",
        _edited(_full_response(), (("systemActions", 0, "type"), "patch")),
        "$.systemActions[0].type",
    ),
    (
        "create-resource-without-resourceType",
        _edited(_full_response(), (("systemActions", 0, "resource", "resourceType"), _DELETE)),
        "$.systemActions[0].resource.resourceType",
    ),
    (
        "null-inside-action-resource",
        _edited(_full_response(), (("systemActions", 0, "resource", "note"), None)),
        "$.systemActions[0].resource.note",
    ),
    (
        "empty-object-inside-action-resource",
        _edited(_full_response(), (("systemActions", 0, "resource", "code"), {})),
        "$.systemActions[0].resource.code",
    ),
    (
        "unknown-card-field",
        _edited(_full_response(), (("cards", 0, "sumary"), "typo")),
        "$.cards[0]",
    ),
    (
        "unknown-suggestion-field",
        _edited(_full_response(), (("cards", 0, "suggestions", 0, "recommended"), True)),
        "$.cards[0].suggestions[0]",
    ),
    (
        "unknown-top-level-field",
        _edited(_full_response(), (("card",), [])),
        "$",
    ),
    (
        "override-reason-without-display",
        _edited(_full_response(), (("cards", 0, "overrideReasons", 0, "display"), _DELETE)),
        "$.cards[0].overrideReasons[0].display",
    ),
    (
        "override-reason-without-system",
        _edited(_full_response(), (("cards", 0, "overrideReasons", 0, "system"), _DELETE)),
        "$.cards[0].overrideReasons[0].system",
    ),
    (
        "override-reason-empty-code",
        _edited(_full_response(), (("cards", 0, "overrideReasons", 0, "code"), "")),
        "$.cards[0].overrideReasons[0].code",
    ),
    (
        "link-without-type",
        _edited(_full_response(), (("cards", 0, "links", 0, "type"), _DELETE)),
        "$.cards[0].links[0].type",
    ),
    (
        "link-type-unknown",
        _edited(_full_response(), (("cards", 0, "links", 0, "type"), "relative")),
        "$.cards[0].links[0].type",
    ),
    (
        "appContext-on-absolute-link",
        _edited(_full_response(), (("cards", 0, "links", 0, "appContext"), "x=1")),
        "$.cards[0].links[0].appContext",
    ),
    (
        "card-extension-empty-object",
        _edited(_full_response(), (("cards", 0, "extension"), {})),
        "$.cards[0].extension",
    ),
    (
        "response-extension-null-value",
        _edited(_full_response(), (("extension", "com.magnesium-cds.version"), None)),
        "$.extension['com.magnesium-cds.version']",
    ),
]


@pytest.mark.parametrize(
    ("document", "expected_path"),
    [pytest.param(doc, path, id=case) for case, doc, path in RESPONSE_REJECTIONS],
)
def test_invalid_responses_are_rejected_at_the_offending_field(
    document: dict[str, Any], expected_path: str
) -> None:
    _assert_rejected_at("response.schema.json", document, expected_path)


def test_unknown_card_field_error_names_the_field() -> None:
    document = _edited(_full_response(), (("cards", 0, "sumary"), "typo"))
    errors = [
        e
        for e in _errors("response.schema.json", document)
        if e.validator == "additionalProperties"
    ]
    assert errors and "'sumary'" in errors[0].message


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------


def _discovery() -> dict[str, Any]:
    return {
        "services": [
            {
                "hook": "order-select",
                "id": "magnesium-order-select",
                "title": "Magnesium order safety (select)",
                "description": "Flags magnesium orders that can harm the patient",
                "prefetch": {
                    "patient": "Patient/{{context.patientId}}",
                    "renalLabs": "Observation?patient={{context.patientId}}&code=http://loinc.org|33914-3&_sort=-date&_count=1",
                    "user": "PractitionerRole?_id={{userPractitionerRoleId}}",
                },
            },
            {
                "hook": "order-sign",
                "id": "magnesium-order-sign",
                "title": "Magnesium order safety (sign)",
                "description": "Flags magnesium orders that can harm the patient",
                "usageRequirements": "Needs renal function results (prefetch or FHIR server).",
            },
        ]
    }


@pytest.mark.parametrize(
    "document",
    [
        pytest.param(_discovery(), id="two-services"),
        pytest.param({"services": []}, id="no-services"),
    ],
)
def test_valid_discovery_documents_are_accepted(document: dict[str, Any]) -> None:
    _assert_valid("discovery.schema.json", document)


DISCOVERY_REJECTIONS: list[tuple[str, dict[str, Any], str]] = [
    ("missing-services", {}, "$.services"),
    (
        "missing-title",
        _edited(_discovery(), (("services", 1, "title"), _DELETE)),
        "$.services[1].title",
    ),
    (
        "missing-description",
        _edited(_discovery(), (("services", 1, "description"), _DELETE)),
        "$.services[1].description",
    ),
    (
        "missing-hook",
        _edited(_discovery(), (("services", 1, "hook"), _DELETE)),
        "$.services[1].hook",
    ),
    (
        "id-with-slash",
        _edited(_discovery(), (("services", 0, "id"), "magnesium/select")),
        "$.services[0].id",
    ),
    (
        "id-with-space",
        _edited(_discovery(), (("services", 0, "id"), "magnesium select")),
        "$.services[0].id",
    ),
    ("id-dot-dot", _edited(_discovery(), (("services", 0, "id"), "..")), "$.services[0].id"),
    ("id-empty", _edited(_discovery(), (("services", 0, "id"), "")), "$.services[0].id"),
    (
        "prefetch-value-not-a-string",
        _edited(_discovery(), (("services", 0, "prefetch", "patient"), {"read": "Patient"})),
        "$.services[0].prefetch.patient",
    ),
    (
        "prefetch-nested-context-token",
        _edited(
            _discovery(), (("services", 0, "prefetch", "patient"), "Patient/{{context.patient.id}}")
        ),
        "$.services[0].prefetch.patient",
    ),
    (
        "prefetch-unknown-token",
        _edited(_discovery(), (("services", 0, "prefetch", "patient"), "Patient/{{patientId}}")),
        "$.services[0].prefetch.patient",
    ),
    (
        "prefetch-empty",
        _edited(_discovery(), (("services", 0, "prefetch"), {})),
        "$.services[0].prefetch",
    ),
    (
        "usageRequirements-empty",
        _edited(_discovery(), (("services", 1, "usageRequirements"), "")),
        "$.services[1].usageRequirements",
    ),
    (
        "unknown-service-field",
        _edited(_discovery(), (("services", 1, "titel"), "typo")),
        "$.services[1]",
    ),
]


@pytest.mark.parametrize(
    ("document", "expected_path"),
    [pytest.param(doc, path, id=case) for case, doc, path in DISCOVERY_REJECTIONS],
)
def test_invalid_discovery_documents_are_rejected_at_the_offending_field(
    document: dict[str, Any], expected_path: str
) -> None:
    _assert_rejected_at("discovery.schema.json", document, expected_path)


# --------------------------------------------------------------------------------------------
# Feedback
# --------------------------------------------------------------------------------------------


def _accepted() -> dict[str, Any]:
    return {
        "feedback": [
            {
                "card": CARD_UUID,
                "outcome": "accepted",
                "acceptedSuggestions": [{"id": SUGGESTION_UUID}],
                "outcomeTimestamp": "2021-12-11T10:05:31Z",
            }
        ]
    }


def _overridden() -> dict[str, Any]:
    return {
        "feedback": [
            {
                "card": "9368d37b-283f-44a0-93ea-547cebab93ed",
                "outcome": "overridden",
                "overrideReason": {
                    # The sandbox echoes code and system only, without display.
                    "reason": {
                        "code": "level-monitored",
                        "system": "https://magnesium-cds.example/CodeSystem/override-reasons",
                    },
                    "userComment": "Level checked this morning.",
                },
                "outcomeTimestamp": "1985-04-12T23:20:50.52Z",
            }
        ]
    }


@pytest.mark.parametrize(
    "document",
    [
        pytest.param(_accepted(), id="accepted"),
        pytest.param(_overridden(), id="overridden-with-reason"),
        pytest.param(
            _edited(_overridden(), (("feedback", 0, "overrideReason"), _DELETE)),
            id="overridden-without-reason",
        ),
        pytest.param(
            _edited(_overridden(), (("feedback", 0, "overrideReason", "reason"), _DELETE)),
            id="overridden-with-comment-only",
        ),
        pytest.param(
            _edited(
                _overridden(), (("feedback", 0, "outcomeTimestamp"), "2020-12-11T00:00:00+00:00")
            ),
            id="numeric-utc-offset",
        ),
        pytest.param(
            {"feedback": _accepted()["feedback"] + _overridden()["feedback"]},
            id="several-cards-at-once",
        ),
    ],
)
def test_valid_feedback_is_accepted(document: dict[str, Any]) -> None:
    _assert_valid("feedback.schema.json", document)


FEEDBACK_REJECTIONS: list[tuple[str, dict[str, Any], str]] = [
    (
        "accepted-without-acceptedSuggestions",
        _edited(_accepted(), (("feedback", 0, "acceptedSuggestions"), _DELETE)),
        "$.feedback[0].acceptedSuggestions",
    ),
    (
        "accepted-with-empty-acceptedSuggestions",
        _edited(_accepted(), (("feedback", 0, "acceptedSuggestions"), [])),
        "$.feedback[0].acceptedSuggestions",
    ),
    (
        "accepted-suggestion-without-id",
        _edited(_accepted(), (("feedback", 0, "acceptedSuggestions", 0), {})),
        "$.feedback[0].acceptedSuggestions[0].id",
    ),
    (
        "accepted-with-overrideReason",
        _edited(
            _accepted(),
            (("feedback", 0, "overrideReason"), _overridden()["feedback"][0]["overrideReason"]),
        ),
        "$.feedback[0].overrideReason",
    ),
    (
        "overridden-with-acceptedSuggestions",
        _edited(_overridden(), (("feedback", 0, "acceptedSuggestions"), [{"id": SUGGESTION_UUID}])),
        "$.feedback[0].acceptedSuggestions",
    ),
    ("empty-feedback-array", {"feedback": []}, "$.feedback"),
    ("missing-feedback", {}, "$.feedback"),
    (
        "card-not-a-uuid",
        _edited(_accepted(), (("feedback", 0, "card"), "card-1")),
        "$.feedback[0].card",
    ),
    (
        "missing-card",
        _edited(_accepted(), (("feedback", 0, "card"), _DELETE)),
        "$.feedback[0].card",
    ),
    (
        "outcome-unknown",
        _edited(_accepted(), (("feedback", 0, "outcome"), "ignored")),
        "$.feedback[0].outcome",
    ),
    (
        "missing-outcomeTimestamp",
        _edited(_accepted(), (("feedback", 0, "outcomeTimestamp"), _DELETE)),
        "$.feedback[0].outcomeTimestamp",
    ),
    (
        "outcomeTimestamp-without-offset",
        _edited(_accepted(), (("feedback", 0, "outcomeTimestamp"), "2021-12-11T10:05:31")),
        "$.feedback[0].outcomeTimestamp",
    ),
    (
        "outcomeTimestamp-date-only",
        _edited(_accepted(), (("feedback", 0, "outcomeTimestamp"), "2021-12-11")),
        "$.feedback[0].outcomeTimestamp",
    ),
    (
        "outcomeTimestamp-month-13",
        _edited(_accepted(), (("feedback", 0, "outcomeTimestamp"), "2021-13-11T10:05:31Z")),
        "$.feedback[0].outcomeTimestamp",
    ),
    (
        "outcomeTimestamp-epoch-number",
        _edited(_accepted(), (("feedback", 0, "outcomeTimestamp"), 1639217131)),
        "$.feedback[0].outcomeTimestamp",
    ),
    (
        "reason-without-code",
        _edited(_overridden(), (("feedback", 0, "overrideReason", "reason", "code"), _DELETE)),
        "$.feedback[0].overrideReason.reason.code",
    ),
    (
        "overrideReason-empty-object",
        _edited(_overridden(), (("feedback", 0, "overrideReason"), {})),
        "$.feedback[0].overrideReason",
    ),
    (
        "userComment-empty-string",
        _edited(_overridden(), (("feedback", 0, "overrideReason", "userComment"), "")),
        "$.feedback[0].overrideReason.userComment",
    ),
]


@pytest.mark.parametrize(
    ("document", "expected_path"),
    [pytest.param(doc, path, id=case) for case, doc, path in FEEDBACK_REJECTIONS],
)
def test_invalid_feedback_is_rejected_at_the_offending_field(
    document: dict[str, Any], expected_path: str
) -> None:
    _assert_rejected_at("feedback.schema.json", document, expected_path)


# --------------------------------------------------------------------------------------------
# The path check itself must not be vacuous
# --------------------------------------------------------------------------------------------


def test_rejection_check_fails_when_the_error_is_elsewhere() -> None:
    document = _edited(_order_select(), (("hookInstance",), "not-a-uuid"))
    with pytest.raises(AssertionError):
        _assert_rejected_at("hook-request.schema.json", document, "$.context.selections")
