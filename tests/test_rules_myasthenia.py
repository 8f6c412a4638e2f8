"""Myasthenia gravis and magnesium (rules/myasthenia.py), without Flask."""

from __future__ import annotations

from rule_builders import (
    MG,
    MG_OXIDE_400,
    MG_SULFATE,
    MG_SULFATE_INJ,
    PYRIDOSTIGMINE,
    condition,
    context,
    draft,
    medication,
    run,
    run_all,
    shape,
)

from cds_service.rules import myasthenia


def test_coded_myasthenia_and_oral_magnesium_is_critical_with_removal() -> None:
    order = draft(MG_OXIDE_400, dose=(400, "mg"))
    [finding] = run(myasthenia.evaluate, context(conditions=[MG], drafts=[order]))
    assert (finding.rule_id, finding.indicator) == ("myasthenia-magnesium", "critical")
    assert "myasthenia gravis" in finding.summary and "magnesium oxide" in finding.summary
    [proposal] = finding.proposals
    assert (proposal.kind, proposal.order, proposal.recommended) == ("remove-order", order, True)
    # Words on the card, the code beside them (for the card's extension).
    assert any(e.text.startswith("Myasthenia gravis") for e in finding.evidence)
    assert any(c.code == "G70.00" for e in finding.evidence for c in e.codes)
    assert not any("G70" in e.text for e in finding.evidence)


def test_parenteral_sulfate_names_crisis_and_respiratory_failure() -> None:
    order = draft(MG_SULFATE_INJ, MG_SULFATE, route="iv", dose=(2, "g"))
    [finding] = run(myasthenia.evaluate, context(conditions=[MG], drafts=[order]))
    assert "myasthenic crisis" in finding.summary
    assert "respiratory failure" in finding.summary
    assert "neuromuscular" in finding.detail


def test_myasthenia_implied_by_an_anticholinesterase_flags_the_interference_as_unverified() -> None:
    ctx = context(
        medications=[medication(PYRIDOSTIGMINE)], drafts=[draft(MG_OXIDE_400, dose=(400, "mg"))]
    )
    [finding] = run(myasthenia.evaluate, ctx)
    assert "no coded diagnosis" in finding.evidence[0].text
    assert "anticholinesterase" in finding.detail
    assert finding.unverified


def test_topical_epsom_salt_is_not_flagged() -> None:
    soak = draft(MG_SULFATE, text="Epsom salt bath soak", route="topical")
    assert run(myasthenia.evaluate, context(conditions=[MG], drafts=[soak])) == []


def test_inactive_or_refuted_myasthenia_is_ignored() -> None:
    resolved = condition("G70.00", clinical="resolved")
    refuted = condition("G70.01", verification="refuted")
    ctx = context(conditions=[resolved, refuted], drafts=[draft(MG_OXIDE_400)])
    assert run(myasthenia.evaluate, ctx) == []


def test_patient_view_flags_magnesium_on_file() -> None:
    statement = medication(MG_OXIDE_400, kind="MedicationStatement")
    ctx = context(conditions=[MG], medications=[statement])
    [finding] = run(myasthenia.evaluate, ctx, "patient-view")
    assert (finding.rule_id, finding.indicator) == ("patient-view-contraindication", "critical")
    assert finding.proposals == ()


def test_stays_critical_at_order_select_and_is_the_only_card() -> None:
    ctx = context(conditions=[MG], drafts=[draft(MG_OXIDE_400, dose=(400, "mg"))])
    assert shape(run_all(ctx, "order-select")) == [("myasthenia-magnesium", "critical")]
