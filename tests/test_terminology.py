"""Real-world coding over HTTP: RxNorm products and brands, SNOMED CT descendants, the live
RxNav look-up against a local server, ``knowledge expand`` against a local FHIR terminology
server, and the generator reproducing the committed terminology files."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from flask import Flask
from hook_calls import send_json

from cds_service.app import create_app
from cds_service.cli import main as cli_main
from cds_service.context.model import Coding
from cds_service.knowledge import DATA_DIR, load_knowledge
from cds_service.settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parent.parent
REQUESTS = ROOT / "fixtures" / "requests"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
SNOMED = "http://snomed.info/sct"
SELECT = "/cds-services/magnesium-order-select"


def request(name: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((REQUESTS / name).read_text(encoding="utf-8"))
    return body


def make_app(tmp_path: Path, **settings: Any) -> Flask:
    return create_app(
        Settings(auth="off", database_url=f"sqlite:///{tmp_path / 'cds.sqlite3'}", **settings)
    )


def post(app: Flask, body: dict[str, Any]) -> dict[str, Any]:
    response = app.test_client().post(SELECT, json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    result: dict[str, Any] = response.get_json()
    return result


def cards(body: dict[str, Any]) -> list[tuple[str, str]]:
    return [(c["indicator"], c["summary"]) for c in body["cards"]]


def issues(body: dict[str, Any]) -> list[str]:
    found = body.get("extension", {}).get("org.magnesium-cds", {}).get("dataIssues", [])
    return [issue["problem"] for issue in found]


def draft_of(body: dict[str, Any]) -> dict[str, Any]:
    resource: dict[str, Any] = body["context"]["draftOrders"]["entry"][0]["resource"]
    return resource


def with_draft_drug(body: dict[str, Any], coding: dict[str, str] | None, text: str) -> None:
    concept: dict[str, Any] = {"text": text} if text else {}
    if coding is not None:
        concept["coding"] = [coding]
    draft_of(body)["medicationCodeableConcept"] = concept


def with_myasthenia_coded(body: dict[str, Any], code: str, display: str) -> None:
    """The patient's only myasthenia condition, coded with one SNOMED CT code, and no
    myasthenia drug on file (which would stand for the diagnosis by itself)."""
    for key in ("medicationRequests", "medicationStatements"):
        bundle = body["prefetch"].get(key) or {}
        bundle["entry"] = [
            e for e in bundle.get("entry", []) if "pyridostigmine" not in json.dumps(e).lower()
        ]
    for entry in body["prefetch"]["conditions"]["entry"]:
        condition = entry["resource"]
        if "myasthenia" in json.dumps(condition.get("code", {})).lower():
            condition["code"] = {"coding": [{"system": SNOMED, "code": code, "display": display}]}


def iv_magnesium_for_generalized_myasthenia() -> dict[str, Any]:
    body = request("mg-pyridostigmine.order-select.json")
    with_myasthenia_coded(body, "230686005", "Generalized myasthenia")
    draft = draft_of(body)
    with_draft_drug(body, {"system": RXNORM, "code": "1658236"}, "")  # code only
    dosage = draft["dosageInstruction"][0]
    dosage["text"] = "2 g IV over 20 minutes"
    dosage["route"] = {"coding": [{"system": SNOMED, "code": "47625008", "display": "IV"}]}
    dosage["doseAndRate"] = [{"doseQuantity": {"value": 2, "unit": "g", "code": "g"}}]
    return body


def knowledge_without_terminology(tmp_path: Path) -> Path:
    copy_dir = tmp_path / "curated-only"
    shutil.copytree(DATA_DIR, copy_dir, ignore=shutil.ignore_patterns("terminology"))
    return copy_dir


# ------------------------------------------------------------------ SNOMED CT descendants


def test_iv_magnesium_for_generalized_myasthenia_is_critical(tmp_path: Path) -> None:
    body = post(make_app(tmp_path), iv_magnesium_for_generalized_myasthenia())
    assert any(indicator == "critical" for indicator, _ in cards(body)), cards(body)
    # Without the generated descendants the same call is silent: the miss the issue reported.
    curated = knowledge_without_terminology(tmp_path)
    silent = post(
        make_app(tmp_path, knowledge_dir=str(curated)), iv_magnesium_for_generalized_myasthenia()
    )
    assert not any(indicator == "critical" for indicator, _ in cards(silent)), cards(silent)


@pytest.mark.parametrize(
    ("code", "group"),
    [
        ("193207007", "myasthenia-gravis"),
        ("230685009", "myasthenia-gravis"),
        ("95417003", "fibromyalgia"),
        ("127013003", "ckd-unspecified"),
        ("698306007", "ckd-stage-5"),
        ("731000119105", "ckd-stage-3"),
    ],
)
def test_descendants_join_their_ancestors_group(code: str, group: str) -> None:
    assert group in load_knowledge().condition_groups([Coding(SNOMED, code)])


# ------------------------------------------------------------------ RxNorm products and brands


def ciprofloxacin_for_myasthenia(coding: dict[str, str] | None, text: str) -> dict[str, Any]:
    body = request("mg-pyridostigmine.order-select.ciprofloxacin.json")
    with_draft_drug(body, coding, text)
    return body


@pytest.mark.parametrize(
    ("coding", "text"),
    [
        ({"system": RXNORM, "code": "309309"}, ""),  # ciprofloxacin 500 MG Oral Tablet, code only
        ({"system": RXNORM, "code": "205770"}, ""),  # the Cipro branded drug, code only
        ({"system": RXNORM, "code": "1665212"}, ""),  # ciprofloxacin IV bag, code only
        (None, "CIPRO 250 MG TABS"),
        (None, "ciprofloxacin (CIPRO) 500 MG tablet"),
    ],
)
def test_ciprofloxacin_however_coded_warns_in_myasthenia(
    tmp_path: Path, coding: dict[str, str] | None, text: str
) -> None:
    body = post(make_app(tmp_path), ciprofloxacin_for_myasthenia(coding, text))
    assert any("ciprofloxacin" in summary.lower() for _, summary in cards(body)), cards(body)


def test_code_only_product_is_silent_without_the_generated_files(tmp_path: Path) -> None:
    app = make_app(tmp_path, knowledge_dir=str(knowledge_without_terminology(tmp_path)))
    body = post(app, ciprofloxacin_for_myasthenia({"system": RXNORM, "code": "309309"}, ""))
    assert cards(body) == []


@pytest.mark.parametrize(
    ("coding", "text", "salt", "multi"),
    [
        (None, "Rolaids Ultra Strength", "hydroxide", True),
        (None, "Mag-Ox 400", "oxide", False),
        (None, "Milk of Magnesia 30 mL at bedtime", "hydroxide", False),
        (None, "aluminum hydroxide / magnesium hydroxide / simethicone", "hydroxide", True),
        ({"system": RXNORM, "code": "237870"}, "", "hydroxide", True),
    ],
)
def test_magnesium_brands_and_combinations_are_recognised(
    coding: dict[str, str] | None, text: str, salt: str, multi: bool
) -> None:
    codings = [Coding(coding["system"], coding["code"])] if coding else []
    match = load_knowledge().match_magnesium(codings, text)
    assert match is not None and match.salt == salt and match.multi_ingredient is multi


def test_magnesium_stearate_excipient_is_not_a_magnesium_order(tmp_path: Path) -> None:
    body = request("mg-pyridostigmine.order-select.json")
    with_draft_drug(body, None, "acetaminophen 500 MG tablet (inactive: magnesium stearate)")
    assert not {c["indicator"] for c in post(make_app(tmp_path), body)["cards"]} & {"critical"}
    assert load_knowledge().match_magnesium([], "Tablet with magnesium stearate") is None


@pytest.mark.parametrize(
    ("name", "strength"),
    [
        (
            "Multivitamin: Ascorbic Acid 60 MG / Magnesium Sulfate 70 MG / Zinc Oxide 15 MG "
            "Oral Tablet",
            (70.0, "unit"),
        ),
        ("magnesium sulfate 500 MG/ML Injectable Solution", (500.0, "mL")),
        ("Magnesium (as magnesium oxide) 250 mg", (None, None)),  # elemental: not the salt's
        ("Mag-Ox 400", (None, None)),  # a brand's number is not always a strength
    ],
)
def test_strength_comes_from_the_rxnorm_name(name: str, strength: tuple[Any, Any]) -> None:
    coding = Coding(RXNORM, "999000222", name)  # a code no file holds: the name decides
    match = load_knowledge().match_magnesium([coding])
    assert match is not None
    assert (match.strength_mg, match.strength_unit) == strength


def test_strength_of_a_code_only_product_comes_from_the_generated_file() -> None:
    match = load_knowledge().match_magnesium([Coding(RXNORM, "253017")])
    assert match is not None
    assert (match.strength_mg, match.strength_unit) == (80.0, "mL")  # 400 mg per 5 mL


@pytest.mark.parametrize(
    ("code", "group"), [("966222", "thyroid-hormone"), ("1652673", "tetracycline")]
)
def test_code_only_chelating_products(code: str, group: str) -> None:
    assert load_knowledge().drug_groups([Coding(RXNORM, code)]) == (frozenset({group}), "rxnorm")


@pytest.mark.parametrize(
    ("code", "warned"),
    [
        ("1652673", True),  # doxycycline 100 MG Oral Tablet: chelated by oral magnesium
        ("310027", False),  # doxycycline injection (a vial): not absorbed from the gut
    ],
)
def test_a_code_only_product_carries_its_route(tmp_path: Path, code: str, warned: bool) -> None:
    body = request("no-relevant.order-select.json")  # magnesium oxide drafted
    on_file = body["prefetch"]["medicationRequests"]["entry"][0]["resource"]
    on_file["medicationCodeableConcept"] = {"coding": [{"system": RXNORM, "code": code}]}
    on_file["dosageInstruction"] = [{"text": "as directed"}]  # the code alone tells the route
    rules = {
        c["extension"]["org.magnesium-cds"]["ruleId"]
        for c in post(make_app(tmp_path), body)["cards"]
    }
    assert ("chelation-interaction" in rules) is warned, rules


# ------------------------------------------------------------------ term types, code only


def generated_row(rxcui: str) -> dict[str, Any]:
    rows = json.loads((DATA_DIR / "terminology" / "rxnorm-products.json").read_text("utf-8"))
    row: dict[str, Any] = next(p for p in rows["products"] if p["rxcui"] == rxcui)
    return row


def chelation_facts_with_on_file(code: str, tmp_path: Path) -> list[str]:
    """Magnesium oxide drafted; one drug on file, sent as a bare RxNorm code."""
    body = request("no-relevant.order-select.json")
    on_file = body["prefetch"]["medicationRequests"]["entry"][0]["resource"]
    on_file["medicationCodeableConcept"] = {"coding": [{"system": RXNORM, "code": code}]}
    on_file["dosageInstruction"] = [{"text": "as directed"}]
    return [
        evidence["fact"]
        for card in post(make_app(tmp_path), body)["cards"]
        if card["extension"]["org.magnesium-cds"]["ruleId"] == "chelation-interaction"
        for evidence in card["extension"]["org.magnesium-cds"]["evidence"]
    ]


@pytest.mark.parametrize(
    ("tty", "code", "group"),
    [
        ("IN", "46041", "bisphosphonate"),  # alendronate: no curated code, only the value set's
        ("SCD", "199884", "fluoroquinolone"),  # levofloxacin 250 MG Oral Tablet
        ("SCD", "1649425", "tetracycline"),  # doxycycline hyclate 75 MG Oral Tablet
        ("SCD", "245273", "cardiac-glycoside"),  # digoxin 0.0625 MG Oral Tablet
        ("SCD", "200060", "mycophenolate"),  # mycophenolate mofetil 500 MG Oral Tablet
        ("SCD", "198277", "thyroid-hormone"),  # thyroid (USP) 130 MG Oral Tablet
        ("GPCK", "835700", "tetracycline"),  # {30 (doxycycline monohydrate 150 MG ...) } Pack
        ("GPCK", "2398511", "gabapentinoid"),  # gabapentin starter pack
    ],
)
def test_each_term_type_is_recognised_from_its_code_alone(
    tmp_path: Path, tty: str, code: str, group: str
) -> None:
    assert generated_row(code)["tty"] == tty
    facts = chelation_facts_with_on_file(code, tmp_path)
    assert f"On file: {group.replace('-', ' ')} (sent by code only)" in facts, facts


def test_a_branded_drug_code_alone_warns(tmp_path: Path) -> None:
    # SBD 205770, ciprofloxacin 500 MG Oral Tablet [Cipro], from the openFDA NDC records.
    facts = chelation_facts_with_on_file("205770", tmp_path)
    assert "On file: fluoroquinolone (sent by code only)" in facts, facts


@pytest.mark.parametrize(
    ("code", "named"),
    [
        ("466541", "neomycin"),  # MIN neomycin / polymyxin B
        ("689467", "polymyxin b"),  # MIN oxytetracycline / polymyxin B: polymyxin, not a
        # tetracycline (oxytetracycline is no ingredient the knowledge names)
    ],
)
def test_a_multiple_ingredient_code_alone_warns_in_myasthenia(
    tmp_path: Path, code: str, named: str
) -> None:
    assert generated_row(code)["tty"] == "MIN"
    body = request("mg-pyridostigmine.order-select.gentamicin.json")
    with_draft_drug(body, {"system": RXNORM, "code": code}, "")
    found = cards(post(make_app(tmp_path), body))
    assert [summary for _, summary in found if summary.startswith(f"Use {named} ")], found
    assert load_knowledge().drug_groups([Coding(RXNORM, code)])[0] == frozenset(
        {"aminoglycoside-polymyxin"}
    )


@pytest.mark.parametrize(
    ("code", "salt", "strength"),
    [
        # diphenhydramine hydrochloride 25 MG / magnesium salicylate 580 MG Oral Tablet
        ("1297517", "salicylate", 580.0),
        # Cyclobenzaprine hydrochloride 10 MG / Magnesium Oxide 200 MG Oral Capsule (RxNorm 2020)
        ("999731", "oxide", 200.0),
    ],
)
def test_a_clinical_drug_naming_magnesium_gives_salt_and_strength(
    code: str, salt: str, strength: float
) -> None:
    match = load_knowledge().match_magnesium([Coding(RXNORM, code)])
    assert match is not None and match.salt == salt and match.multi_ingredient
    assert (match.strength_mg, match.strength_unit, match.route) == (strength, "unit", "oral")


@pytest.mark.parametrize(
    ("code", "text"),
    [
        ("2001254", ""),  # pitavastatin magnesium 1 MG Oral Tablet, code only
        ("2001254", "pitavastatin magnesium 1 MG Oral Tablet"),
        ("", "esomeprazole magnesium 40 MG Delayed Release Oral Capsule"),
        ("", "omeprazole magnesium 20 MG delayed release tablet"),
    ],
)
def test_a_drug_salted_with_magnesium_is_no_magnesium_order(
    tmp_path: Path, code: str, text: str
) -> None:
    body = request("mg-pyridostigmine.order-select.json")
    with_draft_drug(body, {"system": RXNORM, "code": code} if code else None, text)
    assert cards(post(make_app(tmp_path), body)) == []
    codings = [Coding(RXNORM, code, text)] if code else []
    assert load_knowledge().match_magnesium(codings, text) is None


@pytest.mark.parametrize(
    ("name", "tty"),
    [
        ("Ciprofloxacin", "IN"),
        ("Neomycin / Polymyxin B", "MIN"),
        ("ciprofloxacin 500 MG Oral Tablet", "SCD"),
        ("24 HR ciprofloxacin 1000 MG Extended Release Oral Tablet", "SCD"),
        ("ciprofloxacin 500 MG", "SCDC"),
        ("levothyroxine sodium 0.05 MG/ML", "SCDC"),
        ("ciprofloxacin 500 MG Oral Tablet [Cipro]", "SBD"),
        ("ciprofloxacin 500 MG [Cipro]", "SBDC"),
        ("ciprofloxacin Oral Tablet", "SCDF"),
        ("ciprofloxacin Oral Tablet [Cipro]", "SBDF"),
        ("{30 (doxycycline monohydrate 150 MG Oral Tablet) } Pack", "GPCK"),
        (
            "{4 (amoxicillin 500 MG Oral Capsule [Trimox]) / 2 (clarithromycin 500 MG Oral Tablet "
            "[Biaxin]) } Pack [Prevpac]",
            "BPCK",
        ),
    ],
)
def test_term_type_follows_rxnorm_naming(name: str, tty: str) -> None:
    spec = importlib.util.spec_from_file_location(
        "build_terminology", ROOT / "scripts" / "build_terminology.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.rxnorm_tty(name) == tty


def test_generator_reproduces_the_committed_files() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_terminology.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_generated_file_states_its_source_and_date() -> None:
    for path in (DATA_DIR / "terminology").glob("*.json"):
        generated = json.loads(path.read_text(encoding="utf-8"))["generated"]
        assert generated["source"] and generated["date"] and generated["by"], path.name


# ------------------------------------------------------------------ local servers


@contextmanager
def local_server(handle: Callable[[BaseHTTPRequestHandler], None]) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            handle(self)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def rxnav_related(rxcui: str, ingredients: list[tuple[str, str, str]]) -> dict[str, Any]:
    """RxNav's documented answer to /REST/rxcui/{rxcui}/related.json?tty=IN+PIN."""
    groups = []
    for tty in ("IN", "PIN"):
        props = [
            {
                "rxcui": code,
                "name": name,
                "synonym": "",
                "tty": t,
                "language": "ENG",
                "suppress": "N",
                "umlscui": "",
            }
            for code, name, t in ingredients
            if t == tty
        ]
        groups.append({"tty": tty, **({"conceptProperties": props} if props else {})})
    return {"relatedGroup": {"rxcui": rxcui, "termType": ["IN", "PIN"], "conceptGroup": groups}}


