"""The cards layer's fast paths give exactly what the plain definitions give: card and
suggestion uuids are the uuid5 values, and pruning drops exactly the empty values."""

from __future__ import annotations

import random
import uuid
from typing import Any

import pytest

from cds_service.cards.builder import _CARD_NAMESPACE, _uuid5, card_uuid, suggestion_uuid
from cds_service.cards.model import _prune
from cds_service.context.model import Coding
from cds_service.rules.findings import Proposal

NAMES = [
    "",
    "hook-1|myasthenia-magnesium:MedicationRequest/draft-1",
    "d3b07384-d9a0-4c9b-8e5a-000000000000|magnesium-excretion:order:MedicationRequest/x#draft-0",
    "ünïcödé|Magnesiumoxid — 400 mg|日本語",
    "x" * 5000,
]


@pytest.mark.parametrize("name", NAMES)
def test_uuid5_matches_the_standard_library(name: str) -> None:
    for namespace in (
        _CARD_NAMESPACE,
        uuid.NAMESPACE_URL,
        uuid.UUID(int=0),
        uuid.UUID(int=-1 % 2**128),
    ):
        assert _uuid5(namespace.bytes, name) == str(uuid.uuid5(namespace, name))


@pytest.mark.parametrize("name", NAMES)
def test_card_and_suggestion_uuids_are_the_uuid5_values(name: str) -> None:
    card = card_uuid("hook-instance", name)
    assert card == str(uuid.uuid5(_CARD_NAMESPACE, f"hook-instance|{name}"))
    proposal = Proposal(
        kind="order-lab", label=name or "Order", code=Coding("http://loinc.org", "19123-9", "")
    )
    expected = uuid.uuid5(uuid.UUID(card), f"order-lab||http://loinc.org|19123-9|{proposal.label}")
    assert suggestion_uuid(card, proposal) == str(expected)


def _reference_prune(value: Any) -> Any:
    """The straightforward definition the card model's ``_prune`` must keep to."""
    if isinstance(value, dict):
        pruned = {k: _reference_prune(v) for k, v in value.items()}
        return {k: v for k, v in pruned.items() if v not in (None, "", [], {})}
    if isinstance(value, list | tuple):
        items = [_reference_prune(v) for v in value]
        return [v for v in items if v not in (None, "", [], {})]
    return value


class _Text(str):
    pass


_ATOMS: list[Any] = [None, "", "x", _Text(""), _Text("y"), 0, 0.0, -0.0, False, True, [], {}, ()]


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    if depth > 3 or rng.random() < 0.4:
        return rng.choice(_ATOMS)
    size = rng.randint(0, 4)
    kind = rng.random()
    if kind < 0.4:
        return {rng.choice("abcde"): _random_json(rng, depth + 1) for _ in range(size)}
    items = [_random_json(rng, depth + 1) for _ in range(size)]
    return items if kind < 0.8 else tuple(items)


def test_prune_drops_exactly_the_empty_values() -> None:
    rng = random.Random(7)
    for _ in range(5000):
        value = _random_json(rng)
        assert repr(_prune(value)) == repr(_reference_prune(value))
    nested = {"a": {"b": ["", None, {}, [], {"c": ""}], "d": "kept"}, "e": (0, False, "")}
    assert _prune(nested) == {"a": {"d": "kept"}, "e": [0, False]}
