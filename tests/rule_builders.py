"""Small builders of PatientContext facts for the rule unit tests (no Flask, no FHIR JSON).

Codes here are test data taken from clinical-knowledge.md; the rules themselves read every
code from the knowledge files.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from datetime import UTC, date, datetime
from typing import Any

from cds_service.context.model import (
    Coding,
    Condition,
    Dose,
    Lab,
    LabOrder,
    Medication,
    PatientContext,
    PatientInfo,
    Quantity,
    ReferenceRange,
    SourceRef,
)
from cds_service.knowledge import Knowledge, default_knowledge
from cds_service.rules import engine
from cds_service.rules.findings import Finding
from cds_service.rules.picture import ClinicalPicture, build_picture

KB: Knowledge = default_knowledge()
TODAY = date(2026, 11, 25)

ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ATC = "http://www.whocc.no/atc"
LOINC = "http://loinc.org"
ROUTES = {"oral": "26643006", "iv": "47625008", "topical": "6064005"}

# RxNorm (clinical-knowledge.md)
MG_OXIDE_400 = "198741"
MG_SULFATE_INJ = "1658221"
MG_CITRATE_SOLN = "1052760"
MG_GLYCINATE_100 = "849497"
MG_SULFATE = "6585"
PYRIDOSTIGMINE = "9000"
CIPROFLOXACIN = "2551"
LEVOFLOXACIN = "82122"
DOXYCYCLINE = "3640"
LEVOTHYROXINE = "10582"
RALTEGRAVIR = "719872"
GENTAMICIN = "1596450"
ROCURONIUM = "68139"
# LOINC
SERUM_MG_MASS = "19123-9"
SERUM_MG_MOLES = "2601-3"
EGFR = "98979-8"

_ids = itertools.count(1)

Rule = Callable[[ClinicalPicture, Knowledge, str], Iterable[Finding]]


def _ref(kind: str, origin: str = "prefetch:test") -> SourceRef:
    return SourceRef(kind, f"{kind.lower()}-{next(_ids)}", origin)


def condition(
    icd: str | None = None,
    snomed: str | None = None,
    text: str = "",
    clinical: str | None = "active",
    verification: str | None = "confirmed",
) -> Condition:
    codings = tuple(
        Coding(system, code)
        for system, code in ((ICD10CM, icd), (SNOMED, snomed))
        if code is not None
    )
    return Condition(codings, text, clinical, verification, None, _ref("Condition"))


def medication(
    *rxnorm: str,
    text: str = "",
    route: str | None = "oral",
    dose: tuple[float, str] | None = None,
    per_day: float | None = 1,
    draft: bool = False,
    status: str | None = None,
    kind: str = "MedicationRequest",
    patient_instruction: str = "",
    atc: str | None = None,
) -> Medication:
    codings = tuple(Coding(RXNORM, code) for code in rxnorm)
    if atc:
        codings += (Coding(ATC, atc),)
    doses = (
        (Dose(Quantity(*dose), per_day, "", patient_instruction),)
        if dose is not None or patient_instruction
        else ()
    )
    route_codings = (Coding(SNOMED, ROUTES[route]),) if route else ()
    return Medication(
        codings=codings,
        text=text,
        status=status or ("draft" if draft else "active"),
        route=route_codings,
        route_text="",
        doses=doses,
        is_draft=draft,
        kind=kind,
        authored=None,
        source=_ref(kind, "context:draftOrders" if draft else "prefetch:medicationRequests"),
    )


def draft(*rxnorm: str, **kwargs: Any) -> Medication:
    """A draft order of this hook call (same options as ``medication``)."""
    return medication(*rxnorm, draft=True, **kwargs)


def lab(
    loinc: str,
    value: float,
    unit: str,
    when: str = "2026-11-20",
    low: float | None = None,
    high: float | None = None,
) -> Lab:
    ranges = ()
    if low is not None or high is not None:
        ranges = (
            ReferenceRange(
                Quantity(low, unit) if low is not None else None,
                Quantity(high, unit) if high is not None else None,
            ),
        )
    effective = datetime.fromisoformat(when).replace(tzinfo=UTC)
    return Lab(
        (Coding(LOINC, loinc),), "", Quantity(value, unit), effective, "final", ranges, (),
        _ref("Observation"),
    )  # fmt: skip


def serum_mg(value: float, when: str = "2026-11-20", low: float = 1.6, high: float = 2.6) -> Lab:
    return lab(SERUM_MG_MASS, value, "mg/dL", when, low, high)


def egfr(value: float, when: str = "2026-11-20") -> Lab:
    return lab(EGFR, value, "mL/min/{1.73_m2}", when)


def lab_order(loinc: str = SERUM_MG_MASS, status: str = "draft") -> LabOrder:
    return LabOrder((Coding(LOINC, loinc),), "", status, _ref("ServiceRequest"))


def context(
    *,
    conditions: Iterable[Condition] = (),
    medications: Iterable[Medication] = (),
    drafts: Iterable[Medication] = (),
    labs: Iterable[Lab] = (),
    lab_orders: Iterable[LabOrder] = (),
    birth_date: date | None = date(1970, 1, 1),
    sex: str | None = "female",
) -> PatientContext:
    return PatientContext(
        patient=PatientInfo("p1", birth_date, sex),
        conditions=tuple(conditions),
        medications=tuple(medications),
        draft_orders=tuple(drafts),
        labs=tuple(labs),
        draft_lab_orders=tuple(lab_orders),
    )


def picture(ctx: PatientContext) -> ClinicalPicture:
    return build_picture(ctx, KB, TODAY)


def run(rule: Rule, ctx: PatientContext, hook: str = "order-select") -> list[Finding]:
    """One rule alone, before the engine's merging and hook policy."""
    return list(rule(picture(ctx), KB, hook))


def run_all(ctx: PatientContext, hook: str = "order-select") -> list[Finding]:
    """Every rule through the engine: merged, hook policy applied, most serious first."""
    return engine.evaluate(ctx, KB, hook, TODAY)


def shape(findings: Iterable[Finding]) -> list[tuple[str, str]]:
    return [(f.rule_id, f.indicator) for f in findings]


MG = condition("G70.00", "91637004", "Myasthenia gravis")
RA = condition("M05.79", "69896004", "Rheumatoid arthritis")
CKD4 = condition("N18.4", "431857002", "Chronic kidney disease stage 4")
