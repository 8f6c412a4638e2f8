"""Review fixes in the patient-context fallback and in suggestions, over real HTTP.

Referenced Medication resources, paged prefetch searchsets, DSTU2 servers behind patient-view,
suggestions built from the repaired draft in the client's FHIR version, stable suggestion
uuids, and the Observation prefetch's LOINC codes coming from the knowledge base.
"""

from __future__ import annotations

import ast
import copy
import json
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import requests
from hook_calls import (
    StubFhirServer,
    assert_conformant,
    call,
    data_issues,
    fhir_client,
    load_request,
    only_card,
    searchset,
    send_json,
)

from cds_service.app import create_app
from cds_service.knowledge import DATA_DIR, default_knowledge, load_knowledge
from cds_service.protocol.services import OBSERVATION_LAB_GROUPS
from cds_service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


# --- helpers -------------------------------------------------------------------------------


def _mg_implied_only_by_pyridostigmine() -> tuple[dict[str, Any], dict[str, Any]]:
    """The MG patient's order-select call with no coded conditions: only the active
    pyridostigmine order implies myasthenia gravis. Returns (body, that order)."""
    body = load_request("mg-pyridostigmine.order-select.json")
    body.pop("fhirServer", None)
    body["prefetch"]["conditions"] = None
    for entry in body["prefetch"]["medicationRequests"]["entry"]:
        resource = entry["resource"]
        if "pyridostigmine" in json.dumps(resource.get("medicationCodeableConcept", "")).lower():
            return body, resource
    raise AssertionError("no pyridostigmine order in the fixture")


def _by_reference(order: dict[str, Any], medication_id: str) -> dict[str, Any]:
    """Turn an order's medicationCodeableConcept into a Medication resource it references."""
    concept = order.pop("medicationCodeableConcept")
    order["medicationReference"] = {"reference": f"Medication/{medication_id}"}
    return {"resourceType": "Medication", "id": medication_id, "code": concept}


def _topics(body: dict[str, Any]) -> set[str]:
    return {card["source"]["topic"]["code"] for card in body["cards"]}


def _actions(body: dict[str, Any], topic: str) -> list[dict[str, Any]]:
    return [
        action
        for card in body["cards"]
        if card["source"]["topic"]["code"] == topic
        for suggestion in card.get("suggestions", [])
        for action in suggestion["actions"]
    ]


def _draft(body: dict[str, Any]) -> dict[str, Any]:
    resource: dict[str, Any] = body["context"]["draftOrders"]["entry"][0]["resource"]
    return resource


def _as_dstu2_order(order: dict[str, Any]) -> None:
    """An R4 draft MedicationRequest reshaped as a DSTU2 MedicationOrder."""
    order["resourceType"] = "MedicationOrder"
    order["patient"] = order.pop("subject")
    order.pop("intent", None)
    order.pop("category", None)
    order["dateWritten"] = order.pop("authoredOn")
    order["prescriber"] = order.pop("requester")
    for instruction in order.get("dosageInstruction", []):
        for dose_and_rate in instruction.pop("doseAndRate", []):
            instruction["doseQuantity"] = dose_and_rate["doseQuantity"]


def _as_stu3_order(order: dict[str, Any]) -> None:
    for instruction in order.get("dosageInstruction", []):
        for dose_and_rate in instruction.pop("doseAndRate", []):
            instruction["doseQuantity"] = dose_and_rate["doseQuantity"]


# --- 1. referenced Medication resources ------------------------------------------------------


def test_a_medication_included_in_the_prefetch_names_the_order_that_references_it(
    cds_url: str,
) -> None:
    body, order = _mg_implied_only_by_pyridostigmine()
    medication = _by_reference(order, "pyridostigmine")
    body["prefetch"]["medicationRequests"]["entry"].append(
        {"resource": medication, "search": {"mode": "include"}}
    )
    result = assert_conformant(call(cds_url, "magnesium-order-select", body))
    assert "myasthenia-magnesium" in _topics(result)
    problems = " ".join(issue["problem"] for issue in data_issues(result))
    assert "not a MedicationRequest" not in problems and "names no medication" not in problems


