"""Rule behaviour fixed after the code review (one test per finding), without Flask.

Each test failed before its fix: MG inferred only from MG-specific drugs (and then "possible"),
serum magnesium with a one-sided range or only an interpretation flag, coded hypermagnesemia,
local routes and route words on every drug, resolved / not-taken facts, order-select
selections, hazard-first summaries, the spacing check, and the small lower-priority fixes.
"""

from __future__ import annotations

import dataclasses

import pytest
from rule_builders import (
    CIPROFLOXACIN,
    CKD4,
    MG,
    MG_CITRATE_SOLN,
    MG_GLYCINATE_100,
    MG_OXIDE_400,
    MG_SULFATE,
    MG_SULFATE_INJ,
    PYRIDOSTIGMINE,
    RA,
    SERUM_MG_MASS,
    SNOMED,
    condition,
    context,
    draft,
    lab,
    medication,
    run,
    run_all,
    shape,
)

from cds_service.context.model import Coding, Lab, Medication, PatientContext, SourceRef
from cds_service.rules import (
    autoimmune,
    interactions,
    mg_drugs,
    myasthenia,
    renal,
    serum_magnesium,
)

ECULIZUMAB = "591781"
NEOSTIGMINE = "7315"
V3_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
MG_ORAL = draft(MG_OXIDE_400, dose=(400, "mg"))


def _with_route(order: Medication, *codes: str) -> Medication:
    return dataclasses.replace(order, route=tuple(Coding(SNOMED, c) for c in codes))


# ---------------------------------------------------------------- 1 myasthenia inferred


@pytest.mark.parametrize("drug", [ECULIZUMAB, NEOSTIGMINE])
def test_drugs_with_other_uses_do_not_imply_myasthenia(drug: str) -> None:
    ctx = context(medications=[medication(drug)], drafts=[MG_ORAL])
    assert run(myasthenia.evaluate, ctx) == []
    cipro = draft(CIPROFLOXACIN, text="ciprofloxacin 500 MG Oral Tablet")
    assert run(mg_drugs.evaluate, context(medications=[medication(drug)], drafts=[cipro])) == []


def test_mg_specific_drug_without_a_code_gives_a_possible_myasthenia_warning() -> None:
    ctx = context(medications=[medication(PYRIDOSTIGMINE)], drafts=[MG_ORAL])
    [finding] = run(myasthenia.evaluate, ctx)
    assert (finding.rule_id, finding.indicator) == ("myasthenia-magnesium", "warning")
    assert "possible myasthenia gravis (on pyridostigmine, not coded)" in finding.summary
    [proposal] = finding.proposals
    assert (proposal.kind, proposal.recommended) == ("remove-order", False)
    assert "not coded" in finding.detail
    for hook in ("order-select", "order-sign"):
        assert shape(run_all(ctx, hook)) == [("myasthenia-magnesium", "warning")]


def test_possible_myasthenia_at_patient_view_is_a_warning() -> None:
    statement = medication(MG_OXIDE_400, kind="MedicationStatement")
    ctx = context(medications=[medication(PYRIDOSTIGMINE), statement])
    [finding] = run(myasthenia.evaluate, ctx, "patient-view")
    assert (finding.rule_id, finding.indicator) == ("patient-view-contraindication", "warning")
    assert "possible myasthenia gravis" in finding.summary.lower()


def test_aggravating_drug_with_possible_myasthenia_is_a_warning_not_recommended() -> None:
    cipro = draft(CIPROFLOXACIN, text="ciprofloxacin 500 MG Oral Tablet")
    ctx = context(medications=[medication(PYRIDOSTIGMINE)], drafts=[cipro])
    [finding] = run(mg_drugs.evaluate, ctx)
    assert (finding.rule_id, finding.indicator) == ("myasthenia-aggravating-drug", "warning")
    assert "possible myasthenia gravis" in finding.summary.lower()
    [proposal] = finding.proposals
    assert proposal.recommended is False


def test_coded_myasthenia_still_critical_with_removal_recommended() -> None:
    iv = draft(MG_SULFATE_INJ, route="iv", dose=(2, "g"))
    ctx = context(conditions=[MG], medications=[medication(PYRIDOSTIGMINE)], drafts=[iv])
    [finding] = run(myasthenia.evaluate, ctx)
    assert finding.indicator == "critical" and finding.proposals[0].recommended


# ---------------------------------------------------------------- 2 serum magnesium


def _mg_lab(value: float, unit: str = "mg/dL", **kwargs: float | None) -> Lab:
    return lab(SERUM_MG_MASS, value, unit, "2026-11-20", **kwargs)


