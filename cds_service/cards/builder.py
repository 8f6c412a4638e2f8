"""Findings → CDS Hooks cards: wording, sources, override reasons and FHIR suggestions.

This is the only place that turns a rule's abstract proposal into a FHIR action, and the
only place that formats evidence and sources, so every card explains itself the same way.
"""

from __future__ import annotations

import copy
import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from cds_service.cards.model import Action, Card, CardCoding, Source, Suggestion, shorten
from cds_service.context.model import Coding, DataIssue
from cds_service.fhir_models import model_problems
from cds_service.knowledge import Knowledge
from cds_service.knowledge.model import EvidenceSource
from cds_service.rules.findings import Evidence, Finding, Proposal

EXTENSION_KEY = "org.magnesium-cds"
RULE_TOPIC_SYSTEM = "urn:magnesium-cds:rule"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
_CARD_NAMESPACE = uuid.UUID("6f1f0b7e-4a55-4b8e-9a0c-2f1d8c3e5a10")
_STATUS_WORDS = {"secondary": "secondary source", "unverified": "**unverified**"}


def _uuid5(namespace: bytes, name: str) -> str:
    """``str(uuid.uuid5(UUID(bytes=namespace), name))`` without building UUID objects (a few
    µs a card): SHA-1 of namespace + name, version 5 and RFC 4122 variant bits, 8-4-4-4-12."""
    digest = bytearray(hashlib.sha1(namespace + name.encode("utf-8")).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # variant RFC 4122
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_CARD_NAMESPACE_BYTES = _CARD_NAMESPACE.bytes


def card_uuid(hook_instance: str, finding_key: str) -> str:
    """Stable for one finding within one hook instance, so feedback can find its card."""
    return _uuid5(_CARD_NAMESPACE_BYTES, f"{hook_instance}|{finding_key}")


def suggestion_uuid(card: str, proposal: Proposal) -> str:
    """Stable for one proposal of one card: a retried hookInstance gets the same uuids, so
    feedback naming an accepted suggestion matches whichever answer the EHR showed."""
    order = proposal.order.source.reference if proposal.order is not None else ""
    code = f"{proposal.code.system}|{proposal.code.code}" if proposal.code is not None else ""
    # ``card`` is one of ours (``card_uuid``): its hex digits are the namespace's bytes.
    namespace = bytes.fromhex(card.replace("-", ""))
    return _uuid5(namespace, f"{proposal.kind}|{order}|{code}|{proposal.label}")


def build_cards(
    findings: list[Finding],
    knowledge: Knowledge,
    hook_instance: str,
    patient_id: str,
    draft_resources: Mapping[str, dict[str, Any]],
    fhir_version: str = "R4",
) -> list[Card]:
    """``draft_resources`` maps ``"MedicationRequest/id"`` to the (repaired) draft order's JSON;
    ``fhir_version`` is the client's ("R4", "STU3" or "DSTU2"): suggestions are in its shapes."""
    return [
        build_card(finding, knowledge, hook_instance, patient_id, draft_resources, fhir_version)
        for finding in findings
    ]


def update_conformance_issues(
    cards_json: list[dict[str, Any]], fhir_version: str
) -> list[DataIssue]:
    """The strict FHIR model check (fhir.resources) of each draft order an update suggestion
    hands back to the EHR, as sent (``cards_json``: the answer's cards): the one place our
    answer carries the client's own data, which the EHR will apply as it is. An update that is
    not valid (the draft's own shape, mostly) is reported to the client; the suggestion is
    still offered (EHRs accept their own shapes)."""
    issues: list[DataIssue] = []
    checked: set[str] = set()
    for card in cards_json:
        for suggestion in card.get("suggestions", ()):
            for action in suggestion["actions"]:
                if action["type"] != "update":
                    continue
                resource = action["resource"]
                reference = f"{resource.get('resourceType')}/{resource.get('id')}"
                if reference in checked:
                    continue
                checked.add(reference)
                problems = model_problems(resource, fhir_version)
                if problems:
                    issues.append(
                        DataIssue(
                            f"suggestion to update {reference}",
                            f"is not valid FHIR {fhir_version} ({'; '.join(problems)}); the EHR "
                            "may refuse it",
                        )
                    )
    return issues


@dataclass(frozen=True)
class _RuleParts:
    """What a card takes from the knowledge alone (its rule and sources), built once."""

    source: Source
    override_reasons: tuple[CardCoding, ...]
    sources_markdown: str  # the detail's "Sources" section, "" without sources


# Knowledge is immutable once loaded; the key is (knowledge, rule id, the finding's sources),
# a few dozen combinations in all, so this is bounded only as a precaution.
@lru_cache(maxsize=256)
def _rule_parts(knowledge: Knowledge, rule_id: str, finding_sources: tuple[str, ...]) -> _RuleParts:
    rule = knowledge.rule(rule_id)
    source_ids = tuple(dict.fromkeys((*finding_sources, *rule.source_ids)))
    sources = tuple(knowledge.source(source_id) for source_id in source_ids)
    primary = sources[0] if sources else None
    source = Source(
        label=primary.title if primary else rule.title,
        url=primary.url if primary and primary.url else "",
        topic=CardCoding(RULE_TOPIC_SYSTEM, rule_id, rule.title),
    )
    override_reasons = tuple(_card_coding(c) for c in rule.override_reasons)
    return _RuleParts(source, override_reasons, _sources_markdown(sources))


def build_card(
    finding: Finding,
    knowledge: Knowledge,
    hook_instance: str,
    patient_id: str,
    draft_resources: Mapping[str, dict[str, Any]],
    fhir_version: str = "R4",
) -> Card:
    parts = _rule_parts(knowledge, finding.rule_id, finding.source_ids)
    uuid_of_card = card_uuid(hook_instance, finding.key)
    suggestions: list[Suggestion] = []
    notes: list[str] = []
    for proposal in finding.proposals:
        if proposal.kind == "order-lab" and fhir_version == "DSTU2":
            # DSTU2 has no ServiceRequest/ProcedureRequest; its DiagnosticOrder differs enough
            # that a guessed shape could be applied wrongly. Say it in words instead.
            if proposal.code is not None:
                notes.append(
                    f"**To do by hand:** {proposal.label} (LOINC {proposal.code.code}); no "
                    "one-click order is offered to a FHIR DSTU2 EHR."
                )
            continue
        action = _action(proposal, patient_id, draft_resources, fhir_version)
        if action is not None:
            suggestions.append(
                Suggestion(
                    label=proposal.label,
                    actions=(action,),
                    is_recommended=proposal.recommended,
                    uuid=suggestion_uuid(uuid_of_card, proposal),
                )
            )
    detail = "\n\n".join([_detail(finding, parts.sources_markdown), *notes])
    return Card(
        uuid=uuid_of_card,
        summary=shorten(finding.summary),
        indicator=finding.indicator,
        detail=detail,
        source=parts.source,
        suggestions=tuple(suggestions),
        selection_behavior="at-most-one" if suggestions else None,
        override_reasons=parts.override_reasons,
        extension={
            EXTENSION_KEY: {"ruleId": finding.rule_id, "knowledgeVersion": knowledge.version}
        },
    )


def _card_coding(coding: Coding) -> CardCoding:
    return CardCoding(coding.system, coding.code, coding.display or coding.code)


def _detail(finding: Finding, sources_markdown: str) -> str:
    parts = [finding.detail.strip()]
    if finding.evidence:
        facts = "\n".join([_evidence_line(item) for item in finding.evidence])
        parts.append(f"**Patient facts used**\n{facts}")
    if finding.unverified:
        facts = "; ".join(fact.rstrip(". ") for fact in finding.unverified)
        parts.append(f"**Unverified:** {facts}.")
    parts.append(sources_markdown)
    return "\n\n".join([part for part in parts if part])


def _evidence_line(item: Evidence) -> str:
    if item.source and item.source.resource_id:
        return f"- {item.text} — `{item.source.reference}`"
    return f"- {item.text}"


def _sources_markdown(sources: tuple[EvidenceSource, ...]) -> str:
    if not sources:
        return ""
    lines = []
    for source in sources:
        title = f"[{source.title}]({source.url})" if source.url else source.title
        status = _STATUS_WORDS.get(source.status)
        lines.append(f"- {title}" + (f" ({status})" if status else ""))
    return "**Sources**\n" + "\n".join(lines)


def _action(
    proposal: Proposal,
    patient_id: str,
    draft_resources: Mapping[str, dict[str, Any]],
    fhir_version: str,
) -> Action | None:
    order = proposal.order
    reference = order.source.reference if order is not None else ""
    if proposal.kind == "remove-order":
        if order is None or not order.source.resource_id:
            return None
        return Action("delete", f"Remove the draft order {order.display}", resource_id=reference)
    if proposal.kind == "order-lab":
        if proposal.code is None:
            return None
        return Action(
            "create", proposal.label, resource=_lab_order(proposal, patient_id, fhir_version)
        )
    if proposal.kind in ("add-dosage-instruction", "replace-medication"):
        original = draft_resources.get(reference)
        if original is None:
            return None
        return Action(
            "update", proposal.label, resource=_updated_order(proposal, original, fhir_version)
        )
    return None


def _lab_order(proposal: Proposal, patient_id: str, fhir_version: str) -> dict[str, Any]:
    """A draft laboratory order: R4 ServiceRequest, STU3 ProcedureRequest (same fields here)."""
    assert proposal.code is not None
    resource: dict[str, Any] = {
        "resourceType": "ProcedureRequest" if fhir_version == "STU3" else "ServiceRequest",
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
    }
    if proposal.text:  # an empty list is not allowed in FHIR JSON
        resource["reasonCode"] = [{"text": proposal.text}]
    return resource


# Per-administration amounts and rates of the old product (R4 doseAndRate; STU3/DSTU2 dose[x]
# and rate[x] directly on the instruction) and its free-text dose: none carries over to
# another product.
_PRODUCT_DOSE_FIELDS = frozenset(
    {
        "doseAndRate",
        "doseQuantity",
        "doseRange",
        "doseSimpleQuantity",
        "rateRatio",
        "rateRange",
        "rateQuantity",
        "rateSimpleQuantity",
        "maxDosePerAdministration",
        "maxDosePerPeriod",
        "maxDosePerLifetime",
        "text",
    }
)
# dispenseRequest fields that count units of the old product (DSTU2 also names it there).
_PRODUCT_DISPENSE_FIELDS = frozenset(
    {"quantity", "medicationCodeableConcept", "medicationReference"}
)


def _updated_order(
    proposal: Proposal, original: dict[str, Any], fhir_version: str
) -> dict[str, Any]:
    resource = copy.deepcopy(original)
    # A lone instruction object (as some clients send it) is the first instruction, not none.
    if isinstance(resource.get("dosageInstruction"), dict):
        resource["dosageInstruction"] = [resource["dosageInstruction"]]
    if proposal.kind == "replace-medication" and proposal.code is not None:
        display = proposal.code.display or proposal.text
        old_reference = resource.pop("medicationReference", None)
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
        _drop_contained(resource, old_reference)
        # A dose of the old product does not carry over (10 mL of a solution is not 10
        # tablets): keep timing and route, drop the amounts for the prescriber to re-enter.
        instructions = resource.get("dosageInstruction")
        if isinstance(instructions, list):
            resource["dosageInstruction"] = [
                {k: v for k, v in i.items() if k not in _PRODUCT_DOSE_FIELDS}
                if isinstance(i, dict)
                else i
                for i in instructions
            ]
        # Nor does a dispensed quantity (60 tablets of one product are not 60 of another).
        dispense = resource.get("dispenseRequest")
        if isinstance(dispense, dict):
            kept = {k: v for k, v in dispense.items() if k not in _PRODUCT_DISPENSE_FIELDS}
            if kept:
                resource["dispenseRequest"] = kept
            else:
                resource.pop("dispenseRequest")
    elif proposal.kind == "add-dosage-instruction":
        instructions = resource.get("dosageInstruction")
        if not isinstance(instructions, list) or not instructions:
            instructions = [{}]
        first = dict(instructions[0]) if isinstance(instructions[0], dict) else {}
        # DSTU2's dosage instruction has no patientInstruction (STU3 and R4 do): there the
        # advice goes into the instruction's text.
        field_name = "text" if fhir_version == "DSTU2" else "patientInstruction"
        existing = first.get(field_name)
        first[field_name] = (
            f"{existing} {proposal.text}".strip()
            if isinstance(existing, str) and existing.strip()
            else proposal.text
        )
        resource["dosageInstruction"] = [first, *instructions[1:]]
    return resource


def _drop_contained(resource: dict[str, Any], old_reference: Any) -> None:
    """Remove the contained Medication the replaced reference pointed to: a contained
    resource nothing references is invalid FHIR (dom-3)."""
    ref = old_reference.get("reference") if isinstance(old_reference, dict) else None
    contained = resource.get("contained")
    if not isinstance(ref, str) or not ref.startswith("#") or not isinstance(contained, list):
        return
    kept = [c for c in contained if not (isinstance(c, dict) and c.get("id") == ref[1:])]
    if kept:
        resource["contained"] = kept
    else:
        resource.pop("contained")
