"""Prefetch resolution + FHIR fallback + normalisation → one PatientContext.

Order of business for each prefetch key: use what the client prefetched; a key that is
absent, or holds an OperationOutcome, is fetched from ``fhirServer`` (all such keys at once);
a required key that still has no data makes the whole call fail with ``DataUnavailable``
(HTTP 412 at the protocol layer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import requests
from requests.adapters import HTTPAdapter

from cds_service.context import normalise as fhir
from cds_service.context.fhir_client import FetchResult, FhirClient, FhirClientConfig, next_link
from cds_service.context.model import (
    Coding,
    Condition,
    DataIssue,
    DataUnavailable,
    Lab,
    LabOrder,
    Medication,
    MissingData,
    PatientContext,
    PatientInfo,
    lab_recency,
)
from cds_service.context.prefetch import PrefetchKey, UnresolvedToken, render_template
from cds_service.context.rxnav import RxNavClient, with_ingredients
from cds_service.settings import Settings

ClientFactory = Callable[[str, str | None], FhirClient]


class HookRequest(Protocol):
    """What this layer reads of a hook call (``protocol.hook_request.HookRequest`` is one):
    a structural type, so that the context layer does not depend on the protocol layer."""

    @property
    def hook(self) -> str: ...

    @property
    def context(self) -> dict[str, Any]: ...

    @property
    def fhir_server(self) -> str | None: ...

    @property
    def access_token(self) -> str | None: ...

    @property
    def prefetch(self) -> dict[str, Any]: ...

    @property
    def patient_id(self) -> str: ...


class Relevance(Protocol):
    """Which coded facts the rules can use at all (the pipeline asks the knowledge).

    A chronic patient's chart is mostly codes no rule reads: such resources are recognised
    from their codes and not normalised further. A resource without a usable code is still
    read in full, so it is reported (or kept, text only) exactly as without this filter.
    """

    def condition_code(self, system: str, code: str) -> bool: ...

    def lab_kind(self, system: str, code: str) -> str | None:
        """The kind of result a lab code is, None when no rule reads it.

        The rules read only the newest usable result of each kind (``latest_lab``), so the
        context keeps just that one per kind (``_keep_if_newest``).
        """
        ...

    def medication(self, codings: tuple[Coding, ...], text: str) -> bool: ...


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
# Distinct Medication resources read one by one for unresolved medicationReferences; a chart
# (or a hostile prefetch) referencing thousands must not turn into thousands of requests.
MAX_MEDICATION_READS = 50
# A draft order an update suggestion would copy and send back: FHIR resources nest a dozen
# levels or so; far deeper is hostile, and copying it recursively would exhaust the stack.
MAX_ECHOED_DRAFT_DEPTH = 64
# A server that answers these to a MedicationRequest search does not know the type: DSTU2.
_UNKNOWN_TYPE_STATUSES = frozenset({400, 404})


class FhirFallback:
    """The one FhirClient of a hook call (made when first needed): every fallback read of
    the call shares its token, connection pool and concurrency bound."""

    def __init__(self, request: HookRequest, make_client: ClientFactory) -> None:
        self._request = request
        self._make_client = make_client
        self._client: FhirClient | None = None

    @property
    def available(self) -> bool:
        return bool(self._request.fhir_server)

    def client(self) -> FhirClient:
        if self._client is None:
            assert self._request.fhir_server
            self._client = self._make_client(self._request.fhir_server, self._request.access_token)
        return self._client


@dataclass
class Gathered:
    resolved: dict[str, tuple[str, Any]]  # key → (origin, data)
    issues: list[DataIssue]
    # The version detected up front, or DSTU2 when the server turned out not to know
    # MedicationRequest.
    fhir_version: str


def gather_prefetch(
    request: HookRequest,
    fallback: FhirFallback,
    fhir_version: str,
    keys: tuple[PrefetchKey, ...],
) -> Gathered:
    """Each key → (origin, data). Raises DataUnavailable for a required key with no data."""
    resolved: dict[str, tuple[str, Any]] = {}
    issues: list[DataIssue] = []
    problems: dict[str, str] = {}
    to_fetch: dict[str, str] = {}
    continuations: dict[str, dict[str, Any]] = {}
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
            # A searchset with a next page: the rest is read from fhirServer (same origin only).
            if (
                isinstance(value, dict)
                and value.get("resourceType") == "Bundle"
                and next_link(value) is not None
            ):
                if fallback.available:
                    continuations[key.name] = value
                else:
                    issues.append(
                        DataIssue(
                            f"prefetch.{key.name}",
                            "only the first page was prefetched (the searchset has a next "
                            "page) and the request has no fhirServer to read the rest; "
                            "checks ran with the first page",
                        )
                    )
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

    if (to_fetch or continuations) and fallback.available:
        results = fallback.client().fetch_all(to_fetch, continuations)
        retry = _dstu2_retries(results, keys, fhir_version, request)
        if retry:
            retried = fallback.client().fetch_all(retry)
            medication_key = next(k.name for k in keys if k.resource_type == "MedicationRequest")
            if retried.get(medication_key, FetchResult("", None)).resource is not None:
                fhir_version = "DSTU2"
                issues.append(
                    DataIssue(
                        f"prefetch.{medication_key}",
                        "the FHIR server does not know MedicationRequest "
                        f"(HTTP {results[medication_key].status}); read as DSTU2 "
                        "MedicationOrder instead",
                    )
                )
            results.update(
                {name: result for name, result in retried.items() if result.resource is not None}
            )
        for name, result in results.items():
            if name in continuations:
                if result.resource is not None:
                    resolved[name] = (f"prefetch:{name}", result.resource)
                if result.incomplete:
                    issues.append(
                        DataIssue(
                            f"prefetch.{name}",
                            f"only the first page was prefetched; the searchset "
                            f"{result.incomplete}; checks ran with the pages read",
                        )
                    )
            elif result.resource is not None:
                resolved[name] = (f"fhir:{name}", result.resource)
                problems.pop(name, None)
                if result.incomplete:
                    issues.append(
                        DataIssue(
                            f"prefetch.{name}",
                            f"the fetched searchset {result.incomplete}; checks ran with the "
                            "pages read",
                        )
                    )
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
    return Gathered(resolved, issues, fhir_version)


def _dstu2_retries(
    results: dict[str, FetchResult],
    keys: tuple[PrefetchKey, ...],
    fhir_version: str,
    request: HookRequest,
) -> dict[str, str]:
    """The DSTU2 queries to try once when the server rejected the MedicationRequest search.

    Nothing in a patient-view call may tell a DSTU2 server apart: its 404/400 to an R4 type
    does. Every key that failed the same way and has a DSTU2 query is retried with it.
    """
    if fhir_version == "DSTU2":
        return {}
    medication = next((k for k in keys if k.resource_type == "MedicationRequest"), None)
    if medication is None:
        return {}
    first = results.get(medication.name)
    if first is None or first.resource is not None:
        return {}
    if first.status not in _UNKNOWN_TYPE_STATUSES:
        return {}
    retry: dict[str, str] = {}
    for key in keys:
        result = results.get(key.name)
        if (
            result is not None
            and result.resource is None
            and result.status in _UNKNOWN_TYPE_STATUSES
            and key.dstu2_template
        ):
            try:
                retry[key.name] = render_template(key.dstu2_template, request.context)
            except UnresolvedToken:
                continue
    return retry


def build_patient_context(
    request: HookRequest,
    make_client: ClientFactory,
    draft_orders_key: str | None,
    relevant: Relevance | None = None,
    *,
    keys: tuple[PrefetchKey, ...],
    rxnav: RxNavClient | None = None,
) -> PatientContext:
    """``relevant``: skip normalising prefetched facts it rules out (draft orders never are).

    ``keys``: the prefetch keys (their queries carry the knowledge base's LOINC codes).
    """
    issues: list[DataIssue] = []
    draft_resources = _draft_resources(request, draft_orders_key, issues)
    draft_lab_orders = _draft_lab_orders(request, draft_orders_key)
    fhir_version = fhir.detect_fhir_version(
        (r for _, r in draft_resources), request.hook, _prefetched_resources(request, keys)
    )
    fallback = FhirFallback(request, make_client)
    gathered = gather_prefetch(request, fallback, fhir_version, keys)
    resolved, fhir_version = gathered.resolved, gathered.fhir_version
    issues.extend(gathered.issues)
    patient_id = request.patient_id
    # "Patient/<id>" as resources name their subject; a "/" in the id would make that
    # reference mean another id (``reference_id`` keeps the last segment).
    own_reference = (
        f"Patient/{patient_id}"
        if isinstance(patient_id, str) and patient_id and "/" not in patient_id
        else None
    )

    # Medication resources that came with the data (_include, the draft Bundle), for orders
    # and statements that name their drug by medicationReference.
    referenced: dict[str, dict[str, Any]] = {}
    kept: list[tuple[str, str, dict[str, Any], str]] = []  # (key, origin, resource, where)
    patient = PatientInfo(id=patient_id)
    for key in keys:
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
            elif resource_type == "Medication" and key.resource_type in fhir.MEDICATION_TYPES:
                continue  # a supporting resource (_include), indexed below
            elif resource_type != key.resource_type:
                issues.append(
                    DataIssue(where, f"is a {resource_type}, not a {key.resource_type}; ignored")
                )
                continue
            if resource_type == "Patient":
                owner = resource.get("id")
            elif own_reference is not None and _refers_to(resource.get("subject"), own_reference):
                owner = patient_id  # the usual shape, told without taking the reference apart
            else:
                owner = fhir.subject_id(resource)
            if owner != patient_id:
                issues.append(DataIssue(where, "belongs to another patient (or to none); ignored"))
                continue
            kept.append((key.name, origin, resource, where))
        if key.resource_type in fhir.MEDICATION_TYPES:
            referenced.update(_medication_index(value))
    if draft_orders_key is not None and draft_orders_key in request.context:
        referenced.update(_medication_index(request.context[draft_orders_key]))
    _read_referenced_medications(
        [(where, r) for _, _, r, where in kept if r.get("resourceType") in fhir.MEDICATION_TYPES]
        + draft_resources,
        referenced,
        fallback,
        issues,
    )

    conditions: list[Condition] = []
    medications: list[Medication] = []
    rxnav_deadline = 0.0  # set by the first RxNav look-up: one budget for the whole call
    labs: list[Lab] = []
    # Per lab kind, the newest usable result so far.
    newest: dict[str, _LabCandidate] = {}
    # ``relevant`` skips a resource with usable codes (or drug text) that no rule can use. A
    # resource without them is read in full, so that it is reported exactly as without the
    # filter.
    for _, origin, resource, where in kept:
        resource_type = resource.get("resourceType")
        if resource_type == "Patient":
            patient = fhir.to_patient(resource, origin, patient_id)
        elif resource_type == "Condition":
            # Decided from the raw codes, before any Coding is built: most are skipped.
            if relevant is not None:
                coded, matters = fhir.first_code_match(
                    resource.get("code"), relevant.condition_code
                )
                if coded and not matters:
                    continue
            _append(conditions, fhir.to_condition(resource, origin), issues, where, "has no code")
        elif resource_type in fhir.MEDICATION_TYPES:
            codes = fhir.medication_codes(resource, referenced)
            named, ingredients, text = codes
            if (
                (named or ingredients or text)
                and relevant is not None
                and not relevant.medication(named + ingredients, text)
            ):
                if rxnav is None:
                    continue
                rxnav_deadline = rxnav_deadline or rxnav.deadline()
                codes = with_ingredients(codes, rxnav, rxnav_deadline, issues, where)
                if not relevant.medication(codes[0] + codes[1], text):
                    continue
            medication = fhir.to_medication(resource, origin, is_draft=False, codes=codes)
            _append(medications, medication, issues, where, "names no medication")
        elif resource_type == "Observation":
            if relevant is not None:
                coded, kind = fhir.first_code_match(resource.get("code"), relevant.lab_kind)
                if coded:
                    if kind is not None:
                        _keep_if_newest(newest, kind, origin, resource, where)
                    continue
            _append(labs, fhir.to_lab(resource, origin), issues, where, "has no code")
    # A chronic patient has hundreds of results of a kind: only the newest is normalised.
    for _, origin, resource, where in newest.values():
        _append(labs, fhir.to_lab(resource, origin), issues, where, "has no code")

    drafts: list[Medication] = []
    draft_json: dict[str, dict[str, Any]] = {}
    for where, resource in draft_resources:
        owner = fhir.subject_id(resource)
        if owner is not None and owner != patient_id:
            issues.append(DataIssue(where, "is a draft order for another patient; ignored"))
            continue
        repaired, notes = fhir.repair_draft(resource)
        issues.extend(DataIssue(where, note) for note in notes)
        if isinstance(repaired.get("id"), str):
            if fhir.nested_deeper_than(repaired, MAX_ECHOED_DRAFT_DEPTH):
                # Still read (its drug may need a warning), never copied into a suggestion.
                issues.append(
                    DataIssue(
                        where,
                        f"nests more than {MAX_ECHOED_DRAFT_DEPTH} levels deep (no FHIR "
                        "resource does); read, but no suggestion sends it back",
                    )
                )
            else:
                draft_json[f"{repaired['resourceType']}/{repaired['id']}"] = repaired
        # No strict (fhir.resources) check here: it cost a third of a typical call, and the
        # lenient reading reports what it cannot use. The cards check the drafts they send
        # back (``cards.builder.update_conformance_issues``), where conformance matters.
        codes = fhir.medication_codes(repaired, referenced)
        if (
            rxnav is not None
            and relevant is not None
            and not relevant.medication(codes[0] + codes[1], codes[2])
        ):
            rxnav_deadline = rxnav_deadline or rxnav.deadline()
            codes = with_ingredients(codes, rxnav, rxnav_deadline, issues, where)
        medication = fhir.to_medication(
            repaired, f"context:{draft_orders_key}", is_draft=True, codes=codes
        )
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
        selections=_selections(request),
        draft_resources=draft_json,
    )


def _refers_to(subject: Any, reference: str) -> bool:
    return subject.__class__ is dict and subject.get("reference") == reference


_LabCandidate = tuple[float, str, dict[str, Any], str]  # (recency, origin, resource, where)


def _keep_if_newest(
    newest: dict[str, _LabCandidate],
    kind: str,
    origin: str,
    resource: dict[str, Any],
    where: str,
) -> None:
    """Keep ``resource`` as its kind's result if it is usable and newer than the one kept.

    Exactly the result ``ClinicalPicture.latest_lab`` would pick from all of them: the newest
    by the same key, the first one read among equally new results.
    """
    if not fhir.lab_is_usable(resource):
        return
    recency = lab_recency(fhir.lab_effective(resource))
    kept = newest.get(kind)
    if kept is None or recency > kept[0]:
        newest[kind] = (recency, origin, resource, where)


def _prefetched_resources(
    request: HookRequest, keys: tuple[PrefetchKey, ...]
) -> Iterator[dict[str, Any]]:
    """Every prefetched resource, for telling the client's FHIR version."""
    for key in keys:
        value = request.prefetch.get(key.name)
        if isinstance(value, dict | list):
            for _, resource, _ in fhir.iter_resources(value, key.name):
                if resource is not None:
                    yield resource


def _medication_index(value: Any) -> dict[str, dict[str, Any]]:
    """Medication resources of a Bundle (or list) by ``"Medication/id"`` and entry fullUrl."""
    index: dict[str, dict[str, Any]] = {}
    bundles = value if isinstance(value, list) else [value]
    for bundle in bundles:
        if not isinstance(bundle, dict):
            continue
        if bundle.get("resourceType") == "Medication":
            entries: list[Any] = [{"resource": bundle}]
        elif bundle.get("resourceType") == "Bundle":
            entries = fhir.as_list(bundle.get("entry"))
        else:
            continue
        for entry in entries:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(resource, dict) or resource.get("resourceType") != "Medication":
                continue
            if isinstance(resource.get("id"), str) and resource["id"]:
                index[f"Medication/{resource['id']}"] = resource
            full_url = entry.get("fullUrl")
            if isinstance(full_url, str) and full_url:
                key = fhir.medication_reference_key({"reference": full_url})
                index[key or full_url] = resource
    return index


def _read_referenced_medications(
    resources: list[tuple[str, dict[str, Any]]],
    referenced: dict[str, dict[str, Any]],
    fallback: FhirFallback,
    issues: list[DataIssue],
) -> None:
    """Read from ``fhirServer`` the Medications referenced but not sent; add them to
    ``referenced``. A Medication that cannot be had is a data issue, never a 412: the order
    is still read (by its reference's display text, if any)."""
    wanted: dict[str, list[str]] = {}  # "Medication/id" → where it is referenced
    for where, resource in resources:
        if resource.get("medicationCodeableConcept") is not None:
            continue
        reference = resource.get("medicationReference")
        ref = fhir.medication_reference_key(reference)
        if ref is None:
            continue
        if ref not in referenced:
            wanted.setdefault(ref, []).append(where)
    if not wanted:
        return
    # The id comes from the client's data: quoted, so it can only ever name one resource.
    readable = {
        ref: f"Medication/{quote(ref.removeprefix('Medication/'), safe='')}"
        for ref in wanted
        if ref.startswith("Medication/")
    }
    problems: dict[str, str] = {
        ref: "is not in the data and cannot be read by itself"
        for ref in wanted
        if ref not in readable
    }
    if len(readable) > MAX_MEDICATION_READS:
        for ref in list(readable)[MAX_MEDICATION_READS:]:
            problems[ref] = f"is one of more than {MAX_MEDICATION_READS} to read; not read"
            del readable[ref]
    if readable and fallback.available:
        for ref, result in fallback.client().fetch_all(readable).items():
            fetched = result.resource
            if (
                fetched is not None
                and fetched.get("resourceType") == "Medication"
                and f"Medication/{fetched.get('id')}" == ref
            ):
                referenced[ref] = fetched
            else:
                problems[ref] = (
                    f"could not be read from fhirServer ({result.problem})"
                    if result.problem
                    else "was answered by fhirServer with something other than that Medication"
                )
    else:
        for ref in readable:
            problems[ref] = "is not in the data and the request has no fhirServer to read it"
    for ref, problem in problems.items():
        for where in wanted[ref]:
            issues.append(DataIssue(where, f"references {ref}, which {problem}; read without it"))


def _selections(request: HookRequest) -> tuple[str, ...]:
    """order-select's ``context.selections`` ("MedicationRequest/123"): the orders to advise
    on; the other drafts are context. Other hooks, or no usable list: every draft counts."""
    if request.hook != "order-select":
        return ()
    selections = request.context.get("selections")
    if not isinstance(selections, list):
        return ()
    return tuple(s.strip() for s in selections if isinstance(s, str) and s.strip())


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
