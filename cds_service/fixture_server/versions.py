"""Down-convert the fixture store's R4 resources to STU3 and DSTU2 shapes.

Only what the fixture patients use is converted (Patient, Condition, MedicationRequest,
MedicationStatement, Observation and searchset Bundles of them); these feed the request
fixtures of older clients (CDS Hooks 1.0 medication-prescribe, the sandbox's DSTU2 server).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

Resource = dict[str, Any]

_R4_TO_STU3_SYSTEMS = {
    "http://terminology.hl7.org/CodeSystem/condition-category":
        "http://hl7.org/fhir/condition-category",
    "http://terminology.hl7.org/CodeSystem/observation-category":
        "http://hl7.org/fhir/observation-category",
    "http://terminology.hl7.org/CodeSystem/medicationrequest-category":
        "http://hl7.org/fhir/medication-request-category",
    "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation":
        "http://hl7.org/fhir/v2/0078",
}
# DSTU2 condition categories are complaint|symptom|finding|diagnosis (no problem-list-item).
_DSTU2_CONDITION_CATEGORY = {
    "coding": [{"system": "http://hl7.org/fhir/condition-category", "code": "diagnosis",
                "display": "Diagnosis"}],
}


def _status_code(concept: Any) -> str | None:
    """R4 CodeableConcept status → the plain code STU3/DSTU2 use."""
    if isinstance(concept, dict):
        for coding in concept.get("coding", []):
            if isinstance(coding, dict) and coding.get("code"):
                return str(coding["code"])
    return None


def _old_systems(concept: Resource) -> Resource:
    concept = copy.deepcopy(concept)
    for coding in concept.get("coding", []):
        coding["system"] = _R4_TO_STU3_SYSTEMS.get(coding.get("system", ""), coding.get("system"))
    return concept


def _first(concepts: Any) -> Resource | None:
    """An R4 0..* CodeableConcept list as the 0..1 single object of older versions."""
    return _old_systems(concepts[0]) if isinstance(concepts, list) and concepts else None


def _flat_dosage(dosage: Resource, quantity_field: str) -> Resource:
    """R4 ``doseAndRate[].doseQuantity`` → ``doseQuantity`` (STU3) / ``quantityQuantity``."""
    dosage = copy.deepcopy(dosage)
    dose_and_rate = dosage.pop("doseAndRate", [])
    rebuilt: Resource = {}
    for key, value in dosage.items():
        rebuilt[key] = value
        if key == "route" and dose_and_rate and "doseQuantity" in dose_and_rate[0]:
            rebuilt[quantity_field] = dose_and_rate[0]["doseQuantity"]
    if dose_and_rate and quantity_field not in rebuilt and "doseQuantity" in dose_and_rate[0]:
        rebuilt[quantity_field] = dose_and_rate[0]["doseQuantity"]
    return rebuilt


def _dstu2_dosage(dosage: Resource) -> Resource:
    dosage = _flat_dosage(dosage, "quantityQuantity")
    repeat = dosage.get("timing", {}).get("repeat")
    if isinstance(repeat, dict):
        # DSTU2 Timing.repeat: `periodUnits` and `boundsQuantity` (later `periodUnit`,
        # `boundsDuration`).
        renames = {"periodUnit": "periodUnits", "boundsDuration": "boundsQuantity"}
        dosage["timing"]["repeat"] = {renames.get(k, k): v for k, v in repeat.items()}
    return dosage


def _rebuild(resource: Resource, convert: Callable[[str, Any], list[tuple[str, Any]]]) -> Resource:
    """Copy a resource key by key, letting ``convert`` rename, reshape or drop each element."""
    out: Resource = {}
    for key, value in resource.items():
        for new_key, new_value in convert(key, copy.deepcopy(value)):
            if new_value is not None:
                out[new_key] = new_value
    return out


def to_stu3(resource: Resource) -> Resource:
    kind = resource.get("resourceType")

    def convert(key: str, value: Any) -> list[tuple[str, Any]]:
        if kind == "Condition":
            if key in ("clinicalStatus", "verificationStatus"):
                return [(key, _status_code(value))]
            if key == "category":
                return [(key, [_old_systems(c) for c in value])]
            if key == "recordedDate":
                return [("assertedDate", value)]
        if kind == "MedicationRequest":
            if key == "category":
                return [(key, _first(value))]
            if key == "requester":
                return [(key, {"agent": value})]
            if key == "encounter":
                return [("context", value)]
            if key == "dosageInstruction":
                return [(key, [_flat_dosage(d, "doseQuantity") for d in value])]
        if kind == "MedicationStatement":
            if key == "dosage":
                return [(key, [_flat_dosage(d, "doseQuantity") for d in value])]
            if key == "subject":
                # STU3 requires `taken`; the fixtures only hold statements of taken drugs.
                return [(key, value), ("taken", "y")]
        if kind == "Observation":
            if key == "category":
                return [(key, [_old_systems(c) for c in value])]
            if key == "interpretation":
                return [(key, _first(value))]
        return [(key, value)]

    return _rebuild(resource, convert)


def to_dstu2(resource: Resource) -> Resource:
    kind = resource.get("resourceType")

    def convert(key: str, value: Any) -> list[tuple[str, Any]]:
        if kind == "Patient" and key == "name":
            # DSTU2 HumanName.family is a list.
            return [(key, [{**name, "family": [name["family"]]} if "family" in name else name
                           for name in value])]
        if kind == "Condition":
            if key == "subject":
                return [("patient", value)]
            if key in ("clinicalStatus", "verificationStatus"):
                return [(key, _status_code(value))]
            if key == "category":
                return [(key, copy.deepcopy(_DSTU2_CONDITION_CATEGORY))]
            if key == "recordedDate":
                return [("dateRecorded", value)]
        if kind == "MedicationStatement":
            if key == "subject":
                return [("patient", value)]
            if key == "dosage":
                return [(key, [_dstu2_dosage(d) for d in value])]
        if kind == "Observation" and key in ("category", "interpretation"):
            return [(key, _first(value))]
        return [(key, value)]

    if kind == "MedicationRequest":
        raise ValueError("DSTU2 has no MedicationRequest (it has MedicationOrder)")
    return _rebuild(resource, convert)


def convert_searchset(bundle: Resource, convert: Callable[[Resource], Resource]) -> Resource:
    """A searchset Bundle with each entry's resource converted (Bundle itself is unchanged)."""
    bundle = copy.deepcopy(bundle)
    for entry in bundle.get("entry", []):
        entry["resource"] = convert(entry["resource"])
    return bundle
