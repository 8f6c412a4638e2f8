"""The structure of FHIR JSON, before any fact is read from it: Bundles and their entries,
references, and which FHIR version the client speaks.

Shared by gathering (``context.gather``: which resources a call holds and whose they are) and
normalising (``context.normalise``: what they say). Lenient like both: never raises.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

MEDICATION_TYPES = frozenset({"MedicationRequest", "MedicationStatement", "MedicationOrder"})
# Draft laboratory orders: R4 ServiceRequest, STU3 ProcedureRequest (same code/status shape).
LAB_ORDER_TYPES = frozenset({"ServiceRequest", "ProcedureRequest"})


def as_list(value: Any) -> list[Any]:
    """FHIR arrays, tolerating a single object (or nothing) where an array belongs."""
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def reference_id(reference: Any) -> str | None:
    """``{"reference": "Patient/123"}`` (or a bare string) → ``"123"``."""
    ref = reference.get("reference") if isinstance(reference, dict) else reference
    if not isinstance(ref, str) or not ref:
        return None
    return ref.rstrip("/").split("/")[-1] if "/" in ref else ref


def subject_id(resource: dict[str, Any]) -> str | None:
    """The patient a resource is about: R4/STU3 ``subject``, DSTU2 ``patient``."""
    for key in ("subject", "patient"):
        if key in resource:
            return reference_id(resource.get(key))
    return None


def iter_resources(
    value: Any, where: str
) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    """Resources in a prefetch/fetch value or a context Bundle, with their location.

    Yields ``(location, resource, problem)``: a Bundle's entries (with or without
    ``Bundle.type``), a lone resource, or a list of either. OperationOutcome entries that a
    server adds to a searchset (``search.mode: outcome``) are skipped silently.
    """
    if isinstance(value, list):
        for index, item in enumerate(value):
            yield from iter_resources(item, f"{where}[{index}]")
        return
    if not isinstance(value, dict):
        yield where, None, "is not a FHIR resource or Bundle"
        return
    if value.get("resourceType") != "Bundle":
        yield where, value, None
        return
    for index, entry in enumerate(as_list(value.get("entry"))):
        location = f"{where}.entry[{index}]"
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            yield location, None, "has no resource"
            continue
        if resource.get("resourceType") == "OperationOutcome":
            continue
        yield location, resource, None


def medication_reference_key(reference: Any) -> str | None:
    """``"Medication/x"`` for a (relative or absolute, versioned or not) reference to a
    Medication resource, else None (contained ``#x`` references are resolved elsewhere)."""
    ref = reference.get("reference") if isinstance(reference, dict) else None
    if not isinstance(ref, str) or ref.startswith("#"):
        return None
    if ref.startswith("urn:uuid:"):
        return ref  # a Bundle entry's fullUrl
    parts = [part for part in ref.split("?")[0].split("/") if part]
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) >= 2 and parts[-2] == "Medication" and parts[-1]:
        return f"Medication/{parts[-1]}"
    return None


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Do dicts and lists nest more than ``limit`` levels in ``value``? Iterative, so safe at
    any depth (the JSON parser accepts up to 1,024 levels; copying such a value recursively
    would exhaust Python's stack)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def detect_fhir_version(
    resources: Iterable[dict[str, Any]],
    hook: str,
    prefetched: Iterable[dict[str, Any]] = (),
) -> str:
    """R4 unless the draft orders look DSTU2 (MedicationOrder) or STU3.

    Without a telling draft order (patient-view has none), the prefetched resources decide:
    a DSTU2 server's answers must be recognised, or the fallback asks it for types it lacks.
    """
    resources = list(resources)
    if any(r.get("resourceType") == "MedicationOrder" for r in resources):
        return "DSTU2"
    found = _draft_version(resources)
    if found is not None:
        return found
    prefetched = list(prefetched)
    if any(_looks_dstu2(r) for r in prefetched):
        return "DSTU2"
    found = _draft_version([r for r in prefetched if r.get("resourceType") == "MedicationRequest"])
    if found is not None:
        return found
    return "STU3" if hook == "medication-prescribe" else "R4"


def _looks_dstu2(resource: dict[str, Any]) -> bool:
    """MedicationOrder, or a Condition naming its patient by ``patient`` (``subject`` since
    STU3) with a plain-code ``clinicalStatus`` (a CodeableConcept in R4)."""
    resource_type = resource.get("resourceType")
    if resource_type == "MedicationOrder":
        return True
    return (
        resource_type == "Condition"
        and "patient" in resource
        and "subject" not in resource
        and isinstance(resource.get("clinicalStatus", ""), str)
    )


def _draft_version(resources: list[dict[str, Any]]) -> str | None:
    """R4 or STU3 from the shape of medication orders, None when they do not tell."""
    for resource in resources:
        for instruction in as_list(resource.get("dosageInstruction")):
            if isinstance(instruction, dict):
                if "doseAndRate" in instruction:
                    return "R4"
                if "doseQuantity" in instruction or "doseRange" in instruction:
                    return "STU3"
        if "context" in resource and "encounter" not in resource:
            return "STU3"
    return None
