"""The real-world corpus over HTTP: Synthea patients the project was not written against.

``fixtures/corpus`` is built by ``scripts/build_corpus.py`` from the public Synthea Bundles of
``smart-on-fhir/generated-sample-data`` (see ``docs/corpus.md``). Every request is POSTed to
the app (Flask test client, authentication off, SQLite in a temporary directory) once per
module; the tests read those answers. ``python scripts/build_corpus.py --report`` prints the
same run as figures.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from flask import Flask

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "fixtures" / "corpus"


def _load_builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_corpus", ROOT / "scripts" /
                                                  "build_corpus.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


build_corpus = _load_builder()
CALLS = build_corpus.corpus_requests(CORPUS)
KNOWLEDGE_CODES = build_corpus.KnowledgeCodes()
CORPUS_CODES = sorted(
    {code for call in CALLS for code in build_corpus.request_codes(call.request, KNOWLEDGE_CODES)}
)

SNOMED_CHILD = "issue 19 point 3: SNOMED CT child of a knowledge concept"
# Codes of the corpus the service does not recognise yet, each with the fix it waits for.
# Drop a mark when its fix is merged: strict, so an unexpected pass fails.
KNOWN_GAPS: dict[tuple[str, str], str] = {
    ("condition", "431855005"): SNOMED_CHILD,  # CKD stage 1 (is-a CKD)
    ("condition", "431856006"): SNOMED_CHILD,  # CKD stage 2 (is-a CKD)
    ("condition", "83664006"): SNOMED_CHILD,  # idiopathic atrophic hypothyroidism
    ("condition", "95417003"): SNOMED_CHILD,  # primary fibromyalgia syndrome
}


@pytest.fixture(scope="module")
def corpus_app(tmp_path_factory: pytest.TempPathFactory) -> Flask:
    """Authentication off, SQLite in a temporary directory, the clock at the drafts' date."""
    app: Flask = build_corpus.corpus_app(tmp_path_factory.mktemp("corpus-db") / "cds.sqlite3")
    return app


@pytest.fixture(scope="module")
def corpus_results(corpus_app: Flask) -> list[Any]:
    """Every corpus request POSTed once, with the clinical picture the service built."""
    results: list[Any] = build_corpus.run_corpus(corpus_app.test_client(), CALLS)
    return results


@pytest.fixture(scope="module")
def codes_by_call(corpus_results: list[Any]) -> list[set[Any]]:
    """The knowledge-group codes of each request's data, aligned with ``corpus_results``."""
    return [build_corpus.request_codes(r.call.request, KNOWLEDGE_CODES) for r in corpus_results]


@pytest.fixture(scope="module")
def discovery(corpus_app: Flask) -> dict[str, Any]:
    response = corpus_app.test_client().get("/cds-services")
    assert response.status_code == 200
    body: dict[str, Any] = response.get_json()
    return body


