"""Drugs that can worsen myasthenia gravis (rules/mg_drugs.py), without Flask."""

from __future__ import annotations

from rule_builders import (
    CIPROFLOXACIN,
    GENTAMICIN,
    MG,
    MG_OXIDE_400,
    MG_SULFATE_INJ,
    PYRIDOSTIGMINE,
    RA,
    ROCURONIUM,
    context,
    draft,
    medication,
    run,
)

from cds_service.rules import blockade, mg_drugs


def test_fluoroquinolone_in_myasthenia_is_critical_as_the_boxed_warning_says() -> None:
    order = draft(CIPROFLOXACIN, text="ciprofloxacin 500 MG Oral Tablet", dose=(500, "mg"))
    [finding] = run(mg_drugs.evaluate, context(conditions=[MG], drafts=[order]))
    assert (finding.rule_id, finding.indicator) == ("myasthenia-aggravating-drug", "critical")
    assert "ciprofloxacin" in finding.summary and "myasthenia gravis" in finding.summary
    assert "Boxed warning" in finding.detail
    [proposal] = finding.proposals
    assert (proposal.kind, proposal.recommended) == ("remove-order", True)
    assert "fda-fq-mg-boxed-warning" in finding.source_ids
    assert finding.unverified == ()


def test_fluoroquinolone_by_atc_code() -> None:
    order = draft(text="levofloxacin tablet", atc="J01MA12")
    [finding] = run(mg_drugs.evaluate, context(conditions=[MG], drafts=[order]))
    assert finding.indicator == "critical"


def test_aminoglycoside_is_a_warning_citing_the_gentamicin_label() -> None:
    order = draft(GENTAMICIN, route="iv", dose=(350, "mg"))
    [finding] = run(mg_drugs.evaluate, context(conditions=[MG], drafts=[order]))
    assert finding.indicator == "warning"
    assert "gentamicin-label" in finding.source_ids
    assert finding.proposals[0].recommended is False


def test_myasthenia_implied_by_therapy_counts() -> None:
    ctx = context(medications=[medication(PYRIDOSTIGMINE)], drafts=[draft(CIPROFLOXACIN)])
    assert len(run(mg_drugs.evaluate, ctx)) == 1


def test_no_myasthenia_no_card_and_eye_drops_are_not_flagged() -> None:
    assert run(mg_drugs.evaluate, context(conditions=[RA], drafts=[draft(CIPROFLOXACIN)])) == []
    drops = draft(CIPROFLOXACIN, text="ciprofloxacin ophthalmic solution", route="topical")
    assert run(mg_drugs.evaluate, context(conditions=[MG], drafts=[drops])) == []


def test_active_drugs_are_not_re_flagged_and_patient_view_is_quiet() -> None:
    ctx = context(conditions=[MG], medications=[medication(CIPROFLOXACIN)])
    assert run(mg_drugs.evaluate, ctx) == []
    assert run(mg_drugs.evaluate, ctx, "patient-view") == []


def test_neuromuscular_blocker_with_parenteral_magnesium_for_every_patient() -> None:
    blocker = draft(ROCURONIUM, route="iv")
    for conditions in ([MG], []):
        with_iv_mg = context(
            conditions=conditions,
            medications=[medication(MG_SULFATE_INJ, route="iv")],
            drafts=[blocker],
        )
        [finding] = run(blockade.evaluate, with_iv_mg)
        assert (finding.rule_id, finding.indicator) == (
            "magnesium-neuromuscular-blocker",
            "warning",
        )
        assert "rocuronium" in finding.summary
        assert any(c.code == "1658221" for e in finding.evidence for c in e.codes)
    # The other direction: IV magnesium ordered while a blocker is on file.
    iv_mg = draft(MG_SULFATE_INJ, route="iv", dose=(2, "g"))
    on_file = context(medications=[medication(ROCURONIUM, route="iv")], drafts=[iv_mg])
    assert len(run(blockade.evaluate, on_file)) == 1
    assert run(blockade.evaluate, context(drafts=[blocker])) == []
    oral_mg = context(medications=[medication(MG_OXIDE_400)], drafts=[blocker])
    assert run(blockade.evaluate, oral_mg) == []
