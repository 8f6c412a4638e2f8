"""Supplemental magnesium above the upper limit (rules/dose.py and derived.daily_elemental_mg)."""

from __future__ import annotations

import dataclasses
from datetime import date

import pytest
from rule_builders import (
    MG_CITRATE_SOLN,
    MG_GLYCINATE_100,
    MG_OXIDE_400,
    MG_SULFATE,
    MG_SULFATE_INJ,
    context,
    draft,
    egfr,
    medication,
    picture,
    run,
)

from cds_service.context.model import Medication
from cds_service.rules import dose
from cds_service.rules.derived import daily_elemental_mg, daily_elemental_mg_value


def daily(order: Medication) -> float | None:
    [fact] = picture(context(drafts=[order])).drafts
    result = daily_elemental_mg(fact).elemental_mg
    assert daily_elemental_mg_value(fact) == result  # the number-only path agrees
    return result


@pytest.mark.parametrize(
    ("order", "mg_per_day"),
    [
        (draft(MG_OXIDE_400, dose=(400, "mg")), 400 * 0.603),
        (draft(MG_OXIDE_400, dose=(2, "{tbl}"), per_day=3), 2 * 400 * 0.603 * 3),
        (draft(MG_OXIDE_400, dose=(1, "{pill}")), 400 * 0.603),  # the sandbox's unit
        (draft(MG_OXIDE_400, dose=(1, "tablet"), per_day=2), 2 * 400 * 0.603),
        (draft(MG_OXIDE_400, dose=(0.4, "g")), 400 * 0.603),
        (draft(MG_CITRATE_SOLN, dose=(10, "mL"), per_day=2), 10 * 58.2 * 0.162 * 2),
        (draft(MG_GLYCINATE_100, dose=(2, "{tbl}")), 2 * 100 * 0.141),
        (draft("198936", dose=(1, "tablet")), 84),  # strength stated as elemental magnesium
        (draft("6582", dose=(500, "mg")), 500 * 0.603),  # ingredient only: a mass is enough
    ],
)
def test_daily_elemental_magnesium(order: Medication, mg_per_day: float) -> None:
    assert daily(order) == pytest.approx(mg_per_day)


@pytest.mark.parametrize(
    "order",
    [
        draft(MG_OXIDE_400),  # no dose at all
        draft(MG_OXIDE_400, dose=(400, "mg"), per_day=None),  # no frequency
        draft(MG_CITRATE_SOLN, dose=(2, "{tbl}")),  # tablets of a solution
        draft(MG_OXIDE_400, dose=(5, "mL")),  # a volume of a tablet
        draft("6582", dose=(1, "tablet")),  # ingredient only: strength unknown
        draft(MG_OXIDE_400, dose=(1, "spoonful")),
        draft("486895", dose=(500, "mg")),  # amino acid chelate: fraction unknown
        draft(MG_OXIDE_400, dose=(1.7e308, "g"), per_day=1000),  # finite, but overflows
    ],
)
def test_dose_unknown_rather_than_guessed(order: Medication) -> None:
    [fact] = picture(context(drafts=[order])).drafts
    result = daily_elemental_mg(fact)
    assert result.elemental_mg is None and result.how.startswith("dose unknown")
    assert daily_elemental_mg_value(fact) is None
    assert run(dose.evaluate, context(drafts=[order])) == []


def test_above_the_adult_limit_is_a_warning() -> None:
    order = draft(MG_OXIDE_400, dose=(2, "{tbl}"), per_day=3)
    [finding] = run(dose.evaluate, context(drafts=[order]))
    assert (finding.rule_id, finding.indicator) == ("magnesium-dose-limit", "warning")
    assert "1447 mg" in finding.summary and "350 mg/day" in finding.summary
    assert "nih-ods-magnesium" in finding.source_ids


def test_within_the_limit_no_card() -> None:
    assert run(dose.evaluate, context(drafts=[draft(MG_OXIDE_400, dose=(400, "mg"))])) == []


