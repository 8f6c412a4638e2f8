"""Skipping facts no rule can use (``KnowledgeRelevance``) must change no answer.

The pipeline lets the context layer skip normalising resources whose codes match nothing in
the knowledge base (most of a chronic patient's chart). These tests build every request both
ways and require the same clinical picture, the same findings and the same data issues.
"""

from __future__ import annotations

import copy
import json
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.workloads import large, typical
from cds_service.context.builder import (
    DataUnavailable,
    build_patient_context,
    default_client_factory,
)
from cds_service.context.model import Coding, PatientContext
from cds_service.knowledge import default_knowledge
from cds_service.protocol.hook_request import HookRequest
from cds_service.protocol.services import PREFETCH_KEYS, SERVICES
from cds_service.rules import engine
from cds_service.rules.picture import KnowledgeRelevance, build_picture
from cds_service.settings import Settings

REQUESTS_DIR = Path(__file__).resolve().parent.parent / "fixtures" / "requests"
TODAY = date(2026, 11, 25)
DRAFT_KEY = {service.hook: service.draft_orders_context_key for service in SERVICES}


def _both_ways(body: dict[str, Any]) -> tuple[PatientContext, PatientContext]:
    request = HookRequest.from_json(body)
    make_client = default_client_factory(Settings(fhir_read_timeout=5))
    key = DRAFT_KEY[request.hook]
    everything = build_patient_context(request, make_client, key, keys=PREFETCH_KEYS)
    filtered = build_patient_context(
        request, make_client, key, KnowledgeRelevance(default_knowledge()), keys=PREFETCH_KEYS
    )
    return everything, filtered


def _assert_same_answer(body: dict[str, Any]) -> PatientContext | None:
    try:
        everything, filtered = _both_ways(body)
    except DataUnavailable as exc:
        with pytest.raises(DataUnavailable) as again:
            build_patient_context(
                HookRequest.from_json(body),
                default_client_factory(Settings(fhir_read_timeout=5)),
                DRAFT_KEY[body["hook"]],
                keys=PREFETCH_KEYS,
            )
        assert again.value.missing == exc.missing
        return None
    knowledge = default_knowledge()
    assert filtered.issues == everything.issues
    assert filtered.patient == everything.patient
    assert filtered.draft_orders == everything.draft_orders
    full = build_picture(everything, knowledge, TODAY)
    lean = build_picture(filtered, knowledge, TODAY)
    # Every fact a rule can match is there; only facts matching nothing are left out.
    assert lean.conditions == full.conditions
    assert lean.medications == tuple(
        fact for fact in full.medications if fact.groups or fact.is_magnesium
    )
    assert lean.drafts == full.drafts
    # Of the labs, only the newest usable result of each kind is kept: the one rules read.
    for kind in {fact.kind for fact in full.labs}:
        assert lean.latest_lab(kind) == full.latest_lab(kind)
    assert set(lean.labs) <= set(full.labs)
    assert len({fact.kind for fact in lean.labs}) == len(lean.labs)
    hook = body["hook"]
    assert engine.evaluate(filtered, knowledge, hook, TODAY) == engine.evaluate(
        everything, knowledge, hook, TODAY
    )
    return filtered


@pytest.mark.parametrize("name", sorted(p.name for p in REQUESTS_DIR.glob("*.json")))
def test_fixture_requests_get_the_same_answer(name: str, fixture_fhir_server: str) -> None:
    body = json.loads((REQUESTS_DIR / name).read_text(encoding="utf-8"))
    body["fhirServer"] = fixture_fhir_server  # keys left out of prefetch are fetched
    _assert_same_answer(body)


@pytest.mark.parametrize("make", [typical, large], ids=["typical", "large"])
def test_benchmark_workloads_get_the_same_answer_with_fewer_facts(make: Any) -> None:
    workload = make()
    filtered = _assert_same_answer(workload.request)
    assert filtered is not None
    prefetched = len(workload.patient) - 1  # all but the Patient
    kept = len(filtered.conditions) + len(filtered.medications) + len(filtered.labs)
    assert kept < prefetched  # irrelevant codes were skipped, not normalised