UNKNOWN_CIPRO_PRODUCT = "999000111"  # in no knowledge file: only RxNav knows it


def test_rxnav_names_the_ingredients_of_an_unknown_code(tmp_path: Path) -> None:
    asked: list[str] = []

    def answer(handler: BaseHTTPRequestHandler) -> None:
        url = urlsplit(handler.path)
        rxcui = url.path.split("/")[-2]
        asked.append(rxcui)
        assert url.path == f"/REST/rxcui/{rxcui}/related.json"
        assert parse_qs(url.query)["tty"] == ["IN PIN"]
        if rxcui != UNKNOWN_CIPRO_PRODUCT:  # the chart's other drugs: nothing we know
            send_json(handler, rxnav_related(rxcui, []))
            return
        send_json(
            handler,
            rxnav_related(
                UNKNOWN_CIPRO_PRODUCT,
                [("2551", "ciprofloxacin", "IN"), ("20561", "ciprofloxacin hydrochloride", "PIN")],
            ),
        )

    with local_server(answer) as base:
        app = make_app(tmp_path, rxnav_url=f"{base}/REST")
        coding = {"system": RXNORM, "code": UNKNOWN_CIPRO_PRODUCT}
        first = post(app, ciprofloxacin_for_myasthenia(coding, ""))
        second = post(app, ciprofloxacin_for_myasthenia(coding, ""))
    assert any("ciprofloxacin" in s.lower() for _, s in cards(first)), cards(first)
    assert cards(second) == cards(first)
    assert asked.count(UNKNOWN_CIPRO_PRODUCT) == 1  # the second call was answered from the cache


