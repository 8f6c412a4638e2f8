"""In-memory FHIR R4 store and search used by the fixture server and the request generator.

Both the HTTP server (``app.py``) and ``build_requests.py`` answer queries through
``FixtureStore.read`` and ``FixtureStore.searchset``, so the prefetch written into the request
fixtures is exactly what a live fetch from the fixture server returns.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

from cds_service.resources import bundled_dir

Resource = dict[str, Any]

DEFAULT_COUNT = 50
MAX_COUNT = 500
# Our paging parameter; FHIR leaves the name to the server and clients only follow links.
OFFSET_PARAM = "_offset"

_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_PARTIAL_DATE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")
# FHIR escapes a literal comma in a search value as "\,"; only bare commas separate OR values.
_OR_SEPARATOR = re.compile(r"(?<!\\),")


class FhirError(Exception):
    """A request the server answers with an OperationOutcome instead of data."""

    def __init__(self, status: int, issue_code: str, diagnostics: str) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.issue_code = issue_code
        self.diagnostics = diagnostics

    def outcome(self) -> Resource:
        return operation_outcome(self.issue_code, self.diagnostics)


def operation_outcome(issue_code: str, diagnostics: str, severity: str = "error") -> Resource:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": issue_code, "diagnostics": diagnostics}],
    }


@dataclass(frozen=True)
class SearchParam:
    """One supported search parameter: how the CapabilityStatement names it and what it reads."""

    name: str
    type: str  # FHIR search parameter type: reference | token
    kind: str  # how it matches: id | reference | concept | code
    element: str  # the resource element it reads
    documentation: str


def _subject_params(what: str) -> tuple[SearchParam, ...]:
    return (
        SearchParam("patient", "reference", "reference", "subject",
                    f"The patient the {what} is about: Patient/x or x"),
        SearchParam("subject", "reference", "reference", "subject",
                    f"The subject of the {what}: Patient/x or x"),
    )


_ID_PARAM = SearchParam("_id", "token", "id", "id", "Logical id; comma = OR")

SEARCH_PARAMS: dict[str, tuple[SearchParam, ...]] = {
    "Patient": (_ID_PARAM,),
    "Condition": (
        _ID_PARAM,
        *_subject_params("condition"),
        SearchParam("code", "token", "concept", "code", "Condition.code: system|code, code, |code"),
        SearchParam("clinical-status", "token", "concept", "clinicalStatus",
                    "Condition.clinicalStatus code, e.g. active,recurrence,relapse"),
        SearchParam("verification-status", "token", "concept", "verificationStatus",
                    "Condition.verificationStatus code"),
    ),
    "MedicationRequest": (
        _ID_PARAM,
        *_subject_params("order"),
        SearchParam("code", "token", "concept", "medicationCodeableConcept",
                    "medicationCodeableConcept: system|code, code, |code"),
        SearchParam("status", "token", "code", "status", "MedicationRequest.status"),
        SearchParam("intent", "token", "code", "intent", "MedicationRequest.intent"),
    ),
    "MedicationStatement": (
        _ID_PARAM,
        *_subject_params("statement"),
        SearchParam("code", "token", "concept", "medicationCodeableConcept",
                    "medicationCodeableConcept: system|code, code, |code"),
        SearchParam("status", "token", "code", "status", "MedicationStatement.status"),
    ),
    "Observation": (
        _ID_PARAM,
        *_subject_params("observation"),
        SearchParam("code", "token", "concept", "code", "Observation.code: system|code, code"),
        SearchParam("status", "token", "code", "status", "Observation.status"),
    ),
}
SUPPORTED_TYPES = tuple(SEARCH_PARAMS)


def _observation_date(resource: Resource) -> datetime | None:
    value = resource.get("effectiveDateTime") or resource.get("effectiveInstant")
    if value is None and isinstance(resource.get("effectivePeriod"), dict):
        value = resource["effectivePeriod"].get("start")
    return parse_fhir_datetime(value) if isinstance(value, str) else None


# _sort fields we honour, per type; the others are ignored (and left out of the self link).
SORT_KEYS: dict[tuple[str, str], Callable[[Resource], datetime | None]] = {
    ("Observation", "date"): _observation_date,
}


def parse_fhir_datetime(value: str) -> datetime | None:
    """A FHIR date/dateTime/instant as an aware datetime; partial dates start their period."""
    match = _PARTIAL_DATE.fullmatch(value)
    if match:
        year, month, day = match.groups()
        return datetime(int(year), int(month or 1), int(day or 1), tzinfo=UTC)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True)
class SearchRequest:
    """A parsed type search: the filters used (ANDed; each a tuple of OR values) and paging."""

    resource_type: str
    filters: tuple[tuple[SearchParam, str, tuple[str, ...]], ...]  # (param, raw value, values)
    sort: tuple[str, ...]
    count: int
    count_given: bool
    offset: int

    def link_params(self, offset: int, with_count: bool) -> list[tuple[str, str]]:
        pairs = [(param.name, raw) for param, raw, _ in self.filters]
        if self.sort:
            pairs.append(("_sort", ",".join(self.sort)))
        if with_count:
            pairs.append(("_count", str(self.count)))
        if offset:
            pairs.append((OFFSET_PARAM, str(offset)))
        return pairs


def _non_negative_int(name: str, value: str) -> int:
    if not value.strip().isdigit():
        raise FhirError(400, "invalid", f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def parse_search(resource_type: str, params: Iterable[tuple[str, str]]) -> SearchRequest:
    """Read decoded query/form parameters; unknown parameters are ignored, like lenient servers."""
    if resource_type not in SEARCH_PARAMS:
        raise FhirError(404, "not-supported", f"resource type {resource_type!r} is not served")
    known = {param.name: param for param in SEARCH_PARAMS[resource_type]}
    filters: list[tuple[SearchParam, str, tuple[str, ...]]] = []
    sort: tuple[str, ...] = ()
    count, count_given, offset = DEFAULT_COUNT, False, 0
    for name, value in params:
        if name == "_count":
            count, count_given = min(_non_negative_int(name, value), MAX_COUNT), True
        elif name == OFFSET_PARAM:
            offset = _non_negative_int(name, value)
        elif name == "_sort":
            sort = tuple(
                field for field in (part.strip() for part in value.split(","))
                if (resource_type, field.removeprefix("-")) in SORT_KEYS
            )
        elif name in known and value:
            values = tuple(part.replace("\\,", ",") for part in _OR_SEPARATOR.split(value))
            filters.append((known[name], value, values))
    return SearchRequest(resource_type, tuple(filters), sort, count, count_given, offset)


def _split_reference(value: str) -> tuple[str | None, str]:
    """``Patient/x``, ``x`` or ``http://base/Patient/x`` → (type or None, id)."""
    parts = value.rstrip("/").split("/")
    if len(parts) >= 2:
        return parts[-2], parts[-1]
    return None, parts[-1]


