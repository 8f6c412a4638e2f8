"""Lenient FHIR extraction: R4, STU3 and DSTU2 shapes, and what real clients get wrong."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest
import requests
from hook_calls import fhir_client
from hypothesis import given
from hypothesis import strategies as st

from cds_service.context import fhir_json
from cds_service.context import normalise as fhir
from cds_service.context.fhir_json import detect_fhir_version as detect
from cds_service.context.model import Coding
from cds_service.fhir_models import model_problems

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


def _order(**fields: object) -> dict[str, object]:
    return {
        "resourceType": "MedicationRequest",
        "id": "o1",
        "status": "draft",
        "intent": "order",
        "subject": {"reference": "Patient/p1"},
        "medicationCodeableConcept": {
            "text": "magnesium oxide 400 MG Oral Tablet",
            "coding": [{"system": RXNORM, "code": "198741"}],
        },
        **fields,
    }


def test_r4_dose_and_timing_give_amount_and_frequency_per_day() -> None:
    order = _order(
        dosageInstruction=[
            {
                "timing": {"repeat": {"frequency": 3, "period": 1, "periodUnit": "d"}},
                "route": {"coding": [{"system": "http://snomed.info/sct", "code": "26643006"}]},
                "doseAndRate": [{"doseQuantity": {"value": 2, "unit": "tablet", "code": "{tbl}"}}],
            }
        ]
    )
    medication = fhir.to_medication(order, "context:draftOrders", is_draft=True)
    assert medication is not None
    [dose] = medication.doses
    assert dose.quantity is not None and dose.quantity.value == 2 and dose.quantity.unit == "{tbl}"
    assert dose.frequency_per_day == 3
    assert medication.route[0].code == "26643006"
    assert medication.codings == (Coding(RXNORM, "198741"),)


def test_stu3_and_dstu2_dose_shapes() -> None:
    stu3 = _order(
        dosageInstruction=[
            {
                "doseQuantity": {"value": 1},
                "timing": {"repeat": {"frequency": 1, "period": 12, "periodUnit": "h"}},
            }
        ]
    )
    dstu2 = {
        **_order(),
        "resourceType": "MedicationOrder",
        "patient": {"reference": "Patient/p1"},
        "dosageInstruction": [
            {
                "doseQuantity": {"value": 1},
                "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnits": "d"}},
            }
        ],
        "dateWritten": "2026-11-24",
    }
    stu3_med = fhir.to_medication(stu3, "x", is_draft=True)
    dstu2_med = fhir.to_medication(dstu2, "x", is_draft=True)
    assert stu3_med is not None and stu3_med.doses[0].frequency_per_day == 2
    assert dstu2_med is not None and dstu2_med.doses[0].frequency_per_day == 1
    assert dstu2_med.authored == datetime(2026, 11, 24, tzinfo=UTC)
    assert fhir_json.subject_id(dstu2) == "p1"


def test_contained_medication_supplies_codes_and_ingredients() -> None:
    order = _order(
        medicationReference={"reference": "#med"},
        contained=[
            {
                "resourceType": "Medication",
                "id": "med",
                "code": {"text": "Antacid suspension"},
                "ingredient": [
                    {"itemCodeableConcept": {"coding": [{"system": RXNORM, "code": "6581"}]}},
                    {"itemCodeableConcept": {"coding": [{"system": RXNORM, "code": "612"}]}},
                ],
            }
        ],
    )
    del order["medicationCodeableConcept"]
    medication = fhir.to_medication(order, "x", is_draft=True)
    assert medication is not None
    assert medication.text == "Antacid suspension"
    assert [c.code for c in medication.ingredient_codings] == ["6581", "612"]


def test_order_without_a_drug_yields_nothing() -> None:
    order = _order()
    del order["medicationCodeableConcept"]
    assert fhir.to_medication(order, "x", is_draft=True) is None


def test_statuses_as_codes_or_concepts_and_partial_dates() -> None:
    r4 = {
        "resourceType": "Condition",
        "clinicalStatus": {"coding": [{"code": "active"}]},
        "verificationStatus": {"coding": [{"code": "confirmed"}]},
        "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "G70.00"}]},
        "onsetDateTime": "2019-03",
    }
    dstu2 = {**r4, "clinicalStatus": "active", "verificationStatus": "confirmed"}
    for resource in (r4, dstu2):
        condition = fhir.to_condition(resource, "x")
        assert condition is not None
        assert (condition.clinical_status, condition.verification_status) == ("active", "confirmed")
        assert condition.onset == datetime(2019, 3, 1, tzinfo=UTC)
    assert fhir.parse_date("1980") == date(1980, 1, 1)
    assert fhir.parse_datetime("not a date") is None


def test_single_objects_where_arrays_belong_are_read_and_repaired() -> None:
    order = _order(category={"text": "community"}, reasonCode={"text": "cramps"})
    repaired, notes = fhir.repair_draft(order)
    assert isinstance(repaired["category"], list) and isinstance(repaired["reasonCode"], list)
    assert notes == [
        "category was a single object, read as a list",
        "reasonCode was a single object, read as a list",
    ]
    assert model_problems(order, "R4")  # strict R4B rejects the original
    assert model_problems(repaired, "R4") == []


def test_bundle_without_type_and_outcome_entries() -> None:
    bundle = {
        "resourceType": "Bundle",
        "entry": [
            {"resource": _order()},
            {
                "resource": {"resourceType": "OperationOutcome", "issue": []},
                "search": {"mode": "outcome"},
            },
            {"fullUrl": "urn:uuid:1"},
        ],
    }
    found = list(fhir_json.iter_resources(bundle, "context.draftOrders"))
    assert [(where, problem) for where, _, problem in found] == [
        ("context.draftOrders.entry[0]", None),
        ("context.draftOrders.entry[2]", "has no resource"),
    ]


def test_version_detection() -> None:
    assert detect([{"resourceType": "MedicationOrder"}], "order-select") == "DSTU2"
    assert detect([_order(dosageInstruction=[{"doseQuantity": {"value": 1}}])], "x") == "STU3"
    assert detect([_order(dosageInstruction=[{"doseAndRate": []}])], "x") == "R4"
    assert detect([], "medication-prescribe") == "STU3"


def test_fhir_client_follows_next_links_up_to_the_page_bound(fixture_fhir_server: str) -> None:
    client = fhir_client(fixture_fhir_server, max_pages=2)
    query = "Observation?patient=mg-pyridostigmine&_count=1"
    total = requests.get(f"{fixture_fhir_server}/{query}", timeout=5).json()["total"]
    assert total > 2
    result = client.fetch("observations", query)
    assert result.problem is None and result.resource is not None
    assert len(result.resource["entry"]) == 2  # two pages of one, then the bound stops it
    unbounded = fhir_client(fixture_fhir_server, max_pages=100)
    assert len(unbounded.fetch("observations", query).resource["entry"]) == total  # type: ignore[index]


def test_fhir_client_reports_outcomes_and_http_errors(fixture_fhir_server: str) -> None:
    client = fhir_client(fixture_fhir_server, max_pages=2)
    missing = client.fetch("patient", "Patient/nobody")
    assert missing.resource is None
    # The status class and nothing the server said (a caller must not use this as a probe);
    # the exact status still tells a DSTU2 server from an R4 one.
    assert missing.problem == "the FHIR server answered with an error (HTTP 4xx)"
    assert missing.status == 404
    bad = client.fetch("observations", "Observation?_count=lots")
    assert bad.problem == "the FHIR server answered with an error (HTTP 4xx)"
    assert bad.status == 400


def _timing(**repeat: object) -> dict[str, object]:
    return _order(
        dosageInstruction=[{"timing": {"repeat": {"period": 1, "periodUnit": "d", **repeat}}}]
    )


def test_frequency_is_the_stated_one_and_zero_is_unknown() -> None:
    def per_day(**repeat: object) -> float | None:
        medication = fhir.to_medication(_timing(**repeat), "context:draftOrders", is_draft=True)
        assert medication is not None
        return medication.doses[0].frequency_per_day

    assert per_day(frequency=2, frequencyMax=4) == 2  # "up to 4" is not the dose
    assert per_day(frequency=0) is None
    assert per_day(frequencyMax=3) is None
    assert per_day() == 1


@pytest.mark.parametrize(
    ("fields", "abated"),
    [
        ({"abatementDateTime": "2024-01-01"}, True),
        ({"abatementPeriod": {"start": "2024-01-01"}}, True),
        ({"abatementAge": {"value": 40, "unit": "a"}}, True),
        ({"abatementString": "in childhood"}, True),
        ({"abatementBoolean": True}, True),
        ({"abatementBoolean": False}, False),
        ({}, False),
    ],
)
def test_condition_abatement_marks_it_abated(fields: dict[str, object], abated: bool) -> None:
    resource = {
        "resourceType": "Condition",
        "id": "c1",
        "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "G70.00"}]},
        **fields,
    }
    condition = fhir.to_condition(resource, "prefetch:conditions")
    assert condition is not None and condition.abated is abated


@pytest.mark.parametrize(
    ("fields", "not_taken"),
    [({"taken": "n"}, True), ({"wasNotTaken": True}, True), ({"taken": "y"}, False), ({}, False)],
)
def test_statement_not_taken(fields: dict[str, object], not_taken: bool) -> None:
    statement = _order(resourceType="MedicationStatement", **fields)
    medication = fhir.to_medication(statement, "prefetch:medicationStatements", is_draft=False)
    assert medication is not None and medication.not_taken is not_taken


# Values a client may put where a CodeableConcept belongs: right, wrong and in between.
_text_or_junk = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=4), st.just("  "),
    st.sampled_from(["http://loinc.org", " 19123-9 ", "E11.9"]),
)
_coding = st.dictionaries(st.sampled_from(["system", "code", "display"]), _text_or_junk)
_concept = st.dictionaries(
    st.sampled_from(["coding", "text"]),
    st.one_of(st.lists(st.one_of(_coding, _text_or_junk), max_size=3), _coding, _text_or_junk),
)
_concepts = st.one_of(_text_or_junk, _concept, st.lists(st.one_of(_concept, _text_or_junk)))


@given(_concepts, st.sampled_from(["19123-9", "E11.9", "  ", "5"]))
def test_first_code_match_answers_what_codings_of_would(concept: object, wanted: str) -> None:
    # The relevance check reads raw codes without building Codings; it must see exactly the
    # codes codings_of reads, and say when there is none.
    codings = fhir.codings_of(concept)
    seen: list[tuple[str, str]] = []

    def kind_of(system: str, code: str) -> str | None:
        seen.append((system, code))
        return f"kind of {code}" if code == wanted else None

    found = next((f"kind of {c.code}" for c in codings if c.code == wanted), None)
    assert fhir.first_code_match(concept, kind_of) == (bool(codings), found)
    # Stops at the first match, and asks in codings_of's order.
    assert seen == [(c.system, c.code) for c in codings][: len(seen)]