def test_rxnav_is_not_asked_for_the_combinations_an_ingredient_is_in(tmp_path: Path) -> None:
    calcium_carbonate = "1897"  # an ingredient no knowledge file holds

    def answer(handler: BaseHTTPRequestHandler) -> None:
        url = urlsplit(handler.path)
        rxcui = url.path.split("/")[-2]
        types = parse_qs(url.query)["tty"][0].split()
        body = rxnav_related(rxcui, [])
        if rxcui == calcium_carbonate and "MIN" in types:  # what RxNav answers for an IN
            body["relatedGroup"]["conceptGroup"].append(
                {
                    "tty": "MIN",
                    "conceptProperties": [
                        {
                            "rxcui": "214229",
                            "name": "calcium carbonate / magnesium hydroxide",
                            "tty": "MIN",
                        }
                    ],
                }
            )
        send_json(handler, body)

    body = request("mg-pyridostigmine.order-select.json")
    with_draft_drug(body, {"system": RXNORM, "code": calcium_carbonate}, "")
    with local_server(answer) as base:
        result = post(make_app(tmp_path, rxnav_url=f"{base}/REST"), body)
    assert cards(result) == []  # calcium carbonate is not a magnesium order


@pytest.mark.parametrize("failure", ["slow", "malformed", "error"])
def test_rxnav_failures_are_data_issues_within_the_budget(tmp_path: Path, failure: str) -> None:
    def answer(handler: BaseHTTPRequestHandler) -> None:
        if failure == "slow":
            time.sleep(2.0)
            send_json(handler, rxnav_related(UNKNOWN_CIPRO_PRODUCT, [("2551", "cipro", "IN")]))
        elif failure == "malformed":
            send_json(handler, {"relatedGroup": {"conceptGroup": "not a list"}})
        else:
            send_json(handler, {"error": "boom"}, status=500)

    with local_server(answer) as base:
        app = make_app(tmp_path, rxnav_url=f"{base}/REST", rxnav_budget_ms=150)
        started = time.perf_counter()
        body = post(
            app,
            ciprofloxacin_for_myasthenia({"system": RXNORM, "code": UNKNOWN_CIPRO_PRODUCT}, ""),
        )
        elapsed = time.perf_counter() - started
    assert cards(body) == []
    assert any(UNKNOWN_CIPRO_PRODUCT in problem for problem in issues(body)), issues(body)
    assert elapsed < 1.0, elapsed  # the 150 ms budget, not the server's two seconds


