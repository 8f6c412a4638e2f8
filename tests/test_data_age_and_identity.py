"""Data age and identity, over HTTP with real FHIR JSON (the request fixtures, changed the way
real-world data differs): urn:uuid references, results older than their look-back window, a
patient recorded as deceased, required data none of which is the patient's, single doses.

The decisions these tests hold (docs/architecture.md, "Data age and identity"):
- a reference to the Patient's ``urn:uuid:`` fullUrl (or ``urn:uuid:<patient id>``) is the
  patient's; an unresolvable ``urn:uuid:`` is not;
- a lab result older than its kind's look-back (labs.json) is named with its date and cannot
  raise a card above warning; a critical that stands without it stays critical;
- a patient recorded as deceased gets no clinical card, one card to check the chart;
- required data that was sent but none of it is the patient's gives a warning card saying
  the checks that need it were not done (not a clean "no risk" answer, not a 412: the checks
  that can run still run);
- ``timing.repeat.count`` 1, or a parenteral order with no timing, is one administration.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from hook_calls import assert_conformant, call, data_issues, load_request, only_card

ORDER_SELECT = "magnesium-order-select"
ORDER_SIGN = "magnesium-order-sign"
PATIENT_VIEW = "magnesium-patient-view"


def _rule(card: dict[str, Any]) -> str:
    rule_id: str = card["source"]["topic"]["code"]
    return rule_id


def _cards(result: dict[str, Any]) -> list[tuple[str, str]]:
    return [(_rule(card), card["indicator"]) for card in result["cards"]]


def _entries(body: dict[str, Any], key: str) -> list[dict[str, Any]]:
    resources: list[dict[str, Any]] = [e["resource"] for e in body["prefetch"][key]["entry"]]
    return resources


# --- references inside Bundles ---------------------------------------------------------------


def _synthea_style(body: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The request as Synthea-derived data reads: the patient id a uuid, every resource naming
    the patient ``urn:uuid:<id>``, every entry under a ``urn:uuid:`` fullUrl."""
    old_id = body["context"]["patientId"]
    new_id = str(uuid.uuid5(uuid.NAMESPACE_URL, old_id))
    text = json.dumps(body).replace(f'"Patient/{old_id}"', f'"urn:uuid:{new_id}"')
    text = text.replace(f'"{old_id}"', f'"{new_id}"')  # patientId and Patient.id
    changed: dict[str, Any] = json.loads(text)
    for value in [*changed["prefetch"].values(), changed["context"]["draftOrders"]]:
        for entry in value.get("entry", []) if isinstance(value, dict) else []:
            entry["fullUrl"] = f"urn:uuid:{uuid.uuid4()}"
    return changed, new_id


def test_synthea_style_urn_uuid_subjects_are_the_patients(cds_url: str) -> None:
    body, patient_id = _synthea_style(load_request("mg-pyridostigmine.order-select.json"))
    assert _entries(body, "conditions")[0]["subject"] == {"reference": f"urn:uuid:{patient_id}"}
    result = assert_conformant(call(cds_url, ORDER_SELECT, body))
    assert _cards(result) == [("myasthenia-magnesium", "warning")]
    assert not [i for i in data_issues(result) if "another patient" in i["problem"]]


def test_the_patients_fullurl_in_a_bundle_resolves_its_references(cds_url: str) -> None:
    body = load_request("mg-pyridostigmine.order-select.urn-uuid.json")
    full_url = body["prefetch"]["patient"]["entry"][0]["fullUrl"]
    assert full_url.startswith("urn:uuid:") and "mg-pyridostigmine" not in full_url
    result = assert_conformant(call(cds_url, ORDER_SELECT, body))
    assert _cards(result) == [("myasthenia-magnesium", "warning")]


def test_a_urn_uuid_that_names_no_entry_is_not_the_patients(cds_url: str) -> None:
    body = load_request("mg-pyridostigmine.order-select.urn-uuid.json")
    for condition in _entries(body, "conditions"):
        condition["subject"] = {"reference": f"urn:uuid:{uuid.uuid4()}"}
    result = assert_conformant(call(cds_url, ORDER_SELECT, body))
    # The coded myasthenia is not read: only the drug-inferred warning, and the card saying
    # the conditions could not be used.
    assert _cards(result) == [
        ("myasthenia-magnesium", "warning"),
        ("incomplete-data", "warning"),
    ]


