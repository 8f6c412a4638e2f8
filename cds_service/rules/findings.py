"""What a rule produces: a Finding, with the evidence it rests on and what could be done."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cds_service.context.model import Coding, Medication, SourceRef

ProposalKind = Literal["remove-order", "order-lab", "add-dosage-instruction", "replace-medication"]
Indicator = Literal["info", "warning", "critical"]
_INDICATORS: dict[str, Indicator] = {"info": "info", "warning": "warning", "critical": "critical"}


def as_indicator(value: str) -> Indicator:
    """A knowledge file's indicator string as the Finding type (KeyError for anything else)."""
    return _INDICATORS[value]


@dataclass(frozen=True)
class Evidence:
    """One patient fact that triggered a finding, in words a clinician reads."""

    text: str  # clinical words, no codes: "Myasthenia gravis since 2019"
    source: SourceRef | None = None
    # Provenance for the card's extension, never its text: the codes that matched, and how a
    # medication was recognised (e.g. "magnesium: rxnorm-product 198741").
    codes: tuple[Coding, ...] = ()
    recognised_by: str = ""


@dataclass(frozen=True)
class Proposal:
    """A change the clinician could accept in one click; the cards layer makes it FHIR."""

    kind: ProposalKind
    label: str
    order: Medication | None = None  # the draft order it acts on (remove, add dosage, replace)
    recommended: bool = False
    text: str = ""  # instruction text or reason
    code: Coding | None = None  # the lab (LOINC) or replacement product (RxNorm)


def remove_order(
    order: Medication, name: str, *, recommended: bool = False
) -> tuple[Proposal, ...]:
    """The one-click removal of a draft order, or nothing for an order the EHR gave no id (a
    delete action needs one)."""
    if not order.source.resource_id:
        return ()
    return (Proposal("remove-order", f"Remove the {name} order", order, recommended),)


@dataclass(frozen=True)
class Finding:
    rule_id: str
    indicator: Indicator
    summary: str
    detail: str  # markdown: why, what to do
    evidence: tuple[Evidence, ...]
    source_ids: tuple[str, ...]
    # Identity of the finding for de-duplication: same rule + same subject = same finding.
    key: str
    proposals: tuple[Proposal, ...] = ()
    order: Medication | None = None
    # Facts this finding uses that the knowledge base marks unverified: short labels, flagged
    # once on the card ("the 4-hour spacing figure"); the explanation page gives them in full.
    unverified: tuple[str, ...] = ()
    # The card's own words (``detail`` above is the long reasoning, kept for the explanation
    # and as the fallback): what to do and what to watch, a sentence or two each.
    action: str = ""
    watch: str = ""
    # Names of the drug or condition the card is about: its source is the document about them.
    about: tuple[str, ...] = ()
    # Knowledge ids (condition or drug group, salt) that pick the explanation page's sections.
    topics: tuple[str, ...] = ()
    # The card's one sentence on its grade, when it is not what a reader would expect: set by
    # a rule ("Not critical: the label contraindication is for parenteral magnesium.") or by
    # the engine (capped by old data; different at selection and signing).
    severity_note: str = ""
    # A rule's input to that sentence, not shown by itself: why a critical finding is critical
    # ("IV magnesium with severe kidney impairment"); the engine words the sentence around it
    # only where the hook changes the grade.
    critical_because: str = ""