def test_a_slow_rxnav_answer_serves_the_next_call(tmp_path: Path) -> None:
    def answer(handler: BaseHTTPRequestHandler) -> None:
        rxcui = urlsplit(handler.path).path.split("/")[-2]
        time.sleep(0.4)  # past the 150 ms budget, well within the look-up's own timeout
        found = [("2551", "ciprofloxacin", "IN")] if rxcui == UNKNOWN_CIPRO_PRODUCT else []
        send_json(handler, rxnav_related(rxcui, found))

    coding = {"system": RXNORM, "code": UNKNOWN_CIPRO_PRODUCT}
    with local_server(answer) as base:
        app = make_app(tmp_path, rxnav_url=f"{base}/REST")
        first = post(app, ciprofloxacin_for_myasthenia(coding, ""))
        time.sleep(0.8)  # the look-up finishes in the background
        second = post(app, ciprofloxacin_for_myasthenia(coding, ""))
    assert cards(first) == [] and any(UNKNOWN_CIPRO_PRODUCT in p for p in issues(first))
    assert any("ciprofloxacin" in s.lower() for _, s in cards(second)), cards(second)
    assert not any(UNKNOWN_CIPRO_PRODUCT in p for p in issues(second))


def test_rxnav_cache_is_bounded_and_expires() -> None:
    from cds_service.context.rxnav import RxNavClient

    asked: list[str] = []

    def answer(handler: BaseHTTPRequestHandler) -> None:
        rxcui = urlsplit(handler.path).path.split("/")[-2]
        asked.append(rxcui)
        send_json(handler, rxnav_related(rxcui, [("2551", "ciprofloxacin", "IN")]))

    now = [1000.0]
    with local_server(answer) as base:
        client = RxNavClient(
            f"{base}/REST", budget_seconds=2.0, cache_size=1, ttl_seconds=60, clock=lambda: now[0]
        )

        def ask(rxcui: str) -> None:
            found, problem = client.ingredients(rxcui, client.deadline())
            assert [c.code for c in found] == ["2551"] and problem == ""
            time.sleep(0.05)  # the answer is cached by the request's own thread

        ask("111")
        ask("111")  # cached
        ask("222")  # the cache holds one answer: 111 goes
        ask("111")
        now[0] += 61  # past the TTL
        ask("111")
    assert asked == ["111", "222", "111", "111"]


