"""Magnesium with reduced kidney function (clinical source: "Impaired Kidney Function";
magnesium sulfate injection label; KDIGO GFR categories; thresholds in thresholds.json).

Kidney function is graded once in ``derived.kidney_function``: CKD stage 4-5, ESRD, dialysis,
active AKI or a latest eGFR below 30 is severe; CKD stage 3 or eGFR 30-59 is moderate.

- A systemic magnesium order with severe impairment: warning; critical when the magnesium is
  parenteral or the latest serum magnesium is already above its range.
- With moderate impairment: info with monitoring advice.
- Either way, a serum magnesium test (a ServiceRequest) is suggested when no result is recent
  (recency window: a local-policy threshold) and none is among the draft orders yet.
- patient-view: magnesium on file with severe impairment gives a
  ``patient-view-contraindication`` card.

A renal finding and a high-serum-magnesium finding about the same order say the same thing
(magnesium is not being cleared), so they share one key and merge, the more serious kept.
"""

from __future__ import annotations

from collections.abc import Iterator

from cds_service.context.model import Coding
from cds_service.knowledge import Knowledge
from cds_service.knowledge.model import LOINC
from cds_service.rules.derived import (
    KidneyFunction,
    SerumMagnesium,
    is_recent,
    is_systemic_magnesium,
    kidney_function,
    magnesium_name,
    order_evidence,
    recency_window_days,
    serum_magnesium,
    serum_magnesium_ordered,
)
from cds_service.rules.describe import mid_sentence
from cds_service.rules.findings import Finding, Indicator, Proposal
from cds_service.rules.picture import ClinicalPicture, MedicationFact

RULE_ID = "renal-magnesium"
PATIENT_VIEW_RULE_ID = "patient-view-contraindication"
HIGH_SERUM_RULE_ID = "high-serum-magnesium"


def excretion_key(fact: MedicationFact, *, patient_view: bool = False) -> str:
    """Shared by the renal and high-serum-magnesium rules: one card per order and concern."""
    scope = "patient-view" if patient_view else "order"
    return f"magnesium-excretion:{scope}:{fact.ref}"


def evaluate(picture: ClinicalPicture, knowledge: Knowledge, hook: str) -> Iterator[Finding]:
    kidney = kidney_function(picture, knowledge)
    if kidney.severity is None:
        return
    serum = serum_magnesium(picture, knowledge)
    if hook == "patient-view":
        if kidney.severity == "severe":
            for fact in picture.medications:
                if is_systemic_magnesium(fact):
                    yield _on_file(fact, kidney, serum, knowledge)
        return
    for fact in picture.actionable_drafts:
        if is_systemic_magnesium(fact):
            yield _order(picture, fact, kidney, serum, knowledge)


def serum_test_proposal(
    picture: ClinicalPicture,
    knowledge: Knowledge,
    serum: SerumMagnesium | None,
    reason: str,
) -> tuple[tuple[Proposal, ...], list[str], tuple[str, ...]]:
    """The 'order a serum magnesium' suggestion when no recent result and none ordered.

    Returns (proposals, detail paragraphs, unverified facts used).
    """
    ordered = serum_magnesium_ordered(picture, knowledge)
    if ordered is not None:
        return (), ["A serum magnesium test is among the orders."], ()
    if serum is not None and is_recent(picture, knowledge, serum.lab):
        return (), [], ()
    window = recency_window_days(knowledge)
    code = knowledge.lab_group("serum-magnesium").codes[0]  # mass/volume, as most labs report
    proposal = Proposal(
        kind="order-lab",
        label="Order a serum magnesium",
        text=reason,
        code=Coding(LOINC, code.code, code.display),
    )
    if serum is None:
        return (proposal,), ["No serum magnesium on file: check it."], ()
    note = (
        f"Last serum magnesium over {window:g} days old: recheck it."
    )
    return (proposal,), [note], (f"the {window:g}-day recency window (local policy)",)


