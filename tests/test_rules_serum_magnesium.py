"""Serum magnesium high or low (rules/serum_magnesium.py and derived.serum_magnesium)."""

from __future__ import annotations

import pytest
from rule_builders import (
    CKD4,
    KB,
    MG,
    MG_OXIDE_400,
    MG_SULFATE,
    MG_SULFATE_INJ,
    RA,
    SERUM_MG_MOLES,
    condition,
    context,
    draft,
    egfr,
    lab,
    medication,
    picture,
    run,
    run_all,
    serum_mg,
    shape,
)

from cds_service.context.model import Lab
from cds_service.rules import serum_magnesium
from cds_service.rules.derived import serum_magnesium as latest_serum_magnesium

ORDER = draft(MG_OXIDE_400, dose=(400, "mg"))


@pytest.mark.parametrize(
    ("result", "high", "low", "mmol"),
    [
        (serum_mg(2.7), True, False, 2.7 / 2.4305),  # own range 1.6-2.6 mg/dL
        (serum_mg(1.4), False, True, 1.4 / 2.4305),
        (serum_mg(2.5, low=1.8, high=2.4), True, False, 2.5 / 2.4305),  # a stricter lab
        (lab(SERUM_MG_MOLES, 1.2, "mmol/L"), True, False, 1.2),  # default range 0.7-1.1 mmol/L
        (lab(SERUM_MG_MOLES, 1.05, "mmol/L", low=0.7, high=1.0), True, False, 1.05),
        (lab(SERUM_MG_MOLES, 2.6, "mEq/L"), True, False, 1.3),
        (lab(SERUM_MG_MOLES, 0.9, "mmol/L"), False, False, 0.9),
    ],
)
def test_units_and_reference_ranges(result: Lab, high: bool, low: bool, mmol: float) -> None:
    serum = latest_serum_magnesium(picture(context(labs=[result])), KB)
    assert serum is not None
    assert serum.mmol == pytest.approx(mmol)
    assert (serum.is_high, serum.is_low) == (high, low)


def test_the_latest_result_counts_and_an_unknown_unit_is_not_compared() -> None:
    older_high = serum_mg(3.0, when="2026-05-01")
    newer_normal = serum_mg(2.0, when="2026-11-20")
    serum = latest_serum_magnesium(picture(context(labs=[older_high, newer_normal])), KB)
    assert serum is not None and serum.lab is newer_normal and not serum.is_high
    odd = latest_serum_magnesium(picture(context(labs=[lab(SERUM_MG_MOLES, 9, "furlong")])), KB)
    assert odd is not None and odd.mmol is None and not odd.is_high


def test_high_value_flags_a_magnesium_order_whatever_the_kidney_codes() -> None:
    [finding] = run(serum_magnesium.evaluate, context(drafts=[ORDER], labs=[serum_mg(2.9)]))
    assert (finding.rule_id, finding.indicator) == ("high-serum-magnesium", "warning")
    assert "2.9 mg/dL" in finding.summary and "2026-11-20" in finding.summary
    assert "reflexes" in finding.detail


def test_grading_follows_the_label_levels_with_the_context() -> None:
    """Above 4 mEq/L reflexes begin to diminish: a warning by itself, critical with severe
    kidney impairment or a neuromuscular disease; above 5 mEq/L (the usual anticonvulsant
    level) critical."""
    above_4 = lab(SERUM_MG_MOLES, 4.5, "mEq/L")
    [alone] = run(serum_magnesium.evaluate, context(drafts=[ORDER], labs=[above_4]))
    assert alone.indicator == "warning" and "reflexes" in alone.summary
    with_ckd = context(conditions=[CKD4], drafts=[ORDER], labs=[above_4])
    assert run(serum_magnesium.evaluate, with_ckd)[0].indicator == "critical"
    with_mg = context(conditions=[MG], drafts=[ORDER], labs=[above_4])
    assert run(serum_magnesium.evaluate, with_mg)[0].indicator == "critical"
    above_5 = lab(SERUM_MG_MOLES, 5.5, "mEq/L")
    [finding] = run(serum_magnesium.evaluate, context(drafts=[ORDER], labs=[above_5]))
    assert finding.indicator == "critical" and finding.critical_because
    # 4.8 mg/dL is 3.95 mEq/L: high, not critical.
    [high] = run(serum_magnesium.evaluate, context(drafts=[ORDER], labs=[serum_mg(4.8)]))
    assert high.indicator == "warning"