def test_range_with_only_a_low_bound_takes_the_high_bound_from_the_default() -> None:
    ctx = context(labs=[_mg_lab(3.5, low=1.6)], drafts=[MG_ORAL])
    [finding] = run(serum_magnesium.evaluate, ctx)
    assert (finding.rule_id, finding.indicator) == ("high-serum-magnesium", "warning")
    assert "default range" in finding.detail


def test_value_above_the_anticonvulsant_level_is_critical_whatever_the_range_says() -> None:
    # 6.5 mg/dL = 5.3 mEq/L, above the 2.5-5 mEq/L the label names for controlling convulsions.
    only_low = context(labs=[_mg_lab(6.5, low=1.6)], drafts=[MG_ORAL])
    assert shape(run(serum_magnesium.evaluate, only_low)) == [("high-serum-magnesium", "critical")]
    wide = context(labs=[_mg_lab(6.5, low=1.6, high=8.0)], drafts=[MG_ORAL])
    assert shape(run(serum_magnesium.evaluate, wide)) == [("high-serum-magnesium", "critical")]


@pytest.mark.parametrize("code", ["H", "HH", "HU"])
def test_interpretation_high_counts_when_no_number_decides(code: str) -> None:
    result = dataclasses.replace(
        _mg_lab(9.0, unit="furlongs"), interpretation=(Coding(V3_INTERPRETATION, code),)
    )
    [finding] = run(serum_magnesium.evaluate, context(labs=[result], drafts=[MG_ORAL]))
    assert finding.indicator == "warning"
    assert "flagged high by the laboratory" in finding.detail


# ---------------------------------------------------------------- 3 coded hypermagnesemia

HYPERMAGNESEMIA = condition("E83.41", text="Hypermagnesemia")


def test_coded_hypermagnesemia_with_a_magnesium_order_is_a_warning() -> None:
    [finding] = run(
        serum_magnesium.evaluate, context(conditions=[HYPERMAGNESEMIA], drafts=[MG_ORAL])
    )
    assert (finding.rule_id, finding.indicator) == ("high-serum-magnesium", "warning")
    assert finding.summary.endswith("hypermagnesemia is on the problem list")
    assert any(c.code == "E83.41" for e in finding.evidence for c in e.codes)
    assert [p.kind for p in finding.proposals] == ["order-lab"]


def test_coded_hypermagnesemia_with_magnesium_on_file_at_patient_view() -> None:
    ctx = context(conditions=[HYPERMAGNESEMIA], medications=[medication(MG_OXIDE_400)])
    [finding] = run(serum_magnesium.evaluate, ctx, "patient-view")
    assert (finding.rule_id, finding.indicator) == ("patient-view-contraindication", "warning")


def test_resolved_hypermagnesemia_is_quiet() -> None:
    resolved = condition("E83.41", clinical="resolved")
    assert run(serum_magnesium.evaluate, context(conditions=[resolved], drafts=[MG_ORAL])) == []


# ---------------------------------------------------------------- 4 routes

EYE_DROPS = "ciprofloxacin 3 MG/ML Ophthalmic Solution"


def test_eye_drops_by_name_are_not_an_aggravating_drug() -> None:
    drops = draft(CIPROFLOXACIN, text=EYE_DROPS, route=None)
    assert run(mg_drugs.evaluate, context(conditions=[MG], drafts=[drops])) == []


@pytest.mark.parametrize("code", ["54485002", "10547007", "46713006", "18679011"])
def test_local_route_codes_are_not_systemic(code: str) -> None:
    drops = _with_route(draft(CIPROFLOXACIN, text="ciprofloxacin"), code)
    assert run(mg_drugs.evaluate, context(conditions=[MG], drafts=[drops])) == []
    inhaled = _with_route(draft(MG_SULFATE, text="magnesium sulfate"), code)
    assert run(myasthenia.evaluate, context(conditions=[MG], drafts=[inhaled])) == []


def test_iv_ciprofloxacin_by_name_does_not_chelate() -> None:
    iv = draft(CIPROFLOXACIN, text="ciprofloxacin 400 MG in 200 ML IV infusion", route=None)
    on_file = medication(MG_OXIDE_400)
    assert run(interactions.evaluate, context(medications=[on_file], drafts=[iv])) == []
    oral = draft(CIPROFLOXACIN, text="ciprofloxacin 500 MG Oral Tablet", route=None)
    assert len(run(interactions.evaluate, context(medications=[on_file], drafts=[oral]))) == 1


# ---------------------------------------------------------------- 5 resolved / not taken