# --- age of results --------------------------------------------------------------------------


def _redate(body: dict[str, Any], key: str, when: str) -> None:
    for resource in _entries(body, key):
        if resource["code"]["coding"][0]["code"] != "19123-9":  # not the serum magnesium
            resource["effectiveDateTime"] = when


def test_an_egfr_from_1978_gives_at_most_a_warning_named_with_its_date(cds_url: str) -> None:
    result = assert_conformant(
        call(cds_url, ORDER_SIGN, load_request("stale-egfr.order-sign.json"))
    )
    card = only_card(result)
    assert (_rule(card), card["indicator"]) == ("renal-magnesium", "warning")
    assert "1978-05-01" in card["detail"] and "look-back" in card["detail"]


def test_the_same_egfr_measured_last_week_gives_the_critical_card(cds_url: str) -> None:
    body = load_request("stale-egfr.order-sign.json")
    _redate(body, "observations", "2026-11-20T09:15:00-05:00")
    card = only_card(assert_conformant(call(cds_url, ORDER_SIGN, body)))
    assert (_rule(card), card["indicator"]) == ("renal-magnesium", "critical")
    assert "look-back" not in card["detail"]


def test_a_critical_that_stands_without_the_old_result_stays_critical(cds_url: str) -> None:
    # Coded ESRD on dialysis: the IV magnesium card is critical whatever the eGFR's age.
    body = load_request("esrd-dialysis.order-sign.nolab.json")
    _redate(body, "observations", "1978-05-01T09:15:00-05:00")
    card = only_card(assert_conformant(call(cds_url, ORDER_SIGN, body)))
    assert (_rule(card), card["indicator"]) == ("renal-magnesium", "critical")


# --- a patient recorded as deceased ----------------------------------------------------------


def test_a_deceased_patient_gets_one_card_to_check_the_chart(cds_url: str) -> None:
    result = assert_conformant(
        call(cds_url, ORDER_SELECT, load_request("deceased.order-select.json"))
    )
    card = only_card(result)
    assert (_rule(card), card["indicator"]) == ("patient-deceased", "warning")
    assert "2026-10-02" in card["summary"]


def test_deceased_boolean_counts_and_patient_view_gets_information_only(cds_url: str) -> None:
    body = load_request("mg-pyridostigmine.patient-view.json")
    body["prefetch"]["patient"]["deceasedBoolean"] = True
    card = only_card(assert_conformant(call(cds_url, PATIENT_VIEW, body)))
    assert (_rule(card), card["indicator"]) == ("patient-deceased", "info")
    body = load_request("mg-pyridostigmine.order-sign.json")
    body["prefetch"]["patient"]["deceasedBoolean"] = True
    card = only_card(assert_conformant(call(cds_url, ORDER_SIGN, body)))
    assert (_rule(card), card["indicator"]) == ("patient-deceased", "warning")


def test_deceased_boolean_false_is_a_living_patient(cds_url: str) -> None:
    body = load_request("mg-pyridostigmine.order-select.json")
    body["prefetch"]["patient"]["deceasedBoolean"] = False
    result = assert_conformant(call(cds_url, ORDER_SELECT, body))
    assert _cards(result) == [("myasthenia-magnesium", "warning")]


# --- required data none of which is the patient's --------------------------------------------


def test_medication_orders_all_of_another_patient_are_not_no_risk(cds_url: str) -> None:
    body = load_request("pyridostigmine-uncoded.order-select.json")
    for order in _entries(body, "medicationRequests"):
        order["subject"] = {"reference": "Patient/someone-else"}
    result = assert_conformant(call(cds_url, ORDER_SELECT, body))
    # Without the pyridostigmine order no myasthenia is known: the one card says the check
    # was not done, instead of a clean answer.
    card = only_card(result)
    assert (_rule(card), card["indicator"]) == ("incomplete-data", "warning")
    assert "medication orders" in card["summary"]


