"""How facts are worded on a card (rules/describe.py): units, rounding, names, sentence case."""

from __future__ import annotations

import pytest
from rule_builders import SERUM_MG_MASS, context, draft, egfr, lab, picture, serum_mg

from cds_service.rules.describe import (
    clinical_name,
    frequency_text,
    lab_text,
    lab_value_text,
    mid_sentence,
    order_text,
    unit_text,
)


@pytest.mark.parametrize(
    ("unit", "words"),
    [
        ("mL/min/{1.73_m2}", "mL/min/1.73 m²"),
        ("{pill}", "pill"),
        ("{tbl}", "tablet"),
        ("ug", "mcg"),
        ("mg/dL", "mg/dL"),
        ("{puff}/d", "puff/d"),
    ],
)
def test_units_read_as_a_clinician_writes_them(unit: str, words: str) -> None:
    assert unit_text(unit) == words


def test_values_are_rounded_as_read() -> None:
    assert lab_value_text(egfr(22.4), "egfr") == "22 mL/min/1.73 m²"
    assert lab_value_text(serum_mg(2.66), "serum-magnesium") == "2.7 mg/dL"
    mmol = lab(SERUM_MG_MASS, 1.3, "mmol/L")
    assert lab_value_text(mmol, "serum-magnesium") == "1.30 mmol/L"
    written = lab_text(egfr(38, "2026-11-22"), "eGFR", "egfr")
    assert written == "eGFR 38 mL/min/1.73 m² on 2026-11-22"


def test_names_mid_sentence_keep_eponyms_and_acronyms() -> None:
    assert mid_sentence("End-stage renal disease") == "end-stage renal disease"
    assert mid_sentence("Hashimoto's thyroiditis") == "Hashimoto's thyroiditis"
    assert mid_sentence("IV magnesium") == "IV magnesium"
    rxnorm = "magnesium oxide 400 MG Oral Tablet"
    assert clinical_name(rxnorm) == "magnesium oxide 400 mg oral tablet"
    assert clinical_name("Myasthenia gravis (disorder)") == "Myasthenia gravis"


@pytest.mark.parametrize(
    "name",
    ["Mag-Ox 400", "Lambert-Eaton syndrome", "CIPRO 250 mg TABS", "Rolaids Ultra Strength tablet"],
)
def test_proper_names_keep_their_capital_mid_sentence(name: str) -> None:
    assert mid_sentence(name) == name


def test_a_brand_name_the_knowledge_holds_keeps_its_capital() -> None:
    for name, written in [
        ("Rolaids chewable tablet", "Rolaids chewable tablet"),
        ("Magnesium oxide 400 mg tablet", "magnesium oxide 400 mg tablet"),
    ]:
        fact = picture(context(drafts=[draft(text=name)])).drafts[0]
        assert order_text(fact).startswith(written)


@pytest.mark.parametrize(
    ("per_day", "words"),
    [(1, "once a day"), (2, "twice a day"), (3, "3 times a day"), (4, "4 times a day"),
     (6, "every 4 hours"), (24, "every hour"), (5, "5 times a day")],
)
def test_frequent_doses_read_as_an_interval(per_day: float, words: str) -> None:
    assert frequency_text(per_day) == words
