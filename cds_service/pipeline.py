"""One hook call through the layers: request → PatientContext → findings → cards.

Shared by the HTTP blueprint and ``cds-service evaluate``, so both give the same answer.
Timings per stage are kept for the logs and the benchmark.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from cds_service.cards.builder import EXTENSION_KEY, build_cards, update_conformance_issues
from cds_service.context.builder import ClientFactory, build_patient_context
from cds_service.context.rxnav import RxNavClient
from cds_service.knowledge import Knowledge
from cds_service.protocol.hook_request import HookRequest
from cds_service.protocol.services import ServiceDefinition, prefetch_keys_for
from cds_service.rules import engine
from cds_service.rules.picture import KnowledgeRelevance


@dataclass
class PipelineResult:
    response: dict[str, Any]
    cards: list[IssuedCard]
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def rule_ids(self) -> list[str]:
        return [card.rule_id for card in self.cards]


@dataclass(frozen=True)
class IssuedCard:
    """What the feedback store keeps of a card: no patient data."""

    uuid: str
    rule_id: str
    indicator: str


class HookPipeline:
    def __init__(self, knowledge: Knowledge, make_client: ClientFactory) -> None:
        self.knowledge = knowledge
        self.make_client = make_client
        # Built once, from the knowledge this app loaded: the Observation query's LOINC codes
        # are exactly the lab groups' codes, here and at discovery.
        self.prefetch_keys = prefetch_keys_for(knowledge)
        # Facts no rule can use are recognised by their codes and not normalised; its memo of
        # codes lives as long as the pipeline.
        self.relevance = KnowledgeRelevance(knowledge)
        # "Today" for the rules (lab recency, age); tests pin it to the fixtures' date.
        self.clock: Callable[[], date] = date.today
        # Live RxNorm look-up for codes the knowledge files do not hold (CDS_RXNAV_URL).
        self.rxnav: RxNavClient | None = None

    def run(
        self, service: ServiceDefinition, request: HookRequest, base_url: str = ""
    ) -> PipelineResult:
        """Raises ``DataUnavailable`` when required data cannot be had (HTTP 412).
        ``base_url``: the service's public URL, for the cards' explanation links."""
        timings: dict[str, float] = {}
        started = time.perf_counter()
        context = build_patient_context(
            request,
            self.make_client,
            service.draft_orders_context_key,
            self.relevance,
            keys=self.prefetch_keys,
            rxnav=self.rxnav,
        )
        after_context = time.perf_counter()
        findings = engine.evaluate(
            context,
            self.knowledge,
            service.hook,
            self.clock(),
            advice_shown_before=service.advice_shown_before,
        )
        after_rules = time.perf_counter()
        cards = build_cards(
            findings,
            self.knowledge,
            request.hook_instance,
            request.patient_id,
            context.draft_resources,
            fhir_version=context.fhir_version,
            base_url=base_url,
        )
        cards_json = [card.to_json() for card in cards]
        response: dict[str, Any] = {"cards": cards_json}
        issues = [*context.issues, *update_conformance_issues(cards_json, context.fhir_version)]
        if issues:
            response["extension"] = {
                EXTENSION_KEY: {
                    "dataIssues": [
                        {"where": issue.where, "problem": issue.problem} for issue in issues
                    ]
                }
            }
        finished = time.perf_counter()
        timings["context"] = (after_context - started) * 1000
        timings["rules"] = (after_rules - after_context) * 1000
        timings["cards"] = (finished - after_rules) * 1000
        issued = [
            IssuedCard(card.uuid, finding.rule_id, card.indicator)
            for card, finding in zip(cards, findings, strict=True)
        ]
        return PipelineResult(response, issued, timings)

