"""CDS Hooks discovery and service calls over real HTTP, end to end through every layer.

The CDS app runs on a real socket; the fallback fetch goes to the fixture FHIR server on
localhost. Authentication is off here (its own tests live in test_auth.py).
"""

from __future__ import annotations

import copy
import uuid
from typing import Any

import pytest
import requests
from flask import Flask
from hook_calls import (
    StubFhirServer,
    assert_conformant,
    call,
    data_issues,
    load_request,
    only_card,
    searchset,
)
from jsonschema import Draft202012Validator

from cds_service.fixture_server import fixture_state
from cds_service.protocol.services import PREFETCH_KEYS
from cds_service.resources import load_schema

DISCOVERY_SCHEMA = Draft202012Validator(load_schema("discovery.schema.json"))


# --- discovery ----------------------------------------------------------------------------


def test_answers_keep_the_specs_field_order(cds_url: str) -> None:
    # JSON objects are unordered, but people read these answers while integrating: the card
    # starts with its uuid, summary and indicator, as the spec lists them, not alphabetically.
    discovery = requests.get(f"{cds_url}/cds-services", timeout=10).json()
    assert list(discovery["services"][0])[:3] == ["hook", "id", "title"]
    request = load_request("mg-pyridostigmine.order-select.json")
    answer = assert_conformant(call(cds_url, "magnesium-order-select", request))
    assert list(answer["cards"][0])[:3] == ["uuid", "summary", "indicator"]


def test_discovery_lists_one_service_per_hook_with_prefetch(cds_url: str) -> None:
    response = requests.get(f"{cds_url}/cds-services", timeout=10)
    assert response.status_code == 200
    body = response.json()
    assert not list(DISCOVERY_SCHEMA.iter_errors(body))
    services = {s["hook"]: s for s in body["services"]}
    assert set(services) == {"order-select", "order-sign", "patient-view", "medication-prescribe"}
    assert len({s["id"] for s in body["services"]}) == 5  # order-sign twice: with, without select
    for service in body["services"]:
        assert service["title"] and service["description"]
        assert set(service["prefetch"]) == {key.name for key in PREFETCH_KEYS}
    prefetch = services["order-sign"]["prefetch"]
    assert prefetch["patient"] == "Patient/{{context.patientId}}"
    assert "status=active" in prefetch["medicationRequests"]
    assert "clinical-status=active" in prefetch["conditions"]
    for loinc in ("19123-9", "2601-3", "98979-8", "2160-0"):
        assert f"http://loinc.org|{loinc}" in prefetch["observations"]


# --- the myasthenia gravis pipe -----------------------------------------------------------


def test_myasthenia_patient_ordering_oral_magnesium_gets_a_warning_with_removal(
    cds_url: str,
) -> None:
    body = assert_conformant(
        call(cds_url, "magnesium-order-select", load_request("mg-pyridostigmine.order-select.json"))
    )
    card = only_card(body)
    assert card["indicator"] == "warning"
    assert "myasthenia gravis" in card["summary"].lower()
    assert len(card["summary"]) < 140
    assert "Myasthenia gravis" in card["detail"] and "pyridostigmine" in card["detail"].lower()
    evidence = card["extension"]["org.magnesium-cds"]["evidence"]
    assert any(code["code"] == "G70.00" for fact in evidence for code in fact["codes"])
    assert card["source"]["label"]
    assert card["source"]["topic"]["code"] == "myasthenia-magnesium"
    assert card["selectionBehavior"] == "at-most-one"
    suggestion = only_suggestion(card)
    # Offered, not recommended: oral magnesium is a warning (the contraindication is IV).
    assert suggestion["isRecommended"] is False
    action = suggestion["actions"][0]
    assert action["type"] == "delete"
    draft = load_request("mg-pyridostigmine.order-select.json")["context"]["draftOrders"]["entry"][
        0
    ]
    assert action["resourceId"] == f"MedicationRequest/{draft['resource']['id']}"
    assert all(reason["display"] for reason in card["overrideReasons"])


def only_suggestion(card: dict[str, Any]) -> dict[str, Any]:
    assert len(card["suggestions"]) == 1
    return card["suggestions"][0]


def test_card_uuid_is_stable_within_a_hook_instance(cds_url: str) -> None:
    body = load_request("mg-pyridostigmine.order-select.json")
    first = only_card(call(cds_url, "magnesium-order-select", body).json())
    again = only_card(call(cds_url, "magnesium-order-select", body).json())
    body["hookInstance"] = str(uuid.uuid4())
    other = only_card(call(cds_url, "magnesium-order-select", body).json())
    assert first["uuid"] == again["uuid"] != other["uuid"]


