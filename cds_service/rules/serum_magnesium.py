"""The latest serum magnesium: high while magnesium is ordered or taken, low in autoimmune
disease (magnesium sulfate injection label §5.2/§10 toxicity; HL7 PDDI-CDS default range;
clinical source: deficiency and autoimmunity).

The value is read once in ``derived.serum_magnesium`` (mg/dL, mmol/L or mEq/L; the
Observation's own reference range when present).

- high-serum-magnesium: a systemic magnesium order while the latest value is above its range
  gives a warning whatever the kidney codes say; critical above the level where reflexes
  weaken. With reduced kidney function the renal rule says the same: the two share a key.
- patient-view-contraindication: magnesium on file with a high value.
- patient-view-low-magnesium: a value below its range in a patient with an autoimmune-related
  condition: info, with the myasthenia and kidney cautions to weigh before replacing it.
"""

from __future__ import annotations

from collections.abc import Iterator

from cds_service.knowledge import Knowledge
from cds_service.rules.derived import (
    KidneyFunction,
    SerumMagnesium,
    autoimmune_related,
    is_systemic_magnesium,
    kidney_function,
    magnesium_name,
    order_evidence,
    serum_magnesium,
)
from cds_service.rules.describe import condition_text
from cds_service.rules.findings import Evidence, Finding, Indicator
from cds_service.rules.myasthenia import myasthenia_evidence
from cds_service.rules.picture import ClinicalPicture, MedicationFact
from cds_service.rules.renal import PATIENT_VIEW_RULE_ID, excretion_key

RULE_ID = "high-serum-magnesium"
LOW_RULE_ID = "patient-view-low-magnesium"


def evaluate(picture: ClinicalPicture, knowledge: Knowledge, hook: str) -> Iterator[Finding]:
    serum = serum_magnesium(picture, knowledge)
    if serum is None:
        return
    if hook == "patient-view":
        if serum.is_high:
            kidney = kidney_function(picture, knowledge)
            for fact in picture.medications:
                if is_systemic_magnesium(fact):
                    yield _high(fact, serum, kidney, knowledge, patient_view=True)
        elif serum.is_low:
            low = _low(picture, serum, knowledge)
            if low is not None:
                yield low
        return
    if not serum.is_high:
        return
    kidney = kidney_function(picture, knowledge)
    for fact in picture.drafts:
        if is_systemic_magnesium(fact):
            yield _high(fact, serum, kidney, knowledge, patient_view=False)


def _high(
    fact: MedicationFact,
    serum: SerumMagnesium,
    kidney: KidneyFunction,
    knowledge: Knowledge,
    *,
    patient_view: bool,
) -> Finding:
    name = magnesium_name(fact)
    indicator: Indicator = "critical" if serum.is_toxic else "warning"
    when = serum.lab.effective.date().isoformat() if serum.lab.effective else "date unknown"
    if patient_view:
        summary = f"{name} on file while serum magnesium is high ({serum.value_text}, {when})"
    else:
        summary = f"{name} ordered while serum magnesium is high ({serum.value_text}, {when})"
    paragraphs = [
        f"The latest serum magnesium, {serum.value_text} on {when}, is above the "
        f"{serum.range_text}; more magnesium raises it further.",
        knowledge.rule(RULE_ID).statement("toxicity").text,
        "Confirm that magnesium is needed and recheck the level before giving more.",
    ]
    evidence = [Evidence(serum.describe, serum.lab.source)]
    if kidney.severity is not None:
        evidence += kidney.evidence
    evidence.append(order_evidence(fact))
    return Finding(
        rule_id=PATIENT_VIEW_RULE_ID if patient_view else RULE_ID,
        indicator=indicator,
        summary=summary,
        detail="\n\n".join(paragraphs),
        evidence=tuple(evidence),
        source_ids=("mgso4-pi",),
        key=excretion_key(fact, patient_view=patient_view),
        order=fact.medication,
    )


def _low(picture: ClinicalPicture, serum: SerumMagnesium, knowledge: Knowledge) -> Finding | None:
    related = autoimmune_related(picture, knowledge)
    if not related:
        return None
    rule = knowledge.rule(LOW_RULE_ID)
    when = serum.lab.effective.date().isoformat() if serum.lab.effective else "date unknown"
    condition = related[0][0].condition.display
    summary = f"Low serum magnesium ({serum.value_text}, {when}) in a patient with {condition}"
    paragraphs = [
        f"The latest serum magnesium is below the {serum.range_text}.",
        rule.statement("absorption").text,
    ]
    mg_evidence = myasthenia_evidence(picture)
    if mg_evidence:
        group = knowledge.condition_group("myasthenia-gravis")
        paragraphs.append(
            "Before replacing it: myasthenia gravis. "
            + " ".join(g.text for g in group.guidance if g.status != "unverified")
        )
    kidney = kidney_function(picture, knowledge)
    if kidney.severity is not None:
        paragraphs.append(
            f"Before replacing it: reduced kidney function ({kidney.label}). "
            + knowledge.rule("renal-magnesium").statement("accumulation").text
        )
    paragraphs.append(knowledge.rule("autoimmune-guidance").statement("diet-first").text)
    evidence = [
        *(Evidence(condition_text(fact.condition), fact.condition.source) for fact, _ in related),
        Evidence(serum.describe, serum.lab.source),
    ]
    evidence += mg_evidence
    if kidney.severity is not None:
        evidence += kidney.evidence
    return Finding(
        rule_id=LOW_RULE_ID,
        indicator="info",
        summary=summary,
        detail="\n\n".join(paragraphs),
        evidence=tuple(dict.fromkeys(evidence)),  # coded MG is also an autoimmune condition
        source_ids=("magnesium-autoimmunity",),
        key=f"{LOW_RULE_ID}:{serum.lab.source.reference}",
    )