def test_corpus_holds_fifty_patients_per_version_in_under_ten_megabytes() -> None:
    manifest = json.loads((CORPUS / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["source"]["repository"].endswith("smart-on-fhir/generated-sample-data")
    assert len(manifest["source"]["commit"]) == 40
    for version in ("R4", "STU3", "DSTU2"):
        files = sorted(path.name for path in (CORPUS / version).glob("*.json"))
        assert len(files) >= 50, version
        listed = sorted(f"{p['patientId']}.json" for p in manifest["versions"][version]["patients"])
        assert files == listed, f"{version}: files and manifest disagree"
    size = sum(path.stat().st_size for path in CORPUS.rglob("*.json"))
    assert size < 10_000_000


def test_every_offered_hook_is_called_with_each_draft(discovery: dict[str, Any]) -> None:
    """Each service of the discovery document, for every version whose clients use it
    (medication-prescribe: the CDS Hooks 1.0 clients, STU3 and DSTU2), with each draft."""
    drafts = {"draft-mg-oxide", "draft-mg-sulfate", "draft-ciprofloxacin"}
    for version in ("R4", "STU3", "DSTU2"):
        seen: dict[str, set[str]] = {}
        for call in (c for c in CALLS if c.version == version):
            context = call.request["context"]
            bundle = context.get("draftOrders") or context.get("medications") or {}
            ids = {e["resource"]["id"] for e in bundle.get("entry", [])}
            seen.setdefault(call.service_id, set()).update(ids)
        for service in discovery["services"]:
            if service["hook"] == "medication-prescribe" and version == "R4":
                assert service["id"] not in seen
                continue
            assert service["id"] in seen, (version, service["id"])
            expected = set() if service["hook"] == "patient-view" else drafts
            assert seen[service["id"]] == expected, (version, service["id"])


def test_prefetch_is_filtered_as_the_discovery_templates_ask(discovery: dict[str, Any]) -> None:
    """Conditions carry a clinical status the template asks for (R4, STU3: a DSTU2 server
    knows no clinical-status), medications the status it asks for, Observations one of its
    LOINC codes; every resource is about the request's patient (its id or its urn:uuid)."""
    templates = discovery["services"][0]["prefetch"]

    def values(key: str, parameter: str) -> set[str]:
        query = templates[key].partition("?")[2]
        pairs = [pair.partition("=") for pair in query.split("&")]
        found = next(value for name, _, value in pairs if name == parameter)
        return {value.rpartition("|")[2] for value in found.split(",")}

    clinical = values("conditions", "clinical-status")
    loinc = values("observations", "code")
    for call in CALLS:
        prefetch = call.request["prefetch"]
        patient_id = call.request["context"]["patientId"]
        assert prefetch["patient"]["id"] == patient_id
        about = {f"Patient/{patient_id}", f"urn:uuid:{patient_id}"}
        for key in ("conditions", "medicationRequests", "medicationStatements", "observations"):
            for entry in prefetch[key].get("entry", []):
                resource = entry["resource"]
                if entry["search"]["mode"] == "include":
                    assert resource["resourceType"] == "Medication"
                    continue
                subject = resource.get("subject") or resource.get("patient")
                assert subject["reference"] in about, call.name
                if key == "conditions" and call.version != "DSTU2":
                    assert build_corpus._status(resource["clinicalStatus"]) in clinical
                if key.startswith("medication"):
                    assert resource["status"] == "active", call.name
                if key == "observations":
                    codes = {c["code"] for c in resource["code"]["coding"]}
                    assert codes & loinc, call.name


def test_every_corpus_request_is_answered_without_a_server_error(
    corpus_results: list[Any],
) -> None:
    """200 with a cards array, or 400/412 with a JSON body naming the problem; never 5xx."""
    assert len(corpus_results) == len(CALLS) >= 3 * 50 * 7
    wrong = []
    for result in corpus_results:
        body = result.body if isinstance(result.body, dict) else {}
        if result.status == 200:
            ok = isinstance(body.get("cards"), list)
        else:
            ok = result.status in (400, 412) and bool(body.get("error")) and bool(
                body.get("message"))
        if not ok:
            wrong.append((result.call.name, result.status, str(result.body)[:200]))
    assert not wrong, wrong[:10]


def test_the_inventory_reads_every_kind_of_code() -> None:
    """The inventory is not empty by accident: conditions, drugs on file and drafts, labs."""
    kinds = {code.kind for code in CORPUS_CODES}
    assert kinds == {"condition", "medication", "lab"}
    drafts = {code.code for code in CORPUS_CODES if code.kind == "medication"}
    assert {"198741", "1658221", "2551"} <= drafts


def _inventory_params() -> list[Any]:
    params = []
    for code in CORPUS_CODES:
        gap = KNOWN_GAPS.get((code.kind, code.code))
        marks = [pytest.mark.xfail(strict=True, reason=gap)] if gap else []
        params.append(pytest.param(code, id=f"{code.kind}-{code.code}-{code.group}", marks=marks))
    return params


@pytest.mark.parametrize("code", _inventory_params())
def test_every_corpus_code_of_a_knowledge_group_is_recognised(
    code: Any, corpus_results: list[Any], codes_by_call: list[set[Any]]
) -> None:
    """A code belongs to a knowledge group when the knowledge files say so, read directly
    (``KnowledgeCodes``: the group code lists of ``knowledge/data/*.json``, generated files of
    ``knowledge/data/terminology/`` when present, RxNorm names holding an ingredient's name,
    and the few SNOMED CT is-a facts of ``SNOMED_PARENTS``), for the data a rule reads:
    conditions with a current clinical status, drugs on file with status active, the drafts,
    the labs.

    Recognised means: in every corpus call whose data holds the code and that the service
    evaluated (it built a clinical picture: not a 4xx, nor a call it declines on purpose, such
    as a deceased patient's, should it decide so), the picture it built while answering that
    call over HTTP (the facts every rule reads, captured as the rule engine builds it) holds a
    fact with that coding mapped to that same group (a lab fact of that kind; for magnesium, a
    drug fact matched as magnesium); and there is at least one such call. A fact dropped on the
    way (wrong subject, unparsed) or left unmapped is not recognised.
    """
    evaluated = [result for result, codes in zip(corpus_results, codes_by_call, strict=True)
                 if code in codes and result.evaluated]
    assert evaluated, "no evaluated call holds this code"
    missed = [result.call.name for result in evaluated
              if (code.kind, code.system, code.code, code.group) not in result.recognised]
    assert not missed, f"{len(missed)} of {len(evaluated)} calls, e.g. {missed[:3]}"


# --- the inventory's own reading of the knowledge files --------------------------------------


def test_knowledge_codes_read_the_group_code_lists_and_rxnorm_names() -> None:
    codes = build_corpus.KnowledgeCodes()
    snomed, icd, rxnorm, loinc = (build_corpus.SNOMED, build_corpus.ICD10CM, build_corpus.RXNORM,
                                  build_corpus.LOINC)
    assert codes.condition_group(snomed, "91637004") == "myasthenia-gravis"
    assert codes.condition_group(icd, "G70.01") == "myasthenia-gravis"  # prefix
    assert codes.condition_group(icd, "N18.4") == "ckd-stage-4"
    assert codes.condition_group(icd, "N18") == "ckd-unspecified"  # exact only
    assert codes.condition_group(snomed, "95417003") == "fibromyalgia"  # SNOMED_PARENTS
    assert codes.condition_group(snomed, "38341003") is None  # hypertension
    assert codes.medication_group(rxnorm, "2551", "") == "fluoroquinolone"
    assert codes.medication_group(rxnorm, "198741", "") == "magnesium"
    levothyroxine = "Levothyroxine Sodium 0.075 MG Oral Tablet"
    assert codes.medication_group(rxnorm, "966222", levothyroxine) == "thyroid-hormone"
    assert codes.medication_group(rxnorm, "1", "Milk of Magnesia 400 MG/5ML") == "magnesium"
    # An excipient is no magnesium order; a name inside another word is no match.
    assert codes.medication_group(rxnorm, "2", "Ibuprofen 200 MG (magnesium stearate)") is None
    assert codes.medication_group(rxnorm, "3", "Hydrochlorothiazide 25 MG") is None
    assert codes.lab_group(loinc, "33914-3") == "egfr"
    assert codes.lab_group(loinc, "2598-1") is None  # urine magnesium


def test_knowledge_codes_read_generated_terminology_files(tmp_path: Path) -> None:
    """Descendants and products in ``knowledge/data/terminology/`` join their group, whether a
    file names the group by a naming key or by a mapping key."""
    data = tmp_path / "data"
    shutil.copytree(build_corpus.KNOWLEDGE_DIR, data)
    (data / "terminology").mkdir(exist_ok=True)
    (data / "terminology" / "snomed-test.json").write_text(json.dumps({
        "source": "test", "expansions": [
            {"concept": "91637004", "contains": [{"code": "230686005"}, {"code": "193207007"}]},
            {"group": "fibromyalgia", "codes": ["95417003"]},
        ]}), encoding="utf-8")
    (data / "terminology" / "rxnorm-test.json").write_text(json.dumps({
        "ingredients": {"2551": {"products": [{"code": "309309"}]},
                        "levothyroxine": {"brands": [{"code": "224920"}]}}}), encoding="utf-8")
    codes = build_corpus.KnowledgeCodes(data)
    assert codes.terminology_files == ["rxnorm-test.json", "snomed-test.json"]
    assert codes.condition_group(build_corpus.SNOMED, "230686005") == "myasthenia-gravis"
    assert codes.condition_group(build_corpus.SNOMED, "193207007") == "myasthenia-gravis"
    assert codes.medication_group(build_corpus.RXNORM, "309309", "") == "fluoroquinolone"
    assert codes.medication_group(build_corpus.RXNORM, "224920", "") == "thyroid-hormone"
    # A SNOMED CT descendant is not a drug, an RxNorm product not a condition.
    assert codes.medication_group(build_corpus.RXNORM, "230686005", "") is None
    assert codes.condition_group(build_corpus.SNOMED, "309309") is None