def test_iv_magnesium_at_signing_names_myasthenic_crisis(cds_url: str) -> None:
    body = assert_conformant(
        call(cds_url, "magnesium-order-sign", load_request("mg-pyridostigmine.order-sign.json"))
    )
    card = only_card(body)
    assert card["indicator"] == "critical"
    assert "myasthenic crisis" in card["summary"].lower()
    assert "breathing" in card["detail"].lower()


def test_sandbox_payload_is_normalised_not_rejected(cds_url: str) -> None:
    name = "mg-pyridostigmine.order-select.sandbox.json"
    body = assert_conformant(call(cds_url, "magnesium-order-select", load_request(name)))
    assert only_card(body)["indicator"] == "warning"


def test_dstu2_client_gets_its_medication_orders_fetched_as_medication_order(
    cds_url: str,
) -> None:
    # The sandbox's default DSTU2 server has no MedicationRequest, so that prefetch key is
    # dropped; the service must ask the DSTU2 server for MedicationOrder instead.
    body = load_request("mg-pyridostigmine.order-select.dstu2.json")
    assert "medicationRequests" not in body["prefetch"]
    pyridostigmine = {
        "resourceType": "MedicationOrder",
        "id": "dstu2-pyridostigmine",
        "status": "active",
        "patient": {"reference": "Patient/mg-pyridostigmine"},
        "medicationCodeableConcept": {
            "text": "pyridostigmine bromide 60 MG Oral Tablet",
            "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "9000"}],
        },
    }
    server = StubFhirServer({"MedicationOrder": searchset(pyridostigmine)})
    with server.running() as base_url:
        body["fhirServer"] = base_url
        result = assert_conformant(call(cds_url, "magnesium-order-select", body))
    assert only_card(result)["indicator"] == "warning"
    assert server.paths == [
        "/MedicationOrder?patient=mg-pyridostigmine&status=active"
        "&_include=MedicationOrder:medication&_count=100"
    ]


def test_sandbox_quirks_are_reported_in_the_response(cds_url: str) -> None:
    body = assert_conformant(
        call(
            cds_url,
            "magnesium-order-select",
            load_request("mg-pyridostigmine.order-select.sandbox.json"),
        )
    )
    problems = " ".join(issue["problem"] for issue in data_issues(body))
    assert "single object" in problems


def _draft_without_intent(name: str) -> dict[str, Any]:
    body = load_request(name)
    del body["context"]["draftOrders"]["entry"][0]["resource"]["intent"]  # required in R4
    return body


def test_an_invalid_draft_sent_back_in_an_update_suggestion_is_reported(cds_url: str) -> None:
    body = assert_conformant(
        call(
            cds_url,
            "magnesium-order-select",
            _draft_without_intent("ciprofloxacin.order-select.json"),
        )
    )
    card = only_card(body)
    action = only_suggestion(card)["actions"][0]
    assert action["type"] == "update"  # still offered: the EHR accepts its own shapes
    issues = [
        issue
        for issue in data_issues(body)
        if issue["where"] == "suggestion to update MedicationRequest/draft-mg-oxide"
    ]
    assert len(issues) == 1
    assert "not valid FHIR R4" in issues[0]["problem"] and "intent" in issues[0]["problem"]


def test_a_valid_draft_sent_back_is_not_reported(cds_url: str) -> None:
    body = assert_conformant(
        call(cds_url, "magnesium-order-select", load_request("ciprofloxacin.order-select.json"))
    )
    assert only_suggestion(only_card(body))["actions"][0]["type"] == "update"
    assert not any("not valid FHIR" in issue["problem"] for issue in data_issues(body))


def test_the_strict_check_looks_at_the_update_as_sent(cds_url: str) -> None:
    # An empty string is not valid FHIR, but the answer never carries one (it is pruned): the
    # update sent back is valid, so nothing is reported.
    body = load_request("ciprofloxacin.order-select.json")
    body["context"]["draftOrders"]["entry"][0]["resource"]["priority"] = ""
    answer = assert_conformant(call(cds_url, "magnesium-order-select", body))
    action = only_suggestion(only_card(answer))["actions"][0]
    assert action["type"] == "update" and "priority" not in action["resource"]
    assert not any("not valid FHIR" in issue["problem"] for issue in data_issues(answer))


def test_an_invalid_draft_only_removed_is_read_leniently_without_a_strict_report(
    cds_url: str,
) -> None:
    # The strict check runs on what the answer sends back; a delete sends back an id only.
    body = assert_conformant(
        call(
            cds_url,
            "magnesium-order-select",
            _draft_without_intent("mg-pyridostigmine.order-select.json"),
        )
    )
    assert only_suggestion(only_card(body))["actions"][0]["type"] == "delete"
    assert not any("not valid FHIR" in issue["problem"] for issue in data_issues(body))


