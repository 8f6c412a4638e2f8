"""FHIR value types every layer shares (context, knowledge, rules, cards).

Plain frozen dataclasses with no behaviour and no imports from the layers: knowledge reads
codes in these terms without depending on the context layer, and the context layer builds
them from the client's JSON.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Coding:
    system: str  # canonical URI, e.g. "http://www.nlm.nih.gov/research/umls/rxnorm"
    code: str
    display: str = ""


@dataclass(frozen=True)
class Quantity:
    value: float
    unit: str = ""  # UCUM code when known, else the text unit