def test_abated_condition_without_an_active_status_is_resolved() -> None:
    abated = dataclasses.replace(MG, clinical_status=None, abated=True)
    assert run(myasthenia.evaluate, context(conditions=[abated], drafts=[MG_ORAL])) == []
    relapsed = dataclasses.replace(MG, clinical_status="relapse", abated=True)
    assert len(run(myasthenia.evaluate, context(conditions=[relapsed], drafts=[MG_ORAL]))) == 1


def test_statement_not_taken_does_not_count() -> None:
    not_taken = dataclasses.replace(
        medication(PYRIDOSTIGMINE, kind="MedicationStatement"), not_taken=True
    )
    assert run(myasthenia.evaluate, context(medications=[not_taken], drafts=[MG_ORAL])) == []


# ---------------------------------------------------------------- 6 selections


def _selected(ctx: PatientContext, *orders: Medication) -> PatientContext:
    return dataclasses.replace(ctx, selections=tuple(o.source.reference for o in orders))


def test_order_select_advises_only_on_the_selected_drafts() -> None:
    mg = draft(MG_OXIDE_400, dose=(400, "mg"))
    cipro = draft(CIPROFLOXACIN, text="ciprofloxacin 500 MG Oral Tablet")
    ctx = context(conditions=[CKD4], drafts=[mg, cipro])
    everything = run_all(ctx)
    assert {f.rule_id for f in everything} == {"renal-magnesium", "chelation-interaction"}
    only_cipro = run_all(_selected(ctx, cipro))
    # The magnesium draft still counts as context: the interaction lands on ciprofloxacin.
    assert shape(only_cipro) == [("chelation-interaction", "warning")]
    assert only_cipro[0].order == cipro
    only_mg = run_all(_selected(ctx, mg))
    assert {f.rule_id for f in only_mg} == {"renal-magnesium", "chelation-interaction"}
    assert all(f.order == mg for f in only_mg)


# ---------------------------------------------------------------- 8 hazard-first summaries


def test_renal_summary_says_what_to_do_and_uses_the_knowledge_name() -> None:
    long_text = "Chronic kidney disease stage 4 " + "with a long local description " * 6
    ckd = dataclasses.replace(CKD4, text=long_text)
    [finding] = run(renal.evaluate, context(conditions=[ckd], drafts=[MG_ORAL]))
    assert finding.summary.startswith("Use magnesium oxide with caution")
    assert finding.summary.endswith("magnesium can accumulate")
    assert "long local description" not in finding.summary
    assert len(finding.summary) < 140


# ---------------------------------------------------------------- 9 spacing stated


@pytest.mark.parametrize(
    ("instruction", "resolved"),
    [
        ("Take 1 hour after ciprofloxacin.", False),  # the drug named, the wrong figure
        ("Take with food, 2 hours before bed.", False),  # figures without the drug
        ("Take ciprofloxacin at least 2 hours before or 6 hours after this.", True),
    ],
)
def test_spacing_counts_as_stated_only_with_the_drug_and_its_figures(
    instruction: str, resolved: bool
) -> None:
    mg = draft(MG_OXIDE_400, dose=(400, "mg"), patient_instruction=instruction)
    cipro = medication(CIPROFLOXACIN, text="ciprofloxacin 500 MG Oral Tablet")
    found = run(interactions.evaluate, context(medications=[cipro], drafts=[mg]))
    assert (found == []) is resolved


# ---------------------------------------------------------------- 10 lower priority


def test_no_switch_to_glycinate_when_glycinate_is_already_among_the_drafts() -> None:
    citrate = draft(MG_CITRATE_SOLN, dose=(10, "mL"))
    glycinate = draft(MG_GLYCINATE_100, dose=(2, "{tbl}"))
    alone = run(autoimmune.evaluate, context(conditions=[RA], drafts=[citrate]))
    assert [p.kind for p in alone[0].proposals] == ["replace-medication"]
    both = run(autoimmune.evaluate, context(conditions=[RA], drafts=[citrate, glycinate]))
    by_order = {f.order: f for f in both}
    assert by_order[citrate].proposals == ()


def test_drafts_without_an_id_are_separate_findings() -> None:
    no_id = SourceRef("MedicationRequest", "", "context:draftOrders")
    first = dataclasses.replace(draft(MG_OXIDE_400), source=no_id)
    second = dataclasses.replace(draft(MG_SULFATE_INJ, MG_SULFATE, route="iv"), source=no_id)
    found = run_all(context(conditions=[MG], drafts=[first, second]), "order-sign")
    assert len(found) == 2