def _order(
    picture: ClinicalPicture,
    fact: MedicationFact,
    kidney: KidneyFunction,
    serum: SerumMagnesium | None,
    knowledge: Knowledge,
) -> Finding:
    rule = knowledge.rule(RULE_ID)
    name = magnesium_name(fact)
    parenteral = fact.route == "parenteral"
    high = serum is not None and serum.is_high
    indicator: Indicator
    mg = mid_sentence(name)
    actions: list[str] = []
    if kidney.severity == "severe":
        indicator = "critical" if parenteral or high else "warning"
        paragraphs = [rule.statement("accumulation").text]
        if parenteral:
            paragraphs.append(_parenteral_limits(knowledge))
        else:
            paragraphs.append(rule.statement("oral-caution").text)
        if high:
            assert serum is not None
            # What to do first, then why.
            summary = (
                f"Avoid more {mg}: serum magnesium already high ({serum.value_text}) with "
                f"{kidney.label}"
            )
            paragraphs.append(
                f"Serum magnesium is already above its range ({serum.value_text}). "
                + knowledge.rule(HIGH_SERUM_RULE_ID).statement("toxicity").text
            )
            actions.append("Hold magnesium unless treating a documented deficiency.")
        elif parenteral:
            summary = f"Limit IV/IM {mg}: {kidney.label}; magnesium accumulates"
        else:
            summary = f"Use {mg} with caution: {kidney.label}; magnesium can accumulate"
        if parenteral:
            actions.append(_parenteral_limits(knowledge, short=True))
        elif not high:
            actions.append("If it is needed, use the lowest dose; check serum magnesium during it.")
        paragraphs.append(rule.statement("dose-advice").text)
        watch = "Reflexes, blood pressure, breathing and heart rhythm (magnesium toxicity)."
    else:
        indicator = "info"
        summary = f"Check serum magnesium on {mg}: {kidney.label}; magnesium excretion is reduced"
        paragraphs = [rule.statement("moderate-monitoring").text]
        actions.append("Check serum magnesium before long-term use and monitor it.")
        watch = "Serum magnesium during long-term use."
    proposals, lab_notes, unverified = serum_test_proposal(
        picture, knowledge, serum, f"{name} ordered with reduced kidney function"
    )
    paragraphs += lab_notes
    # Every other magnesium source counts: an over-the-counter supplement on file adds up.
    others = [
        other
        for other in (*picture.medications, *picture.drafts)
        if other is not fact and is_systemic_magnesium(other)
    ]
    if others:
        names = ", ".join(dict.fromkeys(mid_sentence(magnesium_name(o)) for o in others))
        paragraphs.insert(0, f"Also taking or ordered: {names}; count it in the total.")
        actions.append(f"Count the {names} too.")
    evidence = [*kidney.evidence]
    if serum is not None:
        evidence.append(serum.evidence)
    evidence.append(order_evidence(fact))
    evidence += [order_evidence(o) for o in others]
    because = ""
    if indicator == "critical":
        why = "serum magnesium already high" if high else "IV magnesium"
        because = f"{why} with severe kidney impairment"
    return Finding(
        rule_id=RULE_ID,
        indicator=indicator,
        summary=summary,
        detail="\n\n".join(paragraphs),
        evidence=tuple(evidence),
        source_ids=("local-policy",) if unverified else (),
        key=excretion_key(fact),
        proposals=proposals,
        order=fact.medication,
        unverified=unverified,
        action=" ".join([*actions, *lab_notes]),
        watch=watch,
        critical_because=because,
    )


def _parenteral_limits(knowledge: Knowledge, *, short: bool = False) -> str:
    most = knowledge.threshold("iv-mgso4-severe-renal-max")
    urine = knowledge.threshold("iv-mgso4-urine-output-min")
    if short:
        return (
            f"At most {most.value:g} {most.unit}, each dose only with a urine output of "
            f"{urine.value:g} {urine.unit}; check serum magnesium during it."
        )
    return " ".join(f"{t.display}: {t.value:g} {t.unit}." for t in (most, urine))


def _on_file(
    fact: MedicationFact,
    kidney: KidneyFunction,
    serum: SerumMagnesium | None,
    knowledge: Knowledge,
) -> Finding:
    rule = knowledge.rule(RULE_ID)
    name = mid_sentence(magnesium_name(fact))
    paragraphs = [rule.statement("accumulation").text, rule.statement("oral-caution").text]
    indicator: Indicator = "warning"
    summary = f"Review {name} on file: {kidney.label}; magnesium can accumulate"
    evidence = [*kidney.evidence]
    if serum is not None:
        evidence.append(serum.evidence)
        if serum.is_high:
            summary = (
                f"Review {name} on file: serum magnesium high ({serum.value_text}) with "
                f"{kidney.label}"
            )
            paragraphs.append(knowledge.rule(HIGH_SERUM_RULE_ID).statement("toxicity").text)
        if serum.is_toxic:
            indicator = "critical"
    paragraphs.append("Review whether this magnesium is still needed.")
    evidence.append(order_evidence(fact))
    return Finding(
        rule_id=PATIENT_VIEW_RULE_ID,
        indicator=indicator,
        summary=summary,
        detail="\n\n".join(paragraphs),
        evidence=tuple(evidence),
        source_ids=(),
        key=excretion_key(fact, patient_view=True),
        order=fact.medication,
        action="Review whether this magnesium is still needed; check serum magnesium.",
        watch="Reflexes, blood pressure, breathing and heart rhythm (magnesium toxicity).",
    )
