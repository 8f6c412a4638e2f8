"""Supplemental magnesium above the tolerable upper intake level (NIH ODS: 350 mg/day of
elemental magnesium from supplements and medicines from age 9, lower for children; the age
bands are the ``supplemental-magnesium-ul`` threshold).

- The order alone above the limit: warning; a magnesium laxative ordered for a short stated
  course (at most ``supervised-laxative-course-max-days``, local policy) is the supervised
  use the source says may exceed the limit: info.
- The order within the limit, but above it together with magnesium already taken (every
  other active magnesium with a known dose): info.

The daily dose comes from ``derived.daily_elemental_mg``; when any factor is unknown there is
no card (other cards say "dose unknown"). Parenteral therapy is supervised replacement, not
supplementation, and topical soaks are not intake: neither is counted. With the age unknown
the adult limit applies, and the card says so; below the youngest band there is no limit.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

from cds_service.knowledge import Knowledge, ThresholdBand
from cds_service.rules.derived import (
    daily_elemental_mg,
    daily_elemental_mg_value,
    kidney_function,
    magnesium_name,
    order_evidence,
)
from cds_service.rules.describe import mid_sentence
from cds_service.rules.findings import Evidence, Finding, Indicator
from cds_service.rules.picture import ClinicalPicture, MedicationFact

RULE_ID = "magnesium-dose-limit"
LIMIT = "supplemental-magnesium-ul"
LAXATIVE_COURSE = "supervised-laxative-course-max-days"  # local policy
LAXATIVE_ATC = "A06AD"  # osmotically acting laxatives (magnesium salts)


def _counted(fact: MedicationFact) -> bool:
    return fact.is_magnesium and fact.route not in ("parenteral", "topical")


def evaluate(picture: ClinicalPicture, knowledge: Knowledge, hook: str) -> Iterator[Finding]:
    if hook == "patient-view":
        return
    drafts = [f for f in picture.actionable_drafts if _counted(f)]
    if not drafts:
        return
    age = picture.age
    band = _limit_band(knowledge, age, _band_sex(knowledge, picture.context.patient.sex))
    if band is None or band.value is None:
        if age is not None and age < _youngest_band_age(knowledge):
            # The source sets no limit this young: say so rather than check nothing silently.
            yield from (_no_limit(fact, knowledge) for fact in drafts)
        return
    others = [f for f in (*picture.medications, *picture.drafts) if _counted(f)]
    for fact in drafts:
        # The number decides; the working is written out only for a finding.
        daily = daily_elemental_mg_value(fact)
        if daily is None:
            continue
        if daily > band.value:
            if _supervised_laxative_course(fact, knowledge):
                impaired = kidney_function(picture, knowledge).severity is not None
                yield _laxative_course(fact, daily, band, impaired, knowledge)
            else:
                yield _finding(fact, daily, (), band, age, "warning", knowledge)
            continue
        with_others = [
            (other, dose)
            for other in others
            if other is not fact and (dose := daily_elemental_mg_value(other)) is not None
        ]
        total = daily + sum(dose for _, dose in with_others)
        if with_others and total > band.value:
            yield _finding(
                fact, total, tuple(o for o, _ in with_others), band, age, "info", knowledge
            )


# Stands for every sex no band names: bands treat all such values alike (``applies_to``).
_UNNAMED_SEX = "\x00unnamed"


def _band_sex(knowledge: Knowledge, sex: str | None) -> str | None:
    """``sex`` as the bands tell it apart. A chart's gender is any string: keyed as it is, the
    memo below would keep every odd (or huge) value sent to it."""
    if sex is None or sex in _named_sexes(knowledge):
        return sex
    return _UNNAMED_SEX


@lru_cache(maxsize=8)
def _named_sexes(knowledge: Knowledge) -> frozenset[str]:
    named = frozenset(b.sex for b in knowledge.threshold(LIMIT).bands if b.sex is not None)
    assert _UNNAMED_SEX not in named
    return named


# A pure look-up on the immutable knowledge, memoised: ages are few, and sexes are keyed by
# ``_band_sex`` (bounded anyway).
@lru_cache(maxsize=512)
def _limit_band(knowledge: Knowledge, age: int | None, sex: str | None) -> ThresholdBand | None:
    """The upper-limit band for the patient."""
    threshold = knowledge.threshold(LIMIT)
    if age is None:
        # Unknown age: the open-ended (adult) band rather than a guess.
        return next((b for b in threshold.bands if b.age_max is None), None)
    return threshold.band_for(age, sex)


def _supervised_laxative_course(fact: MedicationFact, knowledge: Knowledge) -> bool:
    """An order (not a self-reported statement) of a magnesium laxative salt for a short,
    stated course: the supervised use the source says may exceed the supplement limit."""
    match = fact.magnesium
    if match is None or match.salt is None or fact.medication.kind == "MedicationStatement":
        return False
    salt = knowledge.magnesium_salt(match.salt)
    if not any(a.code.startswith(LAXATIVE_ATC) for a in salt.atc):
        return False
    longest = knowledge.threshold(LAXATIVE_COURSE).value
    courses = [d.course_days for d in fact.medication.doses]
    return (
        longest is not None
        and bool(courses)
        and all(c is not None and c <= longest for c in courses)
    )


def _laxative_course(
    fact: MedicationFact,
    daily: float,
    band: ThresholdBand,
    kidneys_impaired: bool,
    knowledge: Knowledge,
) -> Finding:
    """``kidneys_impaired``: high magnesium is worth watching for only then (the renal card
    says why); a patient with healthy kidneys is not told about kidneys."""
    name = mid_sentence(magnesium_name(fact))
    threshold = knowledge.threshold(LAXATIVE_COURSE)
    course = max(d.course_days or 0.0 for d in fact.medication.doses)
    watch_for = "diarrhoea and high magnesium" if kidneys_impaired else "diarrhoea"
    return Finding(
        rule_id=RULE_ID,
        indicator="info",
        summary=f"Watch for {watch_for}: a supervised {name} laxative course may exceed the "
        f"{band.value:g} mg/day supplement limit",
        detail="\n\n".join(
            [
                f"A {course:g}-day course giving {daily:.0f} mg elemental magnesium a day.",
                knowledge.rule(RULE_ID).statement("supervised-laxative").text,
            ]
        ),
        evidence=(order_evidence(fact),),
        source_ids=threshold.source_ids,
        key=f"{RULE_ID}:{fact.ref}",
        order=fact.medication,
        action=f"Keep it to the stated {course:g}-day course; it is not a daily supplement.",
        watch="Diarrhoea; serum magnesium, as kidney function is reduced."
        if kidneys_impaired
        else "Diarrhoea.",
        unverified=(f"a course of at most {threshold.value:g} days counts as short-term",)
        if threshold.status == "unverified"
        else (),
    )


@lru_cache(maxsize=8)
def _youngest_band_age(knowledge: Knowledge) -> float:
    ages = [b.age_min for b in knowledge.threshold(LIMIT).bands if b.age_min is not None]
    return min(ages, default=0.0)


def _no_limit(fact: MedicationFact, knowledge: Knowledge) -> Finding:
    name = mid_sentence(magnesium_name(fact))
    return Finding(
        rule_id=RULE_ID,
        indicator="info",
        summary=f"Dose {name} by weight: no supplement upper limit is set for infants under "
        "1 year",
        detail=knowledge.rule(RULE_ID).statement("infant").text,
        action="Dose it by weight with the prescriber and check serum magnesium.",
        evidence=(Evidence("Infant under 1 year old"), order_evidence(fact)),
        source_ids=knowledge.threshold(LIMIT).source_ids,
        key=f"{RULE_ID}:{fact.ref}",
        order=fact.medication,
    )


def _finding(
    fact: MedicationFact,
    total: float,
    others: tuple[MedicationFact, ...],
    band: ThresholdBand,
    age: int | None,
    indicator: Indicator,
    knowledge: Knowledge,
) -> Finding:
    threshold = knowledge.threshold(LIMIT)
    assert band.value is not None
    name = magnesium_name(fact)
    limit = f"{band.value:g} mg/day"
    mg = mid_sentence(name)
    # What to do, then why.
    if others:
        summary = (
            f"Review total magnesium: with {mg}, {total:.0f} mg elemental a day is above the "
            f"{limit} upper limit"
        )
    else:
        summary = (
            f"Lower the {mg} dose: {total:.0f} mg elemental a day is above the {limit} upper "
            "limit"
        )
    who = f"age {age}" if age is not None else "age unknown, adult limit used"
    paragraphs = [
        f"{threshold.display}: {limit} for {band.label} ({who}).",
        f"This order gives {daily_elemental_mg(fact).how}"
        + (f"; with the magnesium on file, {total:.0f} mg/day in all." if others else "."),
        knowledge.rule(RULE_ID).statement("short-term-laxatives").text,
        "Consider a lower dose or fewer doses a day, unless a higher dose is intended "
        "and supervised.",
    ]
    limit_fact = f"upper limit {limit} for {band.label}" + (
        "" if age is not None else " (age unknown: the adult limit)"
    )
    return Finding(
        rule_id=RULE_ID,
        indicator=indicator,
        summary=summary,
        detail="\n\n".join(p for p in paragraphs if p),
        evidence=(
            order_evidence(fact),
            *(order_evidence(o) for o in others),
            Evidence(limit_fact),
        ),
        action="Lower the dose or the number of doses a day, unless a higher dose is intended "
        "and supervised.",
        watch="Diarrhoea, nausea and abdominal cramps.",
        source_ids=threshold.source_ids,
        # Together-above-the-limit is one finding however many drafts share it.
        key=f"{RULE_ID}:" + "|".join(sorted(f.ref for f in (fact, *others))),
        order=fact.medication,
    )
