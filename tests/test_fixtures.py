"""The fixture files: valid FHIR where they claim to be, current, and consistent with the
prefetch contract."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pydantic
import pytest
from fhir.resources.R4B import get_fhir_model_class as r4b_model
from fhir.resources.R4B.bundle import Bundle as R4BBundle
from fhir.resources.STU3 import get_fhir_model_class as stu3_model

from cds_service.fixture_server.build_requests import (
    FIXTURE_FHIR_SERVER,
    SCENARIOS,
    Scenario,
    build_all,
)
from cds_service.protocol.services import PREFETCH_KEYS
from cds_service.resources import bundled_dir
from cds_service.settings import Settings

FIXTURES = bundled_dir("fixtures")
PATIENT_FILES = sorted((FIXTURES / "patients").glob("*.json"))
REQUEST_FILES = sorted((FIXTURES / "requests").glob("*.json"))
SCENARIO_BY_FILE = {scenario.file_name: scenario for scenario in SCENARIOS}
PREFETCH_NAMES = {key.name for key in PREFETCH_KEYS}
TERMINOLOGY = "http://terminology.hl7.org/CodeSystem/"


def load(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as handle:
        data: dict[str, Any] = json.load(handle)
    return data


def requests_with_shape(*shapes: str) -> list[Path]:
    return [path for path in REQUEST_FILES if SCENARIO_BY_FILE[path.name].shape in shapes]


def entries(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [entry["resource"] for entry in bundle.get("entry", [])]


def empty_values(value: Any, where: str = "$") -> list[str]:
    """Paths of null, "", [] and {}: neither FHIR JSON nor CDS Hooks allows them."""
    if value is None or value in ("", [], {}):
        return [where]
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in empty_values(item, f"{where}.{key}")]
    if isinstance(value, list):
        return [p for i, item in enumerate(value) for p in empty_values(item, f"{where}[{i}]")]
    return []


def test_fixture_sets_are_present() -> None:
    assert {path.stem for path in PATIENT_FILES} >= {
        "mg-pyridostigmine", "ckd4-low-egfr", "hashimoto-levothyroxine", "rheumatoid-arthritis",
        "ciprofloxacin", "no-relevant", "mg-inactive",
    }
    assert {path.name for path in REQUEST_FILES} == set(SCENARIO_BY_FILE)


# --- patients --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATIENT_FILES, ids=lambda p: p.stem)
def test_patient_bundle_validates_as_r4(path: Path) -> None:
    bundle = load(path)
    R4BBundle.model_validate(bundle)
    assert bundle["type"] == "collection"
    assert all(entry.get("fullUrl") for entry in bundle["entry"])
    first = entries(bundle)[0]
    assert (first["resourceType"], first["id"]) == ("Patient", path.stem)
    assert empty_values(bundle) == []


def test_resource_ids_are_unique_and_prefixed_with_the_patient() -> None:
    seen: set[str] = set()
    for path in PATIENT_FILES:
        for resource in entries(load(path)):
            assert resource["id"].startswith(path.stem), resource["id"]
            assert resource["id"] not in seen, resource["id"]
            seen.add(resource["id"])
    draft_ids = {
        entry["resource"]["id"]
        for path in REQUEST_FILES
        for key in ("draftOrders", "medications")
        for entry in load(path)["context"].get(key, {}).get("entry", [])
    }
    assert not draft_ids & seen


@pytest.mark.parametrize("path", PATIENT_FILES, ids=lambda p: p.stem)
def test_patient_resources_carry_what_the_rules_read(path: Path) -> None:
    for resource in entries(load(path)):
        kind = resource["resourceType"]
        if kind != "Patient":
            assert resource["subject"] == {"reference": f"Patient/{path.stem}"}
        if kind == "Condition":
            verification = resource["verificationStatus"]["coding"][0]
            assert verification["system"] == TERMINOLOGY + "condition-ver-status"
            # FHIR con-5: no clinicalStatus on an entered-in-error condition.
            if verification["code"] != "entered-in-error":
                clinical = resource["clinicalStatus"]["coding"][0]
                assert clinical["system"] == TERMINOLOGY + "condition-clinical"
        if kind == "Observation":
            assert resource["status"] == "final"
            # stale-egfr's kidney results are from 1978 on purpose (look-back windows).
            if not resource["id"].startswith("stale-egfr-obs-") or "-mg-" in resource["id"]:
                assert "2026-01-01" <= resource["effectiveDateTime"][:10] < "2026-11-25"
            assert resource["valueQuantity"]["system"] == "http://unitsofmeasure.org"
        if kind in ("MedicationRequest", "MedicationStatement"):
            codings = resource["medicationCodeableConcept"]["coding"]
            assert codings[0]["system"] == "http://www.nlm.nih.gov/research/umls/rxnorm"


def test_myasthenia_patient_has_both_codings_on_one_condition() -> None:
    bundle = load(FIXTURES / "patients" / "mg-pyridostigmine.json")
    codes = [
        {(c["system"], c["code"]) for c in r["code"]["coding"]}
        for r in entries(bundle) if r["resourceType"] == "Condition"
    ]
    wanted = {
        ("http://hl7.org/fhir/sid/icd-10-cm", "G70.00"), ("http://snomed.info/sct", "91637004"),
    }
    assert any(wanted <= condition_codes for condition_codes in codes)


# --- requests --------------------------------------------------------------------------------


def test_generator_output_equals_the_files_on_disk() -> None:
    generated = build_all()
    on_disk = {path.name: path.read_text(encoding="utf-8") for path in REQUEST_FILES}
    stale = sorted(name for name in generated.keys() | on_disk.keys()
                   if generated.get(name) != on_disk.get(name))
    assert stale == [], (
        "regenerate with: python -m cds_service.fixture_server.build_requests"
    )


def test_fixture_fhir_server_is_the_default_fixture_server() -> None:
    settings = Settings()
    expected = f"http://{settings.fixture_server_host}:{settings.fixture_server_port}"
    assert expected == FIXTURE_FHIR_SERVER


@pytest.mark.parametrize("path", REQUEST_FILES, ids=lambda p: p.name)
def test_request_envelope(path: Path) -> None:
    request = load(path)
    scenario: Scenario = SCENARIO_BY_FILE[path.name]
    assert request["hook"] == scenario.hook
    assert request["fhirServer"] == FIXTURE_FHIR_SERVER
    assert request["context"]["patientId"] == scenario.patient_id
    assert request["context"]["userId"].startswith("Practitioner/")
    assert set(request.get("prefetch", {})) <= PREFETCH_NAMES
    assert ("prefetch" in request) == scenario.prefetch
    assert set(request) <= {"hook", "hookInstance", "fhirServer", "fhirAuthorization",
                            "context", "prefetch"}
    if scenario.hook == "order-select":
        # Every selection names a draft order of this request.
        orders = {f"{r['resourceType']}/{r['id']}"
                  for r in entries(request["context"]["draftOrders"])}
        assert set(request["context"]["selections"]) <= orders
    assert empty_values(request) == []


def test_hook_instances_are_distinct_uuids() -> None:
    instances = [load(path)["hookInstance"] for path in REQUEST_FILES]
    assert len(set(instances)) == len(instances)
    for value in instances:
        assert str(uuid.UUID(value)) == value


def test_readme_lists_every_request_fixture() -> None:
    readme = (FIXTURES / "README.md").read_text(encoding="utf-8")
    assert [p.name for p in REQUEST_FILES if f"`{p.name}`" not in readme] == []


@pytest.mark.parametrize("path", requests_with_shape("r4", "sandbox", "sandbox-nodrug"),
                         ids=lambda p: p.name)
def test_r4_prefetch_validates(path: Path) -> None:
    for value in load(path).get("prefetch", {}).values():
        r4b_model(value["resourceType"]).model_validate(value)


@pytest.mark.parametrize("path", requests_with_shape("r4"), ids=lambda p: p.name)
def test_r4_draft_orders_validate(path: Path) -> None:
    context = load(path)["context"]
    if "draftOrders" in context:
        bundle = context["draftOrders"]
        R4BBundle.model_validate(bundle)
        for order in entries(bundle):
            assert order["resourceType"] in ("MedicationRequest", "ServiceRequest")
            assert (order["status"], order["intent"]) == ("draft", "order")
            if order["resourceType"] == "ServiceRequest":
                assert order["code"]["coding"][0]["system"] == "http://loinc.org"
                continue
            dosage = order["dosageInstruction"][0]
            # Oral, intravenous, topical, ophthalmic (SNOMED CT).
            routes = ("26643006", "47625008", "6064005", "54485002")
            assert dosage["route"]["coding"][0]["code"] in routes
            assert dosage["doseAndRate"][0]["doseQuantity"]["value"] > 0


def test_stu3_request_validates_as_stu3() -> None:
    request = load(FIXTURES / "requests" / "mg-pyridostigmine.medication-prescribe.stu3.json")
    stu3_model("Bundle").model_validate(request["context"]["medications"])
    for value in request["prefetch"].values():
        stu3_model(value["resourceType"]).model_validate(value)
    # ...and is not mistaken for R4: its MedicationRequest has the STU3 dose shape.
    with pytest.raises(pydantic.ValidationError):
        R4BBundle.model_validate(request["context"]["medications"])


@pytest.mark.parametrize("variant", ["sandbox", "nodrug"])
def test_strict_r4_rejects_what_the_sandbox_sends(variant: str) -> None:
    """Why the context layer normalises draft orders before reading them: the public sandbox
    sends a Bundle without `type`, `category`/`reasonCode` as objects, and (before a drug is
    chosen) no intent or medication."""
    request = load(FIXTURES / "requests" / f"mg-pyridostigmine.order-select.{variant}.json")
    bundle = request["context"]["draftOrders"]
    assert "type" not in bundle
    with pytest.raises(pydantic.ValidationError):
        R4BBundle.model_validate(bundle)
    with pytest.raises(pydantic.ValidationError):
        r4b_model("MedicationRequest").model_validate(entries(bundle)[0])
    assert "fhirAuthorization" not in request
    assert request["context"]["userId"] == "Practitioner/COREPRACTITIONER1"


def test_dstu2_request_has_dstu2_shapes() -> None:
    # fhir.resources has no DSTU2 models, so this fixture is checked by shape only.
    request = load(FIXTURES / "requests" / "mg-pyridostigmine.order-select.dstu2.json")
    (order,) = entries(request["context"]["draftOrders"])
    assert order["resourceType"] == "MedicationOrder"
    assert order["patient"] == {"reference": "Patient/mg-pyridostigmine"}
    assert "doseQuantity" in order["dosageInstruction"][0]
    assert "medicationRequests" not in request["prefetch"]
    conditions = entries(request["prefetch"]["conditions"])
    assert {c["clinicalStatus"] for c in conditions} == {"active", "resolved"}
    assert all(isinstance(c["verificationStatus"], str) and "patient" in c for c in conditions)


def test_noprefetch_request_carries_a_bearer_token() -> None:
    request = load(FIXTURES / "requests" / "mg-pyridostigmine.order-select.noprefetch.json")
    assert request["fhirAuthorization"]["token_type"] == "Bearer"
    assert request["fhirAuthorization"]["patient"] == "mg-pyridostigmine"
