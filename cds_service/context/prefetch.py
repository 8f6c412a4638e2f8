"""Prefetch keys and templates: what the context needs, and rendering the CDS Hooks 2.0 tokens
into FHIR queries."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

_TOKEN = re.compile(r"\{\{\s*([A-Za-z0-9_.]+)\s*\}\}")
_USER_TOKENS = {
    "userPractitionerId": "Practitioner",
    "userPractitionerRoleId": "PractitionerRole",
    "userPatientId": "Patient",
    "userRelatedPersonId": "RelatedPerson",
}


class UnresolvedToken(ValueError):
    """A template names a token the hook context does not supply."""


def token_values(context: Mapping[str, Any]) -> dict[str, str]:
    """The values of every token a template may use, for one hook context."""
    values: dict[str, str] = {}
    for key, value in context.items():
        # Only primitive context fields may be used in a 2.0 prefetch token.
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            values[f"context.{key}"] = str(value)
    user_id = context.get("userId")
    if isinstance(user_id, str) and "/" in user_id:
        resource_type, _, resource_id = user_id.partition("/")
        for token, expected_type in _USER_TOKENS.items():
            if resource_type == expected_type and resource_id:
                values[token] = resource_id
    return values


def render_template(template: str, context: Mapping[str, Any]) -> str:
    """``"Patient/{{context.patientId}}"`` → ``"Patient/123"``; raises UnresolvedToken."""
    values = token_values(context)

    def substitute(match: re.Match[str]) -> str:
        token = match.group(1)
        if token not in values:
            raise UnresolvedToken(f"prefetch token {{{{{token}}}}} has no value in the context")
        return values[token]

    return _TOKEN.sub(substitute, template)


# --- the prefetch keys ----------------------------------------------------------------------

# Per searchset page: enough for a typical chart in one page; larger charts are paged
# (``link[next]``) by the fallback, bounded by ``CDS_FHIR_MAX_PAGES``.
PAGE_SIZE = 100


@dataclass(frozen=True)
class PrefetchKey:
    """One datum the patient context needs, with the FHIR query that gets it.

    The key names are also the prefetch keys the services advertise at discovery.
    ``required``: without it the rules cannot run (HTTP 412 when it can be neither prefetched
    nor fetched).
    """

    name: str
    template: str
    resource_type: str
    required: bool
    description: str
    # The query used instead when the client speaks DSTU2 (the public sandbox's default
    # server): no MedicationRequest there, and Condition has no clinical-status parameter.
    dstu2_template: str | None = None

    def template_for(self, fhir_version: str) -> str:
        return (
            self.dstu2_template
            if fhir_version == "DSTU2" and self.dstu2_template
            else self.template
        )


def prefetch_keys(observation_loinc_codes: Iterable[str]) -> tuple[PrefetchKey, ...]:
    """The keys, with the Observation query asking for exactly these LOINC codes.

    The codes come from the knowledge base's lab groups (see ``protocol.services``), so the
    query can never drift from what the rules read.
    """
    codes = ",".join(f"http://loinc.org|{code}" for code in dict.fromkeys(observation_loinc_codes))
    patient = "{{context.patientId}}"
    return (
        PrefetchKey(
            "patient",
            f"Patient/{patient}",
            "Patient",
            True,
            "the patient (birth date and sex for dose limits)",
        ),
        PrefetchKey(
            "conditions",
            f"Condition?patient={patient}"
            "&clinical-status=active,recurrence,relapse,remission,inactive"
            f"&_count={PAGE_SIZE}",
            "Condition",
            True,
            "current, remission and inactive conditions (myasthenia gravis stays known)",
            # clinical-status arrived in STU3; a DSTU2 server may reject it as unknown.
            dstu2_template=f"Condition?patient={patient}&_count={PAGE_SIZE}",
        ),
        PrefetchKey(
            "medicationRequests",
            # _include: most R4 EHRs name the drug by medicationReference, so the Medication
            # resources come along in the same answer instead of one read each.
            f"MedicationRequest?patient={patient}&status=active"
            f"&_include=MedicationRequest:medication&_count={PAGE_SIZE}",
            "MedicationRequest",
            True,
            "active medication orders (interacting drugs, myasthenia therapy, magnesium)",
            dstu2_template=f"MedicationOrder?patient={patient}&status=active"
            f"&_include=MedicationOrder:medication&_count={PAGE_SIZE}",
        ),
        PrefetchKey(
            "medicationStatements",
            f"MedicationStatement?patient={patient}&status=active"
            f"&_include=MedicationStatement:medication&_count={PAGE_SIZE}",
            "MedicationStatement",
            False,
            "medications the patient reports taking (supplements bought over the counter)",
        ),
        PrefetchKey(
            "observations",
            # Every parameter here (patient, code, _sort=-date, _count) is DSTU2 core too.
            f"Observation?patient={patient}&code={codes}&_sort=-date&_count={PAGE_SIZE}",
            "Observation",
            True,
            "recent serum magnesium, eGFR and creatinine results",
        ),
    )