def _reference_matches(resource: Resource, element: str, wanted: str, param_name: str) -> bool:
    reference = resource.get(element)
    if not isinstance(reference, dict) or not isinstance(reference.get("reference"), str):
        return False
    have_type, have_id = _split_reference(reference["reference"])
    want_type, want_id = _split_reference(wanted)
    # A bare id given to `patient` can only mean a Patient; `subject` may name any type.
    if want_type is None and param_name == "patient":
        want_type = "Patient"
    return have_id == want_id and (want_type is None or want_type == have_type)


def _token_matches_coding(coding: dict[str, Any], wanted: str) -> bool:
    if "|" in wanted:
        system, code = wanted.split("|", 1)
        # "|code" means a coding without a system; "system|" means any code of the system.
        if (coding.get("system") or "") != system:
            return False
        return not code or coding.get("code") == code
    return coding.get("code") == wanted


def _concept_matches(resource: Resource, element: str, wanted: str) -> bool:
    concept = resource.get(element)
    if not isinstance(concept, dict):
        return False
    codings = concept.get("coding")
    return isinstance(codings, list) and any(
        isinstance(coding, dict) and _token_matches_coding(coding, wanted) for coding in codings
    )


def _matches(resource: Resource, param: SearchParam, wanted: str) -> bool:
    if param.kind == "id":
        return resource.get("id") == wanted
    if param.kind == "reference":
        return _reference_matches(resource, param.element, wanted, param.name)
    if param.kind == "concept":
        return _concept_matches(resource, param.element, wanted)
    # A plain code element: a "system|" prefix adds nothing the element could contradict.
    return resource.get(param.element) == wanted.rpartition("|")[2]


