"""The CDS services this server offers: one per hook, each with its prefetch templates.

The prefetch keys are also the names the patient-context layer uses for the data it needs;
``PREFETCH_KEYS`` says which of them the rules cannot do without (a key that can be neither
prefetched nor fetched then answers HTTP 412).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# LOINC codes the rules read (clinical-knowledge.md, "Labs (LOINC)").
MAGNESIUM_LOINC = ("19123-9", "2601-3")
EGFR_LOINC = (
    "98979-8",
    "98980-6",
    "62238-1",
    "88293-6",
    "88294-4",
    "33914-3",
    "48642-3",
    "48643-1",
    "50044-7",
    "70969-1",
    "69405-9",
    "76633-7",
    "77147-7",
)
CREATININE_LOINC = ("2160-0", "14682-9", "77140-2", "38483-4")

_OBSERVATION_CODES = ",".join(
    f"http://loinc.org|{code}" for code in (*MAGNESIUM_LOINC, *EGFR_LOINC, *CREATININE_LOINC)
)


@dataclass(frozen=True)
class PrefetchKey:
    name: str
    template: str
    resource_type: str
    required: bool
    description: str
    # The query used instead when the client speaks DSTU2 (the public sandbox's default
    # server): no MedicationRequest there, and Condition's status parameter differs.
    dstu2_template: str | None = None

    def template_for(self, fhir_version: str) -> str:
        return (
            self.dstu2_template
            if fhir_version == "DSTU2" and self.dstu2_template
            else self.template
        )


PREFETCH_KEYS: tuple[PrefetchKey, ...] = (
    PrefetchKey(
        "patient",
        "Patient/{{context.patientId}}",
        "Patient",
        True,
        "the patient (birth date and sex for dose limits)",
    ),
    PrefetchKey(
        "conditions",
        "Condition?patient={{context.patientId}}&clinical-status=active,recurrence,relapse",
        "Condition",
        True,
        "active conditions (myasthenia gravis, kidney disease, autoimmune disease)",
        dstu2_template="Condition?patient={{context.patientId}}",
    ),
    PrefetchKey(
        "medicationRequests",
        "MedicationRequest?patient={{context.patientId}}&status=active",
        "MedicationRequest",
        True,
        "active medication orders (interacting drugs, myasthenia therapy, magnesium)",
        dstu2_template="MedicationOrder?patient={{context.patientId}}&status=active",
    ),
    PrefetchKey(
        "medicationStatements",
        "MedicationStatement?patient={{context.patientId}}&status=active",
        "MedicationStatement",
        False,
        "medications the patient reports taking (supplements bought over the counter)",
    ),
    PrefetchKey(
        "observations",
        f"Observation?patient={{{{context.patientId}}}}&code={_OBSERVATION_CODES}"
        "&_sort=-date&_count=100",
        "Observation",
        True,
        "recent serum magnesium, eGFR and creatinine results",
    ),
)
PREFETCH_BY_NAME = {key.name: key for key in PREFETCH_KEYS}


@dataclass(frozen=True)
class ServiceDefinition:
    id: str
    hook: str
    title: str
    description: str
    # The FHIR version this hook's clients speak, used to read draft orders.
    draft_orders_context_key: str | None

    def discovery_json(self) -> dict[str, Any]:
        return {
            "hook": self.hook,
            "id": self.id,
            "title": self.title,
            "description": self.description,
            "prefetch": {key.name: key.template for key in PREFETCH_KEYS},
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


def discovery_document() -> dict[str, Any]:
    return {"services": [service.discovery_json() for service in SERVICES]}