def test_a_referenced_medication_not_sent_is_read_from_the_fhir_server(cds_url: str) -> None:
    body, order = _mg_implied_only_by_pyridostigmine()
    medication = _by_reference(order, "pyridostigmine")
    body["fhirAuthorization"] = {
        "access_token": "medication-read-token",
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "patient/*.read",
        "subject": "cds-service",
    }
    server = StubFhirServer(by_path={"/Medication/pyridostigmine": medication})
    with server.running() as base_url:
        body["fhirServer"] = base_url
        result = assert_conformant(call(cds_url, "magnesium-order-select", body))
    assert "myasthenia-magnesium" in _topics(result)
    assert server.paths == ["/Medication/pyridostigmine"]
    assert server.auth == ["Bearer medication-read-token"]


def test_a_referenced_medication_that_cannot_be_read_is_a_data_issue_not_412(
    cds_url: str,
) -> None:
    body, order = _mg_implied_only_by_pyridostigmine()
    _by_reference(order, "pyridostigmine")
    server = StubFhirServer()
    with server.running() as base_url:
        body["fhirServer"] = base_url
        result = assert_conformant(call(cds_url, "magnesium-order-select", body))
    assert "myasthenia-magnesium" not in _topics(result)
    assert any(
        "references Medication/pyridostigmine" in issue["problem"]
        and "answered with an error (HTTP 4xx)" in issue["problem"]
        for issue in data_issues(result)
    )


def test_a_draft_naming_its_drug_by_reference_is_resolved_from_the_draft_bundle(
    cds_url: str,
) -> None:
    body = load_request("mg-pyridostigmine.order-select.json")
    draft = _draft(body)
    medication = _by_reference(draft, "draft-magnesium")
    body["context"]["draftOrders"]["entry"].append({"resource": medication})
    result = assert_conformant(call(cds_url, "magnesium-order-select", body))
    assert only_card(result)["indicator"] == "warning"


# --- 2. paged prefetch -------------------------------------------------------------------------


def _paged_conditions(body: dict[str, Any], next_url: str) -> list[dict[str, Any]]:
    """Split the prefetched conditions: page 1 empty but for a next link; returns page 2."""
    conditions = body["prefetch"]["conditions"]
    rest = conditions["entry"]
    conditions["entry"] = []
    conditions["link"] = [{"relation": "next", "url": next_url}]
    body["prefetch"]["medicationRequests"] = None  # MG only from the coded condition
    return list(rest)


def test_the_rest_of_a_paged_prefetch_is_read_from_the_fhir_server(cds_url: str) -> None:
    body = load_request("mg-pyridostigmine.order-select.json")
    server = StubFhirServer()
    rest = _paged_conditions(body, f"{server.base}/Condition?page=2")
    server.by_path["/Condition?page=2"] = searchset(*(entry["resource"] for entry in rest))
    with server.running() as base_url:
        body["fhirServer"] = base_url
        result = assert_conformant(call(cds_url, "magnesium-order-select", body))
    assert "myasthenia-magnesium" in _topics(result)
    assert server.paths == ["/Condition?page=2"]


def test_a_paged_prefetch_without_a_fhir_server_says_only_the_first_page_was_read(
    cds_url: str,
) -> None:
    body = load_request("mg-pyridostigmine.order-select.json")
    body.pop("fhirServer", None)
    _paged_conditions(body, "http://127.0.0.1:9/Condition?page=2")
    result = assert_conformant(call(cds_url, "magnesium-order-select", body))
    assert "myasthenia-magnesium" not in _topics(result)
    assert any(
        issue["where"] == "prefetch.conditions"
        and "only the first page was prefetched" in issue["problem"]
        for issue in data_issues(result)
    )


def test_a_paged_prefetch_is_not_followed_to_another_origin(cds_url: str) -> None:
    body = load_request("mg-pyridostigmine.order-select.json")
    elsewhere = StubFhirServer()
    _paged_conditions(body, f"{elsewhere.base}/Condition?page=2")
    server = StubFhirServer()
    with server.running() as base_url, elsewhere.running():
        body["fhirServer"] = base_url
        result = assert_conformant(call(cds_url, "magnesium-order-select", body))
    assert elsewhere.paths == [] and server.paths == []
    assert any("another origin" in issue["problem"] for issue in data_issues(result))