def test_rxnav_unreachable_is_a_data_issue(tmp_path: Path) -> None:
    with local_server(lambda handler: None) as base:
        pass  # closed again: nothing listens there now
    app = make_app(tmp_path, rxnav_url=f"{base}/REST")
    body = post(
        app, ciprofloxacin_for_myasthenia({"system": RXNORM, "code": UNKNOWN_CIPRO_PRODUCT}, "")
    )
    assert any("RxNorm" in problem for problem in issues(body)), issues(body)


# ------------------------------------------------------------------ knowledge expand


SERVER_ONLY_DESCENDANT = "1234567008"  # answered by the test server only


def terminology_server(page_size: int = 2) -> Callable[[BaseHTTPRequestHandler], None]:
    """A FHIR terminology server answering $expand of isa/<code>, paging by offset/count."""
    hierarchy = {
        "91637004": [
            ("91637004", "Myasthenia gravis"),
            ("230686005", "Generalized myasthenia"),
            ("193207007", "Juvenile or adult myasthenia gravis"),
            (SERVER_ONLY_DESCENDANT, "Myasthenia gravis of a kind only this server knows"),
        ],
        "709044004": [
            ("709044004", "Chronic kidney disease"),
            ("771000119108", "Chronic kidney disease due to type 2 diabetes mellitus"),
            ("431855005", "Chronic kidney disease stage 1"),
            ("751000119104", "Chronic kidney disease stage 1 due to type 2 diabetes mellitus"),
        ],
        "431855005": [
            ("431855005", "Chronic kidney disease stage 1"),
            ("751000119104", "Chronic kidney disease stage 1 due to type 2 diabetes mellitus"),
        ],
    }

    def answer(handler: BaseHTTPRequestHandler) -> None:
        url = urlsplit(handler.path)
        query = parse_qs(url.query)
        assert url.path == "/fhir/ValueSet/$expand", url.path
        concept = query["url"][0].removeprefix("http://snomed.info/sct?fhir_vs=isa/")
        rows = hierarchy.get(concept, [(concept, "")])
        offset, count = int(query["offset"][0]), min(int(query["count"][0]), page_size)
        version = "http://snomed.info/sct/731000124108/version/20240301"
        send_json(
            handler,
            {
                "resourceType": "ValueSet",
                "status": "active",
                "expansion": {
                    "timestamp": "2026-12-08T00:00:00Z",
                    "total": len(rows),
                    "offset": offset,
                    "parameter": [{"name": "version", "valueUri": version}],
                    "contains": [
                        {"system": SNOMED, "version": version, "code": c, "display": d}
                        for c, d in rows[offset : offset + count]
                    ],
                },
            },
        )

    return answer


