"""Findings → CDS Hooks cards: wording, sources, override reasons and FHIR suggestions.

This is the only place that turns a rule's abstract proposal into a FHIR action, and the
only place that formats evidence and sources, so every card explains itself the same way.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Mapping
from typing import Any

from cds_service.cards.model import Action, Card, CardCoding, Source, Suggestion, shorten
from cds_service.context.model import Coding
from cds_service.knowledge import Knowledge
from cds_service.rules.findings import Finding, Proposal

EXTENSION_KEY = "org.magnesium-cds"
RULE_TOPIC_SYSTEM = "urn:magnesium-cds:rule"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
_CARD_NAMESPACE = uuid.UUID("6f1f0b7e-4a55-4b8e-9a0c-2f1d8c3e5a10")
_STATUS_WORDS = {"secondary": "secondary source", "unverified": "**unverified**"}


def card_uuid(hook_instance: str, finding_key: str) -> str:
    """Stable for one finding within one hook instance, so feedback can find its card."""
    return str(uuid.uuid5(_CARD_NAMESPACE, f"{hook_instance}|{finding_key}"))


def build_cards(
    findings: list[Finding],
    knowledge: Knowledge,
    hook_instance: str,
    patient_id: str,
    draft_resources: Mapping[str, dict[str, Any]],
) -> list[Card]:
    """``draft_resources`` maps ``"MedicationRequest/id"`` to the draft order's JSON."""
    return [
        build_card(finding, knowledge, hook_instance, patient_id, draft_resources)
        for finding in findings
    ]


def build_card(
    finding: Finding,
    knowledge: Knowledge,
    hook_instance: str,
    patient_id: str,
    draft_resources: Mapping[str, dict[str, Any]],
) -> Card:
    rule = knowledge.rule(finding.rule_id)
    source_ids = tuple(dict.fromkeys((*finding.source_ids, *rule.source_ids)))
    sources = [knowledge.source(source_id) for source_id in source_ids]
    primary = sources[0] if sources else None
    suggestions = tuple(
        suggestion
        for proposal in finding.proposals
        if (suggestion := _suggestion(proposal, patient_id, draft_resources)) is not None
    )
    return Card(
        uuid=card_uuid(hook_instance, finding.key),
        summary=shorten(finding.summary),
        indicator=finding.indicator,
        detail=_detail(finding, sources),
        source=Source(
            label=primary.title if primary else rule.title,
            url=primary.url if primary and primary.url else "",
            topic=CardCoding(RULE_TOPIC_SYSTEM, finding.rule_id, rule.title),
        ),
        suggestions=suggestions,
        selection_behavior="at-most-one" if suggestions else None,
        override_reasons=tuple(_card_coding(c) for c in rule.override_reasons),
        extension={
            EXTENSION_KEY: {"ruleId": finding.rule_id, "knowledgeVersion": knowledge.version}
        },
    )


def _card_coding(coding: Coding) -> CardCoding:
    return CardCoding(coding.system, coding.code, coding.display or coding.code)


def _detail(finding: Finding, sources: list[Any]) -> str:
    parts = [finding.detail.strip()]
    if finding.evidence:
        facts = "\n".join(
            f"- {item.text}"
            + (f" — `{item.source.reference}`" if item.source and item.source.resource_id else "")
            for item in finding.evidence
        )
        parts.append(f"**Patient facts used**\n{facts}")
    if finding.unverified:
        facts = "; ".join(fact.rstrip(". ") for fact in finding.unverified)
        parts.append(f"**Unverified:** {facts}.")
    if sources:
        lines = []
        for source in sources:
            title = f"[{source.title}]({source.url})" if source.url else source.title
            status = _STATUS_WORDS.get(source.status)
            lines.append(f"- {title}" + (f" ({status})" if status else ""))
        parts.append("**Sources**\n" + "\n".join(lines))
    return "\n\n".join(part for part in parts if part)


def _suggestion(
    proposal: Proposal, patient_id: str, draft_resources: Mapping[str, dict[str, Any]]
) -> Suggestion | None:
    order = proposal.order
    reference = order.source.reference if order is not None else ""
    if proposal.kind == "remove-order":
        if order is None or not order.source.resource_id:
            return None
        action = Action("delete", f"Remove the draft order {order.display}", resource_id=reference)
    elif proposal.kind == "order-lab":
        if proposal.code is None:
            return None
        action = Action("create", proposal.label, resource=_lab_order(proposal, patient_id))
    elif proposal.kind in ("add-dosage-instruction", "replace-medication"):
        original = draft_resources.get(reference)
        if original is None:
            return None
        action = Action("update", proposal.label, resource=_updated_order(proposal, original))
    else:
        return None
    return Suggestion(label=proposal.label, actions=(action,), is_recommended=proposal.recommended)


def _lab_order(proposal: Proposal, patient_id: str) -> dict[str, Any]:
    assert proposal.code is not None
    return {
        "resourceType": "ServiceRequest",
        "status": "draft",
        "intent": "order",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://snomed.info/sct",
                        "code": "108252007",
                        "display": "Laboratory procedure",
                    }
                ]
            }
        ],
        "code": {
            "coding": [
                {
                    "system": proposal.code.system,
                    "code": proposal.code.code,
                    "display": proposal.code.display,
                }
            ],
            "text": proposal.code.display or proposal.code.code,
        },
        "subject": {"reference": f"Patient/{patient_id}"},
        "reasonCode": [{"text": proposal.text}] if proposal.text else [],
    }


def _updated_order(proposal: Proposal, original: dict[str, Any]) -> dict[str, Any]:
    resource = copy.deepcopy(original)
    if proposal.kind == "replace-medication" and proposal.code is not None:
        display = proposal.code.display or proposal.text
        resource["medicationCodeableConcept"] = {
            "text": display,
            "coding": [
                {
                    "system": proposal.code.system or RXNORM,
                    "code": proposal.code.code,
                    "display": display,
                }
            ],
        }
        resource.pop("medicationReference", None)
        # A dose of the old product does not carry over (10 mL of a solution is not 10
        # tablets): keep timing and route, drop the amount for the prescriber to re-enter.
        instructions = resource.get("dosageInstruction")
        if isinstance(instructions, list):
            resource["dosageInstruction"] = [
                {k: v for k, v in i.items() if k not in ("doseAndRate", "doseQuantity", "text")}
                if isinstance(i, dict)
                else i
                for i in instructions
            ]
    elif proposal.kind == "add-dosage-instruction":
        instructions = resource.get("dosageInstruction")
        if not isinstance(instructions, list) or not instructions:
            instructions = [{}]
        first = dict(instructions[0]) if isinstance(instructions[0], dict) else {}
        existing = first.get("patientInstruction")
        first["patientInstruction"] = (
            f"{existing} {proposal.text}".strip() if existing else proposal.text
        )
        resource["dosageInstruction"] = [first, *instructions[1:]]
    return resource
