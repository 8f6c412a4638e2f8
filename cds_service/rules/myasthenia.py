"""Myasthenia gravis and magnesium (clinical source: "The Severe Risk for Myasthenia Gravis";
magnesium sulfate injection label §5.6 myasthenic crisis, §7 neuromuscular blockade).

Myasthenia gravis counts when it is coded (active, not refuted) or, without a code, when the
patient is on a therapy used for it (cholinesterase inhibitors, complement/FcRn agents).
Topical magnesium (Epsom salt soaks) is what the clinical source allows in MG, so it is not
flagged.
"""

from __future__ import annotations

from collections.abc import Iterator

from cds_service.knowledge import Knowledge
from cds_service.rules.derived import is_systemic_magnesium, order_evidence
from cds_service.rules.describe import condition_text, medication_text
from cds_service.rules.findings import Evidence, Finding, Proposal
from cds_service.rules.picture import ClinicalPicture, MedicationFact

RULE_ID = "myasthenia-magnesium"
PATIENT_VIEW_RULE_ID = "patient-view-contraindication"
MG_CONDITIONS = ("myasthenia-gravis",)
MG_THERAPIES = ("cholinesterase-inhibitor", "mg-therapy-other")
ANTAGONISED = "antagonised-by-magnesium"

# Statements quoted from the rule catalogue (rules.json), in card order.
_STATEMENTS = ("impaired-transmission", "label", "if-unavoidable")


def myasthenia_evidence(picture: ClinicalPicture) -> tuple[Evidence, ...]:
    """Coded MG, or failing that the MG therapy that implies it."""
    coded = picture.conditions_in(*MG_CONDITIONS)
    if coded:
        return tuple(Evidence(condition_text(f.condition), f.condition.source) for f in coded)
    return tuple(
        Evidence(
            f"{medication_text(f.medication)}: a myasthenia gravis therapy (no coded diagnosis)",
            f.medication.source,
        )
        for f in picture.medications_in(*MG_THERAPIES)
    )


def evaluate(picture: ClinicalPicture, knowledge: Knowledge, hook: str) -> Iterator[Finding]:
    mg_evidence = myasthenia_evidence(picture)
    if not mg_evidence:
        return
    rule = knowledge.rule(RULE_ID)
    paragraphs = [rule.statement(s).text for s in _STATEMENTS]
    # The clinical source's claim that magnesium counteracts anticholinesterases (unverified).
    antagonism = knowledge.drug_group("cholinesterase-inhibitor").effect(ANTAGONISED)
    on_file = picture.medications_in("cholinesterase-inhibitor")
    extra: tuple[str, ...] = ()
    if antagonism is not None and on_file:
        extra = (antagonism.text,)
        names = ", ".join(medication_text(f.medication) for f in on_file)
        paragraphs.insert(2, f"{antagonism.text} On file: {names}.")

    if hook == "patient-view":
        for fact in picture.medications:
            if is_systemic_magnesium(fact):
                yield _finding(fact, mg_evidence, paragraphs, extra, PATIENT_VIEW_RULE_ID, hook)
        return
    for fact in picture.drafts:
        if is_systemic_magnesium(fact):
            yield _finding(fact, mg_evidence, paragraphs, extra, RULE_ID, hook)


def _finding(
    fact: MedicationFact,
    mg_evidence: tuple[Evidence, ...],
    paragraphs: list[str],
    extra: tuple[str, ...],
    rule_id: str,
    hook: str,
) -> Finding:
    medication = fact.medication
    parenteral = fact.route == "parenteral"
    name = (
        fact.magnesium.salt_display
        if fact.magnesium and fact.magnesium.salt_display
        else "magnesium"
    )
    name = name[:1].lower() + name[1:]  # it sits mid-sentence in every summary and label
    if parenteral:
        summary = (
            f"IV/IM {name} in myasthenia gravis: risk of myasthenic crisis and respiratory failure"
        )
    elif hook == "patient-view":
        summary = f"Patient with myasthenia gravis is on {name}: magnesium can worsen weakness"
    else:
        summary = f"Avoid {name} in myasthenia gravis: magnesium worsens neuromuscular weakness"
    proposals: tuple[Proposal, ...] = ()
    if medication.is_draft and medication.source.resource_id:
        proposals = (
            Proposal(
                kind="remove-order",
                label=f"Remove the {name} order",
                order=medication,
                recommended=True,
            ),
        )
    return Finding(
        rule_id=rule_id,
        indicator="critical",
        summary=summary,
        detail="\n\n".join(paragraphs),
        evidence=(*mg_evidence, order_evidence(fact)),
        source_ids=(),  # the rule catalogue lists this rule's sources
        key=f"{rule_id}:{medication.source.reference}",
        proposals=proposals,
        order=medication,
        unverified=extra,
    )
