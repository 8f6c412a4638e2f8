"""The strict FHIR model check (fhir.resources) of what the service sends back to the EHR.

The request path reads FHIR leniently (``context.normalise``); only a draft order that an
update suggestion hands back is held to the model of the client's FHIR version, because the
EHR will apply it as it is. fhir.resources builds its model classes on first use (130-290 ms
for a MedicationRequest), so ``preload_models`` loads them when a worker starts, not in the
first call that needs them.
"""

from __future__ import annotations

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


def preload_models() -> None:
    """Import and build the model classes ``model_problems`` uses, and validate one minimal
    resource with each, so that pydantic's lazily built validators exist before any call."""
    for fhir_version in CHECKED_VERSIONS:
        for resource_type in CHECKED_TYPES:
            model_problems(_MINIMAL[resource_type], fhir_version)


_MINIMAL: dict[str, dict[str, Any]] = {
    "MedicationRequest": {
        "resourceType": "MedicationRequest",
        "id": "preload",
        "status": "draft",
        "intent": "order",
        "subject": {"reference": "Patient/preload"},
        "medicationCodeableConcept": {"text": "preload"},
        "dosageInstruction": [{"text": "preload", "timing": {"repeat": {"count": 1}}}],
    },
}


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
