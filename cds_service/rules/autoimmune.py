"""Magnesium in autoimmune disease: which form suits which aim, diet first, check levels
(clinical source: "How to Approach Magnesium Supplementation Safely" and its comparison of
forms, held per salt in medications.json as ``autoimmune_use``).

An info card for an oral (or route-unstated) magnesium order in a patient with an
autoimmune-related condition (``derived.autoimmune_related``: RA, SLE, Hashimoto's, MS,
Sjögren's, psoriasis, fibromyalgia, inflammatory bowel and malabsorption disorders) and no
contraindication: not with myasthenia gravis or another neuromuscular-junction disorder,
severe kidney impairment or a high serum magnesium, where the warning rules speak instead.

Where the ordered form is a poor fit for long-term oral use (citrate: a laxative; sulfate:
poorly absorbed, for soaks), the card suggests the first well-absorbed form that has a coded
oral product, so that an EHR (and the public sandbox) can apply it in one click. With
Hashimoto's and thyroid hormone on file it adds the spacing advice.
"""

from __future__ import annotations

from collections.abc import Iterator

from cds_service.context.model import Coding
from cds_service.knowledge import Knowledge
from cds_service.knowledge.model import RXNORM, ConditionGroup, MagnesiumProduct
from cds_service.rules.derived import (
    SerumMagnesium,
    autoimmune_related,
    kidney_function,
    magnesium_name,
    order_evidence,
    serum_magnesium,
)
from cds_service.rules.describe import (
    clinical_name,
    condition_evidence,
    fact_name,
    medication_evidence,
    mid_sentence,
    short_display,
)
from cds_service.rules.findings import Evidence, Finding, Proposal
from cds_service.rules.myasthenia import myasthenia_evidence
from cds_service.rules.picture import ClinicalPicture, ConditionFact, MedicationFact

RULE_ID = "autoimmune-guidance"
THYROID_HORMONE = "thyroid-hormone"
THYROID_SPACING = "thyroid-spacing"  # guidance item id in conditions.json
THYROID_GROUP = "hashimoto"


def evaluate(picture: ClinicalPicture, knowledge: Knowledge, hook: str) -> Iterator[Finding]:
    if hook == "patient-view":
        return
    related = autoimmune_related(picture, knowledge, neuromuscular=False)
    if not related or _contraindicated(picture, knowledge):
        return
    serum = serum_magnesium(picture, knowledge)
    if serum is not None and serum.is_high:
        return
    for fact in picture.actionable_drafts:
        if fact.is_magnesium and fact.route in ("oral", None):
            yield _finding(picture, fact, related, serum, knowledge)


def _contraindicated(picture: ClinicalPicture, knowledge: Knowledge) -> bool:
    if myasthenia_evidence(picture, knowledge):
        return True
    neuromuscular = any(
        knowledge.condition_group(g).category == "neuromuscular"
        for fact in picture.conditions
        for g in fact.groups
    )
    return neuromuscular or kidney_function(picture, knowledge).severity == "severe"


def preferred_product(knowledge: Knowledge) -> MagnesiumProduct | None:
    """The first oral product of a form the clinical source recommends (glycinate today)."""
    for salt in knowledge.magnesium_salts:
        use = salt.autoimmune_use
        if use is not None and use.fit == "preferred":
            for product in salt.products:
                if product.route == "oral":
                    return product
    return None


