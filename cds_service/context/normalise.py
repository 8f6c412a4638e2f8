"""Lenient FHIR JSON → PatientContext facts, for R4, STU3 and DSTU2 shapes alike.

Real clients send slightly off-spec JSON (the public sandbox's Bundle without ``type``, single
objects where arrays belong, DSTU2 ``MedicationOrder``, plain-string statuses). Extraction
therefore reads the raw JSON defensively and never raises: what cannot be used becomes a
``DataIssue`` the response reports. A draft order that an update suggestion sends back is
also checked against the fhir.resources model of its FHIR version (``model_problems``, called
by the card builder).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, date, datetime
from typing import Any, TypeVar

from pydantic import ValidationError

from cds_service.context.model import (
    WITHDRAWN_LAB_STATUSES,
    Coding,
    Condition,
    Dose,
    Lab,
    LabOrder,
    Medication,
    PatientInfo,
    Quantity,
    ReferenceRange,
    SourceRef,
)

MEDICATION_TYPES = frozenset({"MedicationRequest", "MedicationStatement", "MedicationOrder"})
# Draft laboratory orders: R4 ServiceRequest, STU3 ProcedureRequest (same code/status shape).
LAB_ORDER_TYPES = frozenset({"ServiceRequest", "ProcedureRequest"})
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


def as_list(value: Any) -> list[Any]:
    """FHIR arrays, tolerating a single object (or nothing) where an array belongs."""
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


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


def reference_id(reference: Any) -> str | None:
    """``{"reference": "Patient/123"}`` (or a bare string) → ``"123"``."""
    ref = reference.get("reference") if isinstance(reference, dict) else reference
    if not isinstance(ref, str) or not ref:
        return None
    return ref.rstrip("/").split("/")[-1] if "/" in ref else ref


def subject_id(resource: dict[str, Any]) -> str | None:
    """The patient a resource is about: R4/STU3 ``subject``, DSTU2 ``patient``."""
    for key in ("subject", "patient"):
        if key in resource:
            return reference_id(resource.get(key))
    return None


def iter_resources(
    value: Any, where: str
) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    """Resources in a prefetch/fetch value or a context Bundle, with their location.

    Yields ``(location, resource, problem)``: a Bundle's entries (with or without
    ``Bundle.type``), a lone resource, or a list of either. OperationOutcome entries that a
    server adds to a searchset (``search.mode: outcome``) are skipped silently.
    """
    if isinstance(value, list):
        for index, item in enumerate(value):
            yield from iter_resources(item, f"{where}[{index}]")
        return
    if not isinstance(value, dict):
        yield where, None, "is not a FHIR resource or Bundle"
        return
    if value.get("resourceType") != "Bundle":
        yield where, value, None
        return
    for index, entry in enumerate(as_list(value.get("entry"))):
        location = f"{where}.entry[{index}]"
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            yield location, None, "has no resource"
            continue
        if resource.get("resourceType") == "OperationOutcome":
            continue
        yield location, resource, None


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
    return PatientInfo(
        id=resource_id if isinstance(resource_id, str) else fallback_id,
        birth_date=parse_date(resource.get("birthDate")),
        sex=gender if isinstance(gender, str) else None,
        source=source_ref(resource, origin),
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
        doses.append(
            Dose(
                quantity=quantity,
                frequency_per_day=_frequency_per_day(instruction.get("timing")),
                text=_text(instruction.get("text")),
                patient_instruction=_text(instruction.get("patientInstruction")),
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


def medication_reference_key(reference: Any) -> str | None:
    """``"Medication/x"`` for a (relative or absolute, versioned or not) reference to a
    Medication resource, else None (contained ``#x`` references are resolved elsewhere)."""
    ref = reference.get("reference") if isinstance(reference, dict) else None
    if not isinstance(ref, str) or ref.startswith("#"):
        return None
    if ref.startswith("urn:uuid:"):
        return ref  # a Bundle entry's fullUrl
    parts = [part for part in ref.split("?")[0].split("/") if part]
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) >= 2 and parts[-2] == "Medication" and parts[-1]:
        return f"Medication/{parts[-1]}"
    return None


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


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Do dicts and lists nest more than ``limit`` levels in ``value``? Iterative, so safe at
    any depth (the JSON parser accepts up to 1,024 levels; copying such a value recursively
    would exhaust Python's stack)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def repair_draft(resource: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Fix the shapes real clients get wrong (single object for an array); say what was fixed."""
    fixed = dict(resource)
    notes: list[str] = []
    for field_name in _LIST_FIELDS_R4.get(str(resource.get("resourceType")), ()):
        if field_name in fixed and not isinstance(fixed[field_name], list):
            fixed[field_name] = [fixed[field_name]]
            notes.append(f"{field_name} was a single object, read as a list")
    return fixed, notes


def model_problems(resource: dict[str, Any], fhir_version: str) -> list[str]:
    """What the fhir.resources model of this FHIR version rejects (empty list = valid)."""
    resource_type = resource.get("resourceType")
    if fhir_version == "DSTU2" or not isinstance(resource_type, str):
        return []  # fhir.resources has no DSTU2 models; lenient extraction only
    model_class = _model_class(fhir_version, resource_type)
    if model_class is None:
        return []
    try:
        model_class.model_validate(resource)
    except ValidationError as exc:
        return [
            f"{'.'.join(str(part) for part in error['loc']) or resource_type}: {error['msg']}"
            for error in exc.errors()[:5]
        ]
    except (TypeError, ValueError) as exc:
        return [str(exc)[:200]]
    except KeyError as exc:  # fhir_core: a contained resource of a type it does not know
        return [f"unknown resource type ({exc})"[:200]]
    return []


_MODEL_CACHE: dict[tuple[str, str], Any] = {}


def _model_class(fhir_version: str, resource_type: str) -> Any:
    key = (fhir_version, resource_type)
    if key not in _MODEL_CACHE:
        try:
            if fhir_version == "STU3":
                from fhir.resources.STU3 import get_fhir_model_class
            else:
                from fhir.resources.R4B import get_fhir_model_class
            _MODEL_CACHE[key] = get_fhir_model_class(resource_type)
        except (KeyError, ValueError, ImportError):
            _MODEL_CACHE[key] = None
    return _MODEL_CACHE[key]


def detect_fhir_version(
    resources: Iterable[dict[str, Any]],
    hook: str,
    prefetched: Iterable[dict[str, Any]] = (),
) -> str:
    """R4 unless the draft orders look DSTU2 (MedicationOrder) or STU3.

    Without a telling draft order (patient-view has none), the prefetched resources decide:
    a DSTU2 server's answers must be recognised, or the fallback asks it for types it lacks.
    """
    resources = list(resources)
    if any(r.get("resourceType") == "MedicationOrder" for r in resources):
        return "DSTU2"
    found = _draft_version(resources)
    if found is not None:
        return found
    prefetched = list(prefetched)
    if any(_looks_dstu2(r) for r in prefetched):
        return "DSTU2"
    found = _draft_version([r for r in prefetched if r.get("resourceType") == "MedicationRequest"])
    if found is not None:
        return found
    return "STU3" if hook == "medication-prescribe" else "R4"


def _looks_dstu2(resource: dict[str, Any]) -> bool:
    """MedicationOrder, or a Condition naming its patient by ``patient`` (``subject`` since
    STU3) with a plain-code ``clinicalStatus`` (a CodeableConcept in R4)."""
    resource_type = resource.get("resourceType")
    if resource_type == "MedicationOrder":
        return True
    return (
        resource_type == "Condition"
        and "patient" in resource
        and "subject" not in resource
        and isinstance(resource.get("clinicalStatus", ""), str)
    )


def _draft_version(resources: list[dict[str, Any]]) -> str | None:
    """R4 or STU3 from the shape of medication orders, None when they do not tell."""
    for resource in resources:
        for instruction in as_list(resource.get("dosageInstruction")):
            if isinstance(instruction, dict):
                if "doseAndRate" in instruction:
                    return "R4"
                if "doseQuantity" in instruction or "doseRange" in instruction:
                    return "STU3"
        if "context" in resource and "encounter" not in resource:
            return "STU3"
    return None

