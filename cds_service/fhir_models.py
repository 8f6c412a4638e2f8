"""The strict FHIR model check (fhir.resources) of what the service sends back to the EHR.

The request path reads FHIR leniently (``context.normalise``); only a draft order that an
update suggestion hands back is held to the model of the client's FHIR version, because the
EHR will apply it as it is. fhir.resources builds its model classes on first use (130-290 ms
for a MedicationRequest), so ``preload_models`` loads them when a worker starts, not in the
first call that needs them.
"""

from __future__ import annotations

import functools
import typing
from typing import Any

from pydantic import ValidationError

# The resource types an update suggestion can send back (draft medication orders).
CHECKED_TYPES = ("MedicationRequest",)
CHECKED_VERSIONS = ("R4", "STU3")

_MODEL_CACHE: dict[tuple[str, str], Any] = {}


def model_problems(resource: dict[str, Any], fhir_version: str) -> list[str]:
    """What the fhir.resources model of this FHIR version rejects (empty list = valid)."""
    resource_type = resource.get("resourceType")
    if fhir_version == "DSTU2" or not isinstance(resource_type, str):
        return []  # fhir.resources has no DSTU2 models; lenient extraction only
    model_class = _model_class(fhir_version, resource_type)
    if model_class is None:
        return []
    try:
        model_class.model_validate(resource)
    except ValidationError as exc:
        return [
            f"{'.'.join(str(part) for part in error['loc']) or resource_type}: {error['msg']}"
            for error in exc.errors()[:5]
        ]
    except (TypeError, ValueError) as exc:
        return [str(exc)[:200]]
    except KeyError as exc:  # fhir_core: a contained resource of a type it does not know
        return [f"unknown resource type ({exc})"[:200]]
    return []


@functools.cache  # once per process: every app created after the first finds them loaded
def preload_models() -> None:
    """Import every model class ``model_problems`` may need for the resource types it checks.

    fhir.resources imports the class of each element type (Dosage, Timing, Coding, ...) the
    first time a value of it is validated; this walks the models' fields instead, so that no
    call pays for an import."""
    seen: set[Any] = set()
    for fhir_version in CHECKED_VERSIONS:
        for resource_type in CHECKED_TYPES:
            model_class = _model_class(fhir_version, resource_type)
            if model_class is not None:
                _import_element_models(model_class, seen)


def _import_element_models(model_class: Any, seen: set[Any]) -> None:
    for field in model_class.model_fields.values():
        pending = [field.annotation]
        while pending:
            annotation = pending.pop()
            pending.extend(typing.get_args(annotation))  # Optional[List[X]] → X
            # fhir_core's element types name their model class and import it on demand.
            get_model_class = getattr(annotation, "get_model_klass", None)
            if get_model_class is None or annotation in seen:
                continue
            seen.add(annotation)
            try:
                element_class = get_model_class()
            except (ImportError, AttributeError, ValueError):
                continue  # an abstract type (Resource): its subclasses load when used
            _import_element_models(element_class, seen)


def _model_class(fhir_version: str, resource_type: str) -> Any:
    key = (fhir_version, resource_type)
    if key not in _MODEL_CACHE:
        try:
            if fhir_version == "STU3":
                from fhir.resources.STU3 import get_fhir_model_class
            else:
                from fhir.resources.R4B import get_fhir_model_class
            _MODEL_CACHE[key] = get_fhir_model_class(resource_type)
        except (KeyError, ValueError, ImportError):
            _MODEL_CACHE[key] = None
    return _MODEL_CACHE[key]
