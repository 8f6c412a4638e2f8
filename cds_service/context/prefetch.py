"""Prefetch templates: rendering the CDS Hooks 2.0 tokens into FHIR queries."""

from __future__ import annotations

import re
from collections.abc import Mapping
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
