"""Magnesium with reduced kidney function (rules/renal.py), without Flask."""

from __future__ import annotations

from typing import Any

import pytest
from rule_builders import (
    CKD4,
    MG_OXIDE_400,
    MG_SULFATE,
    MG_SULFATE_INJ,
    condition,
    context,
    draft,
    egfr,
    lab_order,
    medication,
    run,
    serum_mg,
)

from cds_service.context.model import Condition, Lab, Medication
from cds_service.rules import renal
from cds_service.rules.findings import Finding


def renal_findings(
    hook: str = "order-select", *, drafts: list[Medication] | None = None, **kwargs: Any
) -> list[Finding]:
    """An oral magnesium oxide order unless ``drafts`` says otherwise."""
    orders = [draft(MG_OXIDE_400, dose=(400, "mg"))] if drafts is None else drafts
    return run(renal.evaluate, context(drafts=orders, **kwargs), hook)


@pytest.mark.parametrize(
    ("conditions", "labs", "indicator"),
    [
        ([], [egfr(22)], "warning"),  # eGFR < 30
        ([CKD4], [], "warning"),  # coded CKD 4, no eGFR
        ([condition("N18.5")], [], "warning"),
        ([condition("N18.6")], [], "warning"),  # ESRD
        ([condition("Z99.2")], [], "warning"),  # dialysis
        ([condition("N17.9")], [egfr(38)], "warning"),  # active AKI
        ([condition(snomed="714152005")], [], "warning"),  # CKD 5 on dialysis (SNOMED)
        ([condition("N18.31")], [], "info"),  # CKD 3a
        ([], [egfr(40)], "info"),  # eGFR 30-59
        ([condition("N18.9")], [], "info"),  # CKD, stage not coded, no eGFR to grade it
    ],
)
def test_kidney_function_grades_the_card(
    conditions: list[Condition], labs: list[Lab], indicator: str
) -> None:
    [finding] = renal_findings(conditions=conditions, labs=[*labs, serum_mg(2.0)])
    assert (finding.rule_id, finding.indicator) == ("renal-magnesium", indicator)
    assert len(finding.summary) < 140


@pytest.mark.parametrize(
    ("conditions", "labs"),
    [
        ([], [egfr(75)]),
        ([condition("N17.9", clinical="resolved")], [egfr(80)]),  # AKI over
        ([condition("N18.9")], [egfr(75)]),  # unstaged CKD graded by a normal-enough eGFR
        ([condition("N18.4", verification="entered-in-error")], []),
    ],
)
def test_no_card_without_current_impairment(conditions: list[Condition], labs: list[Lab]) -> None:
    assert renal_findings(conditions=conditions, labs=labs) == []


def test_the_worse_of_code_and_egfr_counts() -> None:
    [finding] = renal_findings(conditions=[condition("N18.31")], labs=[egfr(20), serum_mg(2)])
    assert finding.indicator == "warning"


def test_parenteral_magnesium_is_critical_with_the_label_limits() -> None:
    iv = draft(MG_SULFATE_INJ, MG_SULFATE, route="iv", dose=(2, "g"))
    [finding] = renal_findings(drafts=[iv], conditions=[CKD4], labs=[serum_mg(2.0)])
    assert finding.indicator == "critical"
    assert "20 g per 48 h" in finding.detail and "100 mL" in finding.detail


def test_high_serum_magnesium_with_severe_impairment_is_critical() -> None:
    [finding] = renal_findings(conditions=[CKD4], labs=[egfr(22), serum_mg(2.7)])
    assert finding.indicator == "critical"
    assert "2.7 mg/dL" in finding.summary
    assert any(e.text.endswith("(high)") for e in finding.evidence)


def test_topical_magnesium_is_not_flagged() -> None:
    soak = draft(MG_SULFATE, text="Epsom salt soak", route="topical")
    assert renal_findings(drafts=[soak], conditions=[CKD4]) == []


def test_serum_magnesium_test_suggested_when_none_on_file() -> None:
    [finding] = renal_findings(conditions=[CKD4])
    [proposal] = finding.proposals
    assert proposal.kind == "order-lab"
    assert proposal.code is not None and proposal.code.code == "19123-9"
    assert "No serum magnesium" in finding.detail


def test_recent_result_means_no_suggestion_and_old_one_means_one_under_a_local_policy() -> None:
    [recent] = renal_findings(conditions=[CKD4], labs=[serum_mg(2.0, when="2026-11-01")])
    assert recent.proposals == ()
    [old] = renal_findings(conditions=[CKD4], labs=[serum_mg(2.0, when="2026-06-02")])
    assert [p.kind for p in old.proposals] == ["order-lab"]
    assert "30 days" in old.detail
    assert old.unverified and "local-policy" in old.source_ids


def test_no_suggestion_when_a_serum_magnesium_test_is_among_the_drafts() -> None:
    [finding] = renal_findings(conditions=[CKD4], lab_orders=[lab_order()])
    assert finding.proposals == ()
    assert "among the orders" in finding.detail
    [cancelled] = renal_findings(conditions=[CKD4], lab_orders=[lab_order(status="revoked")])
    assert cancelled.proposals


def test_evidence_names_codes_and_values_with_dates() -> None:
    [finding] = renal_findings(conditions=[CKD4], labs=[egfr(22, "2026-11-18"), serum_mg(2.0)])
    text = " | ".join(e.text for e in finding.evidence)
    assert "eGFR 22 mL/min/1.73 m² on 2026-11-18" in text
    assert "Serum magnesium 2.0 mg/dL on 2026-11-20" in text
    assert "(241 mg elemental magnesium a day)" in text
    assert "N18.4" not in text and "{" not in text
    codes = {c.code for e in finding.evidence for c in e.codes}
    assert {"N18.4", "198741"} <= codes


def test_patient_view_severe_impairment_with_magnesium_on_file() -> None:
    ctx = {"conditions": [CKD4], "labs": [egfr(22)]}
    statement = medication(MG_OXIDE_400, dose=(1, "tablet"), kind="MedicationStatement")
    [finding] = renal_findings("patient-view", drafts=[], medications=[statement], **ctx)
    assert (finding.rule_id, finding.indicator) == ("patient-view-contraindication", "warning")
    moderate = renal_findings(
        "patient-view", drafts=[], medications=[statement], conditions=[condition("N18.31")]
    )
    assert moderate == []
