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


def test_coded_myasthenia_and_oral_magnesium_is_a_warning_removal_offered() -> None:
    """The label contraindication is parenteral: oral magnesium oxide 400 mg (241 mg
    elemental) is a warning, removal offered but not recommended (rules.json oral-grading)."""
    order = draft(MG_OXIDE_400, dose=(400, "mg"))
    [finding] = run(myasthenia.evaluate, context(conditions=[MG], drafts=[order]))
    assert (finding.rule_id, finding.indicator) == ("myasthenia-magnesium", "warning")
    assert "myasthenia gravis" in finding.summary and "magnesium oxide" in finding.summary
    assert "parenteral" in finding.detail
    [proposal] = finding.proposals
    assert (proposal.kind, proposal.order, proposal.recommended) == ("remove-order", order, False)
    # Words on the card, the code beside them (for the card's extension).
    assert any(e.text.startswith("Myasthenia gravis") for e in finding.evidence)
    assert any(c.code == "G70.00" for e in finding.evidence for c in e.codes)
    assert not any("G70" in e.text for e in finding.evidence)


def test_small_oral_amount_in_myasthenia_is_advice() -> None:
    """A multivitamin's 70 mg magnesium sulfate (7 mg elemental) is not the IV card."""
    multivitamin = draft(MG_SULFATE, text="Multivitamin with minerals (magnesium sulfate 70 mg)",
                         dose=(70, "mg"))
    [finding] = run(myasthenia.evaluate, context(conditions=[MG], drafts=[multivitamin]))
    assert finding.indicator == "info" and finding.proposals == ()
    assert "IV" not in finding.summary


def test_parenteral_sulfate_is_critical_and_names_crisis_and_respiratory_failure() -> None:
    order = draft(MG_SULFATE_INJ, MG_SULFATE, route="iv", dose=(2, "g"))
    [finding] = run(myasthenia.evaluate, context(conditions=[MG], drafts=[order]))
    assert finding.indicator == "critical" and finding.proposals[0].recommended
    assert "myasthenic crisis" in finding.summary
    assert "respiratory failure" in finding.detail
    assert "neuromuscular" in finding.detail


def test_myasthenia_in_remission_or_inactive_still_counts_resolved_does_not() -> None:
    order = draft(MG_SULFATE_INJ, MG_SULFATE, route="iv", dose=(2, "g"))
    for status in ("remission", "inactive"):
        known = condition("G70.00", "91637004", "Myasthenia gravis", clinical=status)
        [finding] = run(myasthenia.evaluate, context(conditions=[known], drafts=[order]))
        assert finding.indicator == "critical", status
    resolved = condition("G70.00", "91637004", "Myasthenia gravis", clinical="resolved")
    assert run(myasthenia.evaluate, context(conditions=[resolved], drafts=[order])) == []
    refuted = condition("G70.00", clinical="remission", verification="refuted")
    assert run(myasthenia.evaluate, context(conditions=[refuted], drafts=[order])) == []
    # A kidney code in remission does not count: only groups known for life do.
    ckd = condition("N18.4", clinical="remission")
    assert run_all(context(conditions=[ckd], drafts=[order]), "order-sign") == []


def test_lambert_eaton_and_iv_magnesium_is_a_warning_oral_is_not_flagged() -> None:
    lems = condition("G73.1", text="Lambert-Eaton syndrome in small cell lung cancer")
    iv = draft(MG_SULFATE_INJ, MG_SULFATE, route="iv", dose=(2, "g"))
    [finding] = run(myasthenia.evaluate, context(conditions=[lems], drafts=[iv]))
    assert (finding.rule_id, finding.indicator) == ("neuromuscular-junction-magnesium", "warning")
    assert "Lambert-Eaton" in finding.summary
    oral = draft(MG_OXIDE_400, dose=(400, "mg"))
    assert run(myasthenia.evaluate, context(conditions=[lems], drafts=[oral])) == []
    congenital = condition("G70.2", text="Congenital myasthenic syndrome")
    assert len(run(myasthenia.evaluate, context(conditions=[congenital], drafts=[iv]))) == 1


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
    assert (finding.rule_id, finding.indicator) == ("patient-view-contraindication", "warning")
    assert finding.proposals == ()


def test_stays_critical_at_order_select_and_is_the_only_card() -> None:
    iv = draft(MG_SULFATE_INJ, MG_SULFATE, route="iv", dose=(2, "g"))
    ctx = context(conditions=[MG], drafts=[iv])
    assert shape(run_all(ctx, "order-select")) == [("myasthenia-magnesium", "critical")]


def test_balanced_fluid_is_not_magnesium_therapy_but_a_magnesium_vial_still_is() -> None:
    plasma_lyte = draft("6579", text="Plasma-Lyte A injection pH 7.4", route="iv",
                        dose=(1000, "mL"))
    assert run(myasthenia.evaluate, context(conditions=[MG], drafts=[plasma_lyte])) == []
    vial_for_tpn = draft(MG_SULFATE_INJ, text="Magnesium sulfate 2 g added to TPN", route="iv",
                         dose=(2, "g"))
    [finding] = run(myasthenia.evaluate, context(conditions=[MG], drafts=[vial_for_tpn]))
    assert finding.indicator == "critical"
