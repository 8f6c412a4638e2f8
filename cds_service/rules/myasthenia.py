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
from cds_service.rules.describe import condition_text, medication_text, order_text
from cds_service.rules.findings import Evidence, Finding, Proposal
from cds_service.rules.picture import ClinicalPicture, MedicationFact

RULE_ID = "myasthenia-magnesium"
PATIENT_VIEW_RULE_ID = "patient-view-contraindication"
MG_CONDITIONS = ("myasthenia-gravis",)
MG_THERAPIES = ("cholinesterase-inhibitor", "mg-therapy-other")

_WHY = (
    "In myasthenia gravis, transmission at the neuromuscular junction is already impaired. "
    "Magnesium reduces acetylcholine release and blunts the muscle's response to it, so it "
    "amplifies weakness; parenteral magnesium can precipitate a **myasthenic crisis** with "
    "respiratory failure (magnesium sulfate injection label, §5.6 and §7)."
)
_ANTICHOLINESTERASE = (
    "The clinical source also states that magnesium can counteract anticholinesterase drugs "
    "such as pyridostigmine, worsening symptoms (**unverified**: no drug label found that "
    "states this)."
)
_IF_NEEDED = (
    "If magnesium replacement is unavoidable (documented severe hypomagnesemia), give it only "
    "under neurology advice with respiratory monitoring (vital capacity / NIF), at the "
    "lowest effective dose; topical Epsom-salt soaks are not affected."
)


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


def _is_systemic(fact: MedicationFact) -> bool:
    return fact.is_magnesium and fact.route != "topical"


def evaluate(picture: ClinicalPicture, knowledge: Knowledge, hook: str) -> Iterator[Finding]:
    mg_evidence = myasthenia_evidence(picture)
    if not mg_evidence:
        return
    anticholinesterases = picture.medications_in("cholinesterase-inhibitor")
    extra = (_ANTICHOLINESTERASE,) if anticholinesterases else ()

    if hook == "patient-view":
        for fact in picture.medications:
            if _is_systemic(fact):
                yield _finding(picture, fact, mg_evidence, extra, PATIENT_VIEW_RULE_ID, hook)
        return
    for fact in picture.drafts:
        if _is_systemic(fact):
            yield _finding(picture, fact, mg_evidence, extra, RULE_ID, hook)


def _finding(
    picture: ClinicalPicture,
    fact: MedicationFact,
    mg_evidence: tuple[Evidence, ...],
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
    if parenteral:
        summary = (
            f"IV/IM {name} in myasthenia gravis: risk of myasthenic crisis and respiratory failure"
        )
    elif hook == "patient-view":
        summary = f"Patient with myasthenia gravis is on {name}: magnesium can worsen weakness"
    else:
        summary = f"Avoid {name} in myasthenia gravis: magnesium worsens neuromuscular weakness"
    paragraphs = [_WHY, *extra, _IF_NEEDED]
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
    order_evidence = Evidence(
        ("Order: " if medication.is_draft else "On file: ") + order_text(fact), medication.source
    )
    unverified = ("magnesium counteracts anticholinesterase drugs",) if extra else ()
    return Finding(
        rule_id=rule_id,
        indicator="critical",
        summary=summary,
        detail="\n\n".join(paragraphs),
        evidence=(*mg_evidence, order_evidence),
        source_ids=(),  # the rule catalogue lists this rule's sources
        key=f"{rule_id}:{medication.source.reference}",
        proposals=proposals,
        order=medication,
        unverified=unverified,
    )
