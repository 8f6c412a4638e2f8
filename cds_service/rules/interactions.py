"""Chelation and absorption: oral magnesium binds fluoroquinolones, tetracyclines, thyroid
hormone, oral bisphosphonates, integrase inhibitors, eltrombopag and penicillamine in the gut,
and lowers the absorption of hydroxychloroquine, mycophenolate and gabapentin (clinical
source: "Medication Interactions"; the labels; separation times from interactions.json, per
drug where the label gives one, else the group's).

Both directions, on draft orders only:

- a magnesium order while such a drug is active or among the other drafts;
- such a drug ordered while magnesium (prescribed or over the counter) is active.

A pair of orders gets one card (the key is the pair, whichever side was ordered). The
suggestion adds the spacing to the draft order as a patient instruction; once a draft states
the spacing (the suggestion was accepted, or the prescriber wrote it), the pair counts as
resolved and is not shown again, at order-select or at order-sign. Only oral magnesium
chelates (``Interaction.magnesium_routes``); magnesium with no stated route is taken as oral,
and said so. Parenteral or topical forms of the other drug do not interact.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from cds_service.context.model import Medication
from cds_service.knowledge import Interaction, Knowledge
from cds_service.knowledge.model import DrugEffect, DrugGroup
from cds_service.rules.derived import (
    ingredient_in,
    ingredient_key,
    magnesium_name,
    order_evidence,
)
from cds_service.rules.describe import mid_sentence
from cds_service.rules.findings import Finding, Proposal
from cds_service.rules.picture import ClinicalPicture, MedicationFact

RULE_ID = "chelation-interaction"
CHELATION = "chelation"


@dataclass(frozen=True)
class _Chelator:
    fact: MedicationFact
    group: DrugGroup
    effect: DrugEffect
    name: str
    interaction: Interaction | None


def evaluate(picture: ClinicalPicture, knowledge: Knowledge, hook: str) -> Iterator[Finding]:
    if hook == "patient-view":
        return
    mg_drafts = [f for f in picture.drafts if f.is_magnesium]
    mg_on_file = [f for f in picture.medications if f.is_magnesium]
    drug_drafts = list(_chelators(picture.drafts, knowledge))
    drugs_on_file = list(_chelators(picture.medications, knowledge))
    for magnesium in mg_drafts:
        for drug in (*drugs_on_file, *drug_drafts):
            # The card goes on a selected order: the magnesium, else the other draft.
            if picture.is_selected(magnesium):
                target = magnesium
            elif drug.fact.medication.is_draft and picture.is_selected(drug.fact):
                target = drug.fact
            else:
                continue
            finding = _finding(magnesium, drug, target=target)
            if finding is not None:
                yield finding
    for drug in drug_drafts:
        if not picture.is_selected(drug.fact):
            continue
        for magnesium in mg_on_file:
            finding = _finding(magnesium, drug, target=drug.fact)
            if finding is not None:
                yield finding


def _chelators(facts: Iterable[MedicationFact], knowledge: Knowledge) -> Iterator[_Chelator]:
    for fact in facts:
        if fact.is_magnesium or fact.route in ("parenteral", "topical"):
            continue
        for group_id in sorted(fact.groups):
            group = knowledge.drug_group(group_id)
            effect = group.effect(CHELATION)
            if effect is None:
                continue
            ingredient = ingredient_in(fact, knowledge, group_id)
            name = ingredient.name if ingredient else fact.medication.display
            interaction = knowledge.interaction_for(group_id, ingredient_key(ingredient))
            yield _Chelator(fact, group, effect, name, interaction)
            break


def hours(value: float) -> str:
    return f"{value * 60:g} min" if value < 1 else f"{value:g} h"


def spacing_phrase(drug: str, interaction: Interaction | None) -> str:
    """'take ciprofloxacin at least 2 h before or 6 h after magnesium', from the figures."""
    if interaction is None:
        return f"magnesium lowers {drug} absorption"
    before, after, after_max = (
        interaction.hours_before,
        interaction.hours_after,
        interaction.hours_after_max,
    )
    if before is not None and after is not None:
        if before == after and after_max is None:
            return f"separate {drug} and magnesium by at least {hours(before)}"
        later = hours(after) if after_max is None else f"{after:g}-{hours(after_max)}"
        return f"take {drug} at least {hours(before)} before or {later} after magnesium"
    if before is not None:
        return f"take {drug} at least {hours(before)} before magnesium"
    if after is not None:
        return f"take {drug} at least {hours(after)} after magnesium"
    return f"do not take {drug} at the same time as magnesium"


def _spacing_stated(order: Medication, drug: _Chelator, other_name: str) -> bool:
    """The draft already tells the patient how to space the two (advice taken up): it holds
    our suggestion's own text, or names the other drug with every hour figure of the advice.
    A vaguer note ("take with food, 1 hour before bed") does not resolve the interaction."""
    said = " ".join(
        part for dose in order.doses for part in (dose.patient_instruction, dose.text) if part
    ).lower()
    interaction = drug.interaction
    if not said or interaction is None:
        return False
    if interaction.text.lower() in said:
        return True
    figures = [
        value
        for value in (
            interaction.hours_before,
            interaction.hours_after,
            interaction.hours_after_max,
        )
        if value is not None
    ]
    if not figures or other_name.lower() not in said:
        return False
    return all(_figure_stated(said, value) for value in figures)


def _figure_stated(said: str, value: float) -> bool:
    """'4' near an hour unit ('4 hours', '4 h', '4-6 h'), or '30 min' for half an hour."""
    number, unit = (f"{value * 60:g}", r"min(?:ute)?s?") if value < 1 else (f"{value:g}", _HOURS)
    pattern = rf"(?<![\d.]){re.escape(number)}(?![\d.])\s*(?:(?:-|to|or)\s*[\d.]+\s*)?(?:{unit})\b"
    return re.search(pattern, said) is not None


_HOURS = r"h|hr|hrs|hour|hours"
# "(figure not verified against the label)": a knowledge text's own note on its status.
_STATUS_REMARK = re.compile(r"\s*\([^()]*\bnot verified\b[^()]*\)")


def _finding(magnesium: MedicationFact, drug: _Chelator, target: MedicationFact) -> Finding | None:
    interaction = drug.interaction
    routes = interaction.magnesium_routes if interaction is not None else ("oral",)
    if magnesium.route is not None and magnesium.route not in routes:
        return None  # e.g. IV magnesium does not meet the drug in the gut
    mg_name = magnesium_name(magnesium)
    other = drug.name if target is magnesium else "magnesium"
    if _spacing_stated(target.medication, drug, other):
        return None
    spacing = spacing_phrase(drug.name, interaction)
    has_figure = interaction is not None and (
        interaction.hours_before is not None or interaction.hours_after is not None
    )
    # What to do, then why: the spacing, and that magnesium binds the drug in the gut.
    if has_figure:
        summary = f"{spacing[:1].upper()}{spacing[1:]}: magnesium binds {drug.name} in the gut"
    else:
        summary = (
            f"Separate {drug.name} from {mid_sentence(mg_name)} as its label directs: "
            "magnesium lowers its absorption"
        )
    paragraphs = [f"**{drug.name}** ({drug.group.display.lower()}): {drug.effect.text}"]
    proposals: tuple[Proposal, ...] = ()
    actions: list[str] = []
    if interaction is not None:
        paragraphs.append(interaction.text)
        # The card flags what is unverified once, in its own clause.
        actions.append(_STATUS_REMARK.sub("", interaction.text))
        if has_figure and target.medication.source.resource_id:
            text = interaction.text
            if drug.name.lower() not in text.lower():
                text = f"{drug.name.capitalize()}: {text}"
            proposals = (
                Proposal(
                    kind="add-dosage-instruction",
                    label=f"Add the spacing to the order: {spacing}",
                    order=target.medication,
                    recommended=True,
                    text=text,
                ),
            )
            actions.append("The suggestion adds it to the order's instructions.")
    else:
        paragraphs.append("No separation time is on file for this drug: follow its label.")
        actions.append("No separation time is on file for this drug: follow its label.")
    if magnesium.route is None:
        paragraphs.append("The magnesium's route is not stated; it is taken to be by mouth.")
    unverified = tuple(
        label
        for fact, label in (
            (interaction, "the spacing figure"),
            (drug.effect, f"that magnesium binds {drug.name}"),
        )
        if fact is not None and fact.status == "unverified"
    )
    pair = sorted((magnesium.ref, drug.fact.ref))
    return Finding(
        rule_id=RULE_ID,
        indicator="warning",
        summary=summary,
        detail="\n\n".join(paragraphs),
        evidence=(order_evidence(magnesium, with_dose=False), order_evidence(drug.fact)),
        source_ids=tuple(
            dict.fromkeys(
                (*(interaction.source_ids if interaction else ()), *drug.effect.source_ids)
            )
        ),
        key=f"{RULE_ID}:{'|'.join(pair)}",
        proposals=proposals,
        order=target.medication,
        unverified=unverified,
        action=" ".join(actions),
        watch=f"Whether {drug.name} works as expected if doses were taken together.",
        about=(drug.name,),
        topics=(drug.group.id,),
    )
