"""The parsed hook request handed from the protocol layer to the patient-context layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class HookRequest:
    hook: str
    hook_instance: str
    context: dict[str, Any]
    fhir_server: str | None = None
    # The EHR's access token: transient, never logged or stored.
    access_token: str | None = field(default=None, repr=False)
    prefetch: dict[str, Any] = field(default_factory=dict)
    # The trusted JWT issuer that authenticated the call (None with authentication off): its
    # entry may list the FHIR servers it may send the service to.
    issuer: str | None = None

    @property
    def patient_id(self) -> str:
        return str(self.context.get("patientId", ""))

    @classmethod
    def from_json(cls, body: dict[str, Any], issuer: str | None = None) -> HookRequest:
        """From a body that already passed ``schemas/hook-request.schema.json``."""
        authorization = body.get("fhirAuthorization")
        token = authorization.get("access_token") if isinstance(authorization, dict) else None
        prefetch = body.get("prefetch")
        return cls(
            hook=body["hook"],
            hook_instance=body["hookInstance"],
            context=body["context"],
            fhir_server=body.get("fhirServer"),
            access_token=token,
            prefetch=prefetch if isinstance(prefetch, dict) else {},
            issuer=issuer,
        )
