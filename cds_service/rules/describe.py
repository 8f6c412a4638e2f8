"""How rules name patient facts on a card: clinical words, rounded values, dates; no codes.

The codes and resource a fact came from travel beside its words (``Evidence.codes``,
``Evidence.source``) into the card's machine-readable extension, never into its text.
"""

from __future__ import annotations

import re

from cds_service.context.model import Condition, Lab, Medication, Quantity
from cds_service.rules.findings import Evidence
from cds_service.rules.picture import MedicationFact

_SYSTEM_NAMES = {
    "http://hl7.org/fhir/sid/icd-10-cm": "ICD-10-CM",
    "http://hl7.org/fhir/sid/icd-10": "ICD-10",
    "http://snomed.info/sct": "SNOMED CT",
    "http://www.nlm.nih.gov/research/umls/rxnorm": "RxNorm",
    "http://www.whocc.no/atc": "ATC",
    "http://loinc.org": "LOINC",
}
# UCUM annotations and units as a clinician writes them (UCUM "{pill}" is "pill").
_UNIT_WORDS = {
    "mL/min/{1.73_m2}": "mL/min/1.73 m²",
    "mL/min/1.73m2": "mL/min/1.73 m²",
    "mL/min/1.73.m2": "mL/min/1.73 m²",
    "{tbl}": "tablet",
    "{tablet}": "tablet",
    "{capsule}": "capsule",
    "{cap}": "capsule",
    "meq/L": "mEq/L",
    "mmol/l": "mmol/L",
    "mg/dl": "mg/dL",
    "ug": "mcg",
}
# Count nouns a dose is given in: "2 tablets".
_COUNTED = frozenset({"tablet", "capsule", "pill", "drop", "puff", "sachet", "vial", "patch"})
_ANNOTATION = re.compile(r"\{([^{}]*)\}")
# RxNorm's capitalised strength units and dose forms, as they read in a sentence.
_RXNORM_WORDS = re.compile(
    r"\b(MG|MCG|ML|MEQ|UNT|Oral|Tablet|Capsule|Solution|Injection|Suspension|Extended|Release|"
    r"Delayed|Chewable|Topical|Powder|Granules|Product|Soak|Prefilled|Syringe|Ophthalmic)\b"
)
_RXNORM_CASE = {"MG": "mg", "MCG": "mcg", "ML": "mL", "MEQ": "mEq", "UNT": "units"}
# SNOMED CT fully specified names end in a semantic tag: "(disorder)".
_SEMANTIC_TAG = re.compile(r"\s*\((disorder|finding|clinical drug|product|substance)\)$")
_FREQUENCY = {1.0: "once a day", 2.0: "twice a day"}


def system_name(system: str) -> str:
    return _SYSTEM_NAMES.get(system.rstrip("/"), system or "local code")


def unit_text(unit: str) -> str:
    """A unit as a clinician writes it: no UCUM annotations ('{pill}' -> 'pill')."""
    unit = unit.strip()
    if unit in _UNIT_WORDS:
        return _UNIT_WORDS[unit]
    return _ANNOTATION.sub(lambda m: m.group(1).replace("_", " "), unit).strip()


def quantity_text(quantity: Quantity, decimals: int | None = None) -> str:
    value = f"{quantity.value:.{decimals}f}" if decimals is not None else f"{quantity.value:g}"
    unit = unit_text(quantity.unit)
    if unit in _COUNTED and quantity.value != 1:
        unit += "s"
    return f"{value} {unit}".strip()


def clinical_name(text: str) -> str:
    """An EHR or RxNorm name as it reads in a sentence: '400 MG Oral Tablet' -> '400 mg oral
    tablet'; a SNOMED CT semantic tag dropped."""
    text = _SEMANTIC_TAG.sub("", " ".join(text.split()))
    return _RXNORM_WORDS.sub(lambda m: _RXNORM_CASE.get(m.group(1), m.group(1).lower()), text)


def mid_sentence(name: str) -> str:
    """'Chronic kidney disease' -> 'chronic kidney disease' for the middle of a sentence. A
    proper name keeps its capital: an eponym ("Hashimoto's thyroiditis", "Lambert-Eaton
    syndrome"), an acronym ("AKI", "IV"), a brand written as one ("Mag-Ox 400", "CIPRO",
    "Rolaids Ultra Strength": a capitalised word follows)."""
    words = name.split(" ", 2)
    first = words[0]
    if first.endswith(("'s", "’s", "s'")) or any(ch.isupper() for ch in first[1:]):
        return name
    if len(words) > 1 and words[1][:1].isupper() and words[1][1:].islower():
        return name
    return name[:1].lower() + name[1:]


