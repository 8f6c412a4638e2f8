"""The clinical picture: PatientContext facts mapped through the knowledge base, once.

Every rule reads the same picture, so codes are looked up once per request, and "which
conditions count" (active, not refuted) is decided in one place. A fact that no knowledge
entry matches is not in the picture, so rules never see it; the pipeline therefore lets the
context layer skip normalising such facts (``KnowledgeRelevance``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import date
from functools import lru_cache
from typing import TypeVar

from cds_service.context.model import (
    WITHDRAWN_LAB_STATUSES,
    Coding,
    Condition,
    Lab,
    Medication,
    PatientContext,
    lab_recency,
)
from cds_service.knowledge import Knowledge, MagnesiumMatch

# Clinical statuses that mean "not a current problem"; verification statuses that mean
# "not a real diagnosis" (clinical-knowledge.md, Matching strategy).
INACTIVE_CLINICAL = frozenset({"inactive", "resolved", "remission"})
ACTIVE_CLINICAL = frozenset({"active", "recurrence", "relapse"})
INVALID_VERIFICATION = frozenset({"refuted", "entered-in-error"})
# Orders and statements that are no longer (or not yet) being taken.
INACTIVE_MEDICATION = frozenset(
    {"stopped", "cancelled", "completed", "entered-in-error", "not-taken", "revoked", "superseded"}
)


@dataclass(frozen=True)
class ConditionFact:
    condition: Condition
    groups: frozenset[str]


@dataclass(frozen=True)
class MedicationFact:
    medication: Medication
    groups: frozenset[str]
    groups_matched_by: str | None
    magnesium: MagnesiumMatch | None
    route: str | None  # "oral" | "parenteral" | "topical" | None (unknown)
    # Index among the drafts (or the medications on file): only tells id-less resources apart
    # in finding keys, so it is no part of the fact's identity.
    position: int = field(default=0, compare=False)
    # Its name begins with a brand name: written as sent, capital included, mid-sentence.
    brand_name: bool = field(default=False, compare=False)

    @property
    def is_magnesium(self) -> bool:
        return self.magnesium is not None

    @property
    def ref(self) -> str:
        """Identity for finding keys: the resource reference; for a resource without an id,
        its position too, so that two id-less drafts are never taken for one finding."""
        source = self.medication.source
        if source.resource_id:
            return source.reference
        where = "draft" if self.medication.is_draft else "on-file"
        return f"{source.reference}#{where}-{self.position}"


@dataclass(frozen=True)
class LabFact:
    lab: Lab
    kind: str  # "serum-magnesium" | "egfr" | "creatinine"
    # Older than its kind's look-back window (or undated): shown with its date, but it may
    # not raise a card above warning (``engine.cap_stale``).
    stale: bool = False


@dataclass(frozen=True)
class ClinicalPicture:
    context: PatientContext
    today: date
    conditions: tuple[ConditionFact, ...]
    medications: tuple[MedicationFact, ...]  # active orders/statements on file
    drafts: tuple[MedicationFact, ...]  # this hook's draft orders
    labs: tuple[LabFact, ...]  # newest first

    def conditions_in(self, *groups: str) -> tuple[ConditionFact, ...]:
        wanted = set(groups)
        return tuple(fact for fact in self.conditions if fact.groups & wanted)

    def medications_in(self, *groups: str) -> tuple[MedicationFact, ...]:
        wanted = set(groups)
        return tuple(fact for fact in self.medications if fact.groups & wanted)

    @property
    def actionable_drafts(self) -> tuple[MedicationFact, ...]:
        """The drafts that get findings of their own: at order-select the selected ones
        (advise on what the user is choosing, do not nag about the rest), else every draft.
        The other drafts still count as context (interactions, daily totals)."""
        if not self.context.selections:
            return self.drafts
        return tuple(fact for fact in self.drafts if self.is_selected(fact))

    def is_selected(self, fact: MedicationFact) -> bool:
        selected = self.context.selections
        if not selected or not fact.medication.is_draft:
            return not selected
        source = fact.medication.source
        # Selections are "MedicationRequest/123"; a bare id is accepted too.
        return source.resource_id != "" and (
            source.reference in selected or source.resource_id in selected
        )

    @property
    def stale_labs(self) -> tuple[LabFact, ...]:
        return tuple(fact for fact in self.labs if fact.stale)

    def without_stale_labs(self) -> ClinicalPicture:
        """The same picture as if the results older than their look-back were not on file."""
        return dataclasses.replace(self, labs=tuple(f for f in self.labs if not f.stale))

    def latest_lab(self, kind: str) -> LabFact | None:
        """The newest usable result of a kind: the only lab fact any rule reads, so the
        context layer keeps no other (``KnowledgeRelevance.lab_kind``)."""
        return next((fact for fact in self.labs if fact.kind == kind and fact.lab.value), None)

    @property
    def age(self) -> int | None:
        return self.context.patient.age_on(self.today)


def _is_stale(lab: Lab, lookback_days: float, today: date) -> bool:
    if lab.effective is None:
        return True  # no date: its age cannot be known
    return (today - lab.effective.date()).days > lookback_days


def condition_counts(condition: Condition) -> bool:
    """Current and real: not resolved (by status, or abated with no active status), not
    refuted."""
    if condition.clinical_status in INACTIVE_CLINICAL:
        return False
    if condition.abated and condition.clinical_status not in ACTIVE_CLINICAL:
        return False  # an abatement date with no (or an unknown) status: over
    return condition.verification_status not in INVALID_VERIFICATION


# Clinical statuses after which a "known" diagnosis still counts for the groups that say so
# (``ConditionGroup.counts_while_inactive``: myasthenia gravis in remission is still known).
PERSISTENT_CLINICAL = frozenset({"inactive", "remission"})
CARRIER_FLUID = "magnesium-carrier-fluid"  # drug group: carries magnesium, is not therapy


def counting_groups(
    condition: Condition, groups: frozenset[str], knowledge: Knowledge
) -> frozenset[str]:
    """The groups a condition counts for: all of them while it is current; while inactive or
    in remission (not resolved, not refuted) only the groups known for life."""
    if condition_counts(condition):
        return groups
    if (
        condition.clinical_status not in PERSISTENT_CLINICAL
        or condition.verification_status in INVALID_VERIFICATION
    ):
        return frozenset()
    return frozenset(g for g in groups if knowledge.condition_group(g).counts_while_inactive)


def medication_is_active(medication: Medication) -> bool:
    return medication.status not in INACTIVE_MEDICATION and not medication.not_taken


def route_of(
    medication: Medication, magnesium: MagnesiumMatch | None, knowledge: Knowledge
) -> str | None:
    """The order's route coding, else its route text, else the product's route, else what the
    drug's own name says ("IV infusion", "ophthalmic solution"): one vocabulary, the
    knowledge's, for every drug."""
    route = knowledge.route_of_codings(medication.route) or _text_route(
        knowledge, medication.route_text
    )
    if route is not None:
        return route
    if magnesium is not None and magnesium.route is not None:
        return magnesium.route
    product = knowledge.product_route(medication.all_codings)
    if product is not None:
        return product
    names = " | ".join([medication.text, *(c.display for c in medication.all_codings)])
    return _text_route(knowledge, names)


