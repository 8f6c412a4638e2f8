"""Gather: every FHIR resource a hook call has for its patient, still as JSON.

In order: the draft orders of the hook's context; the prefetch keys (what the client
prefetched, the rest fetched from ``fhirServer`` at once, a required key with no data a
``DataUnavailable``: HTTP 412); the resources that are this patient's, of the key's type;
and the Medication resources their ``medicationReference``s name (sent along, or read).
Nothing here reads what a resource says: ``context.normalise`` does that.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote

from cds_service.context import fhir_json
from cds_service.context.fhir_client import ClientFactory, FetchResult, FhirClient, next_link
from cds_service.context.fhir_json import LAB_ORDER_TYPES, MEDICATION_TYPES
from cds_service.context.model import DataIssue, DataUnavailable, MissingData
from cds_service.context.prefetch import PrefetchKey, UnresolvedToken, render_template

_ABSENT = object()
# Distinct Medication resources read one by one for unresolved medicationReferences; a chart
# (or a hostile prefetch) referencing thousands must not turn into thousands of requests.
MAX_MEDICATION_READS = 50
# A server that answers these to a MedicationRequest search does not know the type: DSTU2.
_UNKNOWN_TYPE_STATUSES = frozenset({400, 404})


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
    def issuer(self) -> str | None: ...  # the JWT issuer that authenticated the call

    @property
    def patient_id(self) -> str: ...


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
            self._client = self._make_client(
                self._request.fhir_server, self._request.access_token, self._request.issuer
            )
        return self._client


@dataclass(frozen=True)
class Found:
    """One resource of the patient's, where it was found and how it reached us."""

    key: str  # the prefetch key
    origin: str  # "prefetch:<key>" or "fhir:<key>"
    resource: dict[str, Any]
    where: str  # e.g. "prefetch.conditions.entry[3]"


@dataclass
class Gathered:
    """A hook call's data for its patient, as JSON, with what could not be used."""

    patient_id: str
    # The version the client speaks (DSTU2 also when its server turned out not to know
    # MedicationRequest).
    fhir_version: str
    found: list[Found]  # the patient's resources, in key order
    drafts: list[tuple[str, dict[str, Any]]]  # (where, draft medication order) of this patient
    draft_lab_orders: list[dict[str, Any]]  # draft ServiceRequests / ProcedureRequests
    # Medication resources by "Medication/id" (or entry fullUrl): sent along or read.
    medications: dict[str, dict[str, Any]]
    issues: list[DataIssue] = field(default_factory=list)
    # Required data that was sent, none of it this patient's (or usable at all).
    unusable: list[MissingData] = field(default_factory=list)


def gather(
    request: HookRequest,
    fallback: FhirFallback,
    keys: tuple[PrefetchKey, ...],
    draft_orders_key: str | None,
) -> Gathered:
    """Raises ``DataUnavailable`` when a required key has no data."""
    issues: list[DataIssue] = []
    drafts = _draft_resources(request, draft_orders_key, issues)
    fhir_version = fhir_json.detect_fhir_version(
        (r for _, r in drafts), request.hook, _prefetched_resources(request, keys)
    )
    resolved = resolve_keys(request, fallback, fhir_version, keys)
    issues.extend(resolved.issues)
    patient_id = request.patient_id
    # References resolve against every Bundle of the call: the prefetch and the drafts.
    bundles = [value for _, value in resolved.values.values()]
    if draft_orders_key in request.context:
        bundles.append(request.context[draft_orders_key])
    owner = _Ownership(patient_id, bundles)
    unusable: list[MissingData] = []
    found = _patients_resources(resolved.values, keys, owner, issues, unusable)
    drafts = _patients_drafts(drafts, owner, issues)

    # Medication resources that came with the data (_include, the draft Bundle), for orders
    # and statements that name their drug by medicationReference.
    medications: dict[str, dict[str, Any]] = {}
    for key in keys:
        if key.resource_type in MEDICATION_TYPES and key.name in resolved.values:
            medications.update(_medication_index(resolved.values[key.name][1]))
    if draft_orders_key is not None and draft_orders_key in request.context:
        medications.update(_medication_index(request.context[draft_orders_key]))
    _read_referenced_medications(
        [(f.where, f.resource) for f in found if f.resource.get("resourceType") in MEDICATION_TYPES]
        + drafts,
        medications,
        fallback,
        issues,
    )
    return Gathered(
        patient_id=patient_id,
        fhir_version=resolved.fhir_version,
        found=found,
        drafts=drafts,
        draft_lab_orders=_draft_lab_orders(request, draft_orders_key),
        medications=medications,
        issues=issues,
        unusable=unusable,
    )