def _finding(
    picture: ClinicalPicture,
    fact: MedicationFact,
    related: tuple[tuple[ConditionFact, ConditionGroup], ...],
    serum: SerumMagnesium | None,
    knowledge: Knowledge,
) -> Finding:
    rule = knowledge.rule(RULE_ID)
    name = magnesium_name(fact)
    # The knowledge's name (bounded, unlike EHR text), last: a cut-off summary keeps the advice.
    condition = related[0][1].display
    match = fact.magnesium
    salt = knowledge.magnesium_salt(match.salt) if match and match.salt else None
    use = salt.autoimmune_use if salt else None
    unverified: list[str] = []
    sources: list[str] = []

    thyroid = picture.medications_in(THYROID_HORMONE)
    hashimoto = any(group.id == THYROID_GROUP for _, group in related)
    paragraphs = [rule.statement("case-by-case").text]
    for _, group in related:
        for item in group.guidance:
            if item.id == THYROID_SPACING and thyroid:
                continue  # the chelation-interaction card says it, with a one-click fix
            paragraphs.append(f"{group.display}: {item.text}")
            sources += item.source_ids  # the explanation page shows and flags them
    if thyroid and hashimoto:
        names = ", ".join(hormone.medication.display for hormone in thyroid)
        paragraphs.append(
            f"{names} is on file: the interaction card on this order gives the spacing."
        )

    forms = [s for s in knowledge.magnesium_salts if s.autoimmune_use is not None]
    lines = []
    for other in forms:
        assert other.autoimmune_use is not None
        marker = " **(this order)**" if salt is not None and other.id == salt.id else ""
        lines.append(f"- {other.autoimmune_use.text}{marker}")
    paragraphs.append("**Which form for which aim**\n" + "\n".join(lines))

    proposals: tuple[Proposal, ...] = ()
    target = preferred_product(knowledge)
    poor = use is not None and use.poor_oral_fit
    # A draft of the recommended form is already being ordered: do not propose it again.
    chosen = target is not None and any(
        d.magnesium is not None and d.magnesium.salt == target.salt for d in picture.drafts
    )
    if poor and target is not None and not chosen and target.salt != (salt.id if salt else None):
        assert use is not None
        paragraphs.append(
            f"The ordered form, {name.lower()}, is {use.summary}; a well-absorbed form such as "
            f"{target.name} (RxNorm {target.code}) suits long-term supplementation better."
        )
        if fact.medication.source.resource_id:
            proposals = (
                Proposal(
                    kind="replace-medication",
                    label=f"Switch to {target.name}",
                    order=fact.medication,
                    text=target.name,
                    code=Coding(RXNORM, target.code, target.name),
                ),
            )
        better = mid_sentence(knowledge.magnesium_salt(target.salt).display)
        mg = mid_sentence(name)
        summary = f"Consider {better} instead of {mg}: {use.summary}"
        actions = [
            f"Switch to {clinical_name(target.name)}, or keep {mg} short-term."
        ]
        if use.status == "unverified":
            unverified.append("the comparison of magnesium forms")
    else:
        if use is None:
            paragraphs.append(
                f"The clinical source does not rate {name.lower()} among these forms."
            )
        summary = (
            f"Diet first and check serum magnesium before {mid_sentence(name)}: its benefit in "
            f"{mid_sentence(short_display(condition))} varies"
        )
        actions = []
    actions.append(
        "Food first: leafy greens, nuts, seeds, legumes, whole grains"
        + ("; check serum magnesium before a supplement." if serum is None else ".")
    )
    if thyroid and hashimoto:
        actions.append("Space it from thyroid hormone: see the interaction card.")
    paragraphs.append(rule.statement("diet-first").text)
    paragraphs.append(rule.statement("check-levels").text)
    evidence = [
        *(condition_evidence(c.condition) for c, _ in related),
        *(
            medication_evidence(t, f"on {mid_sentence(fact_name(t))}")
            for t in thyroid
        ),
        serum.evidence if serum is not None else Evidence("no serum magnesium on file"),
        order_evidence(fact, with_dose=False),
    ]
    return Finding(
        rule_id=RULE_ID,
        indicator="info",
        summary=summary,
        detail="\n\n".join(paragraphs),
        evidence=tuple(evidence),
        source_ids=tuple(dict.fromkeys(sources)),
        key=f"{RULE_ID}:{fact.ref}",
        proposals=proposals,
        order=fact.medication,
        unverified=tuple(unverified),
        action=" ".join(actions),
        watch="Serum magnesium; stomach upset or diarrhoea.",
        topics=(*dict.fromkeys(group.id for _, group in related), *((salt.id,) if salt else ())),
    )
