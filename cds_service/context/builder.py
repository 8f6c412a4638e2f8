"""One hook call's data → one PatientContext, in three steps read top to bottom:

1. gather (``context.gather``): the draft orders, the prefetch keys (prefetched, else fetched
   from ``fhirServer``; a required key with no data is HTTP 412), the patient's resources and
   the Medications they reference: FHIR JSON still;
2. normalise (``context.normalise``): each resource → a fact, or a data issue;
3. assemble (here): the PatientContext the rules read.
"""

from __future__ import annotations

import requests
from requests.adapters import HTTPAdapter

from cds_service.context.fhir_client import FhirClient, FhirClientConfig
from cds_service.context.gather import ClientFactory, FhirFallback, Gathered, HookRequest, gather
from cds_service.context.model import DataUnavailable, PatientContext
from cds_service.context.normalise import Facts, Relevance, normalise
from cds_service.context.prefetch import PrefetchKey
from cds_service.settings import Settings

__all__ = [
    "ClientFactory",
    "DataUnavailable",
    "build_patient_context",
    "client_config",
    "default_client_factory",
]


def client_config(settings: Settings) -> FhirClientConfig:
    return FhirClientConfig(
        connect_timeout=settings.fhir_connect_timeout,
        read_timeout=settings.fhir_read_timeout,
        max_pages=settings.fhir_max_pages,
        max_workers=settings.fhir_max_workers,
        max_response_bytes=settings.fhir_max_response_bytes,
    )


def default_client_factory(settings: Settings) -> ClientFactory:
    config = client_config(settings)
    # One connection pool per process, so consecutive calls to the same EHR reuse their
    # connections; each call still gets its own Session (no cookies shared between calls).
    adapter = HTTPAdapter(pool_connections=16, pool_maxsize=max(10, config.max_workers * 4))

    def make(base_url: str, token: str | None) -> FhirClient:
        session = requests.Session()
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return FhirClient(base_url, config, access_token=token, session=session)

    return make


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
