"""The card model refuses to build anything a CDS client could reject."""

from __future__ import annotations

import pytest
from jsonschema import Draft202012Validator

from cds_service.cards.model import (
    Action,
    Card,
    CardCoding,
    CardError,
    Link,
    Source,
    Suggestion,
)
from cds_service.resources import load_schema

RESPONSE = Draft202012Validator(load_schema("response.schema.json"))
SOURCE = Source(label="Magnesium sulfate injection label", url="https://example.org/label")


def _delete(resource_id: str = "MedicationRequest/draft-1") -> Action:
    return Action("delete", "Remove the draft order", resource_id=resource_id)


def test_full_card_is_conformant_and_has_no_empty_values() -> None:
    card = Card(
        summary="Avoid magnesium in myasthenia gravis",
        indicator="critical",
        source=Source(label="Label", topic=CardCoding("urn:magnesium-cds:rule", "r1", "Rule one")),
        detail="**why**",
        suggestions=(Suggestion("Remove the order", (_delete(),), is_recommended=True),),
        override_reasons=(CardCoding("urn:x", "c", "Because"),),
        links=(Link("Label", "https://example.org"),),
        extension={"org.magnesium-cds": {"ruleId": "r1", "empty": "", "none": None, "list": []}},
    )
    body = card.to_json()
    assert not list(RESPONSE.iter_errors({"cards": [body]}))
    assert body["selectionBehavior"] == "at-most-one"
    assert body["extension"] == {"org.magnesium-cds": {"ruleId": "r1"}}
    assert body["suggestions"][0]["actions"][0] == {
        "type": "delete",
        "description": "Remove the draft order",
        "resourceId": "MedicationRequest/draft-1",
    }


def test_minimal_card_omits_optional_fields() -> None:
    body = Card(summary="s", indicator="info", source=SOURCE).to_json()
    assert set(body) == {"uuid", "summary", "indicator", "source"}
    assert not list(RESPONSE.iter_errors({"cards": [body]}))


@pytest.mark.parametrize(
    "build",
    [
        lambda: Card(summary="x" * 140, indicator="info", source=SOURCE),
        lambda: Card(summary="s", indicator="info", source=SOURCE, detail="x" * 501),
        lambda: Card(summary=" ", indicator="info", source=SOURCE),
        lambda: Card(summary="s", indicator="urgent", source=SOURCE),  # type: ignore[arg-type]
        lambda: Source(label=""),
        lambda: Action("delete", "Remove", resource_id="draft-1"),
        lambda: Action("delete", "Remove", resource={"resourceType": "MedicationRequest"}),
        lambda: Action("create", "Order", resource={"status": "draft"}),
        lambda: Action("update", "", resource={"resourceType": "MedicationRequest"}),
        lambda: Suggestion("Do it", ()),
        lambda: CardCoding("urn:x", "c", ""),
        lambda: Link("l", "https://x", type="absolute", app_context="ctx"),
        lambda: Card(
            summary="s",
            indicator="info",
            source=SOURCE,
            selection_behavior="at-most-one",
            suggestions=(
                Suggestion("a", (_delete(),), is_recommended=True),
                Suggestion("b", (_delete("MedicationRequest/2"),), is_recommended=True),
            ),
        ),
    ],
    ids=[
        "summary-140",
        "detail-501",
        "summary-blank",
        "bad-indicator",
        "source-without-label",
        "delete-without-type-in-id",
        "delete-with-resource",
        "create-without-resourceType",
        "action-without-description",
        "suggestion-without-actions",
        "override-without-display",
        "appContext-on-absolute-link",
        "two-recommended-at-most-one",
    ],
)
def test_nonconformant_parts_are_refused(build) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CardError):
        build()