@dataclass
class ResolvedKeys:
    values: dict[str, tuple[str, Any]]  # key → (origin, data)
    issues: list[DataIssue]
    fhir_version: str


def resolve_keys(
    request: HookRequest,
    fallback: FhirFallback,
    fhir_version: str,
    keys: tuple[PrefetchKey, ...],
) -> ResolvedKeys:
    """Each key → (origin, data). Raises DataUnavailable for a required key with no data.

    What the client prefetched is used; a key that is absent, or holds an OperationOutcome,
    is fetched from ``fhirServer`` (all such keys at once), and so are further pages of a
    prefetched searchset.
    """
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
    return ResolvedKeys(resolved, issues, fhir_version)


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


def _patients_resources(
    resolved: dict[str, tuple[str, Any]],
    keys: tuple[PrefetchKey, ...],
    owner: _Ownership,
    issues: list[DataIssue],
    unusable: list[MissingData],
) -> list[Found]:
    """The resources of each key that are of its type and this patient's, in key order.

    A required key that held resources, none of them this patient's, goes into ``unusable``:
    checks run without that data must not look like "no risk" (the rules say so on a card).
    """
    found: list[Found] = []
    for key in keys:
        if key.name not in resolved:
            continue
        origin, value = resolved[key.name]
        if value is None:
            continue
        seen = kept = 0
        for where, resource, problem in fhir_json.iter_resources(value, f"prefetch.{key.name}"):
            if resource is None:
                seen += 1
                issues.append(DataIssue(where, f"{problem}; ignored"))
                continue
            resource_type = resource.get("resourceType")
            if resource_type == "Medication" and key.resource_type in MEDICATION_TYPES:
                continue  # a supporting resource (_include), indexed by ``_medication_index``
            seen += 1
            if key.resource_type == "MedicationRequest" and resource_type == "MedicationOrder":
                pass  # DSTU2 servers answer MedicationRequest searches with MedicationOrder
            elif resource_type != key.resource_type:
                issues.append(
                    DataIssue(where, f"is a {resource_type}, not a {key.resource_type}; ignored")
                )
                continue
            if not owner.is_patients(resource):
                issues.append(DataIssue(where, "belongs to another patient (or to none); ignored"))
                continue
            kept += 1
            found.append(Found(key.name, origin, resource, where))
        if key.required and seen and not kept:
            unusable.append(
                MissingData(
                    key.name,
                    key.description,
                    f"none of the {seen} resources sent is this patient's {key.resource_type} "
                    "(another patient's, another type, or no resource; see the data issues)",
                )
            )
    return found


