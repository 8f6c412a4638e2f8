"""Myasthenia gravis and magnesium (clinical source: "The Severe Risk for Myasthenia Gravis";
magnesium sulfate injection label §5.6 myasthenic crisis, §7 neuromuscular blockade).

A coded myasthenia gravis (active, not refuted) gives a critical card. Without a code, only a
drug on file that is specific to myasthenia gravis therapy (``implies_myasthenia`` in
medications.json: pyridostigmine, efgartigimod alfa, rozanolixizumab, zilucoplan) suggests it:
then the card is a warning about a *possible* myasthenia gravis, and removing the order is
offered but not recommended. Drugs with other common uses (eculizumab, ravulizumab;
neostigmine, edrophonium for reversal or ileus) imply nothing. Topical magnesium (Epsom salt
soaks) is what the clinical source allows in MG, so it is not flagged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from cds_service.knowledge import Knowledge
from cds_service.knowledge.model import DrugEffect
from cds_service.rules.derived import (
    daily_elemental_mg_value,
    is_systemic_magnesium,
    magnesium_name,
    order_evidence,
)
from cds_service.rules.describe import (
    condition_evidence,
    fact_name,
    medication_evidence,
    medication_text,
    mid_sentence,
)
from cds_service.rules.findings import Evidence, Finding, Indicator, Proposal, remove_order
from cds_service.rules.picture import ClinicalPicture, MedicationFact

RULE_ID = "myasthenia-magnesium"
PATIENT_VIEW_RULE_ID = "patient-view-contraindication"
NMJ_RULE_ID = "neuromuscular-junction-magnesium"
MG_CONDITIONS = ("myasthenia-gravis",)
# Neuromuscular junction disorders besides myasthenia gravis (label: neuromuscular disease).
NMJ_CONDITIONS = ("lambert-eaton", "other-neuromuscular-junction")
ORAL_LOW_DOSE = "myasthenia-oral-low-dose"  # threshold: advice, not a warning, at or below
ANTAGONISED = "antagonised-by-magnesium"
POSSIBLE = "possible-diagnosis"  # guidance id in rules.json

# Statements quoted from the rule catalogue (rules.json), in card order.
_STATEMENTS = ("impaired-transmission", "label", "if-unavoidable")


@dataclass(frozen=True)
class MyastheniaEvidence:
    """Why the patient is taken to have myasthenia gravis, and how sure that is."""

    evidence: tuple[Evidence, ...]
    coded: bool  # False: inferred from an MG-specific drug, so only "possible"
    drugs: tuple[str, ...] = ()  # the MG-specific drugs it was inferred from

    def __bool__(self) -> bool:
        return bool(self.evidence)

    @property
    def indicator(self) -> Indicator:
        """Critical for a coded diagnosis; a possible one is a warning (it may be wrong)."""
        return "critical" if self.coded else "warning"

    @property
    def possible(self) -> str:
        """'possible myasthenia gravis (on pyridostigmine, not coded)', for a summary."""
        return f"possible myasthenia gravis (on {', '.join(self.drugs)}, not coded)"


def myasthenia_evidence(picture: ClinicalPicture, knowledge: Knowledge) -> MyastheniaEvidence:
    """Coded MG, or failing that a drug on file that only MG is treated with."""
    coded = picture.conditions_in(*MG_CONDITIONS)
    if coded:
        return MyastheniaEvidence(tuple(condition_evidence(f.condition) for f in coded), True)
    evidence: list[Evidence] = []
    drugs: list[str] = []
    for fact in picture.medications:
        medication = fact.medication
        specific = [
            i
            for i in knowledge.matched_ingredients(medication.all_codings, medication.text)
            if i.implies_myasthenia is not None
        ]
        if not specific:
            continue
        names = [i.name for i in specific]
        drugs += [n for n in names if n not in drugs]
        evidence.append(
            medication_evidence(
                fact,
                f"On {mid_sentence(medication_text(medication))}, used only in myasthenia "
                "gravis; no coded diagnosis",
            )
        )
    return MyastheniaEvidence(tuple(evidence), False, tuple(drugs))


def evaluate(picture: ClinicalPicture, knowledge: Knowledge, hook: str) -> Iterator[Finding]:
    mg = myasthenia_evidence(picture, knowledge)
    if not mg:
        if hook != "patient-view":
            yield from _neuromuscular_junction(picture, knowledge)
        return
    statements, antagonism = _catalogue(knowledge)
    paragraphs = list(statements)
    if not mg.coded:
        paragraphs.insert(0, knowledge.rule(RULE_ID).statement(POSSIBLE).text)
    on_file = picture.medications_in("cholinesterase-inhibitor")
    extra: tuple[str, ...] = ()
    if antagonism is not None and on_file:
        extra = ("that magnesium counteracts anticholinesterases",)
        names = ", ".join(fact_name(f) for f in on_file)
        paragraphs.insert(len(paragraphs) - 1, f"{antagonism.text} On file: {names}.")
    if mg.coded:  # an MG drug is already named when it is what suggests the diagnosis
        mg = dataclasses.replace(
            mg,
            evidence=(
                *mg.evidence,
                *(
                    medication_evidence(f, f"on {mid_sentence(fact_name(f))}")
                    for f in on_file
                ),
            ),
        )

    if hook == "patient-view":
        for fact in picture.medications:
            if is_systemic_magnesium(fact):
                yield _finding(fact, mg, paragraphs, extra, PATIENT_VIEW_RULE_ID, hook, knowledge)
        return
    for fact in picture.actionable_drafts:
        if is_systemic_magnesium(fact):
            yield _finding(fact, mg, paragraphs, extra, RULE_ID, hook, knowledge)


@lru_cache(maxsize=8)  # keyed by the (immutable) knowledge: one entry per loaded knowledge
def _catalogue(knowledge: Knowledge) -> tuple[tuple[str, ...], DrugEffect | None]:
    """The rule's statements, in card order, and the clinical source's claim that magnesium
    counteracts anticholinesterases (unverified), if the knowledge makes it."""
    rule = knowledge.rule(RULE_ID)
    statements = tuple(rule.statement(s).text for s in _STATEMENTS)
    return statements, knowledge.drug_group("cholinesterase-inhibitor").effect(ANTAGONISED)


def _oral_grade(fact: MedicationFact, knowledge: Knowledge) -> Indicator:
    """Oral magnesium in myasthenia gravis: the label contraindication is parenteral, so a
    warning; a small known daily amount (a multivitamin) is advice (rules.json oral-grading)."""
    low = knowledge.threshold(ORAL_LOW_DOSE).value
    daily = daily_elemental_mg_value(fact)
    if low is not None and daily is not None and daily <= low:
        return "info"
    return "warning"


def _finding(
    fact: MedicationFact,
    mg: MyastheniaEvidence,
    paragraphs: list[str],
    extra: tuple[str, ...],
    rule_id: str,
    hook: str,
    knowledge: Knowledge,
) -> Finding:
    medication = fact.medication
    parenteral = fact.route == "parenteral"
    name = (
        fact.magnesium.salt_display
        if fact.magnesium and fact.magnesium.salt_display
        else "magnesium"
    )
    name = mid_sentence(name)  # it sits mid-sentence in every summary and label
    indicator: Indicator = mg.indicator
    rule = knowledge.rule(RULE_ID)
    severity_note = ""
    # What to do first, then why, so that the summary alone says both.
    route = "IV/IM " if parenteral else ""
    watch = "Muscle strength, swallowing and breathing" + (
        "; reflexes and respiratory rate during the infusion." if parenteral else "."
    )
    if not mg.coded:
        summary = f"Confirm {mg.possible} before {route}{name}: magnesium can trigger a crisis"
        action = (
            "Confirm the diagnosis and add it to the problem list before deciding; if it is "
            "confirmed, avoid systemic magnesium."
        )
    elif parenteral:
        summary = f"Avoid IV/IM {name}: myasthenia gravis; it can trigger a myasthenic crisis"
        action = _UNAVOIDABLE
    else:
        indicator = _oral_grade(fact, knowledge)
        severity_note = "Not critical: the label contraindication is for parenteral magnesium."
        if indicator == "info":
            # Advice, not a warning, rests on a local-policy figure: say which, and flag it.
            low = knowledge.threshold(ORAL_LOW_DOSE)
            severity_note = f"Advice only: at most {low.value:g} mg elemental a day by mouth."
            if low.status == "unverified":
                extra = (*extra, f"the {low.value:g} mg/day figure")
        paragraphs = [rule.statement("oral-grading").text, rule.statement("oral-watch").text]
        if hook == "patient-view":
            summary = f"Review {name} on file: myasthenia gravis; high doses can worsen weakness"
            action = "Review whether magnesium is still needed; stop it unless neurology agrees."
        elif indicator == "info":
            summary = f"Small dose of {name} in myasthenia gravis: watch for new weakness"
            action = "A small oral amount can stay; stop it if weakness appears."
        else:
            summary = f"Use {name} with caution: myasthenia gravis; high doses can worsen weakness"
            action = "Use it only if needed, at the lowest dose; ask neurology if in doubt."
    proposals: tuple[Proposal, ...] = ()
    if medication.is_draft and indicator != "info":
        # Only a coded diagnosis and a critical risk make removal the recommended choice.
        proposals = remove_order(
            medication, name, recommended=mg.coded and indicator == "critical"
        )
    return Finding(
        rule_id=rule_id,
        indicator=indicator,
        summary=summary,
        detail="\n\n".join(paragraphs),
        evidence=(*mg.evidence, order_evidence(fact, with_dose=not parenteral)),
        source_ids=(),  # the rule catalogue lists this rule's sources
        key=f"{rule_id}:{fact.ref}",
        proposals=proposals,
        order=medication,
        unverified=extra,
        action=action,
        watch=watch,
        topics=MG_CONDITIONS,
        severity_note=severity_note,
    )


_UNAVOIDABLE = (
    "Remove the order. If magnesium is unavoidable (documented severe hypomagnesemia), give it "
    "only with neurology advice, at the lowest effective dose."
)


def _neuromuscular_junction(picture: ClinicalPicture, knowledge: Knowledge) -> Iterator[Finding]:
    """Parenteral magnesium with Lambert-Eaton or another junction disorder: a warning (the
    label warns about neuromuscular disease; its contraindication names only MG)."""
    disorders = picture.conditions_in(*NMJ_CONDITIONS)
    if not disorders:
        return
    rule = knowledge.rule(NMJ_RULE_ID)
    evidence = tuple(condition_evidence(f.condition) for f in disorders)
    shown = sorted({g for f in disorders for g in f.groups if g in NMJ_CONDITIONS})
    disorder = mid_sentence(knowledge.condition_group(shown[0]).display)
    for fact in picture.actionable_drafts:
        if not (is_systemic_magnesium(fact) and fact.route == "parenteral"):
            continue
        name = mid_sentence(magnesium_name(fact))
        proposals = remove_order(fact.medication, name)
        yield Finding(
            rule_id=NMJ_RULE_ID,
            indicator="warning",
            summary=f"Use IV {name} with caution: {disorder}; it can cause severe "
            "weakness",
            detail="\n\n".join(rule.statement(s).text for s in ("label", "watch")),
            evidence=(*evidence, order_evidence(fact)),
            source_ids=(),
            key=f"{NMJ_RULE_ID}:{fact.ref}",
            proposals=proposals,
            order=fact.medication,
            action="Give it only if needed, at the lowest dose.",
            watch="Muscle strength, swallowing and breathing during the infusion.",
            about=(disorder,),
            topics=tuple(shown),
        )
