"""Hostile and broken input: every answer is a deliberate status with a JSON body, never a 500.

Authentication is off here (``Settings(auth="off")``): these are the checks behind it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from cds_service.app import create_app
from cds_service.fixture_server import serve_in_background
from cds_service.settings import Settings

REQUESTS_DIR = Path(__file__).resolve().parent.parent / "fixtures" / "requests"
SERVICE = "/cds-services/magnesium-order-select"


def load(name: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((REQUESTS_DIR / name).read_text(encoding="utf-8"))
    body.pop("fhirServer", None)  # everything prefetched: no network in these tests
    return body


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Flask:
    database = tmp_path_factory.mktemp("hostile") / "cds.sqlite3"
    return create_app(
        Settings(auth="off", database_url=f"sqlite:///{database}", max_request_bytes=1_000_000)
    )


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture(scope="module")
def live_url(app: Flask) -> Iterator[str]:
    with serve_in_background(app) as url:
        yield url


def post(client: FlaskClient, data: bytes | str, content_type: str = "application/json") -> Any:
    response = client.post(SERVICE, data=data, content_type=content_type)
    assert response.is_json, response.data[:200]
    return response


def problems(response: Any) -> list[str]:
    return [p["path"] for p in response.get_json().get("problems", [])]


# --- size ----------------------------------------------------------------------------------


def test_a_body_over_the_limit_gets_413(client: FlaskClient) -> None:
    response = post(client, b'{"hook": "' + b"x" * 1_000_001 + b'"}')
    assert response.status_code == 413
    assert response.get_json()["error"] == "request-too-large"


def test_a_chunked_body_over_the_limit_gets_413_too(live_url: str) -> None:
    # No Content-Length: the limit must hold while streaming, not be silently truncated.
    def chunks() -> Iterator[bytes]:
        yield b'{"hook": "'
        for _ in range(30):
            yield b"x" * 50_000
        yield b'"}'

    response = requests.post(
        live_url + SERVICE, data=chunks(), headers={"Content-Type": "application/json"}, timeout=30
    )
    assert response.status_code == 413
    assert response.json()["error"] == "request-too-large"


def test_the_default_limit_admits_large_prefetch_bundles(tmp_path: Path) -> None:
    assert Settings().max_request_bytes >= 10_000_000
    app = create_app(Settings(auth="off", database_url=f"sqlite:///{tmp_path / 'db.sqlite3'}"))
    body = load("mg-pyridostigmine.order-select.json")
    entries = body["prefetch"]["observations"].setdefault("entry", [])
    filler = {
        "resourceType": "Observation",
        "id": "filler",
        "status": "final",
        "code": {"text": "unrelated"},
        "subject": {"reference": "Patient/mg-pyridostigmine"},
        "valueString": "y" * 1000,
    }
    entries.extend({"resource": {**filler, "id": f"filler-{n}"}} for n in range(5000))
    data = json.dumps(body)
    assert len(data) > 5_000_000
    response = app.test_client().post(SERVICE, data=data, content_type="application/json")
    assert response.status_code == 200


# --- JSON that is not what it seems --------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    ],
    ids=["deep-array", "deep-object"],
)
def test_absurd_nesting_gets_400_not_a_recursion_error(client: FlaskClient, data: bytes) -> None:
    response = post(client, data)
    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid-json"


@pytest.mark.parametrize("depth", [50, 500, 900, 990])
@pytest.mark.parametrize("where", ["draft", "prefetch", "context"])
def test_deep_nesting_inside_a_valid_request_is_survived(
    client: FlaskClient, depth: int, where: str
) -> None:
    body = load("mg-pyridostigmine.order-select.json")
    if where == "draft":
        body["context"]["draftOrders"]["entry"][0]["resource"]["note"] = "@@"
    elif where == "prefetch":
        body["prefetch"]["patient"]["extension"] = "@@"
    else:
        body["context"]["extension"] = "@@"
    nested = '{"a":' * depth + "1" + "}" * depth
    response = post(client, json.dumps(body).replace('"@@"', nested))
    assert response.status_code in {200, 400}


@pytest.mark.parametrize(
    "data",
    ['{"hook": NaN}', '{"hook": Infinity}', '{"hook": -Infinity}', '{"hook": ' + "9" * 5000 + "}"],
    ids=["nan", "inf", "-inf", "5000-digit-int"],
)
def test_numbers_json_does_not_have_get_400(client: FlaskClient, data: str) -> None:
    response = post(client, data)
    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid-json"


def test_nan_in_a_dose_is_refused_not_compared(client: FlaskClient) -> None:
    body = load("mg-pyridostigmine.order-select.json")
    resource = body["context"]["draftOrders"]["entry"][0]["resource"]
    resource["dosageInstruction"] = [{"doseAndRate": [{"doseQuantity": {"value": "@@"}}]}]
    assert post(client, json.dumps(body).replace('"@@"', "NaN")).status_code == 400


def strict_json(data: bytes) -> Any:
    """What a strict JSON reader (RFC 8259) makes of an answer: no NaN, no Infinity."""

    def refuse(name: str) -> Any:
        raise AssertionError(f"the answer holds {name}, which is not JSON: {data[:300]!r}")

    return json.loads(data, parse_constant=refuse)


@pytest.mark.parametrize("number", ["1e400", "-1e400", "1E999", "123.4e5678"])
@pytest.mark.parametrize("where", ["hook", "dose"])
def test_a_float_beyond_the_double_range_gets_400(
    client: FlaskClient, number: str, where: str
) -> None:
    # Python would read it as inf and write it back as Infinity, which is not JSON.
    if where == "hook":
        data = '{"hook": ' + number + "}"
    else:
        body = load("mg-pyridostigmine.order-select.json")
        resource = body["context"]["draftOrders"]["entry"][0]["resource"]
        resource["dosageInstruction"] = [{"doseAndRate": [{"doseQuantity": {"value": "@@"}}]}]
        data = json.dumps(body).replace('"@@"', number)
    response = post(client, data)
    assert response.status_code == 400
    answer = strict_json(response.data)
    assert answer["error"] == "invalid-json"
    assert any(number in p["message"] and "finite" in p["message"] for p in answer["problems"])


HUGE_INT = 10**400  # valid JSON, finite, and beyond what a float holds


def _draft_with(dosage: dict[str, Any]) -> dict[str, Any]:
    body = load("mg-pyridostigmine.order-select.json")
    resource = body["context"]["draftOrders"]["entry"][0]["resource"]
    resource["dosageInstruction"] = [dosage]
    return body


@pytest.mark.parametrize(
    "dosage",
    [
        {"doseAndRate": [{"doseQuantity": {"value": HUGE_INT, "unit": "mg"}}]},
        {"doseAndRate": [{"doseQuantity": {"value": -HUGE_INT, "unit": "mg"}}]},
        {"doseAndRate": [{"doseQuantity": {"value": "1e400", "unit": "mg"}}]},
        {"doseAndRate": [{"doseQuantity": {"value": "NaN", "unit": "mg"}}]},
        {"doseQuantity": {"value": 1.7e308, "unit": "g"}},
        {"timing": {"repeat": {"frequency": HUGE_INT, "period": 1, "periodUnit": "d"}}},
        {"timing": {"repeat": {"frequency": 1, "period": HUGE_INT, "periodUnit": "d"}}},
        {"timing": {"repeat": {"frequencyMax": HUGE_INT, "period": 1, "periodUnit": "h"}}},
        {"timing": {"repeat": {"frequency": 1e308, "period": 1e-308, "periodUnit": "min"}}},
        {
            "doseAndRate": [{"doseQuantity": {"value": 1e308, "unit": "mg"}}],
            "timing": {"repeat": {"frequency": 1e308, "period": 1e-300, "periodUnit": "s"}},
        },
        {
            "doseAndRate": [{"doseQuantity": {"value": 1.7e308, "unit": "g"}}],
            "timing": {"repeat": {"frequency": 1000, "period": 1, "periodUnit": "h"}},
        },
    ],
    ids=[
        "dose-huge-int",
        "dose-huge-negative-int",
        "dose-string-1e400",
        "dose-string-nan",
        "dose-near-max-float-grams",
        "frequency-huge-int",
        "period-huge-int",
        "frequency-max-huge-int",
        "frequency-overflows-per-day",
        "frequency-times-period-overflows",
        "grams-times-frequency-overflows",
    ],
)
def test_huge_but_valid_numbers_get_a_json_answer_not_a_500(
    client: FlaskClient, dosage: dict[str, Any]
) -> None:
    response = post(client, json.dumps(_draft_with(dosage)))
    assert response.status_code == 200, response.data[:300]
    strict_json(response.data)  # no Infinity or NaN written back


@pytest.mark.parametrize(
    "data",
    [b'{"hook": "\xe9"}', "{}".encode("utf-16"), b'{"hook": "\xc3\x28"}', b"\xff\xfe\x00"],
    ids=["latin-1", "utf-16", "bad-continuation", "garbage"],
)
def test_non_utf8_gets_400(client: FlaskClient, data: bytes) -> None:
    response = post(client, data)
    assert response.status_code == 400
    assert "UTF-8" in response.get_json()["message"]


@pytest.mark.parametrize("data", ["[]", '"hook"', "null", "42", "true", ""])
def test_a_body_that_is_not_an_object_gets_400(client: FlaskClient, data: str) -> None:
    response = post(client, data)
    assert response.status_code == 400
    assert problems(response)[0].startswith("$")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", ""])
def test_not_json_content_gets_415(client: FlaskClient, content_type: str) -> None:
    body = json.dumps(load("mg-pyridostigmine.order-select.json"))
    response = client.post(SERVICE, data=body, content_type=content_type or None)
    assert response.status_code == 415
    assert response.is_json


# --- wrong types: 400 naming the path ------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (lambda b: b.update(hook=5), "$.hook"),
        (lambda b: b.update(hookInstance=["x"]), "$.hookInstance"),
        (lambda b: b.update(context=[]), "$.context"),
        (lambda b: b.update(context=None), "$.context"),
        (lambda b: b.update(prefetch="everything"), "$.prefetch"),
        (lambda b: b.update(fhirServer=42), "$.fhirServer"),
        (lambda b: b["context"].update(patientId=7), "$.context.patientId"),
        (lambda b: b["context"].update(userId={"id": "x"}), "$.context.userId"),
        (lambda b: b["context"].update(selections="MedicationRequest/1"), "$.context.selections"),
        (lambda b: b["context"].update(draftOrders=[]), "$.context.draftOrders"),
        (lambda b: b["context"]["draftOrders"].update(entry={}), "$.context.draftOrders.entry"),
        (lambda b: b["prefetch"].update(patient="Patient/1"), "$.prefetch.patient"),
        (
            lambda b: b.update(
                fhirServer="http://127.0.0.1:1",
                fhirAuthorization={
                    "access_token": "t",
                    "token_type": "Bearer",
                    "expires_in": "soon",
                    "scope": "s",
                    "subject": "x",
                },
            ),
            "$.fhirAuthorization.expires_in",
        ),
        (lambda b: b.pop("context"), "$.context"),
    ],
)
def test_wrong_types_get_400_naming_the_path(client: FlaskClient, mutate: Any, path: str) -> None:
    body = load("mg-pyridostigmine.order-select.json")
    mutate(body)
    response = post(client, json.dumps(body))
    assert response.status_code == 400, response.get_json()
    assert path in problems(response), problems(response)


# --- prefetch that is not to be trusted ----------------------------------------------------


def myasthenia_condition(subject: str) -> dict[str, Any]:
    conditions = load("mg-pyridostigmine.order-select.json")["prefetch"]["conditions"]
    resource = copy.deepcopy(conditions["entry"][0]["resource"])
    assert resource["resourceType"] == "Condition"
    resource["id"] = "injected-myasthenia"
    resource["subject"] = {"reference": subject}
    return resource


def call_with_condition(client: FlaskClient, key: str, condition: dict[str, Any]) -> Any:
    body = load("no-relevant.order-select.json")
    bundle = body["prefetch"].get(key) or {"resourceType": "Bundle", "type": "searchset"}
    bundle.setdefault("entry", []).append({"resource": condition})
    body["prefetch"][key] = bundle
    response = post(client, json.dumps(body))
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def indicators(answer: dict[str, Any]) -> list[str]:
    return [card["indicator"] for card in answer["cards"]]


def data_issues(answer: dict[str, Any]) -> list[dict[str, str]]:
    return answer.get("extension", {}).get("org.magnesium-cds", {}).get("dataIssues", [])


def test_the_injected_condition_counts_when_it_is_the_patients(client: FlaskClient) -> None:
    # Control: the same condition for the right patient does raise the myasthenia card.
    answer = call_with_condition(client, "conditions", myasthenia_condition("Patient/no-relevant"))
    assert "warning" in indicators(answer)


def test_prefetch_for_another_patient_is_ignored_and_reported(client: FlaskClient) -> None:
    answer = call_with_condition(client, "conditions", myasthenia_condition("Patient/someone-else"))
    assert "warning" not in indicators(answer)
    issues = data_issues(answer)
    assert any("another patient" in i["problem"] and "conditions" in i["where"] for i in issues)


def test_a_patient_id_with_a_slash_is_not_matched_by_its_last_segment(
    client: FlaskClient,
) -> None:
    # "Patient/someone/no-relevant" names the patient "no-relevant" (a reference's last
    # segment), not the patient "someone/no-relevant" in context: not the patient's data.
    body = load("no-relevant.order-select.json")
    body["context"]["patientId"] = "someone/no-relevant"
    condition = myasthenia_condition("Patient/someone/no-relevant")
    bundle = body["prefetch"].get("conditions") or {"resourceType": "Bundle", "type": "searchset"}
    bundle.setdefault("entry", []).append({"resource": condition})
    body["prefetch"]["conditions"] = bundle
    injected = f"prefetch.conditions.entry[{len(bundle['entry']) - 1}]"
    response = post(client, json.dumps(body))
    assert response.status_code == 200, response.get_json()
    issues = {i["where"]: i["problem"] for i in data_issues(response.get_json())}
    assert "another patient" in issues.get(injected, ""), issues


def test_prefetch_of_the_wrong_type_is_ignored_and_reported(client: FlaskClient) -> None:
    answer = call_with_condition(
        client, "observations", myasthenia_condition("Patient/no-relevant")
    )
    assert "warning" not in indicators(answer)
    issues = data_issues(answer)
    assert any("Condition" in i["problem"] and "observations" in i["where"] for i in issues)


def test_a_prefetched_patient_of_another_id_is_not_taken(client: FlaskClient) -> None:
    body = load("no-relevant.order-select.json")
    body["prefetch"]["patient"] = {**body["prefetch"]["patient"], "id": "someone-else"}
    response = post(client, json.dumps(body))
    assert response.status_code in {200, 412}
    if response.status_code == 200:
        issues = data_issues(response.get_json())
        assert any("prefetch.patient" in i["where"] for i in issues)


# --- wrong types everywhere: every field of a real request, one at a time ------------------


def _leaf_paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if prefix:
        yield prefix
    children = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, child in children:
        yield from _leaf_paths(child, (*prefix, key))


def test_every_field_replaced_by_a_wrong_type_gets_a_deliberate_answer(client: FlaskClient) -> None:
    base = load("mg-pyridostigmine.order-select.json")
    failures = []
    for path in _leaf_paths(base):
        for wrong in ({"wrong": 1}, [1], None):  # truthy: `x or default` must not hide them
            body = copy.deepcopy(base)
            parent = body
            for part in path[:-1]:
                parent = parent[part]
            parent[path[-1]] = wrong
            response = client.post(SERVICE, data=json.dumps(body), content_type="application/json")
            if response.status_code not in {200, 400, 412} or not response.is_json:
                failures.append((path, wrong, response.status_code))
            elif response.status_code == 400 and not problems(response):
                failures.append((path, wrong, "400 without problems"))
    assert not failures, failures[:10]


def test_what_only_the_stdlib_parser_reads_is_still_answered(client: FlaskClient) -> None:
    # The fast parser (orjson) refuses a lone surrogate escape and a 400-digit integer; the
    # stdlib parser, which then reads the body, accepts both as it always did.
    body = load("mg-pyridostigmine.order-select.json")
    resource = body["context"]["draftOrders"]["entry"][0]["resource"]
    resource["note"] = [{"text": "@@"}]
    resource["dosageInstruction"] = [{"timing": {"repeat": {"frequency": "##"}}}]
    data = json.dumps(body).replace('"@@"', '"\\ud800"').replace('"##"', "9" * 400)
    with pytest.raises(orjson.JSONDecodeError):  # the premise: the fast path alone refuses it
        orjson.loads(data)
    response = post(client, data)
    assert response.status_code == 200, response.data[:300]
    strict_json(response.data)


CIPROFLOXACIN_SELECT = "/cds-services/magnesium-order-select"


def ciprofloxacin_with(field: str, raw_json: str) -> str:
    """ciprofloxacin.order-select (its card offers an UPDATE that sends the draft back) with
    one field of the draft order set to ``raw_json``, written as is."""
    body = load("ciprofloxacin.order-select.json")
    body["context"]["draftOrders"]["entry"][0]["resource"][field] = "@@"
    return json.dumps(body).replace('"@@"', raw_json)


def update_offered(answer: dict[str, Any]) -> bool:
    return any(
        action["type"] == "update"
        for card in answer["cards"]
        for suggestion in card.get("suggestions", [])
        for action in suggestion["actions"]
    )


@pytest.mark.parametrize(
    ("field", "raw_json"),
    [
        ("note", '[{"text": "\\ud800"}]'),
        ("dispenseRequest", '{"numberOfRepeatsAllowed": ' + "9" * 400 + "}"),
    ],
    ids=["lone-surrogate", "400-digit-integer"],
)
def test_a_draft_only_the_stdlib_can_write_is_still_sent_back(
    client: FlaskClient, field: str, raw_json: str
) -> None:
    # orjson writes the answer; what it cannot write (but the stdlib parser read) is written
    # by the stdlib: never a 500 for a value copied from the EHR's own draft.
    response = post(client, ciprofloxacin_with(field, raw_json))
    assert response.status_code == 200, response.data[:300]
    answer = strict_json(response.data)
    assert update_offered(answer)


def test_a_drug_name_with_a_lone_surrogate_still_gets_its_card(client: FlaskClient) -> None:
    body = load("mg-pyridostigmine.order-select.json")
    concept = body["context"]["draftOrders"]["entry"][0]["resource"]["medicationCodeableConcept"]
    concept["text"] = "@@"
    data = json.dumps(body).replace('"@@"', '"magnesium oxide \\ud800"')
    response = post(client, data)
    assert response.status_code == 200, response.data[:300]
    assert [c["indicator"] for c in strict_json(response.data)["cards"]] == ["warning"]


@pytest.mark.parametrize("depth", [65, 300, 1000])
def test_a_draft_nested_absurdly_deep_is_read_but_never_sent_back(
    client: FlaskClient, depth: int
) -> None:
    nested = '{"a":' * depth + "1" + "}" * depth
    note = f'[{{"text": "x", "extension": {nested}}}]'
    response = post(client, ciprofloxacin_with("note", note))
    if response.status_code == 400:  # beyond what the parsers read: refused as such
        assert response.get_json()["error"] == "invalid-json"
        return
    assert response.status_code == 200, response.data[:300]
    answer = strict_json(response.data)
    assert answer["cards"]  # the interaction is still found
    assert not update_offered(answer)
    assert any("levels deep" in issue["problem"] for issue in data_issues(answer))


# --- feedback ------------------------------------------------------------------------------

FEEDBACK = "/cds-services/magnesium-order-select/feedback"
A_CARD = "0b7f4c4e-8d1a-4e3f-9c55-1f2a3b4c5d6e"


def _feedback(**changes: Any) -> dict[str, Any]:
    item = {"card": A_CARD, "outcome": "overridden", "outcomeTimestamp": "2025-03-01T10:00:00Z"}
    return {"feedback": [{**item, **changes}]}


@pytest.mark.parametrize(
    ("data", "path"),
    [
        # 9999-12-31 at -23:59 is in the year 10000 in UTC: datetime overflows.
        (json.dumps(_feedback(outcomeTimestamp="9999-12-31T23:59:59-23:59")),
         "$.feedback[0].outcomeTimestamp"),
        (json.dumps(_feedback(outcomeTimestamp="0001-01-01T00:00:00+23:59")),
         "$.feedback[0].outcomeTimestamp"),
        # Valid JSON, but a lone surrogate is not text a database can store (UTF-8 cannot).
        (json.dumps(_feedback(overrideReason={"userComment": "\ud800"})),
         "$.feedback[0].overrideReason.userComment"),
        (json.dumps(_feedback(overrideReason={"reason": {"code": "x\udfff", "system": "s"}})),
         "$.feedback[0].overrideReason.reason.code"),
        (json.dumps(_feedback(outcome="accepted", acceptedSuggestions=[{"id": "\udc80"}])),
         "$.feedback[0].acceptedSuggestions[0].id"),
        (json.dumps({"feedback": _feedback()["feedback"] * 101}), "$.feedback"),
        (json.dumps(_feedback(overrideReason={"userComment": "x" * 2001})),
         "$.feedback[0].overrideReason.userComment"),
    ],
)
def test_hostile_feedback_gets_400_naming_the_field(
    client: FlaskClient, data: str, path: str
) -> None:
    response = client.post(FEEDBACK, data=data, content_type="application/json")
    assert response.status_code == 400, response.get_data(as_text=True)
    assert problems(response) == [path]
