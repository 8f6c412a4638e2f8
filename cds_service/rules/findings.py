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

    text: str  # e.g. "Myasthenia gravis (ICD-10-CM G70.00)"
    source: SourceRef | None = None


@dataclass(frozen=True)
class Proposal:
    """A change the clinician could accept in one click; the cards layer makes it FHIR."""

    kind: ProposalKind
    label: str
    order: Medication | None = None  # the draft order it acts on (remove, add dosage, replace)
    recommended: bool = False
    text: str = ""  # instruction text or reason
    code: Coding | None = None  # the lab (LOINC) or replacement product (RxNorm)


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
    # Facts this finding uses that the knowledge base marks unverified (shown on the card).
    unverified: tuple[str, ...] = ()
    # Why a critical finding is critical, as a clause ("IV magnesium with severe kidney
    # impairment"): said on the card when order-select shows it as a warning, and at signing.
    critical_because: str = ""