# A chart repeats the same codes (refills, a problem recorded at every visit), and so do the
# charts a process sees: knowledge answers are memoised per (knowledge, codings, text). The
# knowledge is immutable once loaded; the bound keeps hostile input from growing the cache.
_LOOKUP_CACHE_SIZE = 8192


@lru_cache(maxsize=_LOOKUP_CACHE_SIZE)
def _drug_lookup(
    knowledge: Knowledge, codings: tuple[Coding, ...], text: str
) -> tuple[frozenset[str], str | None, MagnesiumMatch | None]:
    groups, matched_by = knowledge.drug_groups(codings, text)
    return groups, matched_by, knowledge.match_magnesium(codings, text)


@lru_cache(maxsize=_LOOKUP_CACHE_SIZE)
def _text_route(knowledge: Knowledge, text: str) -> str | None:
    return knowledge.route_from_text(text)


@lru_cache(maxsize=_LOOKUP_CACHE_SIZE)
def _condition_lookup(knowledge: Knowledge, codings: tuple[Coding, ...]) -> frozenset[str]:
    return knowledge.condition_groups(codings)


# Distinct (system, code) pairs remembered per KnowledgeRelevance: far above a hospital's
# working vocabulary; hostile input that exceeds it only starts the memo over.
_CODE_MEMO_SIZE = 50_000
_MAX_REMEMBERED_CHARS = 200
_T = TypeVar("_T")
_NOT_LOOKED_UP = "\x00not looked up"  # lab_kind's memo miss (None is an answer)


