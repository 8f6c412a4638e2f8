"""PatientContext: the plain, typed facts the rules read.

No FHIR models and no JSON leave the context layer: every fact here is a small frozen
dataclass that remembers which resource it came from (``SourceRef``), so that a card can
name the exact resource that triggered it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

# Re-exported: the context layer's facts are made of the shared FHIR value types.
from cds_service.fhir_types import Coding as Coding
from cds_service.fhir_types import Quantity as Quantity


def display_name(text: str, codings: tuple[Coding, ...], fallback: str) -> str:
    """What to call a coded fact: its text, else a coding's display, else its first code."""
    return (
        text
        or next((c.display for c in codings if c.display), "")
        or (codings[0].code if codings else fallback)
    )


@dataclass(frozen=True)
class SourceRef:
    """Where a fact came from: ``Condition/123`` plus how it reached us."""

    resource_type: str
    resource_id: str
    # "prefetch:<key>", "fhir:<key>" (fetched from fhirServer) or "context:<key>".
    origin: str

    @property
    def reference(self) -> str:
        return (
            f"{self.resource_type}/{self.resource_id}" if self.resource_id else self.resource_type
        )


@dataclass(frozen=True)
class PatientInfo:
    id: str
    birth_date: date | None = None
    sex: str | None = None  # FHIR administrative gender
    source: SourceRef | None = None
    # Patient.deceasedBoolean true or a deceasedDateTime (its date, when it parses).
    deceased: bool = False
    deceased_on: date | None = None

    def age_on(self, today: date) -> int | None:
        if self.birth_date is None:
            return None
        years = today.year - self.birth_date.year
        if (today.month, today.day) < (self.birth_date.month, self.birth_date.day):
            years -= 1
        return years


@dataclass(frozen=True)
class Condition:
    codings: tuple[Coding, ...]
    text: str
    clinical_status: str | None  # active | recurrence | relapse | inactive | remission | resolved
    verification_status: str | None  # unconfirmed | provisional | differential | confirmed | ...
    onset: datetime | None
    source: SourceRef
    # abatement[x] is present (a date, period, age, text or true): the condition has ended.
    abated: bool = False

    @property
    def display(self) -> str:
        return display_name(self.text, self.codings, "condition")


@dataclass(frozen=True)
class Dose:
    """One dosage instruction, as far as the data allow."""

    quantity: Quantity | None = None  # amount per administration
    frequency_per_day: float | None = None
    text: str = ""
    # What the patient is told (e.g. dose spacing); rules read it to see advice was taken up.
    patient_instruction: str = ""
    # A single administration (timing.repeat.count 1): frequency_per_day is then 1.
    once: bool = False
    # No timing at all: a one-off order for a supervised (parenteral) dose, else unknown.
    untimed: bool = False
    # How long the course lasts (Timing.repeat.boundsDuration, or count / frequency), in days;
    # None when open-ended or not stated. A short course is what "supervised" laxative use is.
    course_days: float | None = None


@dataclass(frozen=True)
class Medication:
    """A medication order, statement, or draft order of the hook."""

    codings: tuple[Coding, ...]
    text: str
    status: str | None
    route: tuple[Coding, ...]
    route_text: str
    doses: tuple[Dose, ...]
    is_draft: bool  # a draft order of this hook invocation
    kind: str  # "MedicationRequest" | "MedicationStatement" | "MedicationOrder"
    authored: datetime | None
    source: SourceRef
    # Ingredient codings of a contained/referenced Medication resource, when present.
    ingredient_codings: tuple[Coding, ...] = ()
    # A statement that the drug is not taken (STU3 taken "n", DSTU2 wasNotTaken true).
    not_taken: bool = False

    @property
    def display(self) -> str:
        return display_name(self.text, self.codings, "medication")

    @property
    def all_codings(self) -> tuple[Coding, ...]:
        return self.codings + self.ingredient_codings


@dataclass(frozen=True)
class ReferenceRange:
    low: Quantity | None = None
    high: Quantity | None = None
    text: str = ""


# Results withdrawn by the laboratory: never read as the patient's value.
WITHDRAWN_LAB_STATUSES = frozenset({"entered-in-error", "cancelled"})


def lab_recency(effective: datetime | None) -> float:
    """Sort key for "newest first": a result without a date counts as dated at the epoch."""
    return effective.timestamp() if effective is not None else 0.0


@dataclass(frozen=True)
class Lab:
    codings: tuple[Coding, ...]
    text: str
    value: Quantity | None
    effective: datetime | None
    status: str | None
    reference_ranges: tuple[ReferenceRange, ...]
    interpretation: tuple[Coding, ...]
    source: SourceRef

    @property
    def display(self) -> str:
        return display_name(self.text, self.codings, "observation")


@dataclass(frozen=True)
class LabOrder:
    """A draft laboratory order (ServiceRequest) of this hook call, e.g. a serum magnesium."""

    codings: tuple[Coding, ...]
    text: str
    status: str | None
    source: SourceRef

    @property
    def display(self) -> str:
        return display_name(self.text, self.codings, "laboratory order")


@dataclass(frozen=True)
class DataIssue:
    """Something in the input that could not be used, reported back to the client."""

    where: str  # e.g. "prefetch.conditions.entry[3]" or "context.draftOrders"
    problem: str


@dataclass(frozen=True)
class PatientContext:
    patient: PatientInfo
    conditions: tuple[Condition, ...] = ()
    medications: tuple[Medication, ...] = ()  # active orders and statements on file
    draft_orders: tuple[Medication, ...] = ()  # this hook's draft orders
    labs: tuple[Lab, ...] = ()
    issues: tuple[DataIssue, ...] = field(default=(), compare=False)
    # FHIR version the client spoke: "R4", "STU3" or "DSTU2".
    fhir_version: str = "R4"
    # Laboratory orders among this hook's draft orders (so a suggested test is not re-suggested).
    draft_lab_orders: tuple[LabOrder, ...] = ()
    # order-select: references ("MedicationRequest/123") of the draft orders the user selected;
    # empty means every draft order is selected.
    selections: tuple[str, ...] = ()
    # The repaired JSON of each draft order by reference, for the cards layer to build update
    # suggestions from (the rules never read it): read once here, not again downstream.
    draft_resources: Mapping[str, dict[str, Any]] = field(
        default_factory=dict, compare=False, repr=False
    )
    # Required data that was sent but none of it is this patient's: the checks that need it
    # could not be done (the rules say so on a card; "no card" would read as "no risk").
    unusable: tuple[MissingData, ...] = ()


@dataclass(frozen=True)
class MissingData:
    key: str
    data: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"prefetchKey": self.key, "data": self.data, "reason": self.reason}


class DataUnavailable(Exception):
    """Data the rules require could not be obtained (→ HTTP 412)."""

    def __init__(self, missing: list[MissingData]) -> None:
        super().__init__("; ".join(f"{m.key}: {m.reason}" for m in missing))
        self.missing = missing