def test_search_templates_ask_for_a_page_size(cds_url: str) -> None:
    prefetch = requests.get(f"{cds_url}/cds-services", timeout=10).json()["services"][0]["prefetch"]
    for name in ("conditions", "medicationRequests", "medicationStatements", "observations"):
        assert "&_count=100" in prefetch[name], name
    assert "_include=MedicationRequest:medication" in prefetch["medicationRequests"]
    assert "_include=MedicationStatement:medication" in prefetch["medicationStatements"]


# --- 6. one byte and time budget per key -----------------------------------------------------


class _Pages(BaseHTTPRequestHandler):
    """Endless searchset pages of ``size`` bytes each, each after ``delay`` seconds."""

    size = 0
    delay = 0.0
    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).seen.append(self.path)
        time.sleep(self.delay)
        port = self.server.server_address[1]
        page = {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [{"resource": {"resourceType": "Patient", "id": "p", "pad": "x" * self.size}}],
            "link": [
                {"relation": "next", "url": f"http://127.0.0.1:{port}/Patient?n={len(self.seen)}"}
            ],
        }
        send_json(self, page)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def _pages(size: int, delay: float) -> Iterator[tuple[str, list[str]]]:
    handler = type("Pages", (_Pages,), {"size": size, "delay": delay, "seen": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler.seen
    finally:
        httpd.shutdown()
        httpd.server_close()




def test_the_byte_bound_holds_for_a_key_across_its_pages() -> None:
    # Each page is well under the bound; five of them together are not.
    with _pages(size=40_000, delay=0) as (base, seen):
        result = fhir_client(base, max_response_bytes=100_000).fetch("k", "Patient?x=1")
    assert result.resource is None and "exceeds 100000 bytes" in (result.problem or "")
    assert len(seen) == 3


def test_the_read_timeout_holds_for_a_key_across_its_pages() -> None:
    # Each page comes well within the read timeout; five of them together do not.
    with _pages(size=10, delay=0.4) as (base, _):
        started = time.monotonic()
        result = fhir_client(base, read_timeout=1.0).fetch("k", "Patient?x=1")
        elapsed = time.monotonic() - started
    assert result.resource is None and "in time" in (result.problem or "")
    assert elapsed < 1.8


def test_a_fetched_searchset_cut_at_the_page_bound_says_so() -> None:
    with _pages(size=10, delay=0) as (base, seen):
        result = fhir_client(base, max_pages=2).fetch("k", "Patient?x=1")
    assert result.resource is not None and len(result.resource["entry"]) == 2
    assert result.incomplete is not None and "more than 2 pages" in result.incomplete
    assert len(seen) == 2


# --- 3, 4, 8. suggestions ----------------------------------------------------------------------


def test_suggestions_are_built_from_the_repaired_draft(cds_url: str) -> None:
    body = load_request("hashimoto-levothyroxine.order-select.json")
    draft = _draft(body)
    # The sandbox's shapes: single objects where lists belong.
    draft["dosageInstruction"] = draft["dosageInstruction"][0]
    draft["category"] = draft["category"][0]
    timing = draft["dosageInstruction"]["timing"]
    result = assert_conformant(call(cds_url, "magnesium-order-select", body))
    [action] = _actions(result, "chelation-interaction")
    resource = action["resource"]
    assert isinstance(resource["category"], list)
    [instruction] = resource["dosageInstruction"]
    assert instruction["timing"] == timing  # kept, not replaced by a bare instruction
    assert instruction["patientInstruction"]


def test_switching_product_drops_the_old_products_amounts(cds_url: str) -> None:
    body = load_request("hashimoto-levothyroxine.order-select.citrate.json")
    draft = _draft(body)
    draft["dispenseRequest"] = {
        "numberOfRepeatsAllowed": 2,
        "quantity": {
            "value": 300,
            "unit": "mL",
            "system": "http://unitsofmeasure.org",
            "code": "mL",
        },
    }
    draft["dosageInstruction"][0]["maxDosePerAdministration"] = {"value": 10, "unit": "mL"}
    result = assert_conformant(call(cds_url, "magnesium-order-select", body))
    [action] = _actions(result, "autoimmune-guidance")
    resource = action["resource"]
    assert resource["dispenseRequest"] == {"numberOfRepeatsAllowed": 2}
    [instruction] = resource["dosageInstruction"]
    assert set(instruction) == {"timing", "route"}


def test_suggestion_uuids_are_the_same_for_a_retried_hook_instance(cds_url: str) -> None:
    body = load_request("hashimoto-levothyroxine.order-select.citrate.json")

    def uuids(payload: dict[str, Any]) -> list[str]:
        answer = assert_conformant(call(cds_url, "magnesium-order-select", payload))
        return [s["uuid"] for card in answer["cards"] for s in card.get("suggestions", [])]

    first, again = uuids(body), uuids(body)
    assert len(first) >= 2 and len(set(first)) == len(first)
    assert first == again
    other = copy.deepcopy(body)
    other["hookInstance"] = str(uuid.uuid4())
    assert not set(uuids(other)) & set(first)


def test_an_stu3_client_is_offered_a_procedure_request(cds_url: str) -> None:
    from fhir.resources.STU3 import get_fhir_model_class

    body = load_request("esrd-dialysis.order-sign.nolab.json")
    _as_stu3_order(_draft(body))
    result = assert_conformant(call(cds_url, "magnesium-order-sign", body))
    [action] = [a for a in _actions(result, "renal-magnesium") if a["type"] == "create"]
    assert action["resource"]["resourceType"] == "ProcedureRequest"
    get_fhir_model_class("ProcedureRequest").model_validate(action["resource"])


def test_a_dstu2_client_gets_the_lab_advice_in_words_not_an_r4_order(cds_url: str) -> None:
    body = load_request("esrd-dialysis.order-sign.nolab.json")
    _as_dstu2_order(_draft(body))
    body["context"].pop("selections", None)
    result = assert_conformant(call(cds_url, "magnesium-order-sign", body))
    cards = [c for c in result["cards"] if c["source"]["topic"]["code"] == "renal-magnesium"]
    assert cards
    assert not [a for a in _actions(result, "renal-magnesium") if a["type"] == "create"]
    assert "By hand (no one-click order in DSTU2): order a serum magnesium." in cards[0]["detail"]


def test_a_dstu2_draft_gets_the_spacing_advice_in_its_instruction_text(cds_url: str) -> None:
    body = load_request("hashimoto-levothyroxine.order-select.json")
    draft = _draft(body)
    _as_dstu2_order(draft)
    body["context"]["selections"] = [f"MedicationOrder/{draft['id']}"]
    original_text = draft["dosageInstruction"][0]["text"]
    result = assert_conformant(call(cds_url, "magnesium-order-select", body))
    [action] = _actions(result, "chelation-interaction")
    [instruction] = action["resource"]["dosageInstruction"]
    assert "patientInstruction" not in instruction
    assert instruction["text"].startswith(original_text) and len(instruction["text"]) > len(
        original_text
    )


# --- 5. patient-view against a DSTU2 server ----------------------------------------------------


def _dstu2_medication_order(patient_id: str) -> dict[str, Any]:
    return {
        "resourceType": "MedicationOrder",
        "id": "dstu2-order",
        "status": "active",
        "patient": {"reference": f"Patient/{patient_id}"},
        "medicationCodeableConcept": {
            "text": "magnesium oxide 400 MG Oral Tablet",
            "coding": [{"system": RXNORM, "code": "198741"}],
        },
    }


def test_patient_view_with_dstu2_prefetch_asks_a_dstu2_server_for_medication_orders(
    cds_url: str,
) -> None:
    body = load_request("mg-pyridostigmine.patient-view.json")
    del body["prefetch"]["medicationRequests"]  # the sandbox drops what its server lacks
    for entry in body["prefetch"]["conditions"]["entry"]:
        condition = entry["resource"]
        condition["patient"] = condition.pop("subject")
        condition["clinicalStatus"] = "active"
    patient_id = body["context"]["patientId"]
    server = StubFhirServer({"MedicationOrder": searchset(_dstu2_medication_order(patient_id))})
    with server.running() as base_url:
        body["fhirServer"] = base_url
        result = assert_conformant(call(cds_url, "magnesium-patient-view", body))
    assert [path.split("?")[0] for path in server.paths] == ["/MedicationOrder"]
    assert result["cards"]  # magnesium on file with myasthenia gravis


def test_a_server_that_does_not_know_medication_request_is_asked_for_medication_order(
    cds_url: str,
) -> None:
    body = load_request("mg-pyridostigmine.patient-view.json")
    del body["prefetch"]["medicationRequests"]
    patient_id = body["context"]["patientId"]
    server = StubFhirServer({"MedicationOrder": searchset(_dstu2_medication_order(patient_id))})
    with server.running() as base_url:
        body["fhirServer"] = base_url
        result = assert_conformant(call(cds_url, "magnesium-patient-view", body))
    assert [path.split("?")[0] for path in server.paths] == [
        "/MedicationRequest",
        "/MedicationOrder",
    ]
    assert any("MedicationOrder" in issue["problem"] for issue in data_issues(result))


# --- 7. LOINC codes from the knowledge base ----------------------------------------------------


def test_every_loinc_code_of_the_lab_groups_is_in_the_discovery_prefetch(cds_url: str) -> None:
    knowledge = default_knowledge()
    codes = {
        entry.code
        for group in ("serum-magnesium", "egfr", "creatinine")
        for entry in knowledge.lab_group(group).codes
    }
    assert set(OBSERVATION_LAB_GROUPS) == {"serum-magnesium", "egfr", "creatinine"}
    for service in requests.get(f"{cds_url}/cds-services", timeout=10).json()["services"]:
        query = service["prefetch"]["observations"]
        listed = {
            value.removeprefix("http://loinc.org|")
            for param in query.split("?", 1)[1].split("&")
            if param.startswith("code=")
            for value in param.removeprefix("code=").split(",")
        }
        assert listed == codes


def test_the_context_layer_does_not_import_the_protocol_layer() -> None:
    offenders: list[str] = []
    for path in (ROOT / "cds_service" / "context").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            offenders += [
                f"{path.name}: {n}" for n in names if n.startswith("cds_service.protocol")
            ]
    assert offenders == []


def test_the_observation_prefetch_follows_the_loaded_knowledge(tmp_path: Path) -> None:
    # A knowledge file with one more eGFR code: discovery advertises it, the fallback asks
    # for it. Nothing in the code lists LOINC codes of its own.
    directory = tmp_path / "knowledge"
    shutil.copytree(DATA_DIR, directory)
    labs_path = directory / "labs.json"
    labs = json.loads(labs_path.read_text(encoding="utf-8"))
    egfr = next(group for group in labs["groups"] if group["id"] == "egfr")
    egfr["codes"].append({"code": "99999-9", "display": "Test eGFR", "status": "verified"})
    labs_path.write_text(json.dumps(labs), encoding="utf-8")
    app = create_app(
        Settings(auth="off", database_url=f"sqlite:///{tmp_path / 'cds.sqlite3'}"),
        knowledge=load_knowledge(directory),
    )
    services = app.test_client().get("/cds-services").get_json()["services"]
    assert all("http://loinc.org|99999-9" in s["prefetch"]["observations"] for s in services)


def test_medication_references_are_read_in_every_form() -> None:
    from cds_service.context.fhir_json import medication_reference_key

    assert medication_reference_key({"reference": "Medication/m1"}) == "Medication/m1"
    assert (
        medication_reference_key({"reference": "https://ehr.example/fhir/Medication/m1"})
        == "Medication/m1"
    )
    assert medication_reference_key({"reference": "Medication/m1/_history/3"}) == "Medication/m1"
    assert medication_reference_key({"reference": "urn:uuid:abc"}) == "urn:uuid:abc"
    assert medication_reference_key({"reference": "#contained"}) is None
    assert medication_reference_key({"reference": "Substance/s1"}) is None
    assert medication_reference_key({"display": "no reference"}) is None


def test_version_is_told_by_the_prefetch_when_the_drafts_do_not_tell() -> None:
    from cds_service.context.fhir_json import detect_fhir_version

    dstu2_condition = {"resourceType": "Condition", "patient": {"reference": "Patient/p"}}
    r4_condition = {
        "resourceType": "Condition",
        "subject": {"reference": "Patient/p"},
        "clinicalStatus": {"coding": [{"code": "active"}]},
    }
    assert detect_fhir_version([], "patient-view", [dstu2_condition]) == "DSTU2"
    assert detect_fhir_version([], "patient-view", [{"resourceType": "MedicationOrder"}]) == (
        "DSTU2"
    )
    assert detect_fhir_version([], "patient-view", [r4_condition]) == "R4"
    # A telling draft order wins over the prefetch.
    r4_draft = {"resourceType": "MedicationRequest", "dosageInstruction": [{"doseAndRate": []}]}
    assert detect_fhir_version([r4_draft], "order-select", [dstu2_condition]) == "R4"
