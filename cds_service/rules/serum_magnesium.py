"""The latest serum magnesium: high while magnesium is ordered or taken, low in autoimmune
disease (magnesium sulfate injection label §5.2/§10 toxicity; HL7 PDDI-CDS default range;
clinical source: deficiency and autoimmunity).

The value is read once in ``derived.serum_magnesium`` (mg/dL, mmol/L or mEq/L; the
Observation's own reference range when present).

- high-serum-magnesium: a systemic magnesium order while the latest value is high (above its
  range, a missing bound taken from the default range; or above 4 mEq/L whatever the range;
  or, when no number decides, flagged H/HH/HU by the laboratory) gives a warning whatever the
  kidney codes say. Graded by the label's levels with the context (``_grade``): critical above
  5 mEq/L (beyond the usual anticonvulsant level), or above 4 mEq/L (reflexes begin to
  diminish) with severe kidney impairment or a neuromuscular disease. With reduced kidney
  function the renal rule says the same: the two share a key.
- obstetric-magnesium-monitoring: parenteral magnesium for pre-eclampsia or eclampsia, where a
  high level is the aim: monitoring (reflexes, breathing, urine output, level against
  2.5-5 mEq/L), critical only above that range.
- The same rule, from a coded active hypermagnesemia when the value does not say "high" (none
  on file, or not high): a warning, suggesting a serum magnesium when none is recent.
- patient-view-contraindication: magnesium on file with a high value or coded hypermagnesemia.
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
from cds_service.rules.describe import condition_evidence, mid_sentence, short_display
from cds_service.rules.findings import Evidence, Finding, Indicator, Proposal
from cds_service.rules.myasthenia import myasthenia_evidence
from cds_service.rules.picture import ClinicalPicture, ConditionFact, MedicationFact
from cds_service.rules.renal import PATIENT_VIEW_RULE_ID, excretion_key, serum_test_proposal

RULE_ID = "high-serum-magnesium"
LOW_RULE_ID = "patient-view-low-magnesium"
OBSTETRIC_RULE_ID = "obstetric-magnesium-monitoring"
HYPERMAGNESEMIA = "hypermagnesemia"  # condition group in conditions.json
OBSTETRIC = "pre-eclampsia-eclampsia"  # condition group: magnesium is the therapy there
# Conditions that lower the level at which magnesium harms (label: MG, neuromuscular disease).
NEUROMUSCULAR = ("myasthenia-gravis", "lambert-eaton", "other-neuromuscular-junction")
ANTICONVULSANT_RANGE = "serum-magnesium-anticonvulsant-range"
RESPIRATORY_RATE_MIN = "obstetric-respiratory-rate-min"


def _above_anticonvulsant_range(serum: SerumMagnesium, knowledge: Knowledge) -> bool:
    """Above the usual anticonvulsant level (5 mEq/L): no indication aims that high."""
    band = knowledge.threshold(ANTICONVULSANT_RANGE)
    limit = knowledge.to_mmol_per_l(band.high, band.unit) if band.high is not None else None
    return serum.mmol is not None and limit is not None and serum.mmol > limit


def _grade(
    serum: SerumMagnesium, kidney: KidneyFunction, picture: ClinicalPicture, knowledge: Knowledge
) -> Indicator:
    """Label levels with the patient's context (rules.json high-serum-magnesium grading):
    critical above 5 mEq/L, or above 4 mEq/L with severe kidney impairment or a neuromuscular
    disease; otherwise a warning."""
    if _above_anticonvulsant_range(serum, knowledge):
        return "critical"
    if serum.is_toxic and (kidney.severity == "severe" or picture.conditions_in(*NEUROMUSCULAR)):
        return "critical"
    return "warning"


def evaluate(picture: ClinicalPicture, knowledge: Knowledge, hook: str) -> Iterator[Finding]:
    serum = serum_magnesium(picture, knowledge)
    high = serum is not None and serum.is_high
    coded = picture.conditions_in(HYPERMAGNESEMIA)
    if hook == "patient-view" and not (high or coded):
        if serum is not None and serum.is_low:
            low = _low(picture, serum, knowledge)
            if low is not None:
                yield low
        return
    if not (high or coded):
        return
    kidney = kidney_function(picture, knowledge)
    # At patient-view the magnesium on file is what matters; at ordering, the drafts.
    patient_view = hook == "patient-view"
    orders = picture.medications if patient_view else picture.actionable_drafts
    for fact in orders:
        if not is_systemic_magnesium(fact):
            continue
        if high:
            assert serum is not None
            obstetric = picture.conditions_in(OBSTETRIC)
            if obstetric and fact.route == "parenteral":
                yield _obstetric(fact, serum, obstetric, knowledge, patient_view=patient_view)
                continue
            indicator = _grade(serum, kidney, picture, knowledge)
            yield _high(
                fact, serum, kidney, knowledge, coded, indicator, patient_view=patient_view
            )
        else:
            yield _coded(picture, fact, coded, serum, knowledge, patient_view=patient_view)


def _high(
    fact: MedicationFact,
    serum: SerumMagnesium,
    kidney: KidneyFunction,
    knowledge: Knowledge,
    coded: tuple[ConditionFact, ...],
    indicator: Indicator,
    *,
    patient_view: bool,
) -> Finding:
    name = mid_sentence(magnesium_name(fact))
    when = serum.lab.effective.date().isoformat() if serum.lab.effective else "date unknown"
    verb = "Review" if patient_view else "Hold"
    where = " on file" if patient_view else ""
    if indicator == "critical":
        why = "reflexes and breathing are at risk"
    elif serum.is_toxic:
        why = "reflexes begin to diminish above 4 mEq/L"
    else:
        why = "more raises it further"
    summary = f"{verb} {name}{where}: serum magnesium {serum.value_text} on {when} is high; {why}"
    paragraphs = [
        f"The latest serum magnesium, {serum.value_text} on {when}, is {serum.high_reason}; "
        "more magnesium raises it further.",
        knowledge.rule(RULE_ID).statement("grading").text,
        "Confirm that magnesium is needed and recheck the level before giving more.",
    ]
    evidence = [*_condition_evidence(coded), serum.evidence]
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
        action="Confirm that magnesium is needed and recheck the level before giving more.",
        watch=_TOXICITY_SIGNS,
        critical_because=f"serum magnesium {serum.value_text} with the risk to reflexes and "
        "breathing"
        if indicator == "critical"
        else "",
    )


def _obstetric(
    fact: MedicationFact,
    serum: SerumMagnesium,
    obstetric: tuple[ConditionFact, ...],
    knowledge: Knowledge,
    *,
    patient_view: bool,
) -> Finding:
    """Magnesium therapy for pre-eclampsia or eclampsia: a high level is the aim, so the card
    is about monitoring; above the usual anticonvulsant level it is critical."""
    rule = knowledge.rule(OBSTETRIC_RULE_ID)
    when = serum.lab.effective.date().isoformat() if serum.lab.effective else "date unknown"
    above = _above_anticonvulsant_range(serum, knowledge)
    paragraphs = [rule.statement("monitoring").text]
    breathing = knowledge.threshold(RESPIRATORY_RATE_MIN)
    policy = " (local protocol)" if breathing.status == "unverified" else ""
    rate = f"breathing rate below {breathing.value:g}/min{policy}"
    paragraphs.append(f"Hold the next dose and reassess at a {rate}.")
    if above:
        summary = (
            f"Hold magnesium: serum magnesium {serum.value_text} on {when} is above the "
            "anticonvulsant range; check reflexes, breathing"
        )
        paragraphs.append(rule.statement("above-range").text)
    else:
        summary = (
            f"Check reflexes, breathing and urine output: serum magnesium {serum.value_text} "
            "on magnesium for pre-eclampsia"
        )
    return Finding(
        rule_id=PATIENT_VIEW_RULE_ID if patient_view else OBSTETRIC_RULE_ID,
        indicator="critical" if above else "warning",
        summary=summary,
        detail="\n\n".join(paragraphs),
        evidence=(
            *_condition_evidence(obstetric),
            Evidence(serum.describe, serum.lab.source),
            order_evidence(fact),
        ),
        source_ids=("local-policy",) if breathing.status == "unverified" else (),
        key=excretion_key(fact, patient_view=patient_view),
        order=fact.medication,
        unverified=(rate,) if breathing.status == "unverified" else (),
        action=(
            "Hold the next dose until reflexes, breathing and a new level allow it."
            if above
            else "Before each dose: patellar reflexes present, breathing not depressed, urine "
            "output at least 100 mL in 4 hours."
        ),
        watch="Serum magnesium against the usual 2.5-5 mEq/L (3-6 mg/dL); calcium gluconate "
        "reverses toxicity.",
        topics=(OBSTETRIC,),
        critical_because=f"serum magnesium {serum.value_text}, above the anticonvulsant range"
        if above
        else "",
    )


def _coded(
    picture: ClinicalPicture,
    fact: MedicationFact,
    coded: tuple[ConditionFact, ...],
    serum: SerumMagnesium | None,
    knowledge: Knowledge,
    *,
    patient_view: bool,
) -> Finding:
    """Hypermagnesemia on the problem list, with no high value to say it: still a warning."""
    name = mid_sentence(magnesium_name(fact))
    if patient_view:
        summary = f"Review {name} on file: hypermagnesemia is on the problem list"
    else:
        summary = f"Check serum magnesium before {name}: hypermagnesemia is on the problem list"
    rule = knowledge.rule(RULE_ID)
    paragraphs = [rule.statement("coded-hypermagnesemia").text, rule.statement("toxicity").text]
    proposals: tuple[Proposal, ...] = ()
    unverified: tuple[str, ...] = ()
    if not patient_view:
        proposals, notes, unverified = serum_test_proposal(
            picture, knowledge, serum, f"{magnesium_name(fact)} ordered with hypermagnesemia coded"
        )
        paragraphs += notes
    evidence = list(_condition_evidence(coded))
    if serum is not None:
        evidence.append(serum.evidence)
    evidence.append(order_evidence(fact))
    notes = paragraphs[2:]
    return Finding(
        rule_id=PATIENT_VIEW_RULE_ID if patient_view else RULE_ID,
        indicator="warning",
        summary=summary,
        detail="\n\n".join(paragraphs),
        evidence=tuple(evidence),
        source_ids=("mgso4-pi", "local-policy") if unverified else ("mgso4-pi",),
        key=excretion_key(fact, patient_view=patient_view),
        proposals=proposals,
        order=fact.medication,
        unverified=unverified,
        action=" ".join(["Confirm that magnesium is needed before giving more.", *notes]),
        watch=_TOXICITY_SIGNS,
    )


_TOXICITY_SIGNS = "Reflexes, blood pressure, breathing and heart rhythm (magnesium toxicity)."


def _condition_evidence(coded: tuple[ConditionFact, ...]) -> tuple[Evidence, ...]:
    return tuple(condition_evidence(f.condition) for f in coded)


def _low(picture: ClinicalPicture, serum: SerumMagnesium, knowledge: Knowledge) -> Finding | None:
    related = autoimmune_related(picture, knowledge)
    if not related:
        return None
    rule = knowledge.rule(LOW_RULE_ID)
    when = serum.lab.effective.date().isoformat() if serum.lab.effective else "date unknown"
    # The knowledge's name: bounded, unlike EHR text.
    condition = mid_sentence(short_display(related[0][1].display))
    summary = (
        f"Diet first, then replace with care: serum magnesium low ({serum.value_text} on "
        f"{when}) with {condition}"
    )
    paragraphs = [
        f"The latest serum magnesium is below the {serum.range_text}.",
        rule.statement("absorption").text,
    ]
    actions = [
        "Diet first (leafy greens, nuts and seeds, legumes, whole grains); replace magnesium "
        "if it stays low."
    ]
    mg_evidence = myasthenia_evidence(picture, knowledge)
    if mg_evidence:
        group = knowledge.condition_group("myasthenia-gravis")
        paragraphs.append(
            "Before replacing it: myasthenia gravis. "
            + " ".join(g.text for g in group.guidance if g.status != "unverified")
        )
        actions.append("Myasthenia gravis: no systemic magnesium without neurology advice.")
    kidney = kidney_function(picture, knowledge)
    if kidney.severity is not None:
        paragraphs.append(
            f"Before replacing it: reduced kidney function ({kidney.label}). "
            + knowledge.rule("renal-magnesium").statement("accumulation").text
        )
        actions.append("Reduced kidney function: the lowest dose, with serum magnesium checks.")
    paragraphs.append(knowledge.rule("autoimmune-guidance").statement("diet-first").text)
    evidence = [
        *(condition_evidence(fact.condition) for fact, _ in related),
        serum.evidence,
    ]
    evidence += mg_evidence.evidence
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
        action=" ".join(actions),
        watch="Serum magnesium after replacing it.",
        topics=tuple(dict.fromkeys(group.id for _, group in related)),
    )
