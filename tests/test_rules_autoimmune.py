"""Autoimmune guidance (rules/autoimmune.py), without Flask."""

from __future__ import annotations

from typing import Any

import pytest
from rule_builders import (
    CKD4,
    LEVOTHYROXINE,
    MG,
    MG_CITRATE_SOLN,
    MG_GLYCINATE_100,
    MG_OXIDE_400,
    MG_SULFATE_INJ,
    PYRIDOSTIGMINE,
    RA,
    condition,
    context,
    draft,
    egfr,
    medication,
    run,
    run_all,
    serum_mg,
)

from cds_service.context.model import Condition, Medication
from cds_service.rules import autoimmune

CITRATE = draft(MG_CITRATE_SOLN, dose=(10, "mL"), per_day=2)


@pytest.mark.parametrize(
    "diagnosis",
    [
        RA,
        condition("M32.9"),  # SLE
        condition("E06.3"),  # Hashimoto's
        condition("G35.B"),  # MS, FY2026 code: matched by the G35 prefix
        condition(snomed="24700007"),  # MS, SNOMED CT
        condition("M79.7"),  # fibromyalgia
        condition("M35.00"),  # Sjögren's
        condition("K50.90"),  # Crohn's: absorption
    ],
)
def test_info_card_for_autoimmune_related_conditions(diagnosis: Condition) -> None:
    [finding] = run(autoimmune.evaluate, context(conditions=[diagnosis], drafts=[CITRATE]))
    assert (finding.rule_id, finding.indicator) == ("autoimmune-guidance", "info")
    assert len(finding.summary) < 140
    for words in ("Which form for which aim", "Diet first", "Check levels", "glycinate", "malate"):
        assert words in finding.detail


def test_poor_fit_form_gets_a_switch_the_sandbox_can_apply() -> None:
    [finding] = run(autoimmune.evaluate, context(conditions=[RA], drafts=[CITRATE]))
    [proposal] = finding.proposals
    assert proposal.kind == "replace-medication" and proposal.order is CITRATE
    assert proposal.code is not None
    assert (proposal.code.code, proposal.code.system) == (
        "849497",
        "http://www.nlm.nih.gov/research/umls/rxnorm",
    )
    assert proposal.text == "magnesium glycinate 100 MG Oral Tablet"
    assert "not ideal for long-term use" in finding.summary
    assert any("comparison of magnesium forms" in u for u in finding.unverified)


@pytest.mark.parametrize(
    "order",
    [
        draft(MG_GLYCINATE_100, dose=(2, "{tbl}")),  # a recommended form
        draft(MG_OXIDE_400, dose=(400, "mg")),  # a form the source does not rate
        draft(text="Magnesium malate 500 mg capsule", dose=(2, "{capsule}")),  # text only
    ],
)
def test_no_switch_for_good_or_unrated_forms(order: Medication) -> None:
    [finding] = run(autoimmune.evaluate, context(conditions=[RA], drafts=[order]))
    assert finding.proposals == ()


def test_hashimoto_spacing_is_general_advice_without_thyroid_hormone_on_file() -> None:
    ctx = context(conditions=[condition("E06.3")], drafts=[draft(MG_OXIDE_400)])
    [finding] = run(autoimmune.evaluate, ctx)
    assert "Space magnesium from thyroid hormone replacement" in finding.detail


def test_hashimoto_with_levothyroxine_points_to_the_interaction_card_instead() -> None:
    # The chelation-interaction card carries the spacing and its one-click fix; saying it
    # again here would be noise.
    ctx = context(
        conditions=[condition("E06.3")],
        medications=[medication(LEVOTHYROXINE, text="levothyroxine 100 MCG Oral Tablet")],
        drafts=[draft(MG_OXIDE_400)],
    )
    [finding] = run(autoimmune.evaluate, ctx)
    assert "Space magnesium from thyroid hormone replacement" not in finding.detail
    assert "levothyroxine 100 MCG Oral Tablet is on file" in finding.detail
    assert "interaction card" in finding.detail


@pytest.mark.parametrize(
    "extra",
    [
        {"conditions": [RA, MG]},  # myasthenia gravis
        {"conditions": [RA], "medications": [medication(PYRIDOSTIGMINE)]},  # implied MG
        {"conditions": [RA, condition("G70.80")]},  # Lambert-Eaton
        {"conditions": [RA, CKD4]},  # severe kidney impairment
        {"conditions": [RA], "labs": [egfr(20)]},
        {"conditions": [RA], "labs": [serum_mg(2.9)]},  # already high
        {"conditions": [condition("I10")]},  # nothing autoimmune
    ],
)
def test_no_guidance_where_a_contraindication_speaks_or_nothing_applies(
    extra: dict[str, Any],
) -> None:
    assert run(autoimmune.evaluate, context(drafts=[CITRATE], **extra)) == []


def test_only_oral_orders_and_not_at_patient_view_or_signing() -> None:
    iv = draft(MG_SULFATE_INJ, route="iv")
    assert run(autoimmune.evaluate, context(conditions=[RA], drafts=[iv])) == []
    ctx = context(conditions=[RA], drafts=[CITRATE])
    assert run(autoimmune.evaluate, ctx, "patient-view") == []
    assert run_all(ctx, "order-sign") == []  # info-level advice is not repeated at signing