def test_odd_shapes_are_kept_or_reported_exactly_as_before() -> None:
    """Text-only and code-less resources, contained drugs, another patient's resources."""
    body = copy.deepcopy(typical().request)
    patient_id = body["context"]["patientId"]
    subject = {"reference": f"Patient/{patient_id}"}
    extra_conditions = [
        {
            "resourceType": "Condition",
            "id": "text-only",
            "subject": subject,
            "code": {"text": "Myasthenia gravis (free text)"},
        },
        {"resourceType": "Condition", "id": "no-code", "subject": subject},
        {
            "resourceType": "Condition",
            "id": "other-patient",
            "subject": {"reference": "Patient/someone-else"},
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "91637004"}]},
        },
        {
            "resourceType": "Condition",
            "id": "bare-code",
            "subject": subject,
            "code": ["G70.00", {"coding": {"code": 38341003}}],
        },
    ]
    extra_statements = [
        {
            "resourceType": "MedicationStatement",
            "id": "epsom",
            "status": "active",
            "subject": subject,
            "medicationCodeableConcept": {"text": "Epsom salt soaks"},
        },
        {
            "resourceType": "MedicationStatement",
            "id": "no-drug",
            "status": "active",
            "subject": subject,
        },
    ]
    extra_requests = [
        {
            "resourceType": "MedicationRequest",
            "id": "by-display",
            "status": "active",
            "intent": "order",
            "subject": subject,
            "medicationReference": {"display": "Mag-Ox 400"},
        },
        {
            "resourceType": "MedicationRequest",
            "id": "contained",
            "status": "active",
            "intent": "order",
            "subject": subject,
            "contained": [
                {
                    "resourceType": "Medication",
                    "id": "m1",
                    "code": {"text": "Mineral supplement"},
                    "ingredient": [
                        {
                            "itemCodeableConcept": {
                                "coding": [
                                    {
                                        "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                        "code": "6581",
                                        "display": "magnesium oxide",
                                    }
                                ]
                            }
                        }
                    ],
                }
            ],
            "medicationReference": {"reference": "#m1"},
        },
    ]
    extra_labs = [
        {"resourceType": "Observation", "id": "no-code", "status": "final", "subject": subject},
        {
            "resourceType": "Observation",
            "id": "mg-text",
            "status": "final",
            "subject": subject,
            "code": {"text": "Magnesium"},
            "valueQuantity": {"value": 1.1, "unit": "mg/dL"},
        },
    ]
    prefetch = body["prefetch"]
    for key, extra in (
        ("conditions", extra_conditions),
        ("medicationStatements", extra_statements),
        ("medicationRequests", extra_requests),
        ("observations", extra_labs),
    ):
        prefetch[key]["entry"].extend({"resource": resource} for resource in extra)
    filtered = _assert_same_answer(body)
    assert filtered is not None
    kept = {fact.source.resource_id for fact in (*filtered.conditions, *filtered.medications)}
    assert {"text-only", "epsom", "by-display", "contained"} <= kept
    assert "bare-code" not in kept  # codes without a system match no knowledge entry
    reported = {issue.where for issue in filtered.issues}
    assert len(reported) >= 4  # code-less condition/lab, drugless statement, other patient


def test_code_relevance_is_remembered_within_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    from cds_service.rules import picture

    knowledge = default_knowledge()
    relevance = KnowledgeRelevance(knowledge)
    monkeypatch.setattr(picture, "_CODE_MEMO_SIZE", 3)
    icd10 = "http://hl7.org/fhir/sid/icd-10-cm"
    codes = ["G70.00", "G70.01", "E11.9", "I10", "N18.4", "G70.00"]
    for code in codes:
        expected = bool(knowledge.condition_groups((Coding(icd10, code),)))
        assert relevance.condition_code(icd10, code) is expected
        assert len(relevance._condition_codes) <= 3  # hostile variety cannot grow it
    assert relevance.condition_code(icd10, "G70.00") is True  # myasthenia gravis
    assert relevance.lab_kind("http://loinc.org", "19123-9") == "serum-magnesium"
    assert relevance.lab_kind("http://loinc.org", "718-7") is None  # haemoglobin
    assert relevance.lab_kind("http://loinc.org", "718-7") is None  # remembered: still None
    assert ("http://loinc.org", "718-7") in relevance._lab_kinds
    long_code = "G70.00" + " " * 300 + "x"  # real codes are short: not remembered
    relevance.condition_code(icd10, long_code)
    assert (icd10, long_code) not in relevance._condition_codes