def test_stu3_medication_prescribe_for_old_clients(cds_url: str) -> None:
    body = assert_conformant(
        call(
            cds_url,
            "magnesium-medication-prescribe",
            load_request("mg-pyridostigmine.medication-prescribe.stu3.json"),
        )
    )
    assert only_card(body)["indicator"] == "warning"


def test_draft_without_a_drug_yet_gives_no_card_and_says_why(cds_url: str) -> None:
    body = assert_conformant(
        call(
            cds_url,
            "magnesium-order-select",
            load_request("mg-pyridostigmine.order-select.nodrug.json"),
        )
    )
    assert body["cards"] == []
    assert any("no medication yet" in issue["problem"] for issue in data_issues(body))


@pytest.mark.parametrize(
    "name",
    [
        "mg-inactive.order-select.json",
        "no-relevant.order-select.json",
        "no-relevant.order-select.lisinopril.json",
    ],
)
def test_no_myasthenia_card_without_active_myasthenia(cds_url: str, name: str) -> None:
    body = assert_conformant(call(cds_url, "magnesium-order-select", load_request(name)))
    assert not [c for c in body["cards"] if c["source"]["topic"]["code"] == "myasthenia-magnesium"]


def test_patient_view_without_magnesium_is_quiet(cds_url: str) -> None:
    body = assert_conformant(
        call(cds_url, "magnesium-patient-view", load_request("mg-pyridostigmine.patient-view.json"))
    )
    assert body["cards"] == []


# --- prefetch fallback over HTTP -----------------------------------------------------------


def test_without_prefetch_the_data_is_fetched_from_the_fhir_server(
    cds_url: str, fixture_fhir_server: str, fixture_fhir_app: Flask
) -> None:
    body = load_request("mg-pyridostigmine.order-select.noprefetch.json", fixture_fhir_server)
    assert "prefetch" not in body or not body["prefetch"]
    body["fhirAuthorization"] = {
        "access_token": "secret-token-123",
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "patient/*.read",
        "subject": "cds-service",
    }
    seen = fixture_state(fixture_fhir_app).seen_requests
    seen.clear()
    with_fetch = assert_conformant(call(cds_url, "magnesium-order-select", body))
    fetched = list(seen)
    with_prefetch = assert_conformant(
        call(cds_url, "magnesium-order-select", load_request("mg-pyridostigmine.order-select.json"))
    )
    card, expected = only_card(with_fetch), only_card(with_prefetch)
    assert (card["summary"], card["indicator"]) == (expected["summary"], expected["indicator"])
    paths = {request.path for request in fetched}
    assert paths == {
        "/Patient/mg-pyridostigmine",
        "/Condition",
        "/MedicationRequest",
        "/MedicationStatement",
        "/Observation",
    }
    for request in fetched:
        assert request.headers.get("Authorization") == "Bearer secret-token-123"
        assert request.headers.get("Accept") == "application/fhir+json"


def test_operation_outcome_in_prefetch_counts_as_missing_and_is_fetched(
    cds_url: str, fixture_fhir_server: str
) -> None:
    body = load_request("mg-pyridostigmine.order-select.json", fixture_fhir_server)
    body["prefetch"]["conditions"] = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "processing", "diagnostics": "timeout"}],
    }
    result = assert_conformant(call(cds_url, "magnesium-order-select", body))
    assert only_card(result)["indicator"] == "warning"  # MG came from the fetched conditions
    assert any("OperationOutcome" in issue["problem"] for issue in data_issues(result))


def test_required_data_that_cannot_be_had_answers_412_naming_it(cds_url: str) -> None:
    body = load_request("mg-pyridostigmine.order-select.json")
    del body["prefetch"]["conditions"]
    body.pop("fhirServer", None)
    response = call(cds_url, "magnesium-order-select", body)
    assert response.status_code == 412
    error = response.json()
    assert error["error"] == "required-data-unavailable"
    [missing] = error["problems"]
    assert missing["prefetchKey"] == "conditions"
    assert "no fhirServer" in missing["reason"]


def test_unreachable_fhir_server_answers_412(cds_url: str) -> None:
    body = load_request("mg-pyridostigmine.order-select.noprefetch.json", "http://127.0.0.1:9/fhir")
    response = call(cds_url, "magnesium-order-select", body)
    assert response.status_code == 412
    keys = {p["prefetchKey"] for p in response.json()["problems"]}
    assert keys == {"patient", "conditions", "medicationRequests", "observations"}
    assert all("could not be reached" in p["reason"] for p in response.json()["problems"])


