"""The fixture FHIR server over real HTTP (see the ``fixture_fhir_server`` fixture)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from flask import Flask

from cds_service.context.prefetch import render_template
from cds_service.fixture_server import (
    create_fixture_app,
    fixture_state,
    serve_in_background,
)
from cds_service.fixture_server.build_requests import FIXTURE_FHIR_SERVER, SCENARIOS
from cds_service.fixture_server.store import parse_fhir_datetime
from cds_service.protocol.services import PREFETCH_KEYS
from cds_service.resources import bundled_dir
from cds_service.settings import Settings

FHIR_JSON = "application/fhir+json"
LOINC = "http://loinc.org"
TIMEOUT = 10


def get(base: str, path: str, **kwargs: Any) -> requests.Response:
    return requests.get(f"{base}/{path}", timeout=TIMEOUT, **kwargs)


def search_ids(base: str, path: str, **kwargs: Any) -> list[str]:
    response = get(base, path, **kwargs)
    assert response.status_code == 200, response.text
    bundle = response.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    return [entry["resource"]["id"] for entry in bundle.get("entry", [])]


def assert_outcome(response: requests.Response, status: int, code: str) -> None:
    assert response.status_code == status
    assert response.headers["Content-Type"] == FHIR_JSON
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == code


# --- capability, read ------------------------------------------------------------------------


def test_metadata_is_an_r4_capability_statement(fixture_fhir_server: str) -> None:
    response = get(fixture_fhir_server, "metadata")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == FHIR_JSON
    statement = response.json()
    CapabilityStatement.model_validate(statement)
    assert statement["fhirVersion"] == "4.0.1"
    resources = {r["type"]: r for r in statement["rest"][0]["resource"]}
    assert set(resources) == {"Patient", "Condition", "MedicationRequest",
                              "MedicationStatement", "Observation"}
    condition_params = {p["name"] for p in resources["Condition"]["searchParam"]}
    assert {"patient", "subject", "_id", "code", "clinical-status"} <= condition_params


def test_read(fixture_fhir_server: str) -> None:
    response = get(fixture_fhir_server, "Patient/mg-pyridostigmine")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == FHIR_JSON
    assert response.json()["id"] == "mg-pyridostigmine"
    observation = get(fixture_fhir_server, "Observation/ckd4-low-egfr-obs-mg-2026-11-18").json()
    assert observation["valueQuantity"]["value"] == 2.7


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("Patient/no-such-patient", "not-found"),
        ("Encounter/anything", "not-supported"),
        ("Encounter?patient=mg-pyridostigmine", "not-supported"),
        ("Patient/a/b/c", "not-found"),
    ],
)
def test_unknown_things_are_404_operation_outcomes(
    fixture_fhir_server: str, path: str, code: str
) -> None:
    assert_outcome(get(fixture_fhir_server, path), 404, code)


def test_unsupported_method_is_405(fixture_fhir_server: str) -> None:
    response = requests.delete(f"{fixture_fhir_server}/Patient/mg-pyridostigmine",
                               timeout=TIMEOUT)
    assert_outcome(response, 405, "not-supported")


# --- search parameters -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    ["patient=mg-pyridostigmine", "patient=Patient/mg-pyridostigmine",
     "subject=Patient/mg-pyridostigmine", "subject=mg-pyridostigmine",
     f"patient={FIXTURE_FHIR_SERVER}/Patient/mg-pyridostigmine"],
)
def test_patient_and_subject_forms(fixture_fhir_server: str, query: str) -> None:
    ids = search_ids(fixture_fhir_server, f"Condition?{query}")
    assert ids == ["mg-pyridostigmine-cond-myasthenia", "mg-pyridostigmine-cond-bronchitis"]


def test_search_without_filters_returns_the_type(fixture_fhir_server: str) -> None:
    assert len(search_ids(fixture_fhir_server, "Patient")) >= 7


def test_id_with_comma_or(fixture_fhir_server: str) -> None:
    ids = search_ids(fixture_fhir_server, "Patient?_id=mg-inactive,no-relevant,unknown")
    assert ids == ["mg-inactive", "no-relevant"]


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        # ckd4-low-egfr: Mg, eGFR and creatinine on 2026-11-18; eGFR and Mg (mmol/L) in May.
        (f"{LOINC}|19123-9", 1),
        ("19123-9", 1),
        ("|19123-9", 0),  # "|code" = a coding without a system; ours all have one
        ("http://snomed.info/sct|19123-9", 0),
        (f"{LOINC}|", 5),  # "system|" = any code of the system
        (f"{LOINC}|19123-9,{LOINC}|98979-8", 3),  # comma = OR
        ("19123-9,2601-3", 2),
    ],
)
def test_code_token_forms(fixture_fhir_server: str, code: str, expected: int) -> None:
    ids = search_ids(fixture_fhir_server, "Observation",
                     params={"patient": "ckd4-low-egfr", "code": code})
    assert len(ids) == expected


def test_percent_encoded_pipe_is_decoded(fixture_fhir_server: str) -> None:
    # Written by hand so the %7C reaches the server exactly as a browser would send it.
    url = (f"{fixture_fhir_server}/Observation?patient=ckd4-low-egfr"
           "&code=http%3A%2F%2Floinc.org%7C19123-9")
    response = requests.get(url, timeout=TIMEOUT)
    assert response.json()["total"] == 1
    assert response.json()["entry"][0]["resource"]["id"] == "ckd4-low-egfr-obs-mg-2026-11-18"


def test_condition_code_across_patients(fixture_fhir_server: str) -> None:
    ids = search_ids(fixture_fhir_server, "Condition?code=http://hl7.org/fhir/sid/icd-10-cm%7CG70.00")
    assert sorted(ids) == ["deceased-cond-myasthenia",
                           "mg-inactive-cond-myasthenia-resolved",
                           "mg-inactive-cond-ocular-myasthenia-refuted",
                           "mg-pyridostigmine-cond-myasthenia",
                           "mg-remission-cond-myasthenia"]


def test_medication_code(fixture_fhir_server: str) -> None:
    ids = search_ids(fixture_fhir_server, "MedicationStatement?code=849497")
    assert ids == ["ckd4-low-egfr-medstmt-mg-glycinate"]


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("active", ["mg-pyridostigmine-medreq-pyridostigmine"]),
        ("stopped", ["mg-pyridostigmine-medreq-amoxicillin"]),
        ("active,stopped", ["mg-pyridostigmine-medreq-pyridostigmine",
                            "mg-pyridostigmine-medreq-amoxicillin"]),
        ("draft", []),
    ],
)
def test_status(fixture_fhir_server: str, status: str, expected: list[str]) -> None:
    path = f"MedicationRequest?patient=mg-pyridostigmine&status={status}"
    assert search_ids(fixture_fhir_server, path) == expected


@pytest.mark.parametrize(
    ("clinical_status", "expected"),
    [
        ("active,recurrence,relapse", ["mg-inactive-cond-ocular-myasthenia-refuted"]),
        ("resolved", ["mg-inactive-cond-myasthenia-resolved"]),
        ("http://terminology.hl7.org/CodeSystem/condition-clinical|resolved",
         ["mg-inactive-cond-myasthenia-resolved"]),
        ("inactive", []),
    ],
)
def test_clinical_status(
    fixture_fhir_server: str, clinical_status: str, expected: list[str]
) -> None:
    ids = search_ids(fixture_fhir_server, "Condition",
                     params={"patient": "mg-inactive", "clinical-status": clinical_status})
    assert ids == expected


def test_entered_in_error_condition_has_no_clinical_status(fixture_fhir_server: str) -> None:
    active = search_ids(fixture_fhir_server, "Condition?patient=no-relevant&clinical-status=active")
    assert active == ["no-relevant-cond-hypertension"]


def test_unknown_params_are_ignored_and_left_out_of_the_self_link(
    fixture_fhir_server: str,
) -> None:
    plain = get(fixture_fhir_server, "Condition?patient=ciprofloxacin").json()
    lenient = get(fixture_fhir_server,
                  "Condition?patient=ciprofloxacin&foo=bar&code:text=x&_format=json").json()
    assert lenient["entry"] == plain["entry"]
    assert lenient["link"][0]["url"] == f"{fixture_fhir_server}/Condition?patient=ciprofloxacin"


@pytest.mark.parametrize("query", ["_count=abc", "_count=-1", "_count=1.5", "_offset=x"])
def test_malformed_paging_is_400(fixture_fhir_server: str, query: str) -> None:
    assert_outcome(get(fixture_fhir_server, f"Observation?{query}"), 400, "invalid")


def test_count_is_capped_and_zero_gives_only_the_total(fixture_fhir_server: str) -> None:
    capped = get(fixture_fhir_server, "Observation?patient=ciprofloxacin&_count=100000").json()
    assert capped["link"][0]["url"].endswith("_count=500")
    zero = get(fixture_fhir_server, "Observation?patient=ciprofloxacin&_count=0").json()
    assert zero["total"] == 3
    assert "entry" not in zero and [link["relation"] for link in zero["link"]] == ["self"]


# --- sorting, paging, POST -------------------------------------------------------------------


def effective_dates(bundle: dict[str, Any]) -> list[Any]:
    return [parse_fhir_datetime(e["resource"]["effectiveDateTime"]) for e in bundle["entry"]]


def test_sort_by_date(fixture_fhir_server: str) -> None:
    newest_first = get(fixture_fhir_server, "Observation?patient=ckd4-low-egfr&_sort=-date").json()
    dates = effective_dates(newest_first)
    assert dates == sorted(dates, reverse=True) and dates[0] > dates[-1]
    oldest_first = get(fixture_fhir_server, "Observation?patient=ckd4-low-egfr&_sort=date").json()
    assert effective_dates(oldest_first) == sorted(dates)
    assert newest_first["link"][0]["url"].endswith("_sort=-date")


def test_paging_follows_next_links_to_the_end(fixture_fhir_server: str) -> None:
    everything = search_ids(fixture_fhir_server, "Observation?patient=ckd4-low-egfr&_sort=-date")
    url: str | None = (
        f"{fixture_fhir_server}/Observation?patient=ckd4-low-egfr&_sort=-date&_count=2"
    )
    paged: list[str] = []
    pages = 0
    while url:
        bundle = requests.get(url, timeout=TIMEOUT).json()
        pages += 1
        assert bundle["total"] == len(everything)
        assert len(bundle.get("entry", [])) <= 2
        paged += [entry["resource"]["id"] for entry in bundle.get("entry", [])]
        links = {link["relation"]: link["url"] for link in bundle["link"]}
        assert links["self"].startswith(fixture_fhir_server)
        url = links.get("next")
    assert paged == everything
    assert pages == 3  # 5 results, 2 per page


def test_post_search_form_encoded(fixture_fhir_server: str) -> None:
    form = {"patient": "ckd4-low-egfr", "code": f"{LOINC}|19123-9,{LOINC}|98979-8",
            "_sort": "-date"}
    response = requests.post(f"{fixture_fhir_server}/Observation/_search", data=form,
                             timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == FHIR_JSON
    posted = [entry["resource"]["id"] for entry in response.json()["entry"]]
    assert posted == search_ids(fixture_fhir_server, "Observation", params=form)
    # Parameters may also sit in the URL of a _search.
    mixed = requests.post(f"{fixture_fhir_server}/Observation/_search?patient=ckd4-low-egfr",
                          data={"code": "19123-9"}, timeout=TIMEOUT)
    assert mixed.json()["total"] == 1


# --- browsers, benchmarks, headers -----------------------------------------------------------


@pytest.mark.parametrize("path", ["metadata", "Patient/mg-pyridostigmine", "Patient/missing"])
def test_cors_header_on_every_response(fixture_fhir_server: str, path: str) -> None:
    response = get(fixture_fhir_server, path, headers={"Origin": "https://sandbox.cds-hooks.org"})
    assert response.headers["Access-Control-Allow-Origin"] == "*"


def test_cors_preflight(fixture_fhir_server: str) -> None:
    response = requests.options(
        f"{fixture_fhir_server}/Observation/_search",
        headers={
            "Origin": "https://sandbox.cds-hooks.org",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
        timeout=TIMEOUT,
    )
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    methods = {m.strip() for m in response.headers["Access-Control-Allow-Methods"].split(",")}
    assert methods == {"GET", "POST", "OPTIONS"}
    allowed_header = response.headers["Access-Control-Allow-Headers"]
    allowed = {h.strip().lower() for h in allowed_header.split(",")}
    assert {"authorization", "content-type", "accept"} <= allowed


def test_delay_setting() -> None:
    app = create_fixture_app(Settings(fixture_server_delay_ms=200))
    with serve_in_background(app) as base:
        started = time.perf_counter()
        response = get(base, "Patient/mg-pyridostigmine")
        elapsed = time.perf_counter() - started
    assert response.status_code == 200
    assert elapsed >= 0.2


def test_authorization_and_accept_are_recorded_not_logged(
    fixture_fhir_server: str, fixture_fhir_app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    token = f"test-token-{uuid.uuid4()}"
    marker = f"marker-{uuid.uuid4()}"
    caplog.set_level(logging.DEBUG)
    response = get(fixture_fhir_server, f"Condition?patient=mg-inactive&_marker={marker}",
                   headers={"Authorization": f"Bearer {token}", "Accept": FHIR_JSON})
    assert response.status_code == 200
    seen = [r for r in fixture_state(fixture_fhir_app).seen_requests if marker in r.query]
    assert len(seen) == 1
    method, path, query, headers = seen[0]
    assert (method, path) == ("GET", "/Condition")
    assert query == f"patient=mg-inactive&_marker={marker}"
    assert headers["Authorization"] == f"Bearer {token}"
    assert headers["Accept"] == FHIR_JSON
    assert token not in repr(seen[0])
    assert token not in caplog.text


def test_posted_form_is_recorded(fixture_fhir_server: str, fixture_fhir_app: Flask) -> None:
    marker = f"marker-{uuid.uuid4()}"
    requests.post(f"{fixture_fhir_server}/Condition/_search",
                  data={"patient": "mg-inactive", "_marker": marker}, timeout=TIMEOUT)
    (seen,) = [r for r in fixture_state(fixture_fhir_app).seen_requests if marker in r.query]
    assert seen.method == "POST" and seen.path == "/Condition/_search"
    assert seen.headers["Content-Type"] == "application/x-www-form-urlencoded"


def test_other_fixture_directory(tmp_path: Path) -> None:
    source = bundled_dir("fixtures") / "patients" / "no-relevant.json"
    (tmp_path / "only.json").write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    client = create_fixture_app(Settings(), fixtures_dir=tmp_path).test_client()
    assert client.get("/Patient/no-relevant").status_code == 200
    assert client.get("/Patient/mg-pyridostigmine").status_code == 404


# --- the request fixtures agree with a live fetch ----------------------------------------------


@pytest.mark.parametrize(
    "scenario",
    [s for s in SCENARIOS if s.prefetch and s.shape in ("r4", "sandbox", "sandbox-nodrug")],
    ids=lambda s: s.file_name,
)
def test_prefetch_equals_a_live_fetch(fixture_fhir_server: str, scenario: Any) -> None:
    path = bundled_dir("fixtures") / "requests" / scenario.file_name
    request = json.loads(path.read_text(encoding="utf-8"))
    for key in PREFETCH_KEYS:
        query = render_template(key.template, request["context"])
        live = get(fixture_fhir_server, query).text.replace(fixture_fhir_server,
                                                             FIXTURE_FHIR_SERVER)
        assert json.loads(live) == request["prefetch"][key.name], key.name
