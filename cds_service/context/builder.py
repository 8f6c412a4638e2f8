"""Prefetch resolution + FHIR fallback + normalisation → one PatientContext.

Order of business for each prefetch key: use what the client prefetched; a key that is
absent, or holds an OperationOutcome, is fetched from ``fhirServer`` (all such keys at once);
a required key that still has no data makes the whole call fail with ``DataUnavailable``
(HTTP 412 at the protocol layer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import requests
from requests.adapters import HTTPAdapter

from cds_service.context import normalise as fhir
from cds_service.context.fhir_client import FetchResult, FhirClient, FhirClientConfig
from cds_service.context.model import (
    Coding,
    Condition,
    DataIssue,
    Lab,
    LabOrder,
    Medication,
    PatientContext,
    PatientInfo,
)
from cds_service.context.prefetch import UnresolvedToken, render_template
from cds_service.protocol.hook_request import HookRequest
from cds_service.protocol.services import PREFETCH_KEYS, PrefetchKey
from cds_service.settings import Settings


@dataclass(frozen=True)
class MissingData:
    key: str
    data: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"prefetchKey": self.key, "data": self.data, "reason": self.reason}


class DataUnavailable(Exception):
    """Data the rules require could not be obtained (→ HTTP 412)."""

    def __init__(self, missing: list[MissingData]) -> None:
        super().__init__("; ".join(f"{m.key}: {m.reason}" for m in missing))
        self.missing = missing


ClientFactory = Callable[[str, str | None], FhirClient]


class Relevance(Protocol):
    """Which coded facts the rules can use at all (the pipeline asks the knowledge).

    A chronic patient's chart is mostly codes no rule reads: such resources are recognised
    from their codes and not normalised further. A resource without a usable code is still
    read in full, so it is reported (or kept, text only) exactly as without this filter.
    """

    def condition(self, codings: tuple[Coding, ...]) -> bool: ...

    def medication(self, codings: tuple[Coding, ...], text: str) -> bool: ...

    def lab(self, codings: tuple[Coding, ...]) -> bool: ...


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


_ABSENT = object()


def gather_prefetch(
    request: HookRequest,
    make_client: ClientFactory,
    fhir_version: str = "R4",
    keys: tuple[PrefetchKey, ...] = PREFETCH_KEYS,
) -> tuple[dict[str, tuple[str, Any]], list[DataIssue]]:
    """Each key → (origin, data). Raises DataUnavailable for a required key with no data."""
    resolved: dict[str, tuple[str, Any]] = {}
    issues: list[DataIssue] = []
    problems: dict[str, str] = {}
    to_fetch: dict[str, str] = {}
    for key in keys:
        value = request.prefetch.get(key.name, _ABSENT)
        if value is None and key.resource_type != "Patient":
            # The spec's way of saying "searched, nothing there".
            resolved[key.name] = (f"prefetch:{key.name}", None)
            continue
        if isinstance(value, dict) and value.get("resourceType") == "OperationOutcome":
            problems[key.name] = "the client's prefetch holds an OperationOutcome"
            issues.append(
                DataIssue(f"prefetch.{key.name}", "held an OperationOutcome; fetched instead")
            )
        elif isinstance(value, dict | list) and value is not _ABSENT:
            resolved[key.name] = (f"prefetch:{key.name}", value)
            continue
        elif value is not _ABSENT and value is not None:
            issues.append(
                DataIssue(f"prefetch.{key.name}", "is not a FHIR resource or Bundle; ignored")
            )
        else:
            problems.setdefault(key.name, "not prefetched")
        try:
            to_fetch[key.name] = render_template(key.template_for(fhir_version), request.context)
        except UnresolvedToken as exc:
            problems[key.name] = str(exc)
            to_fetch.pop(key.name, None)

    if to_fetch and request.fhir_server:
        client = make_client(request.fhir_server, request.access_token)
        results: dict[str, FetchResult] = client.fetch_all(to_fetch)
        for name, result in results.items():
            if result.resource is not None:
                resolved[name] = (f"fhir:{name}", result.resource)
                problems.pop(name, None)
            else:
                problems[name] = f"not prefetched, and {result.problem}"
    elif to_fetch:
        for name in to_fetch:
            problems[name] = (
                f"{problems.get(name, 'not prefetched')} and the request has no fhirServer"
            )

    missing = [
        MissingData(key.name, key.description, problems[key.name])
        for key in keys
        if key.required and key.name not in resolved
    ]
    if missing:
        raise DataUnavailable(missing)
    for key in keys:
        if key.name not in resolved and key.name in problems:
            issues.append(
                DataIssue(f"prefetch.{key.name}", f"{problems[key.name]}; checks ran without it")
            )
    return resolved, issues


def build_patient_context(
    request: HookRequest,
    make_client: ClientFactory,
    draft_orders_key: str | None,
    relevant: Relevance | None = None,
) -> PatientContext:
    """``relevant``: skip normalising prefetched facts it rules out (draft orders never are)."""
    issues: list[DataIssue] = []
    draft_resources = _draft_resources(request, draft_orders_key, issues)
    draft_lab_orders = _draft_lab_orders(request, draft_orders_key)
    fhir_version = fhir.detect_fhir_version((r for _, r in draft_resources), request.hook)
    resolved, prefetch_issues = gather_prefetch(request, make_client, fhir_version)
    issues.extend(prefetch_issues)
    patient_id = request.patient_id

    patient = PatientInfo(id=patient_id)
    conditions: list[Condition] = []
    medications: list[Medication] = []
    labs: list[Lab] = []
    for key in PREFETCH_KEYS:
        if key.name not in resolved:
            continue
        origin, value = resolved[key.name]
        if value is None:
            continue
        for where, resource, problem in fhir.iter_resources(value, f"prefetch.{key.name}"):
            if resource is None:
                issues.append(DataIssue(where, f"{problem}; ignored"))
                continue
            resource_type = resource.get("resourceType")
            if key.resource_type == "MedicationRequest" and resource_type == "MedicationOrder":
                pass  # DSTU2 servers answer MedicationRequest searches with MedicationOrder
            elif resource_type != key.resource_type:
                issues.append(
                    DataIssue(where, f"is a {resource_type}, not a {key.resource_type}; ignored")
                )
                continue
            owner = resource.get("id") if resource_type == "Patient" else fhir.subject_id(resource)
            if owner != patient_id:
                issues.append(DataIssue(where, "belongs to another patient (or to none); ignored"))
                continue
            if relevant is not None and not _may_matter(resource, resource_type, relevant):
                continue
            if resource_type == "Patient":
                patient = fhir.to_patient(resource, origin, patient_id)
            elif resource_type == "Condition":
                _append(
                    conditions, fhir.to_condition(resource, origin), issues, where, "has no code"
                )
            elif resource_type in fhir.MEDICATION_TYPES:
                medication = fhir.to_medication(resource, origin, is_draft=False)
                _append(medications, medication, issues, where, "names no medication")
            elif resource_type == "Observation":
                _append(labs, fhir.to_lab(resource, origin), issues, where, "has no code")

    drafts: list[Medication] = []
    for where, resource in draft_resources:
        owner = fhir.subject_id(resource)
        if owner is not None and owner != patient_id:
            issues.append(DataIssue(where, "is a draft order for another patient; ignored"))
            continue
        repaired, notes = fhir.repair_draft(resource)
        issues.extend(DataIssue(where, note) for note in notes)
        problems = fhir.model_problems(repaired, fhir_version)
        if problems:
            issues.append(
                DataIssue(
                    where,
                    f"is not valid FHIR {fhir_version} ({'; '.join(problems)}); read leniently",
                )
            )
        medication = fhir.to_medication(repaired, f"context:{draft_orders_key}", is_draft=True)
        _append(drafts, medication, issues, where, "names no medication yet; nothing to check")

    return PatientContext(
        patient=patient,
        conditions=tuple(conditions),
        medications=tuple(medications),
        draft_orders=tuple(drafts),
        labs=tuple(labs),
        issues=tuple(issues),
        fhir_version=fhir_version,
        draft_lab_orders=draft_lab_orders,
    )


def _may_matter(resource: dict[str, Any], resource_type: Any, relevant: Relevance) -> bool:
    """False only for a resource with usable codes (or drug text) that no rule can use."""
    if resource_type == "Condition":
        codings = fhir.code_codings(resource)
        return not codings or relevant.condition(codings)
    if resource_type == "Observation":
        codings = fhir.code_codings(resource)
        return not codings or relevant.lab(codings)
    if resource_type in fhir.MEDICATION_TYPES:
        codings, ingredient_codings, text = fhir.medication_codes(resource)
        if not codings and not ingredient_codings and not text:
            return True  # reported as naming no medication
        return relevant.medication(codings + ingredient_codings, text)
    return True


def _append(target: list[Any], item: Any, issues: list[DataIssue], where: str, why: str) -> None:
    if item is None:
        issues.append(DataIssue(where, f"{why}; ignored"))
    else:
        target.append(item)


def _draft_lab_orders(request: HookRequest, key: str | None) -> tuple[LabOrder, ...]:
    """Lab orders among the drafts; problems with entries are reported by _draft_resources."""
    if key is None or key not in request.context:
        return ()
    found = (
        fhir.to_lab_order(resource, f"context:{key}")
        for _, resource, _ in fhir.iter_resources(request.context[key], f"context.{key}")
        if resource is not None and resource.get("resourceType") in fhir.LAB_ORDER_TYPES
    )
    return tuple(order for order in found if order is not None)


def _draft_resources(
    request: HookRequest, key: str | None, issues: list[DataIssue]
) -> list[tuple[str, dict[str, Any]]]:
    if key is None or key not in request.context:
        return []
    out: list[tuple[str, dict[str, Any]]] = []
    for where, resource, problem in fhir.iter_resources(request.context[key], f"context.{key}"):
        if resource is None:
            issues.append(DataIssue(where, f"{problem}; ignored"))
        elif resource.get("resourceType") in fhir.MEDICATION_TYPES:
            out.append((where, resource))
    return out