def test_optional_data_missing_still_answers_and_says_so(cds_url: str) -> None:
    body = load_request("mg-pyridostigmine.order-select.json")
    del body["prefetch"]["medicationStatements"]
    body.pop("fhirServer", None)
    result = assert_conformant(call(cds_url, "magnesium-order-select", body))
    assert only_card(result)["indicator"] == "warning"
    assert any(i["where"] == "prefetch.medicationStatements" for i in data_issues(result))


def test_prefetched_resources_of_another_patient_or_type_are_ignored(cds_url: str) -> None:
    body = load_request("mg-pyridostigmine.order-select.json")
    conditions = copy.deepcopy(body["prefetch"]["conditions"])
    for entry in conditions["entry"]:
        entry["resource"]["subject"] = {"reference": "Patient/someone-else"}
    conditions["entry"].append(
        {
            "resource": {
                "resourceType": "Observation",
                "id": "x",
                "status": "final",
                "code": {"text": "x"},
            }
        }
    )
    body["prefetch"]["conditions"] = conditions
    body["prefetch"]["medicationRequests"] = None  # "searched, nothing there": no implied MG
    result = assert_conformant(call(cds_url, "magnesium-order-select", body))
    problems = " ".join(i["problem"] for i in data_issues(result))
    assert "another patient" in problems and "not a Condition" in problems
    # None of the conditions is this patient's: not a clean "no risk" answer.
    (card,) = result["cards"]
    assert card["source"]["topic"]["code"] == "incomplete-data"
    assert card["indicator"] == "warning" and "conditions" in card["summary"]


def test_missing_keys_are_fetched_concurrently_not_one_after_another(cds_url: str) -> None:
    prefetched = load_request("mg-pyridostigmine.order-select.json")["prefetch"]
    bundles = {
        "Patient": prefetched["patient"],
        "Condition": prefetched["conditions"],
        "MedicationRequest": prefetched["medicationRequests"],
        "MedicationStatement": prefetched["medicationStatements"],
        "Observation": prefetched["observations"],
    }
    # Five keys missing; the server answers none until all five requests are in flight at once,
    # so a sequential client would fail (503 after the barrier's timeout → 412).
    server = StubFhirServer(bundles, parties=5)
    with server.running() as base_url:
        body = load_request("mg-pyridostigmine.order-select.noprefetch.json", base_url)
        result = assert_conformant(call(cds_url, "magnesium-order-select", body))
    assert only_card(result)["indicator"] == "warning"
    assert len(server.paths) == 5


# --- protocol errors -----------------------------------------------------------------------


def test_unknown_service_is_404_json(cds_url: str) -> None:
    response = call(cds_url, "no-such-service", load_request("mg-pyridostigmine.order-select.json"))
    assert response.status_code == 404
    assert response.json()["error"] == "unknown-service"


def test_wrong_hook_for_the_service_is_400(cds_url: str) -> None:
    response = call(
        cds_url, "magnesium-order-sign", load_request("mg-pyridostigmine.order-select.json")
    )
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "wrong-hook"
    assert body["problems"] == [{"path": "$.hook", "message": "expected 'order-sign'"}]


def test_malformed_json_is_400_with_position(cds_url: str) -> None:
    response = requests.post(
        f"{cds_url}/cds-services/magnesium-order-select",
        data=b'{"hook": "order-select", ',
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "invalid-json"
    assert "line 1" in body["problems"][0]["message"]


def test_schema_violations_are_400_naming_each_path(cds_url: str) -> None:
    body = load_request("mg-pyridostigmine.order-select.json")
    body["hookInstance"] = "not-a-uuid"
    del body["context"]["selections"]
    body["fhirAuthorization"] = {
        "access_token": "t",
        "token_type": "MAC",
        "expires_in": 1,
        "scope": "s",
        "subject": "x",
    }
    response = call(cds_url, "magnesium-order-select", body)
    assert response.status_code == 400
    paths = {p["path"] for p in response.json()["problems"]}
    assert {"$.hookInstance", "$.context.selections", "$.fhirAuthorization.token_type"} <= paths
    assert all(p["message"] for p in response.json()["problems"])


def test_non_json_content_type_is_415(cds_url: str) -> None:
    response = requests.post(
        f"{cds_url}/cds-services/magnesium-order-select",
        data="hook=order-select",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=10,
    )
    assert response.status_code == 415
    assert response.json()["error"] == "unsupported-media-type"


def test_health_and_readiness(cds_url: str) -> None:
    assert requests.get(f"{cds_url}/healthz", timeout=5).json() == {"status": "ok"}
    ready = requests.get(f"{cds_url}/readyz", timeout=5)
    assert ready.status_code == 200
    assert ready.json()["checks"]["knowledge"] == "ok"