class FixtureStore:
    """Resources by type and id, in the order they were loaded (the default result order)."""

    def __init__(self) -> None:
        self._resources: dict[str, dict[str, Resource]] = {}

    @classmethod
    def from_directory(cls, directory: Path | None = None) -> FixtureStore:
        """Load every ``*.json`` collection Bundle of ``directory`` (default: bundled patients)."""
        directory = directory or bundled_dir("fixtures") / "patients"
        store = cls()
        paths = sorted(directory.glob("*.json"))
        if not paths:
            raise FileNotFoundError(f"no patient bundles (*.json) in {directory}")
        for path in paths:
            with path.open(encoding="utf-8") as handle:
                bundle = json.load(handle)
            if bundle.get("resourceType") != "Bundle":
                raise ValueError(f"{path.name}: not a Bundle")
            for entry in bundle.get("entry", []):
                store.add(entry["resource"], origin=path.name)
        return store

    def add(self, resource: Resource, origin: str = "") -> None:
        resource_type, resource_id = resource.get("resourceType"), resource.get("id")
        if resource_type not in SEARCH_PARAMS:
            raise ValueError(f"{origin}: resource type {resource_type!r} is not served")
        if not isinstance(resource_id, str) or not _ID.fullmatch(resource_id):
            raise ValueError(f"{origin}: {resource_type} has no valid id")
        by_id = self._resources.setdefault(resource_type, {})
        if resource_id in by_id:
            raise ValueError(f"{origin}: duplicate id {resource_type}/{resource_id}")
        by_id[resource_id] = resource

    def counts(self) -> dict[str, int]:
        return {resource_type: len(by_id) for resource_type, by_id in self._resources.items()}

    def read(self, resource_type: str, resource_id: str) -> Resource:
        if resource_type not in SEARCH_PARAMS:
            raise FhirError(404, "not-supported", f"resource type {resource_type!r} is not served")
        resource = self._resources.get(resource_type, {}).get(resource_id)
        if resource is None:
            raise FhirError(404, "not-found", f"{resource_type}/{resource_id} is not known")
        # Callers may edit what they get (the generator down-converts); keep the store pristine.
        return copy.deepcopy(resource)

    def search(self, request: SearchRequest) -> list[Resource]:
        """All matches of a search, sorted, before paging."""
        matches = [
            resource
            for resource in self._resources.get(request.resource_type, {}).values()
            if all(
                any(_matches(resource, param, wanted) for wanted in values)
                for param, _, values in request.filters
            )
        ]
        for field in reversed(request.sort):
            key = SORT_KEYS[(request.resource_type, field.removeprefix("-"))]
            dated = [(key(resource), resource) for resource in matches]
            present = [(date, resource) for date, resource in dated if date is not None]
            # Python's sort stays stable with reverse=True, so ties keep the load order;
            # undated resources go last either way.
            present.sort(key=lambda item: item[0], reverse=field.startswith("-"))
            matches = [resource for _, resource in present]
            matches += [resource for date, resource in dated if date is None]
        return matches

    def searchset(
        self, resource_type: str, params: Sequence[tuple[str, str]], base_url: str
    ) -> Resource:
        """One page of a type search as a FHIR ``searchset`` Bundle with self/next links."""
        request = parse_search(resource_type, params)
        matches = self.search(request)
        page = matches[request.offset : request.offset + request.count]
        type_url = f"{base_url}/{resource_type}"
        links = [{
            "relation": "self",
            "url": _url(type_url, request.link_params(request.offset, request.count_given)),
        }]
        next_offset = request.offset + request.count
        if request.count and next_offset < len(matches):
            links.append({
                "relation": "next",
                "url": _url(type_url, request.link_params(next_offset, with_count=True)),
            })
        bundle: Resource = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(matches),
            "link": links,
        }
        if page:
            bundle["entry"] = [
                {
                    "fullUrl": f"{type_url}/{resource['id']}",
                    "resource": copy.deepcopy(resource),
                    "search": {"mode": "match"},
                }
                for resource in page
            ]
        return bundle

    def answer(self, relative_url: str, base_url: str) -> Resource:
        """A read (``Patient/x``) or a type search (``Condition?patient=x``), as the server does."""
        path, _, query = relative_url.partition("?")
        segments = [segment for segment in path.split("/") if segment]
        params = parse_qsl(query, keep_blank_values=True)
        if len(segments) == 2 and segments[1] != "_search" and not query:
            return self.read(segments[0], segments[1])
        if len(segments) == 1 or (len(segments) == 2 and segments[1] == "_search"):
            return self.searchset(segments[0], params, base_url)
        raise FhirError(400, "not-supported", f"cannot answer {relative_url!r}")


def _url(base: str, params: list[tuple[str, str]]) -> str:
    # ":/," stay readable; "|" is not allowed bare in a URL, so it goes out as %7C.
    return f"{base}?{urlencode(params, safe=':/,', quote_via=quote)}" if params else base