def test_another_patients_patient_resource_is_reported_and_the_other_checks_run(
    cds_url: str,
) -> None:
    body = load_request("mg-pyridostigmine.order-select.json")
    body["prefetch"]["patient"]["id"] = "someone-else"
    result = assert_conformant(call(cds_url, ORDER_SELECT, body))
    assert _cards(result) == [
        ("myasthenia-magnesium", "warning"),
        ("incomplete-data", "warning"),
    ]
    assert "patient record" in result["cards"][1]["summary"]


def test_some_resources_of_another_patient_are_data_issues_only(cds_url: str) -> None:
    body = load_request("mg-pyridostigmine.order-select.json")
    conditions = body["prefetch"]["conditions"]["entry"]
    stranger = json.loads(json.dumps(conditions[0]))
    stranger["resource"]["id"] = "stranger-condition"
    stranger["resource"]["subject"] = {"reference": "Patient/someone-else"}
    conditions.append(stranger)
    result = assert_conformant(call(cds_url, ORDER_SELECT, body))
    assert _cards(result) == [("myasthenia-magnesium", "warning")]
    assert any("another patient" in i["problem"] for i in data_issues(result))


# --- single doses ----------------------------------------------------------------------------


def _draft(body: dict[str, Any]) -> dict[str, Any]:
    draft: dict[str, Any] = body["context"]["draftOrders"]["entry"][0]["resource"]
    return draft


def test_count_one_is_a_dose(cds_url: str) -> None:
    body = load_request("esrd-dialysis.order-sign.once.json")
    assert _draft(body)["dosageInstruction"][0]["timing"] == {"repeat": {"count": 1}}
    card = only_card(assert_conformant(call(cds_url, ORDER_SIGN, body)))
    assert "dose unknown" not in card["detail"] and "198 mg elemental" in card["detail"]


def test_an_iv_order_without_timing_is_one_dose_an_oral_one_is_not(cds_url: str) -> None:
    body = load_request("esrd-dialysis.order-sign.once.json")
    del _draft(body)["dosageInstruction"][0]["timing"]
    card = only_card(assert_conformant(call(cds_url, ORDER_SIGN, body)))
    assert "dose unknown" not in card["detail"] and "198 mg elemental" in card["detail"]
    # Oral magnesium taken day by day: no timing says nothing about how often.
    body = load_request("esrd-dialysis.order-select.json")
    del _draft(body)["dosageInstruction"][0]["timing"]
    result = assert_conformant(call(cds_url, ORDER_SELECT, body))
    assert any("how often not stated" in card["detail"] for card in result["cards"])


def _toxic_serum_magnesium(**dates: str | None) -> dict[str, Any]:
    """high-magnesium at patient-view with its serum magnesium at 2.6 mmol/L (5.2 mEq/L, above
    the usual anticonvulsant range: critical by the label's grading), dated as given (None: no
    date at all)."""
    body = load_request("high-magnesium.patient-view.json")
    serum = _entries(body, "observations")[0]
    assert serum["code"]["coding"][0]["code"] == "2601-3"
    serum["valueQuantity"]["value"] = 2.6
    for field, value in dates.items():
        if value is None:
            del serum[field]
        else:
            serum[field] = value
    return body


def test_a_recent_toxic_serum_magnesium_is_critical(cds_url: str) -> None:
    card = only_card(assert_conformant(call(cds_url, PATIENT_VIEW, _toxic_serum_magnesium())))
    assert (_rule(card), card["indicator"]) == ("patient-view-contraindication", "critical")


def test_an_old_or_undated_toxic_serum_magnesium_is_a_warning(cds_url: str) -> None:
    old = _toxic_serum_magnesium(effectiveDateTime="2026-09-01T08:00:00-05:00", issued=None)
    card = only_card(assert_conformant(call(cds_url, PATIENT_VIEW, old)))
    assert (_rule(card), card["indicator"]) == ("patient-view-contraindication", "warning")
    assert "2026-09-01" in card["detail"] and "30-day look-back" in card["detail"]
    undated = _toxic_serum_magnesium(effectiveDateTime=None, issued=None)
    card = only_card(assert_conformant(call(cds_url, PATIENT_VIEW, undated)))
    assert (_rule(card), card["indicator"]) == ("patient-view-contraindication", "warning")
    assert "with no date" in card["detail"]
