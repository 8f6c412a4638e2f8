"""How rules name patient facts in evidence lines: codes, displays, values and dates."""

from __future__ import annotations

from cds_service.context.model import Coding, Condition, Lab, Medication
from cds_service.rules.picture import MedicationFact

_SYSTEM_NAMES = {
    "http://hl7.org/fhir/sid/icd-10-cm": "ICD-10-CM",
    "http://hl7.org/fhir/sid/icd-10": "ICD-10",
    "http://snomed.info/sct": "SNOMED CT",
    "http://www.nlm.nih.gov/research/umls/rxnorm": "RxNorm",
    "http://www.whocc.no/atc": "ATC",
    "http://loinc.org": "LOINC",
}


def system_name(system: str) -> str:
    return _SYSTEM_NAMES.get(system.rstrip("/"), system or "local code")


def codes_text(codings: tuple[Coding, ...], limit: int = 3) -> str:
    return "; ".join([f"{system_name(c.system)} {c.code}" for c in codings[:limit]])


def condition_text(condition: Condition) -> str:
    codes = codes_text(condition.codings)
    text = condition.display + (f" ({codes})" if codes else "")
    if condition.onset:
        text += f", since {condition.onset.date().isoformat()}"
    if condition.verification_status and condition.verification_status != "confirmed":
        text += f", {condition.verification_status}"
    return text


def medication_text(medication: Medication) -> str:
    codes = codes_text(medication.codings)
    return medication.display + (f" ({codes})" if codes else "")


def order_text(fact: MedicationFact) -> str:
    """A draft or active order, with route and how it was recognised as magnesium."""
    text = medication_text(fact.medication)
    if fact.route:
        text += f", {fact.route}"
    elif fact.is_magnesium:
        text += ", route not stated"
    if fact.magnesium is not None:
        match = fact.magnesium
        text += f"; recognised as magnesium by {match.matched_by} {match.matched_value}"
    elif fact.groups and fact.groups_matched_by == "text":
        # No code matched: say so, so a clinician can judge a match made on the name alone.
        text += "; recognised by its name (no code matched)"
    return text


def lab_text(lab: Lab) -> str:
    value = f"{lab.value.value:g} {lab.value.unit}".strip() if lab.value else "no value"
    when = f" on {lab.effective.date().isoformat()}" if lab.effective else ", date unknown"
    codes = codes_text(lab.codings, limit=1)
    return f"{lab.display} {value}{when}" + (f" ({codes})" if codes else "")