# Observations as charts hold them: several results of a kind on one day, withdrawn or
# valueless results, partial and missing dates, a second coding of another kind.
_LOINC = "http://loinc.org"
_lab_codes = st.sampled_from(
    [
        [("19123-9", _LOINC)],
        [("2601-3", _LOINC)],
        [("98979-8", _LOINC)],
        [("2160-0", _LOINC)],
        [("718-7", _LOINC)],  # haemoglobin: no rule reads it
        [("718-7", _LOINC), ("19123-9", _LOINC)],  # the second code decides
        [("98979-8", _LOINC), ("19123-9", _LOINC)],  # the first known kind wins
        [("19123-9", "http://example.org/local")],  # a magnesium code of another system
        [],  # text only: read in full and reported
    ]
)
_when = st.sampled_from(
    [
        None,
        "2026-11-10",
        "2026-11",
        "2026-11-10T08:15:00-05:00",
        "2026-11-10T13:15:00Z",  # the same instant as the line above
        "2026-11-20T09:00:00+01:00",
        "1969-07-20",  # before the epoch: older than an undated result
        "not a date",
    ]
)


@st.composite
def _observation(draw: st.DrawFn) -> dict[str, Any]:
    codes = draw(_lab_codes)
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": f"obs-{draw(st.integers(0, 10**6))}",
        "subject": {"reference": "Patient/PLACEHOLDER"},
        "code": {
            "coding": [{"system": system, "code": code} for code, system in codes],
            "text": "a lab result",
        },
    }
    status = draw(st.sampled_from([None, "final", "amended", "entered-in-error", "cancelled"]))
    if status is not None:
        resource["status"] = status
    value = draw(st.sampled_from([None, 0.6, 1.9, 2.4, 4.8, 75, 22, "n/a"]))
    if value is not None:
        resource["valueQuantity"] = {"value": value, "unit": "mg/dL"}
    where = draw(st.sampled_from(["effectiveDateTime", "effectivePeriod", "issued"]))
    when = draw(_when)
    if when is not None:
        resource[where] = {"start": when} if where == "effectivePeriod" else when
    return resource


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_observation(), max_size=12))
def test_only_the_newest_usable_lab_of_each_kind_is_kept(observations: list[Any]) -> None:
    """The rules read the newest usable result of each kind; keeping only that one (and
    normalising no other) must not change which one they read, nor any answer."""
    body = copy.deepcopy(typical().request)
    patient_id = body["context"]["patientId"]
    for index, resource in enumerate(observations):
        resource["subject"] = {"reference": f"Patient/{patient_id}"}
        resource["id"] = f"{resource['id']}-{index}"
    body["prefetch"]["observations"] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": resource} for resource in observations],
    }
    filtered = _assert_same_answer(body)
    assert filtered is not None
    kinds = [
        default_knowledge().lab_kind(lab.codings) for lab in filtered.labs if lab.codings
    ]
    assert len(kinds) == len(set(kinds))  # at most one result per kind


def test_an_empty_patient_id_owns_no_resource() -> None:
    # The schema refuses an empty patientId; called directly, "Patient/" must still not read
    # as the patient's own reference (its last segment is "Patient").
    body = copy.deepcopy(typical().request)
    body["context"]["patientId"] = ""
    for bundle in body["prefetch"].values():
        for entry in bundle.get("entry", []) if isinstance(bundle, dict) else []:
            entry["resource"]["subject"] = {"reference": "Patient/"}
    _, filtered = _both_ways(body)
    assert not filtered.conditions and not filtered.medications and not filtered.labs
    assert any("another patient" in issue.problem for issue in filtered.issues)