def test_knowledge_expand_writes_a_directory_the_service_loads(tmp_path: Path) -> None:
    output = tmp_path / "knowledge"
    with local_server(terminology_server()) as base:
        assert (
            cli_main(
                [
                    "knowledge",
                    "expand",
                    "--terminology-server",
                    f"{base}/fhir",
                    "--output",
                    str(output),
                ]
            )
            == 0
        )
    written = json.loads((output / "terminology" / "snomed-descendants.json").read_text())
    assert written["generated"]["server"] == f"{base}/fhir"
    assert "731000124108" in written["generated"]["edition"]
    assert "20240301" in written["generated"]["edition_version"]
    # The curated "related" members (not is-a) survive a refresh from a server, and so does an
    # exclusion: CKD stage 1 and what lies under it stay out of "CKD, stage not coded".
    members = {c["code"] for row in written["expansions"] for c in row["contains"]}
    assert {"127013003", "698306007", "771000119108"} <= members
    assert not {"431855005", "751000119104"} & members
    knowledge = load_knowledge(output)
    assert knowledge.condition_groups([Coding(SNOMED, "771000119108")]) == {"ckd-unspecified"}
    assert not knowledge.condition_groups([Coding(SNOMED, "751000119104")])
    body = request("mg-pyridostigmine.order-select.json")
    with_myasthenia_coded(body, SERVER_ONLY_DESCENDANT, "Myasthenia of a new kind")
    assert not myasthenia_cards(post(make_app(tmp_path), body))  # the bundled files lack it
    found = myasthenia_cards(post(make_app(tmp_path, knowledge_dir=str(output)), body))
    assert found, "the expanded knowledge should know the server's descendant"


def myasthenia_cards(body: dict[str, Any]) -> list[str]:
    return [summary for _, summary in cards(body) if "myasthenia" in summary.lower()]


@pytest.mark.parametrize(
    "settings",
    [
        {"rxnav_url": "ftp://rxnav.example.org/REST"},
        {"rxnav_budget_ms": 0},
        {"rxnav_cache_size": 0},
    ],
)
def test_rxnav_settings_that_cannot_work_stop_start_up(settings: dict[str, Any]) -> None:
    with pytest.raises(SettingsError, match="RXNAV"):
        Settings(**settings)


def test_knowledge_expand_refuses_a_server_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(handler: BaseHTTPRequestHandler) -> None:
        send_json(handler, {"resourceType": "OperationOutcome"}, status=404)

    with local_server(fail) as base:
        code = cli_main(
            ["knowledge", "expand", "--terminology-server", base, "--output", str(tmp_path / "k")]
        )
    assert code == 1
    assert "HTTP 404" in capsys.readouterr().err
