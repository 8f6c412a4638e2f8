"""One hook call's data → one PatientContext, in three steps read top to bottom:

1. gather (``context.gather``): the draft orders, the prefetch keys (prefetched, else fetched
   from ``fhirServer``; a required key with no data is HTTP 412), the patient's resources and
   the Medications they reference: FHIR JSON still;
2. normalise (``context.normalise``): each resource → a fact, or a data issue;
3. assemble (here): the PatientContext the rules read.
"""

from __future__ import annotations

from cds_service.context.fhir_client import (  # re-exported: app, cli and tests import them here
    ClientFactory as ClientFactory,
)
from cds_service.context.fhir_client import (
    client_config as client_config,
)
from cds_service.context.fhir_client import (
    default_client_factory as default_client_factory,
)
from cds_service.context.gather import FhirFallback, Gathered, HookRequest, gather
from cds_service.context.model import DataUnavailable, PatientContext
from cds_service.context.normalise import Facts, Relevance, normalise
from cds_service.context.prefetch import PrefetchKey

__all__ = [
    "ClientFactory",
    "DataUnavailable",
    "build_patient_context",
    "client_config",
    "default_client_factory",
]


def build_patient_context(
    request: HookRequest,
    make_client: ClientFactory,
    draft_orders_key: str | None,
    relevant: Relevance | None = None,
    *,
    keys: tuple[PrefetchKey, ...],
) -> PatientContext:
    """``relevant``: skip normalising prefetched facts it rules out (draft orders never are).

    ``keys``: the prefetch keys (their queries carry the knowledge base's LOINC codes).
    Raises ``DataUnavailable`` when data the rules require cannot be had.
    """
    gathered = gather(request, FhirFallback(request, make_client), keys, draft_orders_key)
    facts = normalise(gathered, draft_orders_key, relevant)
    return assemble(request, gathered, facts)


def assemble(request: HookRequest, gathered: Gathered, facts: Facts) -> PatientContext:
    return PatientContext(
        patient=facts.patient,
        conditions=tuple(facts.conditions),
        medications=tuple(facts.medications),
        draft_orders=tuple(facts.drafts),
        labs=tuple(facts.labs),
        issues=(*gathered.issues, *facts.issues),
        fhir_version=gathered.fhir_version,
        draft_lab_orders=tuple(facts.draft_lab_orders),
        selections=_selections(request),
        draft_resources=facts.draft_resources,
        unusable=tuple(gathered.unusable),
    )


def _selections(request: HookRequest) -> tuple[str, ...]:
    """order-select's ``context.selections`` ("MedicationRequest/123"): the orders to advise
    on; the other drafts are context. Other hooks, or no usable list: every draft counts."""
    if request.hook != "order-select":
        return ()
    selections = request.context.get("selections")
    if not isinstance(selections, list):
        return ()
    return tuple(s.strip() for s in selections if isinstance(s, str) and s.strip())
