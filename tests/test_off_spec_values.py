"""Off-spec JSON where the context layer expects a narrower type than JSON has.

A JSON value of another type where a ``str``, ``int``, ``float``, ``bool``, ``dict`` or list is
expected must not become a TypeError (a 500), and a ``bool`` is not an ``int`` (``True`` is no
code "1"). Each case sends the off-spec value through the service over HTTP and expects a 200
that reads what it can and reports the rest.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from test_hostile_input import (
    call_with_condition,
    ciprofloxacin_with,
    data_issues,
    indicators,
    load,
    post,
    strict_json,
    update_offered,
)

from cds_service.app import create_app
from cds_service.settings import Settings

SNOMED = "http://snomed.info/sct"


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Flask:
    database = tmp_path_factory.mktemp("off-spec") / "cds.sqlite3"
    return create_app(Settings(auth="off", database_url=f"sqlite:///{database}"))


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def _draft(body: dict[str, Any]) -> dict[str, Any]:
    resource: dict[str, Any] = body["context"]["draftOrders"]["entry"][0]["resource"]
    return resource


def _entry(body: dict[str, Any], key: str, index: int = 0) -> dict[str, Any]:
    resource: dict[str, Any] = body["prefetch"][key]["entry"][index]["resource"]
    return resource


def _set(value: Any, *path: str | int) -> Callable[[dict[str, Any]], None]:
    """Set ``path`` (from the request's root) to ``value``."""

    def mutate(body: dict[str, Any]) -> None:
        parent: Any = body
        for part in path[:-1]:
            parent = parent[part]
        parent[path[-1]] = value

    return mutate


DRAFT = ("context", "draftOrders", "entry", 0, "resource")
DRAFT_DOSAGE = (*DRAFT, "dosageInstruction", 0)
CONDITION = ("prefetch", "conditions", "entry", 0, "resource")
MED_ORDER = ("prefetch", "medicationRequests", "entry", 0, "resource")
OBSERVATION = ("prefetch", "observations", "entry", 0, "resource")

# Every place an unchecked JSON value meets a typed variable, parameter, return value or
# container element of normalise.py / builder.py, with a value of another JSON type. None of
# these touches what makes the myasthenia card (myasthenia gravis + magnesium oxide) hold.
OFF_SPEC = {
    # _codes: a code that is a number (read as its digits), a list, an object.
    "draft-code-int": _set(198741, *DRAFT, "medicationCodeableConcept", "coding", 0, "code"),
    "draft-code-float": _set(1.5, *DRAFT, "medicationCodeableConcept", "coding", 0, "code"),
    "condition-code-list": _set(["G70.00"], *CONDITION, "code", "coding", 0, "code"),
    "condition-coding-object": _set(
        {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "G70.00"},
        *CONDITION,
        "code",
        "coding",
    ),
    "condition-system-int": _set(5, *CONDITION, "code", "coding", 0, "system"),
    "condition-display-list": _set(["x"], *CONDITION, "code", "coding", 0, "display"),
    # status_code: a number, a list of strings, a bare object.
    "condition-clinical-status-int": _set(1, *CONDITION, "clinicalStatus"),
    "condition-verification-status-list": _set(["confirmed"], *CONDITION, "verificationStatus"),
    "draft-status-object": _set({"text": "draft"}, *DRAFT, "status"),
    # parse_datetime / parse_date: numbers where dates belong.
    "condition-onset-int": _set(20190301, *CONDITION, "onsetDateTime"),
    "patient-birth-date-int": _set(19780412, "prefetch", "patient", "birthDate"),
    "draft-authored-on-bool": _set(True, *DRAFT, "authoredOn"),
    "observation-effective-float": _set(2026.11, *OBSERVATION, "effectiveDateTime"),
    "observation-effective-period-list": _set(["2026-11-10"], *OBSERVATION, "effectivePeriod"),
    # source_ref / to_patient: ids and gender that are not strings.
    "condition-id-int": _set(7, *CONDITION, "id"),
    "patient-gender-int": _set(1, "prefetch", "patient", "gender"),
    # reference_id / subject_id / _refers_to: a bare string, a number, a list.
    "condition-subject-bare-string": _set("Patient/mg-pyridostigmine", *CONDITION, "subject"),
    "med-order-subject-reference-int": _set({"reference": 5}, *MED_ORDER, "subject"),
    "draft-subject-list": _set([{"reference": "Patient/x"}], *DRAFT, "subject"),
    # _abated and not_taken read booleans: strings instead.
    "condition-abatement-boolean-string": _set("true", *CONDITION, "abatementBoolean"),
    "med-order-was-not-taken-string": _set("true", *MED_ORDER, "wasNotTaken"),
    # quantity_of: bool, list and object values; a number as text; a unit that is a number.
    "draft-dose-bool": _set(True, *DRAFT_DOSAGE, "doseAndRate", 0, "doseQuantity", "value"),
    "draft-dose-list": _set([400], *DRAFT_DOSAGE, "doseAndRate", 0, "doseQuantity", "value"),
    "draft-dose-unit-int": _set(5, *DRAFT_DOSAGE, "doseAndRate", 0, "doseQuantity", "unit"),
    "observation-value-string": _set("2.1", *OBSERVATION, "valueQuantity", "value"),
    "observation-value-bool": _set(False, *OBSERVATION, "valueQuantity", "value"),
    "observation-range-object": _set(
        {"low": {"value": [1]}, "text": 3}, *OBSERVATION, "referenceRange"
    ),
    "observation-interpretation-string": _set("H", *OBSERVATION, "interpretation"),
    # _frequency_per_day: bool / string / float frequency, string period, list unit.
    "frequency-bool": _set(True, *DRAFT_DOSAGE, "timing", "repeat", "frequency"),
    "frequency-string": _set("1", *DRAFT_DOSAGE, "timing", "repeat", "frequency"),
    "frequency-float": _set(1.0, *DRAFT_DOSAGE, "timing", "repeat", "frequency"),
    "frequency-null": _set(None, *DRAFT_DOSAGE, "timing", "repeat", "frequency"),
    "period-string": _set("1", *DRAFT_DOSAGE, "timing", "repeat", "period"),
    "period-unit-list": _set(["d"], *DRAFT_DOSAGE, "timing", "repeat", "periodUnit"),
    "period-unit-object": _set({"code": "d"}, *DRAFT_DOSAGE, "timing", "repeat", "periodUnit"),
    # _doses / _routes / repair_draft: a single object for a list, a bare string route.
    "draft-dosage-object": _set({"text": "once daily"}, *DRAFT, "dosageInstruction"),
    "draft-route-string": _set("oral", *DRAFT_DOSAGE, "route"),
    "draft-text-int": _set(400, *DRAFT_DOSAGE, "text"),
    # _contained / medication_codes / medication_reference_key / _medication_index.
    "med-order-reference-int": _set(
        {"reference": 5, "display": 6}, *MED_ORDER, "medicationReference"
    ),
    "med-order-contained-object": _set(
        {"resourceType": "Medication", "id": 1}, *MED_ORDER, "contained"
    ),
    "draft-reference-list": _set(["#m"], *DRAFT, "medicationReference"),
    # iter_resources: a single entry for the array, an entry that is a string, a fullUrl
    # that is a number.
    "observations-entry-object": lambda body: body["prefetch"]["observations"].update(
        entry=body["prefetch"]["observations"]["entry"][0]
    ),
    "observations-entry-string": lambda body: body["prefetch"]["observations"]["entry"].append(
        "Observation/x"
    ),
    "medication-requests-full-url-int": _set(
        5, "prefetch", "medicationRequests", "entry", 0, "fullUrl"
    ),
}


@pytest.mark.parametrize("mutate", OFF_SPEC.values(), ids=OFF_SPEC.keys())
def test_off_spec_json_at_a_typed_spot_gets_a_200(
    client: FlaskClient, mutate: Callable[[dict[str, Any]], None]
) -> None:
    body = load("mg-pyridostigmine.order-select.json")
    mutate(body)
    response = post(client, json.dumps(body))
    assert response.status_code == 200, response.data[:300]
    assert "warning" in indicators(strict_json(response.data))


def test_a_draft_whose_id_is_a_number_is_still_checked(client: FlaskClient) -> None:
    # order-sign: no selections to match the id against; the id names nothing to update.
    body = load("mg-pyridostigmine.order-sign.json")
    _draft(body)["id"] = 7
    response = client.post(
        "/cds-services/magnesium-order-sign", data=json.dumps(body), content_type="application/json"
    )
    assert response.status_code == 200, response.data[:300]
    assert "critical" in indicators(strict_json(response.data))


def _bool_codes(body: dict[str, Any]) -> None:
    _draft(body)["medicationCodeableConcept"]["coding"][0]["code"] = True  # RxNorm 198741
    _entry(body, "conditions")["code"]["coding"][0]["code"] = False  # ICD-10-CM G70.00


def test_a_boolean_code_is_no_code(client: FlaskClient) -> None:
    # Compiled, a bool reached ``int`` and was read as the code "1"/"0" (Python: "True"):
    # cards then named a code the EHR never sent ("RxNorm 1").
    body = load("mg-pyridostigmine.order-select.json")
    _bool_codes(body)
    response = post(client, json.dumps(body))
    assert response.status_code == 200, response.data[:300]
    answer = strict_json(response.data)
    assert "warning" in indicators(answer)  # the texts still name both
    details = " ".join(card["detail"] for card in answer["cards"])
    for shown in ("RxNorm 1", "RxNorm True", "ICD-10-CM 0", "ICD-10-CM False"):
        assert shown not in details


def test_a_condition_coded_only_by_a_boolean_is_reported(client: FlaskClient) -> None:
    condition = {
        "resourceType": "Condition",
        "id": "bool-coded",
        "code": {"coding": [{"system": SNOMED, "code": True}]},
        "subject": {"reference": "Patient/no-relevant"},
    }
    answer = call_with_condition(client, "conditions", condition)
    issues = data_issues(answer)
    assert any("has no code" in issue["problem"] for issue in issues), issues


def test_an_integer_code_is_still_read_as_its_digits(client: FlaskClient) -> None:
    # The leniency the boolean must not share: RxNorm 198741 sent as a JSON number.
    body = load("mg-pyridostigmine.order-select.json")
    concept = _draft(body)["medicationCodeableConcept"]
    concept["coding"][0]["code"] = 198741
    concept.pop("text")
    concept["coding"][0].pop("display")
    response = post(client, json.dumps(body))
    assert response.status_code == 200, response.data[:300]
    answer = strict_json(response.data)
    assert "warning" in indicators(answer)
    # Named by what the code was recognised as, the code itself in the provenance.
    [card] = [card for card in answer["cards"] if card["indicator"] == "warning"]
    assert "magnesium oxide" in card["detail"]
    evidence = card["extension"]["org.magnesium-cds"]["evidence"]
    assert "magnesium: rxnorm-product 198741" in [fact.get("recognisedBy") for fact in evidence]


@pytest.mark.parametrize("resource_type", ["x", " ", "2020-01-01"])
def test_a_contained_resource_of_an_unknown_type_is_reported_not_a_500(
    client: FlaskClient, resource_type: str
) -> None:
    # The strict check of the draft an update sends back (model_problems): fhir.resources
    # raises KeyError, not a ValidationError, for a contained resource type it does not know.
    contained = json.dumps([{"resourceType": resource_type, "id": "m1"}])
    response = post(client, ciprofloxacin_with("contained", contained))
    assert response.status_code == 200, response.data[:300]
    answer = strict_json(response.data)
    assert update_offered(answer)
    issues = data_issues(answer)
    assert any("unknown resource type" in issue["problem"] for issue in issues), issues
