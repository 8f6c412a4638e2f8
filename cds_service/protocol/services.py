"""The CDS services this server offers: one per hook, each with its prefetch templates.

The prefetch keys themselves (names, templates, which are required) belong to the
patient-context layer (``context.prefetch``); here they get their LOINC codes from the
knowledge base and are advertised at discovery.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cds_service.context.prefetch import PrefetchKey, prefetch_keys
from cds_service.knowledge import Knowledge, default_knowledge

# The knowledge base's lab groups whose results the rules read (labs.json): the Observation
# prefetch asks for every LOINC code of these groups and no other.
OBSERVATION_LAB_GROUPS = ("serum-magnesium", "egfr", "creatinine")


def prefetch_keys_for(knowledge: Knowledge) -> tuple[PrefetchKey, ...]:
    """The prefetch keys, their Observation codes taken from ``knowledge``."""
    return prefetch_keys(
        entry.code for group in OBSERVATION_LAB_GROUPS for entry in knowledge.lab_group(group).codes
    )


# For the bundled knowledge (fixture generation, benchmarks, tests); the app builds its own
# from the knowledge it loads (``HookPipeline.prefetch_keys``), which may be another file.
PREFETCH_KEYS: tuple[PrefetchKey, ...] = prefetch_keys_for(default_knowledge())


@dataclass(frozen=True)
class ServiceDefinition:
    id: str
    hook: str
    title: str
    description: str
    # The context field holding this hook's draft orders (a Bundle); None for hooks without.
    draft_orders_context_key: str | None
    # order-sign only: False for EHRs that fire no order-select, so the advice (info cards)
    # order-select would have shown is shown at signing instead of being dropped.
    advice_shown_before: bool = True

    def discovery_json(self, keys: tuple[PrefetchKey, ...]) -> dict[str, Any]:
        return {
            "hook": self.hook,
            "id": self.id,
            "title": self.title,
            "description": self.description,
            "prefetch": {key.name: key.template for key in keys},
        }


SERVICES: tuple[ServiceDefinition, ...] = (
    ServiceDefinition(
        id="magnesium-order-select",
        hook="order-select",
        title="Magnesium safety: order selection",
        description=(
            "Advises while a magnesium product, or a drug that interacts with magnesium, is "
            "being ordered: myasthenia gravis, kidney function, chelation interactions and "
            "supplement form."
        ),
        draft_orders_context_key="draftOrders",
    ),
    ServiceDefinition(
        id="magnesium-order-sign",
        hook="order-sign",
        title="Magnesium safety: order signing",
        description=(
            "Checks magnesium orders and magnesium-interacting orders at signing and repeats "
            "only what is still unresolved."
        ),
        draft_orders_context_key="draftOrders",
    ),
    ServiceDefinition(
        id="magnesium-order-sign-only",
        hook="order-sign",
        title="Magnesium safety: order signing, for EHRs without order-select",
        description=(
            "For EHRs that fire only order-sign: the signing checks plus the advice that "
            "order-select would have shown (autoimmune guidance, small-dose notes)."
        ),
        draft_orders_context_key="draftOrders",
        advice_shown_before=False,
    ),
    ServiceDefinition(
        id="magnesium-patient-view",
        hook="patient-view",
        title="Magnesium safety: chart review",
        description=(
            "When the chart is opened, flags magnesium therapy that is contraindicated "
            "(myasthenia gravis, severe renal impairment, high serum magnesium)."
        ),
        draft_orders_context_key=None,
    ),
    ServiceDefinition(
        id="magnesium-medication-prescribe",
        hook="medication-prescribe",
        title="Magnesium safety: prescribing (CDS Hooks 1.0 clients)",
        description=(
            "The order-select checks for clients that still send the CDS Hooks 1.0 "
            "medication-prescribe hook (DSTU2 MedicationOrder or STU3 MedicationRequest)."
        ),
        draft_orders_context_key="medications",
    ),
)
SERVICES_BY_ID = {service.id: service for service in SERVICES}


def discovery_document(keys: tuple[PrefetchKey, ...]) -> dict[str, Any]:
    """``keys``: the app's own (built from the knowledge it loaded at start-up)."""
    return {"services": [service.discovery_json(keys) for service in SERVICES]}
