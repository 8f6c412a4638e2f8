"""Chelation interactions, both directions (rules/interactions.py), without Flask."""

from __future__ import annotations

from rule_builders import (
    CIPROFLOXACIN,
    DOXYCYCLINE,
    LEVOFLOXACIN,
    LEVOTHYROXINE,
    MG_GLYCINATE_100,
    MG_OXIDE_400,
    MG_SULFATE,
    MG_SULFATE_INJ,
    RALTEGRAVIR,
    context,
    draft,
    medication,
    run,
    run_all,
)

from cds_service.rules import interactions

MG_ORDER = draft(MG_OXIDE_400, dose=(400, "mg"))


def test_magnesium_ordered_while_ciprofloxacin_is_active() -> None:
    cipro = medication(CIPROFLOXACIN, text="ciprofloxacin 500 MG Oral Tablet")
    [finding] = run(interactions.evaluate, context(medications=[cipro], drafts=[MG_ORDER]))
    assert (finding.rule_id, finding.indicator) == ("chelation-interaction", "warning")
    assert "ciprofloxacin" in finding.summary and "2 h before or 6 h after" in finding.summary
    [proposal] = finding.proposals
    assert proposal.kind == "add-dosage-instruction" and proposal.order is MG_ORDER
    assert proposal.text == (
        "Take ciprofloxacin at least 2 hours before or 6 hours after oral magnesium."
    )
    assert "ciprofloxacin-label" in finding.source_ids
    assert finding.unverified == ()


def test_drug_ordered_while_magnesium_is_on_file_puts_the_spacing_on_that_order() -> None:
    statement = medication(MG_GLYCINATE_100, kind="MedicationStatement", dose=(2, "{tbl}"))
    order = draft(LEVOFLOXACIN, text="levofloxacin 500 MG Oral Tablet")
    [finding] = run(interactions.evaluate, context(medications=[statement], drafts=[order]))
    assert finding.summary.startswith("Separate levofloxacin and magnesium by at least 2 h")
    # Sent as a code alone: named by what the code was recognised as.
    assert "On file: magnesium glycinate, 2 tablets once a day" in [
        e.text for e in finding.evidence
    ]
    assert finding.proposals[0].order is order
    assert finding.unverified  # the levofloxacin figure is not verified against the label


def test_both_drafts_give_one_card() -> None:
    cipro = draft(CIPROFLOXACIN)
    findings = run_all(context(drafts=[MG_ORDER, cipro]))
    assert [f.rule_id for f in findings] == ["chelation-interaction"]


def test_group_figure_when_the_drug_has_none_of_its_own() -> None:
    [finding] = run(
        interactions.evaluate, context(medications=[medication(DOXYCYCLINE)], drafts=[MG_ORDER])
    )
    assert "4-6 h after" in finding.summary
    assert finding.unverified


def test_no_spacing_suggestion_where_no_figure_exists() -> None:
    [finding] = run(
        interactions.evaluate, context(medications=[medication(RALTEGRAVIR)], drafts=[MG_ORDER])
    )
    assert finding.proposals == ()
    assert "not recommended" in finding.detail


def test_parenteral_magnesium_or_drug_does_not_chelate() -> None:
    iv_mg = draft(MG_SULFATE_INJ, MG_SULFATE, route="iv")
    cipro = medication(CIPROFLOXACIN)
    assert run(interactions.evaluate, context(medications=[cipro], drafts=[iv_mg])) == []
    iv_cipro = medication(CIPROFLOXACIN, route="iv")
    assert run(interactions.evaluate, context(medications=[iv_cipro], drafts=[MG_ORDER])) == []


def test_route_unstated_magnesium_is_taken_as_oral_and_said_so() -> None:
    unstated = draft(text="magnesium supplement", route=None)
    [finding] = run(
        interactions.evaluate, context(medications=[medication(LEVOTHYROXINE)], drafts=[unstated])
    )
    assert "route is not stated" in finding.detail


def test_resolved_once_the_draft_states_the_spacing() -> None:
    levo = medication(LEVOTHYROXINE, text="levothyroxine 100 MCG Oral Tablet")
    own_words = "Take at least 4 hours apart from levothyroxine."
    spaced = draft(MG_OXIDE_400, dose=(400, "mg"), patient_instruction=own_words)
    assert run(interactions.evaluate, context(medications=[levo], drafts=[spaced])) == []
    accepted = "Separate levothyroxine and oral magnesium by at least 4 hours."
    suggested = draft(MG_OXIDE_400, dose=(400, "mg"), patient_instruction=accepted)
    assert run(interactions.evaluate, context(medications=[levo], drafts=[suggested])) == []
    for hook in ("order-select", "order-sign"):
        assert run_all(context(medications=[levo], drafts=[spaced]), hook) == []


def test_stopped_drugs_and_patient_view_are_quiet() -> None:
    stopped = medication(CIPROFLOXACIN, status="stopped")
    assert run(interactions.evaluate, context(medications=[stopped], drafts=[MG_ORDER])) == []
    on_file = context(medications=[medication(CIPROFLOXACIN), medication(MG_OXIDE_400)])
    assert run(interactions.evaluate, on_file, "patient-view") == []


def test_a_drug_recognised_by_its_name_only_says_so_in_the_evidence() -> None:
    coded = medication(CIPROFLOXACIN, text="ciprofloxacin 500 MG Oral Tablet")
    by_name = medication(text="ciprofloxacin 500 MG Oral Tablet")  # a free-text entry
    [from_code] = run(interactions.evaluate, context(medications=[coded], drafts=[MG_ORDER]))
    [from_name] = run(interactions.evaluate, context(medications=[by_name], drafts=[MG_ORDER]))
    assert not any("recognised by its name" in e.text for e in from_code.evidence)
    assert any(e.text.endswith("recognised by its name only") for e in from_name.evidence)