def short_display(display: str) -> str:
    """A knowledge display without its parenthetical: "Hashimoto's thyroiditis"."""
    return " ".join(re.sub(r"\([^)]*\)", "", display).split())


def sentence(text: str) -> str:
    """Sentence case: the first letter capital, nothing else changed."""
    return text[:1].upper() + text[1:]


def condition_text(condition: Condition) -> str:
    """'Myasthenia gravis since 2019' (', unconfirmed' when the chart says so)."""
    text = clinical_name(condition.display)
    if condition.onset:
        text += f" since {condition.onset.year}"
    if condition.verification_status and condition.verification_status != "confirmed":
        text += f" ({condition.verification_status})"
    return sentence(text)


def medication_text(medication: Medication) -> str:
    return clinical_name(medication.display)


def frequency_text(per_day: float) -> str:
    """'twice a day', '3 times a day'; more often than 4 times, as an interval the way it is
    ordered ('every hour' for a maintenance infusion, not '24 times a day')."""
    if per_day in _FREQUENCY:
        return _FREQUENCY[per_day]
    hours = 24 / per_day if per_day > 4 else 0.0
    if hours and hours.is_integer():
        return "every hour" if hours == 1 else f"every {hours:g} hours"
    return f"{per_day:g} times a day"


def dose_text(medication: Medication) -> str:
    """'1 tablet twice a day' for the first dosage instruction that states an amount."""
    for dose in medication.doses:
        if dose.quantity is not None:
            amount = quantity_text(dose.quantity)
            if dose.once or (dose.untimed and dose.frequency_per_day is not None):
                return f"{amount} once"
            if dose.frequency_per_day is not None:
                return f"{amount} {frequency_text(dose.frequency_per_day)}"
            return f"{amount}, how often not stated"
    return ""


def order_text(fact: MedicationFact) -> str:
    """'magnesium oxide 400 mg oral tablet, 1 tablet twice a day': a draft or one on file."""
    name = fact_name(fact)
    text = name if fact.brand_name else mid_sentence(name)
    dose = dose_text(fact.medication)
    if dose:
        text += f", {dose}"
    if fact.route is None and fact.is_magnesium:
        text += ", route not stated"
    if fact.magnesium is not None:
        by_name = fact.magnesium.matched_by == "text"
    else:
        by_name = bool(fact.groups) and fact.groups_matched_by == "text"
    if by_name:
        # No code matched: say so, so a clinician can judge a match made on the name alone.
        text += ", recognised by its name only"
    return text


def fact_name(fact: MedicationFact) -> str:
    """The order's name; when the EHR sent only a code, what the code was recognised as."""
    name = medication_text(fact.medication)
    if any(ch.isalpha() for ch in name):
        return name
    if fact.magnesium is not None:
        return fact.magnesium.salt_display
    if fact.groups:  # recognised from its code alone: say as what, and that no name came
        return f"{' / '.join(sorted(g.replace('-', ' ') for g in fact.groups))} (sent by code only)"
    return "a medication sent without a name"


def recognised_by(fact: MedicationFact) -> str:
    """How the medication was recognised, for provenance: 'magnesium: rxnorm-product 198741'."""
    if fact.magnesium is not None:
        return f"magnesium: {fact.magnesium.matched_by} {fact.magnesium.matched_value}"
    if fact.groups:
        return f"{', '.join(sorted(fact.groups))}: {fact.groups_matched_by or 'code'}"
    return ""


def lab_value_text(lab: Lab, kind: str = "") -> str:
    """Rounded as read: eGFR whole, serum magnesium 1 decimal in mg/dL and mEq/L, 2 in mmol/L."""
    if lab.value is None:
        return "no value"
    unit = unit_text(lab.value.unit)
    decimals: int | None = None
    if kind == "egfr":
        decimals = 0
    elif kind == "serum-magnesium":
        decimals = 2 if unit.lower() in ("mmol/l", "mm") else 1
    return quantity_text(Quantity(lab.value.value, unit), decimals)


def lab_when(lab: Lab) -> str:
    """'on 2026-11-18', or 'date unknown'."""
    return f"on {lab.effective.date().isoformat()}" if lab.effective else "date unknown"


def lab_text(lab: Lab, name: str = "", kind: str = "") -> str:
    """'eGFR 22 mL/min/1.73 m² on 2026-11-18' (``kind``: the lab group, for the rounding)."""
    return f"{name or clinical_name(lab.display)} {lab_value_text(lab, kind)} {lab_when(lab)}"


def condition_evidence(condition: Condition) -> Evidence:
    return Evidence(condition_text(condition), condition.source, condition.codings)


def medication_evidence(fact: MedicationFact, text: str) -> Evidence:
    medication = fact.medication
    return Evidence(text, medication.source, medication.codings, recognised_by(fact))