class KnowledgeRelevance:
    """The context layer's ``Relevance``: a fact matters when it would be in the picture.

    Same look-ups as ``build_picture`` (so the same answers): a condition in a condition
    group, a drug in a drug group or magnesium, a lab of a known kind (the first code of a
    known kind decides, as in ``Knowledge.lab_kind``). Conditions and labs are matched one
    code at a time (a union over codes in the knowledge base), so each
    (system, code) pair is looked up once and remembered (bounded) by the pipeline that owns
    this object: most of a chart is codes no rule reads, seen again and again.
    """

    def __init__(self, knowledge: Knowledge) -> None:
        self.knowledge = knowledge
        self._condition_codes: dict[tuple[str, str], bool] = {}
        self._lab_kinds: dict[tuple[str, str], str | None] = {}

    def condition_code(self, system: str, code: str) -> bool:
        key = (system, code)
        found = self._condition_codes.get(key)
        if found is None:
            found = bool(self.knowledge.condition_groups((Coding(system, code),)))
            _remember(self._condition_codes, key, found)
        return found

    def lab_kind(self, system: str, code: str) -> str | None:
        key = (system, code)
        # One read (not "in" then [key]): another request thread may clear the memo between.
        found = self._lab_kinds.get(key, _NOT_LOOKED_UP)
        if found is not _NOT_LOOKED_UP:
            return found
        found = self.knowledge.lab_kind((Coding(system, code),))
        _remember(self._lab_kinds, key, found)
        return found

    def medication(self, codings: tuple[Coding, ...], text: str) -> bool:
        # Not per code: the drug's text (and the codings' displays) count only when no code
        # matched, so the answer belongs to the whole set.
        groups, _, magnesium = _drug_lookup(self.knowledge, codings, text)
        return bool(groups) or magnesium is not None


def _remember(memo: dict[tuple[str, str], _T], key: tuple[str, str], value: _T) -> None:
    if len(key[0]) + len(key[1]) > _MAX_REMEMBERED_CHARS:
        return  # real codes and systems are short; long ones must not pin memory
    if len(memo) >= _CODE_MEMO_SIZE:
        memo.clear()
    memo[key] = value


def _medication_fact(
    medication: Medication, knowledge: Knowledge, position: int = 0
) -> MedicationFact:
    groups, matched_by, magnesium = _drug_lookup(knowledge, medication.all_codings, medication.text)
    route = route_of(medication, magnesium, knowledge)
    if CARRIER_FLUID in groups and not (magnesium and magnesium.matched_by == "rxnorm-product"):
        # A balanced fluid, dialysate or parenteral nutrition holds magnesium at about plasma
        # level (medications.json): not magnesium therapy, so no magnesium rule reads it. A
        # magnesium product's own code (a vial added to the bag) still counts as magnesium.
        magnesium = None
    brand = knowledge.starts_with_brand(medication.display)
    return MedicationFact(medication, groups, matched_by, magnesium, route, position, brand)


def build_picture(context: PatientContext, knowledge: Knowledge, today: date) -> ClinicalPicture:
    conditions = tuple(
        ConditionFact(condition, groups)
        for condition in context.conditions
        if (
            groups := counting_groups(
                condition, _condition_lookup(knowledge, condition.codings), knowledge
            )
        )
    )
    medications = tuple(
        _medication_fact(medication, knowledge, position)
        for position, medication in enumerate(context.medications)
        if medication_is_active(medication)
    )
    drafts = tuple(
        _medication_fact(medication, knowledge, position)
        for position, medication in enumerate(context.draft_orders)
    )
    labs = [
        LabFact(lab, kind, _is_stale(lab, knowledge.lab_group(kind).lookback.days, today))
        for lab in context.labs
        if lab.status not in WITHDRAWN_LAB_STATUSES
        and (kind := knowledge.lab_kind(lab.codings)) is not None
    ]
    labs.sort(key=lambda fact: lab_recency(fact.lab.effective), reverse=True)
    return ClinicalPicture(context, today, conditions, medications, drafts, tuple(labs))
