"""Normalise: gathered FHIR JSON → PatientContext facts, for R4, STU3 and DSTU2 alike.

Real clients send slightly off-spec JSON (the public sandbox's Bundle without ``type``, single
objects where arrays belong, DSTU2 ``MedicationOrder``, plain-string statuses). Extraction
therefore reads the raw JSON defensively and never raises: what cannot be used becomes a
``DataIssue`` the response reports. (The strict fhir.resources check of what an update
suggestion sends back lives in ``cds_service.fhir_models``.)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Protocol, TypeVar

from cds_service.context.fhir_json import (
    MEDICATION_TYPES,
    as_list,
    medication_reference_key,
    nested_deeper_than,
)
from cds_service.context.gather import Gathered
from cds_service.context.model import (
    WITHDRAWN_LAB_STATUSES,
    Coding,
    Condition,
    DataIssue,
    Dose,
    Lab,
    LabOrder,
    Medication,
    PatientInfo,
    Quantity,
    ReferenceRange,
    SourceRef,
    lab_recency,
)
from cds_service.context.rxnav import RxNavClient, with_ingredients

_PERIOD_PER_DAY = {
    "s": 86400.0,
    "min": 1440.0,
    "h": 24.0,
    "d": 1.0,
    "wk": 1 / 7,
    "mo": 1 / 30,
    "a": 1 / 365,
}
_Found = TypeVar("_Found")
_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


# A chart repeats the same few codes on hundreds of resources: one shared (immutable) Coding
# per distinct (system, code, display) saves building and holding thousands of equal objects.
# Bounded, so that hostile input cannot grow it: full means start over.
_CODINGS: dict[tuple[str, str, str], Coding] = {}
_CODINGS_MAX = 20_000


def _coding(system: str, code: str, display: str) -> Coding:
    key = (system, code, display)
    found = _CODINGS.get(key)
    if found is None:
        if len(_CODINGS) >= _CODINGS_MAX:
            _CODINGS.clear()
        found = _CODINGS[key] = Coding(system, code, display)
    return found


def _codes(concept: Any) -> Iterator[tuple[dict[str, Any] | None, str]]:
    """``(coding, code)`` of every usable code of a concept, in order; coding None for a bare
    code string. The hot path of extraction: plain loops, no helper calls per element."""
    items = concept if isinstance(concept, list) else () if concept is None else (concept,)
    for item in items:
        if isinstance(item, dict):
            codings = item.get("coding")
            if codings is None:
                continue
            for coding in codings if isinstance(codings, list) else (codings,):
                if not isinstance(coding, dict):
                    continue
                code = coding.get("code")
                if isinstance(code, str):
                    code = code.strip()
                elif isinstance(code, int) and not isinstance(code, bool):
                    # JSON true/false is no code.
                    code = str(code).strip()
                else:
                    continue
                if code:
                    yield coding, code
        elif isinstance(item, str):
            code = item.strip()
            if code:
                yield None, code


def codings_of(concept: Any) -> tuple[Coding, ...]:
    """Codings of a CodeableConcept (or a list of them, or a bare code string)."""
    out: list[Coding] = []
    for coding, code in _codes(concept):
        if coding is None:
            out.append(_coding("", code, ""))
            continue
        system = coding.get("system")
        display = coding.get("display")
        out.append(
            _coding(
                system.strip() if isinstance(system, str) else "",
                code,
                display.strip() if isinstance(display, str) else "",
            )
        )
    return tuple(out)


def first_code_match(
    concept: Any, lookup: Callable[[str, str], _Found]
) -> tuple[bool, _Found | None]:
    """``(has a usable code, lookup's first truthy answer)`` over a concept's codes, asking
    ``lookup(system, code)`` in order. The codes are exactly those ``codings_of`` reads
    (stripped, the same ones skipped), without building a Coding for any of them."""
    usable = False
    for coding, code in _codes(concept):
        usable = True
        system = coding.get("system") if coding is not None else ""
        found = lookup(system.strip() if isinstance(system, str) else "", code)
        if found:
            return True, found
    return usable, None


def concept_text(concept: Any) -> str:
    for item in concept if isinstance(concept, list) else () if concept is None else (concept,):
        if isinstance(item, dict):
            text = item.get("text")
            if isinstance(text, str) and (text := text.strip()):
                return text
    return ""


def status_code(value: Any) -> str | None:
    """A status that is a code (STU3/DSTU2) or a CodeableConcept (R4)."""
    if isinstance(value, str):
        return value.strip().lower() or None
    for _, code in _codes(value):
        return code.lower()  # the first code, without building Codings for the rest
    return None


def parse_datetime(value: Any) -> datetime | None:
    """FHIR date / dateTime / instant, partial dates allowed; naive values are taken as UTC."""
    if not isinstance(value, str) or not value:
        return None
    try:
        if "T" in value:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except ValueError:
        pass
    match = _DATE.match(value)
    if not match:
        return None
    year, month, day = match.group(1), match.group(2) or "1", match.group(3) or "1"
    try:
        return datetime(int(year), int(month), int(day), tzinfo=UTC)
    except ValueError:
        return None


def parse_date(value: Any) -> date | None:
    parsed = parse_datetime(value)
    return parsed.date() if parsed else None


def quantity_of(value: Any) -> Quantity | None:
    if not isinstance(value, dict):
        return None
    number = value.get("value")
    if isinstance(number, bool) or not isinstance(number, int | float | str):
        return None
    try:
        amount = float(number)
    except (ValueError, OverflowError):  # OverflowError: an integer beyond a double (10**400)
        return None
    if not math.isfinite(amount):  # "NaN", "1e400": no comparison in the rules would hold
        return None
    unit = _text(value.get("code")) or _text(value.get("unit"))
    return Quantity(amount, unit)


def source_ref(resource: dict[str, Any], origin: str) -> SourceRef:
    resource_id = resource.get("id")
    return SourceRef(
        resource_type=str(resource.get("resourceType", "")),
        resource_id=resource_id if isinstance(resource_id, str) else "",
        origin=origin,
    )


def to_patient(resource: dict[str, Any], origin: str, fallback_id: str) -> PatientInfo:
    resource_id = resource.get("id")
    gender = resource.get("gender")
    died = resource.get("deceasedDateTime")
    return PatientInfo(
        id=resource_id if isinstance(resource_id, str) else fallback_id,
        birth_date=parse_date(resource.get("birthDate")),
        sex=gender if isinstance(gender, str) else None,
        source=source_ref(resource, origin),
        # A date that does not parse still says the patient died.
        deceased=resource.get("deceasedBoolean") is True or bool(_text(died)),
        deceased_on=parse_date(died),
    )


def to_condition(resource: dict[str, Any], origin: str) -> Condition | None:
    codings = code_codings(resource)
    text = concept_text(resource.get("code"))
    if not codings and not text:
        return None
    return Condition(
        codings=codings,
        text=text,
        clinical_status=status_code(resource.get("clinicalStatus")),
        verification_status=status_code(resource.get("verificationStatus")),
        onset=parse_datetime(resource.get("onsetDateTime") or resource.get("recordedDate")),
        source=source_ref(resource, origin),
        abated=_abated(resource),
    )


_ABATEMENT_KEYS = (
    "abatementDateTime", "abatementPeriod", "abatementAge", "abatementRange", "abatementString",
    "abatementDate",  # DSTU2
)  # fmt: skip


def _abated(resource: dict[str, Any]) -> bool:
    """abatement[x] says the condition ended (abatementBoolean false says it did not)."""
    if resource.get("abatementBoolean") is True:
        return True
    return any(resource.get(key) not in (None, "", {}, []) for key in _ABATEMENT_KEYS)


def _contained(resource: dict[str, Any], reference: Any) -> dict[str, Any] | None:
    ref = reference.get("reference") if isinstance(reference, dict) else None
    if not isinstance(ref, str) or not ref.startswith("#"):
        return None
    for item in as_list(resource.get("contained")):
        if isinstance(item, dict) and item.get("id") == ref[1:]:
            return item
    return None


def _frequency_per_day(timing: Any) -> float | None:
    repeat = timing.get("repeat") if isinstance(timing, dict) else None
    if not isinstance(repeat, dict):
        return None
    # The stated frequency; frequencyMax is an "up to" bound, not the dose. With only a
    # maximum the frequency is unknown; with neither, once per period (FHIR's default).
    if "frequency" in repeat:
        frequency = repeat["frequency"]
    elif "frequencyMax" in repeat:
        return None
    else:
        frequency = 1
    if isinstance(frequency, bool) or not isinstance(frequency, int | float) or frequency <= 0:
        return None  # 0 times a period says nothing usable
    period = repeat.get("period")
    unit = repeat.get("periodUnit") or repeat.get("periodUnits")  # R4/STU3, DSTU2
    if not isinstance(period, int | float) or isinstance(period, bool) or period <= 0:
        return None
    # A non-string unit (e.g. an object) would make the dict lookup raise TypeError.
    if not isinstance(frequency, int | float) or not isinstance(unit, str):
        return None
    if unit not in _PERIOD_PER_DAY:
        return None
    try:
        per_day = float(frequency) / float(period) * _PERIOD_PER_DAY[unit]
    except OverflowError:  # an integer beyond a double (10**400)
        return None
    # 1e308 per 1e-308 min overflows to inf: unusable, like a missing frequency.
    return per_day if math.isfinite(per_day) else None


def _single_administration(timing: Any) -> bool:
    """``timing.repeat.count`` 1: one administration in all, whatever the frequency says."""
    repeat = timing.get("repeat") if isinstance(timing, dict) else None
    count = repeat.get("count") if isinstance(repeat, dict) else None
    return count == 1 and not isinstance(count, bool)


def _course_days(timing: Any) -> float | None:
    """Days the course lasts: boundsDuration in a period unit, else count / frequency."""
    repeat = timing.get("repeat") if isinstance(timing, dict) else None
    if not isinstance(repeat, dict):
        return None
    bounds = repeat.get("boundsDuration")
    if isinstance(bounds, dict):
        value, unit = bounds.get("value"), bounds.get("code") or bounds.get("unit")
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            per_day = _PERIOD_PER_DAY.get(unit) if isinstance(unit, str) else None
            days = float(value) / per_day if per_day else None
            return days if days is not None and math.isfinite(days) else None
    count = repeat.get("count")
    per_day = _frequency_per_day(timing)
    if isinstance(count, int) and not isinstance(count, bool) and count > 0 and per_day:
        return count / per_day
    return None


def _doses(resource: dict[str, Any]) -> tuple[Dose, ...]:
    key = "dosage" if resource.get("resourceType") == "MedicationStatement" else "dosageInstruction"
    doses: list[Dose] = []
    for instruction in as_list(resource.get(key)):
        if not isinstance(instruction, dict):
            continue
        quantity = quantity_of(instruction.get("doseQuantity"))  # STU3 / DSTU2
        for dose_and_rate in as_list(instruction.get("doseAndRate")):  # R4
            if quantity is None and isinstance(dose_and_rate, dict):
                quantity = quantity_of(dose_and_rate.get("doseQuantity"))
        timing = instruction.get("timing")
        once = _single_administration(timing)
        doses.append(
            Dose(
                quantity=quantity,
                frequency_per_day=1.0 if once else _frequency_per_day(timing),
                text=_text(instruction.get("text")),
                patient_instruction=_text(instruction.get("patientInstruction")),
                once=once,
                untimed=timing is None,
                course_days=_course_days(instruction.get("timing")),
            )
        )
    return tuple(doses)


def _routes(resource: dict[str, Any]) -> tuple[tuple[Coding, ...], str]:
    key = "dosage" if resource.get("resourceType") == "MedicationStatement" else "dosageInstruction"
    codings: list[Coding] = []
    text = ""
    for instruction in as_list(resource.get(key)):
        if isinstance(instruction, dict):
            codings.extend(codings_of(instruction.get("route")))
            text = text or concept_text(instruction.get("route"))
    return tuple(codings), text


def code_codings(resource: dict[str, Any]) -> tuple[Coding, ...]:
    """Codings of a Condition's or an Observation's ``code``."""
    return codings_of(resource.get("code"))


def medication_codes(
    resource: dict[str, Any],
    referenced: Mapping[str, dict[str, Any]] | None = None,
) -> tuple[tuple[Coding, ...], tuple[Coding, ...], str]:
    """What names the drug of an order or statement: (codings, ingredient codings, text).

    ``referenced``: Medication resources by ``"Medication/id"`` (or entry fullUrl) that came
    with the data (``_include``, the draft Bundle) or were fetched, for ``medicationReference``.
    """
    concept = resource.get("medicationCodeableConcept")
    ingredient_codings: tuple[Coding, ...] = ()
    codings = codings_of(concept)
    text = concept_text(concept)
    reference = resource.get("medicationReference")
    medication = _contained(resource, reference)
    if medication is None and referenced:
        key = medication_reference_key(reference)
        medication = referenced.get(key) if key is not None else None
    if medication is not None:
        codings = codings or codings_of(medication.get("code"))
        text = text or concept_text(medication.get("code"))
        found: list[Coding] = []
        for ingredient in as_list(medication.get("ingredient")):
            if isinstance(ingredient, dict):
                found.extend(
                    codings_of(ingredient.get("itemCodeableConcept") or ingredient.get("item"))
                )
        ingredient_codings = tuple(found)
    elif isinstance(resource.get("medicationReference"), dict):
        text = text or _text(resource["medicationReference"].get("display"))
    return codings, ingredient_codings, text


def to_medication(
    resource: dict[str, Any],
    origin: str,
    *,
    is_draft: bool,
    referenced: Mapping[str, dict[str, Any]] | None = None,
    codes: tuple[tuple[Coding, ...], tuple[Coding, ...], str] | None = None,
) -> Medication | None:
    """A MedicationRequest / MedicationStatement / MedicationOrder, or None if it names no drug.

    ``codes``: ``medication_codes(resource, referenced)`` when the caller has read them already.
    """
    codings, ingredient_codings, text = (
        codes if codes is not None else medication_codes(resource, referenced)
    )
    if not codings and not text and not ingredient_codings:
        return None
    route_codings, route_text = _routes(resource)
    return Medication(
        codings=codings,
        text=text,
        status=status_code(resource.get("status")),
        route=route_codings,
        route_text=route_text,
        doses=_doses(resource),
        is_draft=is_draft,
        kind=str(resource.get("resourceType")),
        authored=parse_datetime(
            resource.get("authoredOn")
            or resource.get("dateWritten")
            or resource.get("dateAsserted")
        ),
        source=source_ref(resource, origin),
        ingredient_codings=ingredient_codings,
        # STU3 taken "n" and DSTU2 wasNotTaken (R4 uses status "not-taken").
        not_taken=resource.get("taken") == "n" or resource.get("wasNotTaken") is True,
    )


def to_lab_order(resource: dict[str, Any], origin: str) -> LabOrder | None:
    """A draft ServiceRequest/ProcedureRequest, or None when it names nothing."""
    codings = codings_of(resource.get("code"))
    text = concept_text(resource.get("code"))
    if not codings and not text:
        return None
    return LabOrder(
        codings=codings,
        text=text,
        status=status_code(resource.get("status")),
        source=source_ref(resource, origin),
    )


def lab_effective(resource: dict[str, Any]) -> datetime | None:
    """When an Observation was taken (effective[x]), else when it was issued."""
    effective = resource.get("effectiveDateTime")
    if effective is None and isinstance(resource.get("effectivePeriod"), dict):
        effective = resource["effectivePeriod"].get("start")
    return parse_datetime(effective or resource.get("issued"))


def lab_is_usable(resource: dict[str, Any]) -> bool:
    """Does an Observation give a value the rules can read (a number, not withdrawn)?"""
    if status_code(resource.get("status")) in WITHDRAWN_LAB_STATUSES:
        return False
    return quantity_of(resource.get("valueQuantity")) is not None


def to_lab(resource: dict[str, Any], origin: str) -> Lab | None:
    codings = code_codings(resource)
    if not codings:
        return None
    ranges = []
    for item in as_list(resource.get("referenceRange")):
        if isinstance(item, dict):
            ranges.append(
                ReferenceRange(
                    quantity_of(item.get("low")),
                    quantity_of(item.get("high")),
                    _text(item.get("text")),
                )
            )
    interpretation: list[Coding] = []
    for concept in as_list(resource.get("interpretation")):
        interpretation.extend(codings_of(concept))
    return Lab(
        codings=codings,
        text=concept_text(resource.get("code")),
        value=quantity_of(resource.get("valueQuantity")),
        effective=lab_effective(resource),
        status=status_code(resource.get("status")),
        reference_ranges=tuple(ranges),
        interpretation=tuple(interpretation),
        source=source_ref(resource, origin),
    )


# --- strict checks of draft orders ----------------------------------------------------------

_LIST_FIELDS_R4 = {
    "MedicationRequest": (
        "category",
        "reasonCode",
        "reasonReference",
        "dosageInstruction",
        "note",
        "identifier",
        "basedOn",
        "insurance",
        "supportingInformation",
        "detectedIssue",
        "eventHistory",
        "instantiatesCanonical",
        "instantiatesUri",
        "contained",
    ),
}


def repair_draft(resource: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Fix the shapes real clients get wrong (single object for an array); say what was fixed."""
    fixed = dict(resource)
    notes: list[str] = []
    for field_name in _LIST_FIELDS_R4.get(str(resource.get("resourceType")), ()):
        if field_name in fixed and not isinstance(fixed[field_name], list):
            fixed[field_name] = [fixed[field_name]]
            notes.append(f"{field_name} was a single object, read as a list")
    return fixed, notes


# --- one call's gathered data → facts -------------------------------------------------------

# A draft order an update suggestion would copy and send back: FHIR resources nest a dozen
# levels or so; far deeper is hostile, and copying it recursively would exhaust the stack.
MAX_ECHOED_DRAFT_DEPTH = 64


class Relevance(Protocol):
    """Which coded facts the rules can use at all (the pipeline asks the knowledge).

    A chronic patient's chart is mostly codes no rule reads: such resources are recognised
    from their codes and not normalised further. A resource without a usable code is still
    read in full, so it is reported (or kept, text only) exactly as without this filter.
    """

    def condition_code(self, system: str, code: str) -> bool: ...

    def lab_kind(self, system: str, code: str) -> str | None:
        """The kind of result a lab code is, None when no rule reads it.

        The rules read only the newest usable result of each kind (``latest_lab``), so the
        context keeps just that one per kind (``_keep_if_newest``).
        """
        ...

    def medication(self, codings: tuple[Coding, ...], text: str) -> bool: ...


@dataclass
class Facts:
    """What a call's data says, as PatientContext facts, and what could not be used."""

    patient: PatientInfo
    conditions: list[Condition] = field(default_factory=list)
    medications: list[Medication] = field(default_factory=list)
    labs: list[Lab] = field(default_factory=list)
    drafts: list[Medication] = field(default_factory=list)
    # The repaired JSON of each draft order by reference, for update suggestions.
    draft_resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    draft_lab_orders: list[LabOrder] = field(default_factory=list)
    issues: list[DataIssue] = field(default_factory=list)


def normalise(
    gathered: Gathered,
    draft_orders_key: str | None,
    relevant: Relevance | None = None,
    rxnav: RxNavClient | None = None,
) -> Facts:
    """Every gathered resource → its fact (or a data issue saying why it cannot be used).

    ``relevant`` skips a resource with usable codes (or drug text) that no rule can use. A
    resource without them is read in full, so that it is reported exactly as without the
    filter. Draft orders are never skipped. ``rxnav`` (optional, CDS_RXNAV_URL) is asked for
    the ingredients of RxNorm codes the knowledge files do not hold, within one time budget
    for the whole call: the one look-up this step may make.
    """
    patient_id = gathered.patient_id
    facts = Facts(patient=PatientInfo(id=patient_id))
    issues = facts.issues
    medications = gathered.medications
    # Per lab kind, the newest usable result so far.
    newest: dict[str, _LabCandidate] = {}
    rxnav_deadline = 0.0  # set by the first RxNav look-up: one budget for the whole call
    for found in gathered.found:
        origin, resource, where = found.origin, found.resource, found.where
        resource_type = resource.get("resourceType")
        if resource_type == "Patient":
            facts.patient = to_patient(resource, origin, patient_id)
        elif resource_type == "Condition":
            # Decided from the raw codes, before any Coding is built: most are skipped.
            if relevant is not None:
                coded, matters = first_code_match(resource.get("code"), relevant.condition_code)
                if coded and not matters:
                    continue
            _append(facts.conditions, to_condition(resource, origin), issues, where, "has no code")
        elif resource_type in MEDICATION_TYPES:
            codes = medication_codes(resource, medications)
            named, ingredients, text = codes
            if (
                (named or ingredients or text)
                and relevant is not None
                and not relevant.medication(named + ingredients, text)
            ):
                if rxnav is None:
                    continue
                rxnav_deadline = rxnav_deadline or rxnav.deadline()
                codes = with_ingredients(codes, rxnav, rxnav_deadline, issues, where)
                if not relevant.medication(codes[0] + codes[1], text):
                    continue
            medication = to_medication(resource, origin, is_draft=False, codes=codes)
            _append(facts.medications, medication, issues, where, "names no medication")
        elif resource_type == "Observation":
            if relevant is not None:
                coded, kind = first_code_match(resource.get("code"), relevant.lab_kind)
                if coded:
                    if kind is not None:
                        _keep_if_newest(newest, kind, origin, resource, where)
                    continue
            _append(facts.labs, to_lab(resource, origin), issues, where, "has no code")
    # A chronic patient has hundreds of results of a kind: only the newest is normalised.
    for _, origin, resource, where in newest.values():
        _append(facts.labs, to_lab(resource, origin), issues, where, "has no code")

    draft_origin = f"context:{draft_orders_key}"
    for where, resource in gathered.drafts:
        repaired, notes = repair_draft(resource)
        issues.extend(DataIssue(where, note) for note in notes)
        if isinstance(repaired.get("id"), str):
            if nested_deeper_than(repaired, MAX_ECHOED_DRAFT_DEPTH):
                # Still read (its drug may need a warning), never copied into a suggestion.
                issues.append(
                    DataIssue(
                        where,
                        f"nests more than {MAX_ECHOED_DRAFT_DEPTH} levels deep (no FHIR "
                        "resource does); read, but no suggestion sends it back",
                    )
                )
            else:
                facts.draft_resources[f"{repaired['resourceType']}/{repaired['id']}"] = repaired
        # No strict (fhir.resources) check here: it cost a third of a typical call, and the
        # lenient reading reports what it cannot use. The cards check the drafts they send
        # back (``cds_service.fhir_models``), where conformance matters.
        codes = medication_codes(repaired, medications)
        if (
            rxnav is not None
            and relevant is not None
            and not relevant.medication(codes[0] + codes[1], codes[2])
        ):
            rxnav_deadline = rxnav_deadline or rxnav.deadline()
            codes = with_ingredients(codes, rxnav, rxnav_deadline, issues, where)
        medication = to_medication(repaired, draft_origin, is_draft=True, codes=codes)
        _append(
            facts.drafts, medication, issues, where, "names no medication yet; nothing to check"
        )
    for resource in gathered.draft_lab_orders:
        order = to_lab_order(resource, draft_origin)
        if order is not None:
            facts.draft_lab_orders.append(order)
    return facts


_LabCandidate = tuple[float, str, dict[str, Any], str]  # (recency, origin, resource, where)


def _keep_if_newest(
    newest: dict[str, _LabCandidate],
    kind: str,
    origin: str,
    resource: dict[str, Any],
    where: str,
) -> None:
    """Keep ``resource`` as its kind's result if it is usable and newer than the one kept.

    Exactly the result ``ClinicalPicture.latest_lab`` would pick from all of them: the newest
    by the same key, the first one read among equally new results.
    """
    if not lab_is_usable(resource):
        return
    recency = lab_recency(lab_effective(resource))
    kept = newest.get(kind)
    if kept is None or recency > kept[0]:
        newest[kind] = (recency, origin, resource, where)


def _append(target: list[Any], item: Any, issues: list[DataIssue], where: str, why: str) -> None:
    if item is None:
        issues.append(DataIssue(where, f"{why}; ignored"))
    else:
        target.append(item)
