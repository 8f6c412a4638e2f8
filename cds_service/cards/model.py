"""CDS Hooks 2.0 card model that can only produce conformant JSON.

Every constructor checks what the spec (and our stricter response schema) demand, so an
invalid card fails where it is built, in a unit test, rather than in an EHR. ``to_json``
omits every optional field that is empty: the spec forbids ``null``, ``""``, ``[]`` and
``{}`` anywhere in a response.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

Indicator = Literal["info", "warning", "critical"]
INDICATOR_RANK: dict[str, int] = {"info": 0, "warning": 1, "critical": 2}
MAX_SUMMARY_CHARS = 139  # the spec says "fewer than 140 characters"
# A card is read in five seconds: the project's budget for its markdown detail.
MAX_DETAIL_CHARS = 500


class CardError(ValueError):
    """A card or suggestion that would not be conformant."""


def _require_text(value: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise CardError(f"{what} must be a non-empty string")
    return value


@dataclass(frozen=True)
class CardCoding:
    system: str
    code: str
    display: str

    def __post_init__(self) -> None:
        _require_text(self.system, "coding.system")
        _require_text(self.code, "coding.code")
        _require_text(self.display, "coding.display")

    def to_json(self) -> dict[str, str]:
        return {"system": self.system, "code": self.code, "display": self.display}


@dataclass(frozen=True)
class Source:
    label: str
    url: str = ""
    icon: str = ""
    topic: CardCoding | None = None

    def __post_init__(self) -> None:
        _require_text(self.label, "source.label")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label}
        if self.url:
            out["url"] = self.url
        if self.icon:
            out["icon"] = self.icon
        if self.topic is not None:
            out["topic"] = self.topic.to_json()
        return out


@dataclass(frozen=True)
class Action:
    type: Literal["create", "update", "delete"]
    description: str
    resource: dict[str, Any] | None = None
    resource_id: str = ""

    def __post_init__(self) -> None:
        _require_text(self.description, "action.description")
        if self.type in ("create", "update"):
            if not self.resource or not isinstance(self.resource.get("resourceType"), str):
                raise CardError(f"a {self.type} action needs a FHIR resource with resourceType")
            if self.resource_id:
                raise CardError(f"a {self.type} action carries a resource, not a resourceId")
        elif self.type == "delete":
            if "/" not in self.resource_id:
                raise CardError("a delete action needs resourceId like 'MedicationRequest/123'")
            if self.resource is not None:
                raise CardError("a delete action carries a resourceId, not a resource")
        else:
            raise CardError(f"unknown action type {self.type!r}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "description": self.description}
        if self.resource is not None:
            out["resource"] = _prune(self.resource)
        if self.resource_id:
            out["resourceId"] = self.resource_id
        return out


@dataclass(frozen=True)
class Suggestion:
    label: str
    actions: tuple[Action, ...]
    is_recommended: bool = False
    uuid: str = field(default_factory=lambda: str(uuid.uuid4()))

    def __post_init__(self) -> None:
        _require_text(self.label, "suggestion.label")
        if not self.actions:
            raise CardError("a suggestion needs at least one action")

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "uuid": self.uuid,
            "isRecommended": self.is_recommended,
            "actions": [action.to_json() for action in self.actions],
        }


@dataclass(frozen=True)
class Link:
    label: str
    url: str
    type: Literal["absolute", "smart"] = "absolute"
    app_context: str = ""

    def __post_init__(self) -> None:
        _require_text(self.label, "link.label")
        _require_text(self.url, "link.url")
        if self.type not in ("absolute", "smart"):
            raise CardError(f"link.type must be absolute or smart, not {self.type!r}")
        if self.app_context and self.type != "smart":
            raise CardError("link.appContext is only for smart links")

    def to_json(self) -> dict[str, str]:
        out = {"label": self.label, "url": self.url, "type": self.type}
        if self.app_context:
            out["appContext"] = self.app_context
        return out


@dataclass(frozen=True)
class Card:
    summary: str
    indicator: Indicator
    source: Source
    detail: str = ""
    suggestions: tuple[Suggestion, ...] = ()
    selection_behavior: Literal["at-most-one", "any"] | None = None
    override_reasons: tuple[CardCoding, ...] = ()
    links: tuple[Link, ...] = ()
    uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    # Our own metadata under `extension` (reverse-domain key, as the spec asks).
    extension: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require_text(self.summary, "card.summary")
        if len(self.summary) > MAX_SUMMARY_CHARS:
            raise CardError(
                f"card.summary has {len(self.summary)} characters; fewer than 140 are allowed"
            )
        if len(self.detail) > MAX_DETAIL_CHARS:
            raise CardError(
                f"card.detail has {len(self.detail)} characters; at most {MAX_DETAIL_CHARS}"
            )
        if self.indicator not in INDICATOR_RANK:
            raise CardError(f"card.indicator must be info, warning or critical: {self.indicator!r}")
        if self.suggestions and self.selection_behavior is None:
            # Required by the spec whenever suggestions are present.
            object.__setattr__(self, "selection_behavior", "at-most-one")
        if self.selection_behavior not in (None, "at-most-one", "any"):
            raise CardError(f"unknown selectionBehavior {self.selection_behavior!r}")
        recommended = sum(1 for s in self.suggestions if s.is_recommended)
        if self.selection_behavior == "at-most-one" and recommended > 1:
            # The spec allows several recommended suggestions only with "any".
            raise CardError("with selectionBehavior at-most-one, recommend one suggestion at most")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "uuid": self.uuid,
            "summary": self.summary,
            "indicator": self.indicator,
            "source": self.source.to_json(),
        }
        if self.detail.strip():
            out["detail"] = self.detail
        if self.suggestions:
            out["suggestions"] = [s.to_json() for s in self.suggestions]
            out["selectionBehavior"] = self.selection_behavior
        if self.override_reasons:
            out["overrideReasons"] = [reason.to_json() for reason in self.override_reasons]
        if self.links:
            out["links"] = [link.to_json() for link in self.links]
        extension = _prune(self.extension)
        if extension:
            out["extension"] = extension
        return out


_EMPTY: tuple[Any, ...] = (None, "", [], {})


def _prune(value: Any) -> Any:
    """Drop None, "", [] and {} recursively (forbidden in CDS Hooks JSON)."""
    # A plain string, the commonest value, is kept unless empty without a call or comparisons.
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        for k, v in value.items():
            if type(v) is str:
                if v:
                    out[k] = v
            elif (v := _prune(v)) not in _EMPTY:
                out[k] = v
        return out
    if isinstance(value, list | tuple):
        items: list[Any] = []
        for v in value:
            if type(v) is str:
                if v:
                    items.append(v)
            elif (v := _prune(v)) not in _EMPTY:
                items.append(v)
        return items
    return value
