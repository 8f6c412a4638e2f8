"""Every request fixture through HTTP against the scenario table (fixtures/scenarios.json).

A live server (auth off, on purpose: its own tests live in test_auth.py) answers each request;
the cards must be exactly the expected list (rule id, indicator, suggestion action types, in
order), conform to the response schema, keep summaries under 140 characters, name the facts
that triggered them, and carry replacement products the sandbox can apply.
"""

from __future__ import annotations

import json
import re
from datetime import date
from typing import Any

import pytest
import requests
from jsonschema import Draft202012Validator

from cds_service.knowledge import default_knowledge
from cds_service.resources import bundled_dir, load_schema

FIXTURES = bundled_dir("fixtures")
TABLE = json.loads((FIXTURES / "scenarios.json").read_text(encoding="utf-8"))
SCENARIOS: list[dict[str, Any]] = TABLE["scenarios"]
TODAY = date.fromisoformat(TABLE["today"])
RESPONSE_SCHEMA = Draft202012Validator(
    load_schema("response.schema.json"), format_checker=Draft202012Validator.FORMAT_CHECKER
)
EXTENSION_KEY = "org.magnesium-cds"


def request_body(name: str, fhir_server: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((FIXTURES / "requests" / name).read_text(encoding="utf-8"))
    body["fhirServer"] = fhir_server
    return body


# --- the table itself ------------------------------------------------------------------------


def test_every_request_fixture_is_in_the_table() -> None:
    on_disk = {path.name for path in (FIXTURES / "requests").glob("*.json")}
    listed = [s["request"] for s in SCENARIOS]
    assert len(listed) == len(set(listed))
    assert set(listed) | set(TABLE["notRunHere"]) == on_disk


def test_every_rule_has_a_scenario_and_the_negatives_are_there() -> None:
    fired = {card["ruleId"] for s in SCENARIOS for card in s["expected"]}
    assert fired == set(default_knowledge().rule_ids)
    negatives = {s["request"] for s in SCENARIOS if not s["expected"]}
    assert {
        "mg-inactive.order-select.json",  # inactive / refuted myasthenia
        "egfr-75.order-select.json",  # normal enough kidneys
        "mg-pyridostigmine.order-select.epsom.json",  # topical Epsom salt in MG
        "no-relevant.order-select.lisinopril.json",  # a non-magnesium order
        # Issue 20: not magnesium therapy, no indication, no gut interaction, oral in LEMS.
        "mg-pyridostigmine.order-sign.plasma-lyte.json",
        "esrd-dialysis.order-sign.plasma-lyte.json",
        "no-relevant.order-select.plasma-lyte.json",
        "preeclampsia-no-magnesium.order-select.json",
        "sle.order-sign.iv-magnesium.json",
        "lambert-eaton.order-select.json",
    } <= negatives


# --- each scenario through HTTP ----------------------------------------------------------------


def _rule_id(card: dict[str, Any]) -> str:
    rule_id: str = card["source"]["topic"]["code"]
    assert card["extension"][EXTENSION_KEY]["ruleId"] == rule_id
    return rule_id


def _shape(card: dict[str, Any]) -> dict[str, Any]:
    return {
        "ruleId": _rule_id(card),
        "indicator": card["indicator"],
        "suggestionTypes": [
            action["type"] for s in card.get("suggestions", []) for action in s["actions"]
        ],
    }


def _codes_and_values(value: Any) -> set[str]:
    """Every code and number in the request: what a card's detail can cite."""
    found: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("code", "value") and isinstance(item, str | int | float):
                found.add(f"{item:g}" if isinstance(item, float) else str(item))
            else:
                found |= _codes_and_values(item)
    elif isinstance(value, list):
        for item in value:
            found |= _codes_and_values(item)
    return found


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return "." in value or len(value) < 4  # a measured value, not a 4+ digit code


def _drafts(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    context = body["context"]
    bundle = context.get("draftOrders") or context.get("medications") or {}
    return {
        f"{e['resource']['resourceType']}/{e['resource']['id']}": e["resource"]
        for e in bundle.get("entry", [])
    }


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s["request"])
def test_scenario(cds_url: str, fixture_fhir_server: str, scenario: dict[str, Any]) -> None:
    body = request_body(scenario["request"], fixture_fhir_server)
    response = requests.post(f"{cds_url}/cds-services/{scenario['service']}", json=body, timeout=30)
    assert response.status_code == 200, response.text
    answer = response.json()
    errors = [f"{e.json_path}: {e.message}" for e in RESPONSE_SCHEMA.iter_errors(answer)]
    assert not errors, errors
    cards = answer["cards"]

    expected = [
        {k: card[k] for k in ("ruleId", "indicator", "suggestionTypes")}
        for card in scenario["expected"]
    ]
    assert [_shape(card) for card in cards] == expected, [c["summary"] for c in cards]

    cited = {v for v in _codes_and_values(body) if len(v) >= 3}
    codes = {v for v in cited if any(ch.isdigit() for ch in v) and not _is_number(v)}
    drafts = _drafts(body)
    for card, wanted in zip(cards, scenario["expected"], strict=True):
        assert len(card["summary"]) < 140
        detail = card["detail"]
        # The codes that triggered the card travel in its extension, not in its words.
        provenance = json.dumps(card["extension"][EXTENSION_KEY]["evidence"])
        # A card about unusable data has no code to name.
        if wanted["ruleId"] not in ("patient-deceased", "incomplete-data"):
            assert any(f'"{v}"' in provenance for v in cited), "the provenance names no code"
        assert not [v for v in codes if re.search(rf"(?<![\w.]){re.escape(v)}(?![\w])", detail)]
        for text in wanted.get("detailIncludes", []):
            assert text in detail, (text, detail)
        for text in wanted.get("provenanceIncludes", []):
            assert text in provenance, (text, provenance)
        assert card["uuid"] and card["overrideReasons"]
        for suggestion in card.get("suggestions", []):
            assert suggestion["uuid"] and card["selectionBehavior"] == "at-most-one"
            for action in suggestion["actions"]:
                _check_action(action, drafts, body["context"]["patientId"])


def _check_action(
    action: dict[str, Any], drafts: dict[str, dict[str, Any]], patient_id: str
) -> None:
    if action["type"] == "delete":
        assert action["resourceId"] in drafts
    elif action["type"] == "create":
        resource = action["resource"]
        assert resource["resourceType"] == "ServiceRequest"
        assert resource["code"]["coding"][0]["system"] == "http://loinc.org"
        assert resource["subject"] == {"reference": f"Patient/{patient_id}"}
    else:
        resource = action["resource"]
        reference = f"{resource['resourceType']}/{resource['id']}"
        original = drafts[reference]
        concept = resource.get("medicationCodeableConcept")
        if concept != original.get("medicationCodeableConcept"):
            # A replacement: the sandbox applies it only with text and coding[0].code.
            assert concept["text"] and concept["coding"][0]["code"]
            assert concept["coding"][0]["system"] == "http://www.nlm.nih.gov/research/umls/rxnorm"
        else:
            # A dosage instruction added to the same order.
            assert resource["dosageInstruction"][0]["patientInstruction"]
