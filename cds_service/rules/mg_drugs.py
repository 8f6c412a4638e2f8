"""Drugs that can worsen myasthenia gravis (fluoroquinolone boxed warning; aminoglycosides and
polymyxins, gentamicin label). Neuromuscular blockers with parenteral magnesium concern every
patient: ``blockade``.

Fires on draft orders only, for a patient whose myasthenia is coded or implied by an
MG-specific drug (``myasthenia.myasthenia_evidence``). The indicator is what the knowledge file
says the label's wording warrants (a boxed warning to avoid the drug is critical), else the
rule's default; with myasthenia only inferred it is at most a warning and removal is not
recommended. Topical and local products (eye and ear drops share the ingredient codes; the
route comes from the order or the product's name) are not flagged.
"""

from __future__ import annotations

from collections.abc import Iterator

from cds_service.knowledge import Knowledge
from cds_service.knowledge.model import DrugEffect, DrugGroup
from cds_service.rules.derived import ingredient_in, order_evidence
from cds_service.rules.findings import Evidence, Finding, as_indicator, remove_order
from cds_service.rules.myasthenia import (
    MG_CONDITIONS,
    POSSIBLE,
    MyastheniaEvidence,
    myasthenia_evidence,
)
from cds_service.rules.myasthenia import RULE_ID as MG_RULE_ID
from cds_service.rules.picture import ClinicalPicture, MedicationFact

RULE_ID = "myasthenia-aggravating-drug"
AGGRAVATES = "aggravates-myasthenia"


def evaluate(picture: ClinicalPicture, knowledge: Knowledge, hook: str) -> Iterator[Finding]:
    if hook == "patient-view":
        return
    # Only a draft in some drug group can give a finding: look for one before the (costlier)
    # myasthenia evidence, which the usual magnesium-only order does not need.
    candidates = [
        fact
        for fact in picture.actionable_drafts
        if fact.groups and not (fact.is_magnesium or fact.route == "topical")
    ]
    if not candidates:
        return
    mg_evidence = myasthenia_evidence(picture, knowledge)
    if not mg_evidence:
        return
    for fact in candidates:
        for group_id in sorted(fact.groups):
            group = knowledge.drug_group(group_id)
            effect = group.effect(AGGRAVATES)
            if effect is not None:
                yield _aggravating(fact, group, effect, mg_evidence, knowledge)
                break


def _drug_name(fact: MedicationFact, knowledge: Knowledge, group: DrugGroup) -> str:
    ingredient = ingredient_in(fact, knowledge, group.id)
    return ingredient.name if ingredient is not None else fact.medication.display


def _aggravating(
    fact: MedicationFact,
    group: DrugGroup,
    effect: DrugEffect,
    mg_evidence: MyastheniaEvidence,
    knowledge: Knowledge,
) -> Finding:
    name = _drug_name(fact, knowledge, group)
    rule = knowledge.rule(RULE_ID)
    indicator = effect.indicator or rule.indicator
    detail = [
        f"**{name}** belongs to {group.display.lower()}. {effect.text}",
        "Choose another drug where one is suitable; if it must be given, watch for worsening "
        "muscle weakness.",
    ]
    drugs = group.display.lower()
    action = "Choose another drug where one is suitable; if it must be given, watch closely."
    if mg_evidence.coded:
        if indicator == "critical":
            summary = f"Avoid {name}: myasthenia gravis; {drugs} can worsen muscle weakness"
        else:
            summary = (
                f"Use {name} with caution: myasthenia gravis; {drugs} can worsen muscle weakness"
            )
    else:
        # Inferred from a drug, the diagnosis may be wrong: advise, do not block.
        indicator = "warning" if indicator == "critical" else indicator
        summary = f"Confirm {mg_evidence.possible} before {name}: it can worsen muscle weakness"
        detail.insert(0, knowledge.rule(MG_RULE_ID).statement(POSSIBLE).text)
        action = "Confirm the diagnosis; until then choose another drug where one is suitable."
    return _finding(
        fact, group, indicator, summary, detail, mg_evidence, effect, (), name, rule.id, action
    )


def _finding(
    fact: MedicationFact,
    group: DrugGroup,
    indicator: str,
    summary: str,
    detail: list[str],
    mg_evidence: MyastheniaEvidence,
    effect: DrugEffect,
    extra: tuple[Evidence, ...],
    name: str,
    rule_id: str,
    action: str,
) -> Finding:
    medication = fact.medication
    # Recommended only for a critical card, which needs a coded diagnosis.
    proposals = remove_order(
        medication, name, recommended=indicator == "critical" and mg_evidence.coded
    )
    order = order_evidence(fact, with_dose=False)
    return Finding(
        rule_id=rule_id,
        indicator=as_indicator(indicator),
        summary=summary,
        detail="\n\n".join(detail),
        evidence=(*mg_evidence.evidence, order, *extra),
        source_ids=effect.source_ids,
        key=f"{rule_id}:{fact.ref}",
        proposals=proposals,
        order=medication,
        unverified=(f"the warning for {group.display.lower()}",)
        if effect.status == "unverified"
        else (),
        action=action,
        watch="Muscle strength, swallowing and breathing.",
        about=(name,),
        topics=(*MG_CONDITIONS, group.id),
    )