class _Ownership:
    """Whether a resource is about the call's patient, references read as FHIR reads them.

    ``Patient/<id>`` (relative, or absolute ending so), or the ``fullUrl`` under which a
    Bundle of the call holds this patient's Patient resource (``urn:uuid:...``, as Synthea
    and transaction Bundles write them). A ``urn:uuid:`` whose uuid is the patient id itself
    is the patient's too: no other resource can carry that uuid.
    """

    def __init__(self, patient_id: str, values: list[Any]) -> None:
        self.patient_id = patient_id
        self._values = values
        # "Patient/<id>" as resources name their subject; a "/" in the id would make that
        # reference mean another id (``reference_id`` keeps the last segment).
        self._own_reference = (
            f"Patient/{patient_id}"
            if isinstance(patient_id, str) and patient_id and "/" not in patient_id
            else None
        )
        self._full_urls: dict[str, str | None] | None = None  # fullUrl → Patient id

    def is_patients(self, resource: dict[str, Any]) -> bool:
        if resource.get("resourceType") == "Patient":
            return resource.get("id") == self.patient_id
        subject = resource.get("subject") if "subject" in resource else resource.get("patient")
        reference = subject.get("reference") if subject.__class__ is dict else subject
        if reference == self._own_reference and reference is not None:
            return True  # the usual shape, told without taking the reference apart
        if isinstance(reference, str) and reference.startswith("urn:"):
            return self._resolve_full_url(reference) == self.patient_id
        return fhir_json.subject_id(resource) == self.patient_id

    def _resolve_full_url(self, reference: str) -> str | None:
        if self._full_urls is None:
            self._full_urls = _patient_full_urls(self._values)
        if reference in self._full_urls:
            return self._full_urls[reference]
        if reference.lower() == f"urn:uuid:{self.patient_id}".lower() and _UUID.fullmatch(
            self.patient_id
        ):
            return self.patient_id
        return None


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def _patient_full_urls(values: list[Any]) -> dict[str, str | None]:
    """The fullUrl of every Patient entry in the call's Bundles → that Patient's id."""
    found: dict[str, str | None] = {}
    pending = list(values)
    while pending:
        value = pending.pop()
        if isinstance(value, list):
            pending.extend(value)
            continue
        if not isinstance(value, dict) or value.get("resourceType") != "Bundle":
            continue
        for entry in fhir_json.as_list(value.get("entry")):
            if not isinstance(entry, dict):
                continue
            resource, full_url = entry.get("resource"), entry.get("fullUrl")
            if (
                isinstance(full_url, str)
                and isinstance(resource, dict)
                and resource.get("resourceType") == "Patient"
            ):
                patient = resource.get("id")
                found[full_url] = patient if isinstance(patient, str) else None
    return found


def _patients_drafts(
    drafts: list[tuple[str, dict[str, Any]]],
    owner: _Ownership,
    issues: list[DataIssue],
) -> list[tuple[str, dict[str, Any]]]:
    """Draft orders that name no other patient (a draft may leave its subject out)."""
    kept: list[tuple[str, dict[str, Any]]] = []
    for where, resource in drafts:
        if fhir_json.subject_id(resource) is not None and not owner.is_patients(resource):
            issues.append(DataIssue(where, "is a draft order for another patient; ignored"))
        else:
            kept.append((where, resource))
    return kept


def _prefetched_resources(
    request: HookRequest, keys: tuple[PrefetchKey, ...]
) -> Iterator[dict[str, Any]]:
    """Every prefetched resource, for telling the client's FHIR version."""
    for key in keys:
        value = request.prefetch.get(key.name)
        if isinstance(value, dict | list):
            for _, resource, _ in fhir_json.iter_resources(value, key.name):
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
            entries = fhir_json.as_list(bundle.get("entry"))
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
                key = fhir_json.medication_reference_key({"reference": full_url})
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
        ref = fhir_json.medication_reference_key(reference)
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


def _draft_lab_orders(request: HookRequest, key: str | None) -> list[dict[str, Any]]:
    """Lab orders among the drafts; problems with entries are reported by _draft_resources."""
    if key is None or key not in request.context:
        return []
    return [
        resource
        for _, resource, _ in fhir_json.iter_resources(request.context[key], f"context.{key}")
        if resource is not None and resource.get("resourceType") in LAB_ORDER_TYPES
    ]


def _draft_resources(
    request: HookRequest, key: str | None, issues: list[DataIssue]
) -> list[tuple[str, dict[str, Any]]]:
    if key is None or key not in request.context:
        return []
    out: list[tuple[str, dict[str, Any]]] = []
    for where, resource, problem in fhir_json.iter_resources(
        request.context[key], f"context.{key}"
    ):
        if resource is None:
            issues.append(DataIssue(where, f"{problem}; ignored"))
        elif resource.get("resourceType") in MEDICATION_TYPES:
            out.append((where, resource))
    return out
