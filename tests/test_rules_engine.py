"""The engine: merging, ordering and the hook policy (rules/engine.py), without Flask."""

from __future__ import annotations

from rule_builders import (
    CIPROFLOXACIN,
    CKD4,
    KB,
    LEVOTHYROXINE,
    MG,
    MG_CITRATE_SOLN,
    MG_OXIDE_400,
    MG_SULFATE,
    MG_SULFATE_INJ,
    RA,
    TODAY,
    condition,
    context,
    draft,
    egfr,
    lab_order,
    medication,
    run_all,
    serum_mg,
    shape,
)

from cds_service.rules import engine
from cds_service.rules.findings import Finding, as_indicator


def finding(key: str, indicator: str, rule_id: str = "renal-magnesium") -> Finding:
    return Finding(rule_id, as_indicator(indicator), "s", "d", (), (), key)


def test_prioritise_keeps_the_more_serious_of_one_key_and_sorts() -> None:
    found = engine.prioritise(
        [finding("a", "info"), finding("b", "warning"), finding("a", "critical"),
         finding("c", "info"), finding("b", "warning", "high-serum-magnesium")]
    )  # fmt: skip
    assert [(f.key, f.indicator, f.rule_id) for f in found] == [
        ("a", "critical", "renal-magnesium"),
        ("b", "warning", "renal-magnesium"),  # a tie keeps the first
        ("c", "info", "renal-magnesium"),
    ]


def test_order_select_caps_at_warning_except_myasthenia() -> None:
    iv = draft(MG_SULFATE_INJ, MG_SULFATE, route="iv", dose=(2, "g"))
    renal = context(conditions=[CKD4], drafts=[iv], labs=[serum_mg(2.0)])
    assert shape(run_all(renal, "order-select")) == [("renal-magnesium", "warning")]
    assert shape(run_all(renal, "order-sign")) == [("renal-magnesium", "critical")]
    myasthenia = context(conditions=[MG], drafts=[iv])
    assert shape(run_all(myasthenia, "order-select")) == [("myasthenia-magnesium", "critical")]


def test_signing_drops_info_but_keeps_warnings() -> None:
    ctx = context(
        conditions=[RA, condition("N18.31")],
        medications=[medication(LEVOTHYROXINE)],
        drafts=[draft(MG_CITRATE_SOLN, dose=(10, "mL"))],
    )
    at_select = shape(run_all(ctx, "order-select"))
    assert ("autoimmune-guidance", "info") in at_select
    assert ("renal-magnesium", "info") in at_select
    assert shape(run_all(ctx, "order-sign")) == [("chelation-interaction", "warning")]


def test_medication_prescribe_is_advised_like_order_select() -> None:
    # It fires while the prescription is written: info is kept, criticals are capped.
    ctx = context(
        conditions=[RA, condition("N18.31")],
        medications=[medication(LEVOTHYROXINE)],
        drafts=[draft(MG_CITRATE_SOLN, dose=(10, "mL"))],
    )
    assert shape(run_all(ctx, "medication-prescribe")) == shape(run_all(ctx, "order-select"))
    iv = draft(MG_SULFATE_INJ, MG_SULFATE, route="iv", dose=(2, "g"))
    renal = context(conditions=[CKD4], drafts=[iv])
    assert shape(run_all(renal, "medication-prescribe")) == [("renal-magnesium", "warning")]


def test_lab_suggestion_not_repeated_once_the_test_is_among_the_drafts() -> None:
    order = draft(MG_OXIDE_400, dose=(400, "mg"))
    without = run_all(context(conditions=[CKD4], drafts=[order]), "order-sign")
    assert [p.kind for p in without[0].proposals] == ["order-lab"]
    with_test = context(conditions=[CKD4], drafts=[order], lab_orders=[lab_order()])
    [finding_] = run_all(with_test, "order-sign")
    assert (finding_.indicator, finding_.proposals) == ("warning", ())


def test_most_serious_first_across_rules_and_each_finding_once() -> None:
    ctx = context(
        conditions=[MG, condition("N18.31")],
        medications=[medication(CIPROFLOXACIN)],
        drafts=[draft(MG_OXIDE_400, dose=(2, "{tbl}"), per_day=3)],
        labs=[egfr(40), serum_mg(2.0)],
    )
    found = run_all(ctx, "order-select")
    assert shape(found) == [
        ("myasthenia-magnesium", "warning"),  # oral: the label contraindication is parenteral
        ("chelation-interaction", "warning"),
        ("magnesium-dose-limit", "warning"),
        ("renal-magnesium", "info"),
    ]
    assert len({f.key for f in found}) == len(found)


def test_patient_view_without_magnesium_on_file_is_quiet() -> None:
    ctx = context(conditions=[MG, CKD4], labs=[egfr(20), serum_mg(2.0)])
    assert run_all(ctx, "patient-view") == []


def test_severity_that_differs_between_select_and_sign_says_why() -> None:
    ckd4 = context(conditions=[CKD4], drafts=[draft(MG_OXIDE_400, dose=(400, "mg"))],
                   labs=[egfr(22), serum_mg(2.7)])
    [select] = run_all(ckd4, "order-select")
    [sign] = run_all(ckd4, "order-sign")
    assert (select.indicator, sign.indicator) == ("warning", "critical")
    assert select.severity_note.startswith("A warning while ordering; critical at signing: serum")
    assert sign.severity_note.startswith("Critical at signing (a warning while ordering): serum")
    assert "severe kidney impairment" in sign.severity_note


def test_sign_only_ehrs_get_the_advice_select_would_have_shown() -> None:
    ms = context(conditions=[condition("G35.A", "24700007", "Multiple sclerosis")],
                 drafts=[draft(MG_OXIDE_400, dose=(400, "mg"))])
    assert run_all(ms, "order-sign") == []
    found = engine.evaluate(ms, KB, "order-sign", TODAY, advice_shown_before=False)
    assert shape(found) == [("autoimmune-guidance", "info")]


def test_a_sign_only_ehr_is_not_told_of_a_warning_it_never_saw() -> None:
    ckd4 = context(conditions=[CKD4], drafts=[draft(MG_OXIDE_400, dose=(400, "mg"))],
                   labs=[egfr(22), serum_mg(2.7)])
    [sign] = run_all(ckd4, "order-sign")
    assert sign.severity_note.startswith("Critical at signing (a warning while ordering)")
    [sign_only] = [
        f for f in engine.evaluate(ckd4, KB, "order-sign", TODAY, advice_shown_before=False)
        if f.indicator == "critical"
    ]
    assert sign_only.severity_note == ""