def test_children_have_lower_limits_and_infants_none() -> None:
    order = draft(MG_OXIDE_400, dose=(1, "tablet"))  # 241 mg/day
    [child] = run(dose.evaluate, context(drafts=[order], birth_date=date(2020, 1, 1)))
    assert "110 mg/day" in child.summary and "4-8 years" in child.detail
    # Under 1 year the source sets no limit: the card says so (info) instead of nothing.
    [infant] = run(dose.evaluate, context(drafts=[order], birth_date=date(2026, 6, 1)))
    assert infant.indicator == "info" and "no supplement upper limit" in infant.summary
    assert infant.evidence[0].text == "Infant under 1 year old"
    assert infant.action.startswith("Dose it by weight")


def test_unknown_age_uses_the_adult_limit_and_says_so() -> None:
    order = draft(MG_OXIDE_400, dose=(2, "{tbl}"), per_day=3)
    [finding] = run(dose.evaluate, context(drafts=[order], birth_date=None))
    assert "adult limit used" in finding.detail


def test_together_with_magnesium_already_taken_is_info() -> None:
    statement = medication(MG_OXIDE_400, dose=(1, "tablet"), kind="MedicationStatement")
    order = draft(MG_OXIDE_400, dose=(400, "mg"))
    [finding] = run(dose.evaluate, context(medications=[statement], drafts=[order]))
    assert finding.indicator == "info" and "482 mg" in finding.summary
    # Both orders, then the limit they are held to.
    assert len(finding.evidence) == 3
    assert finding.evidence[-1].text == "upper limit 350 mg/day for 9 years and older"


def test_two_drafts_together_give_one_finding() -> None:
    first = draft(MG_OXIDE_400, dose=(400, "mg"))
    second = draft(MG_OXIDE_400, dose=(400, "mg"))
    findings = run(dose.evaluate, context(drafts=[first, second]))
    assert len({f.key for f in findings}) == 1


def test_parenteral_and_topical_are_not_supplements() -> None:
    iv = draft(MG_SULFATE_INJ, route="iv", dose=(50, "mL"), per_day=4)
    soak = draft(MG_SULFATE, route="topical", dose=(500, "g"), per_day=1)
    assert run(dose.evaluate, context(drafts=[iv, soak])) == []


def test_any_gender_text_gives_the_bands_answer_without_growing_the_memo() -> None:
    # Patient.gender is whatever string a chart sends: each must get the band the knowledge
    # gives it, and none may be kept in the (process-wide) look-up memo.
    order = draft(MG_OXIDE_400, dose=(2, "{tbl}"), per_day=3)  # 1447 mg/day
    expected = run(dose.evaluate, context(drafts=[order], sex="unknown"))
    dose._limit_band.cache_clear()
    for index in range(300):
        odd = f"gender-{index}-" + "x" * 10_000
        assert run(dose.evaluate, context(drafts=[order], sex=odd)) == expected
    assert dose._limit_band.cache_info().currsize == 1
    female = run(dose.evaluate, context(drafts=[order], sex="female"))
    assert [f.summary for f in female] == [f.summary for f in expected]  # adult bands: 350 mg


def test_a_short_supervised_laxative_course_is_advice_not_a_warning() -> None:
    bottle = draft(MG_CITRATE_SOLN, dose=(300, "mL"))  # 2,829 mg elemental in one dose
    [open_ended] = run(dose.evaluate, context(drafts=[bottle]))
    assert open_ended.indicator == "warning"
    one_day = dataclasses.replace(
        bottle, doses=tuple(dataclasses.replace(d, course_days=1.0) for d in bottle.doses)
    )
    [course] = run(dose.evaluate, context(drafts=[one_day]))
    assert course.indicator == "info" and course.unverified
    assert "supervised laxative course" in course.detail
    # Healthy kidneys: nothing said about kidneys; reduced function: high magnesium to watch.
    assert "kidney" not in f"{course.summary} {course.watch}"
    weak = context(drafts=[one_day], labs=[egfr(25)])
    [course] = run(dose.evaluate, weak)
    assert course.summary.startswith("Watch for diarrhoea and high magnesium")
    assert "kidney function is reduced" in course.watch
    # Magnesium oxide is no laxative salt here (no A06AD code): the limit stands.
    tablets = draft(MG_OXIDE_400, dose=(2, "{tbl}"), per_day=3)
    short = dataclasses.replace(
        tablets, doses=tuple(dataclasses.replace(d, course_days=1.0) for d in tablets.doses)
    )
    assert run(dose.evaluate, context(drafts=[short]))[0].indicator == "warning"
