"""Findings → CDS Hooks cards: wording, sources, override reasons and FHIR suggestions.

This is the only place that turns a rule's abstract proposal into a FHIR action, and the
only place that formats evidence and sources, so every card explains itself the same way.
"""

from __future__ import annotations

import copy
import hashlib
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from cds_service.cards.model import (
    MAX_DETAIL_CHARS,
    MAX_SUMMARY_CHARS,
    Action,
    Card,
    CardCoding,
    Link,
    Source,
    Suggestion,
)
from cds_service.context.model import Coding, DataIssue
from cds_service.fhir_models import model_problems
from cds_service.knowledge import Knowledge
from cds_service.knowledge.model import EvidenceSource
from cds_service.rules.describe import clinical_name, mid_sentence, sentence
from cds_service.rules.findings import Finding, Proposal

EXTENSION_KEY = "org.magnesium-cds"
RULE_TOPIC_SYSTEM = "urn:magnesium-cds:rule"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
_CARD_NAMESPACE = uuid.UUID("6f1f0b7e-4a55-4b8e-9a0c-2f1d8c3e5a10")


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
    base_url: str = "",
) -> list[Card]:
    """``draft_resources`` maps ``"MedicationRequest/id"`` to the (repaired) draft order's JSON;
    ``fhir_version`` is the client's ("R4", "STU3" or "DSTU2"): suggestions are in its shapes;
    ``base_url`` is the service's public URL, for the explanation links ("": no links)."""
    return [
        build_card(
            finding, knowledge, hook_instance, patient_id, draft_resources, fhir_version, base_url
        )
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

    rule_title: str
    source: EvidenceSource | None  # the primary readable document, None: the explanation page
    source_ids: tuple[str, ...]
    override_reasons: tuple[CardCoding, ...]


def readable_url(url: str) -> bool:
    """A page a clinician can open: https, not an API's raw JSON (api.fda.gov, *.json)."""
    parts = urlsplit(url)
    return (
        parts.scheme == "https"
        and bool(parts.netloc)
        and parts.netloc.lower() not in _API_HOSTS
        and not parts.path.lower().endswith((".json", ".xml"))
    )


_API_HOSTS = frozenset({"api.fda.gov"})


# Knowledge is immutable once loaded; the key is (knowledge, rule id, the finding's sources,
# what it is about), a few dozen combinations in all, so this is bounded only as a precaution.
@lru_cache(maxsize=256)
def _rule_parts(
    knowledge: Knowledge, rule_id: str, finding_sources: tuple[str, ...], about: tuple[str, ...]
) -> _RuleParts:
    rule = knowledge.rule(rule_id)
    source_ids = tuple(dict.fromkeys((*finding_sources, *rule.source_ids)))
    readable = [
        source
        for source in (knowledge.source(source_id) for source_id in source_ids)
        if source.url and readable_url(source.url)
    ]
    # The document about this drug or condition (the ciprofloxacin label for ciprofloxacin),
    # else the first readable one the finding and its rule cite.
    names = [name.lower() for name in about]
    specific = [s for s in readable if any(n in f"{s.id} {s.title}".lower() for n in names)]
    primary = (specific or readable)[0] if readable else None
    override_reasons = tuple(_card_coding(c) for c in rule.override_reasons)
    return _RuleParts(rule.title, primary, source_ids, override_reasons)


def guidance_url(base_url: str, rule_id: str, topics: tuple[str, ...] = ()) -> str:
    """The explanation page of a rule; ``topics`` (knowledge ids, no patient data) pick its
    sections."""
    url = f"{base_url}/guidance/{quote(rule_id, safe='')}"
    return url + (f"?{urlencode([('topic', t) for t in topics])}" if topics else "")


def build_card(
    finding: Finding,
    knowledge: Knowledge,
    hook_instance: str,
    patient_id: str,
    draft_resources: Mapping[str, dict[str, Any]],
    fhir_version: str = "R4",
    base_url: str = "",
) -> Card:
    parts = _rule_parts(knowledge, finding.rule_id, finding.source_ids, finding.about)
    uuid_of_card = card_uuid(hook_instance, finding.key)
    suggestions: list[Suggestion] = []
    notes: list[str] = []
    for proposal in finding.proposals:
        if proposal.kind == "order-lab" and fhir_version == "DSTU2":
            # DSTU2 has no ServiceRequest/ProcedureRequest; its DiagnosticOrder differs enough
            # that a guessed shape could be applied wrongly. Say it in words instead.
            if proposal.code is not None:
                label = mid_sentence(proposal.label)
                notes.append(f"By hand (no one-click order in DSTU2): {label}.")
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
    explanation = guidance_url(base_url, finding.rule_id, finding.topics) if base_url else ""
    topic = CardCoding(RULE_TOPIC_SYSTEM, finding.rule_id, parts.rule_title)
    if parts.source is not None:
        source = Source(label=parts.source.title, url=parts.source.url or "", topic=topic)
    else:  # local policy or no readable document: the explanation page is the source
        source = Source(label=f"magnesium-cds: {parts.rule_title}", url=explanation, topic=topic)
    return Card(
        uuid=uuid_of_card,
        summary=card_summary(finding.summary, parts.rule_title),
        indicator=finding.indicator,
        detail=card_detail(finding, tuple(notes)),
        source=source,
        suggestions=tuple(suggestions),
        selection_behavior="at-most-one" if suggestions else None,
        override_reasons=parts.override_reasons,
        links=(Link("Why, and what else to consider", explanation),) if explanation else (),
        extension={EXTENSION_KEY: _provenance(finding, knowledge, parts.source_ids)},
    )


def _provenance(
    finding: Finding, knowledge: Knowledge, source_ids: tuple[str, ...]
) -> dict[str, Any]:
    """What produced the card, machine-readable: the facts with their resource and codes, the
    knowledge entries and sources. Never shown in the card's text."""
    return {
        "ruleId": finding.rule_id,
        "knowledgeVersion": knowledge.version,
        "evidence": [
            {
                "fact": item.text,
                "resource": item.source.reference
                if item.source and item.source.resource_id
                else "",
                "codes": [
                    {"system": c.system, "code": c.code, "display": c.display}
                    for c in item.codes
                ],
                "recognisedBy": item.recognised_by,
            }
            for item in finding.evidence
        ],
        "topics": list(finding.topics),
        "sources": list(source_ids),
        "unverified": list(finding.unverified),
    }


def _card_coding(coding: Coding) -> CardCoding:
    return CardCoding(coding.system, coding.code, coding.display or coding.code)


def card_summary(summary: str, rule_title: str) -> str:
    """The rule's summary in sentence case; one that would not fit whole (a long name from the
    EHR) gives way to the rule's title, never to a cut sentence."""
    text = sentence(" ".join(summary.split()).rstrip(". "))
    return text if len(text) <= MAX_SUMMARY_CHARS else sentence(rule_title)


def card_detail(finding: Finding, notes: tuple[str, ...] = ()) -> str:
    """Patient facts, what to do, what to watch, then one clause on what is unverified and
    why the indicator differs at signing; at most ``MAX_DETAIL_CHARS``. What does not fit
    (watch first, then the last facts) is left to the explanation page."""
    order = finding.order.source if finding.order is not None else None
    evidence = list(finding.evidence)
    action = finding.action or _first_sentence(finding.detail)
    watch = finding.watch
    unverified = _unverified_clause(finding.unverified)
    while True:
        facts = [item.text for item in evidence]
        detail = _compose(facts, action, watch, notes, unverified, finding.severity_note)
        if len(detail) <= MAX_DETAIL_CHARS:
            return detail
        # The order the card is about is the last fact to go: its dose is what the advice is on.
        droppable = [i for i, item in enumerate(evidence) if order is None or item.source != order]
        if watch:
            watch = ""
        elif unverified and unverified != _SOME_UNVERIFIED:
            unverified = _SOME_UNVERIFIED
        elif len(evidence) > 1 and droppable:
            del evidence[droppable[-1]]
        else:
            return _cut_sentences(detail, MAX_DETAIL_CHARS)


_SOME_UNVERIFIED = "Some statements are unverified: see the explanation page."


def _compose(
    facts: list[str],
    action: str,
    watch: str,
    notes: tuple[str, ...],
    unverified: str,
    severity_note: str,
) -> str:
    parts = []
    if facts:
        joined = "; ".join([facts[0], *(mid_sentence(f) for f in facts[1:])])
        parts.append(f"**Patient:** {_end(joined)}")
    if action:
        parts.append(f"**Do:** {_end(action)}")
    if watch:
        parts.append(f"**Watch:** {_end(watch)}")
    parts += list(notes)
    tail = " ".join(_end(t) for t in (unverified, severity_note) if t)
    if tail:
        parts.append(f"_{tail}_")
    return "\n\n".join(parts)


def _unverified_clause(labels: tuple[str, ...]) -> str:
    if not labels:
        return ""
    return "Unverified: " + "; ".join(dict.fromkeys(label.rstrip(". ") for label in labels))


def _end(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def _first_sentence(text: str) -> str:
    """The first sentence of the long reasoning, the action of a rule that states none."""
    plain = " ".join(text.replace("**", "").split())
    match = re.match(r"(.+?[.!?])(\s|$)", plain)
    return match.group(1) if match else plain


def _cut_sentences(text: str, limit: int) -> str:
    """Whole paragraphs, then whole sentences of the one that overflows, up to ``limit``
    characters (a last resort: rules keep their text short). Paragraphs stay paragraphs (the
    **Do:** label starts its own line); the italic clause is kept whole or not at all."""
    kept: list[str] = []
    for paragraph in text.split("\n\n"):
        room = limit - len("\n\n".join(kept)) - (2 if kept else 0)
        if len(paragraph) <= room:
            kept.append(paragraph)
            continue
        if not paragraph.startswith("_"):
            part = ""
            for piece in re.split(r"(?<=[.!?])\s+", paragraph):
                candidate = f"{part} {piece}" if part else piece
                if len(candidate) > room:
                    break
                part = candidate
            if part:
                kept.append(part)
        break
    return "\n\n".join(kept) or text[: limit - 1].rsplit(" ", 1)[0] + "."


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
        name = clinical_name(order.display)
        return Action("delete", f"Remove the draft order {name}", resource_id=reference)
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
