"""Parenteral magnesium with a neuromuscular blocking agent, for every patient (magnesium
sulfate injection label §7: magnesium potentiates neuromuscular blockers).

Both directions, on draft orders: a blocker ordered while parenteral magnesium is on file or
among the drafts, or parenteral magnesium ordered while a blocker is. One card per pair.
"""

from __future__ import annotations

from collections.abc import Iterator

from cds_service.knowledge import Knowledge
from cds_service.rules.derived import (
    ingredient_in,
    is_systemic_magnesium,
    magnesium_name,
    order_evidence,
)
from cds_service.rules.describe import mid_sentence
from cds_service.rules.findings import Finding
from cds_service.rules.picture import ClinicalPicture, MedicationFact

RULE_ID = "magnesium-neuromuscular-blocker"
BLOCKERS = "neuromuscular-blocker"  # drug group in medications.json


def _parenteral_magnesium(fact: MedicationFact) -> bool:
    return is_systemic_magnesium(fact) and fact.route == "parenteral"


def evaluate(picture: ClinicalPicture, knowledge: Knowledge, hook: str) -> Iterator[Finding]:
    if hook == "patient-view":
        return
    everything = (*picture.medications, *picture.drafts)
    blockers = [f for f in everything if BLOCKERS in f.groups and f.route != "topical"]
    if not blockers:
        return
    magnesium = [f for f in everything if _parenteral_magnesium(f)]
    for mg in magnesium:
        for blocker in blockers:
            # The card goes on a selected draft: the magnesium, else the blocker.
            if mg.medication.is_draft and picture.is_selected(mg):
                target = mg
            elif blocker.medication.is_draft and picture.is_selected(blocker):
                target = blocker
            else:
                continue
            yield _finding(mg, blocker, target, knowledge)


def _finding(
    mg: MedicationFact, blocker: MedicationFact, target: MedicationFact, knowledge: Knowledge
) -> Finding:
    ingredient = ingredient_in(blocker, knowledge, BLOCKERS)
    drug = ingredient.name if ingredient is not None else blocker.medication.display
    name = mid_sentence(magnesium_name(mg))
    rule = knowledge.rule(RULE_ID)
    pair = sorted((mg.ref, blocker.ref))
    return Finding(
        rule_id=RULE_ID,
        indicator="warning",
        summary=f"Reduce and monitor {drug} with IV {name}: magnesium deepens and prolongs "
        "the block",
        detail="\n\n".join(rule.statement(s).text for s in ("label", "watch")),
        evidence=(order_evidence(mg, with_dose=False), order_evidence(blocker)),
        source_ids=(),
        key=f"{RULE_ID}:{'|'.join(pair)}",
        order=target.medication,
        action="Reduce and titrate the blocker with train-of-four monitoring.",
        watch="Prolonged weakness and breathing after the procedure.",
    )