def test_pre_eclampsia_on_iv_magnesium_gets_monitoring_not_an_alarm() -> None:
    pre_eclampsia = condition("O14.13", "46764007", "Severe pre-eclampsia, third trimester")
    iv = draft(MG_SULFATE_INJ, MG_SULFATE, route="iv", dose=(2, "g"))
    ctx = context(conditions=[pre_eclampsia], drafts=[iv], labs=[serum_mg(5.5)])
    [finding] = run(serum_magnesium.evaluate, ctx)
    assert (finding.rule_id, finding.indicator) == ("obstetric-magnesium-monitoring", "warning")
    assert "reflexes" in finding.summary and "100 mL in 4 hours" in finding.detail
    above = context(conditions=[pre_eclampsia], drafts=[iv], labs=[serum_mg(7.0)])
    assert run(serum_magnesium.evaluate, above)[0].indicator == "critical"
    # Without pre-eclampsia the same level on IV magnesium is the serum rule's.
    plain = context(drafts=[iv], labs=[serum_mg(5.5)])
    assert run(serum_magnesium.evaluate, plain)[0].rule_id == "high-serum-magnesium"


def test_normal_value_no_card() -> None:
    assert run(serum_magnesium.evaluate, context(drafts=[ORDER], labs=[serum_mg(2.0)])) == []


def test_renal_and_high_serum_findings_merge_into_the_more_serious() -> None:
    ctx = context(conditions=[CKD4], drafts=[ORDER], labs=[egfr(22), serum_mg(2.7)])
    assert shape(run_all(ctx, "order-sign")) == [("renal-magnesium", "critical")]
    moderate = context(
        conditions=[condition("N18.31")], drafts=[ORDER], labs=[egfr(45), serum_mg(2.7)]
    )
    [finding] = run_all(moderate, "order-sign")
    assert (finding.rule_id, finding.indicator) == ("high-serum-magnesium", "warning")
    assert any("eGFR" in e.text for e in finding.evidence)  # the kidney facts are not lost


def test_patient_view_high_value_with_magnesium_on_file() -> None:
    statement = medication(MG_OXIDE_400, dose=(1, "tablet"), kind="MedicationStatement")
    ctx = context(medications=[statement], labs=[lab(SERUM_MG_MOLES, 1.3, "mmol/L", high=1.0)])
    [finding] = run(serum_magnesium.evaluate, ctx, "patient-view")
    assert (finding.rule_id, finding.indicator) == ("patient-view-contraindication", "warning")
    assert run(serum_magnesium.evaluate, context(labs=[serum_mg(2.9)]), "patient-view") == []


def test_patient_view_low_value_in_autoimmune_disease() -> None:
    [finding] = run(
        serum_magnesium.evaluate, context(conditions=[RA], labs=[serum_mg(1.3)]), "patient-view"
    )
    assert (finding.rule_id, finding.indicator) == ("patient-view-low-magnesium", "info")
    assert "1.3 mg/dL" in finding.summary
    assert "absorption" in finding.detail


def test_low_value_reminds_of_myasthenia_and_kidney_cautions() -> None:
    ctx = context(conditions=[MG, CKD4], labs=[serum_mg(1.3), egfr(25)])
    [finding] = run(serum_magnesium.evaluate, ctx, "patient-view")
    assert "myasthenia gravis" in finding.detail.lower()
    assert "kidney" in finding.detail
    assert len(finding.evidence) == len(set(finding.evidence))


def test_low_value_without_autoimmune_disease_is_quiet() -> None:
    ctx = context(conditions=[condition("I10")], labs=[serum_mg(1.3)])
    assert run(serum_magnesium.evaluate, ctx, "patient-view") == []
