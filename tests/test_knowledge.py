"""Knowledge files: validation at load time, and the look-ups the rules rely on."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from cds_service.context.model import Coding
from cds_service.knowledge import (
    DATA_DIR,
    Knowledge,
    KnowledgeError,
    Threshold,
    default_knowledge,
    load_knowledge,
)
from cds_service.knowledge.model import STATUSES
from cds_service.resources import load_schema

ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ATC = "http://www.whocc.no/atc"
LOINC = "http://loinc.org"

RULE_IDS = (
    "myasthenia-magnesium",
    "myasthenia-aggravating-drug",
    "renal-magnesium",
    "high-serum-magnesium",
    "chelation-interaction",
    "autoimmune-guidance",
    "magnesium-dose-limit",
    "patient-view-contraindication",
    "patient-view-low-magnesium",
    "patient-deceased",
    "incomplete-data",
    "neuromuscular-junction-magnesium",
    "magnesium-neuromuscular-blocker",
    "obstetric-magnesium-monitoring",
)
CONDITION_IDS = (
    "myasthenia-gravis",
    "lambert-eaton",
    "other-neuromuscular-junction",
    "ckd-stage-3",
    "ckd-stage-4",
    "ckd-stage-5",
    "esrd-dialysis",
    "ckd-unspecified",
    "acute-kidney-injury",
    "hashimoto",
    "hypothyroidism",
    "rheumatoid-arthritis",
    "sle",
    "multiple-sclerosis",
    "fibromyalgia",
    "sjogren",
    "psoriasis",
    "ibd-celiac-malabsorption",
    "hypermagnesemia",
    "hypomagnesemia",
    "pre-eclampsia-eclampsia",
)
DRUG_GROUP_IDS = (
    "fluoroquinolone",
    "tetracycline",
    "thyroid-hormone",
    "cholinesterase-inhibitor",
    "mg-therapy-other",
    "bisphosphonate",
    "integrase-inhibitor",
    "other-chelator",
    "neuromuscular-blocker",
    "aminoglycoside-polymyxin",
    "antimalarial",
    "mycophenolate",
    "gabapentinoid",
    "magnesium-carrier-fluid",
    "cardiac-glycoside",
)


@pytest.fixture(scope="module")
def kb() -> Knowledge:
    return default_knowledge()


def raw(name: str) -> dict[str, Any]:
    return json.loads((DATA_DIR / name).read_text(encoding="utf-8"))


def icd(code: str, system: str = ICD10CM) -> Coding:
    return Coding(system, code)


# ---------------------------------------------------------------- loading and validation


def test_bundled_knowledge_loads_and_is_cached(kb: Knowledge) -> None:
    assert default_knowledge() is kb
    assert re.fullmatch(r"2026\.12\.3\+[0-9a-f]{8}", kb.version)
    manifest = raw("manifest.json")
    generated = {"terminology/rxnorm-products.json", "terminology/snomed-descendants.json"}
    assert set(kb.file_versions) == {"manifest.json", *manifest["files"], *generated}
    for name, version in kb.file_versions.items():
        assert version == raw(name)["version"]


def test_loading_the_same_files_twice_gives_the_same_version(kb: Knowledge) -> None:
    assert load_knowledge(DATA_DIR).version == kb.version


def test_every_file_matches_the_top_level_schema() -> None:
    validator = Draft202012Validator(load_schema("knowledge.schema.json"))
    for path in sorted(DATA_DIR.glob("*.json")):
        errors = list(validator.iter_errors(json.loads(path.read_text(encoding="utf-8"))))
        assert not errors, (path.name, [e.message for e in errors][:3])


def test_content_hash_changes_with_content(tmp_path: Path, kb: Knowledge) -> None:
    directory = copy_data(tmp_path)
    edit(directory, "rules.json", lambda d: d["rules"][0].update(title="Changed title"))
    assert load_knowledge(directory).version != kb.version


def copy_data(tmp_path: Path) -> Path:
    target = tmp_path / "data"
    shutil.copytree(DATA_DIR, target)
    return target


def edit(directory: Path, name: str, change: Callable[[dict[str, Any]], Any]) -> None:
    path = directory / name
    doc = json.loads(path.read_text(encoding="utf-8"))
    change(doc)
    path.write_text(json.dumps(doc, indent=2), encoding="utf-8")


def group_index(doc: dict[str, Any], group_id: str) -> int:
    return next(i for i, g in enumerate(doc["groups"]) if g["id"] == group_id)


CKD4 = group_index(raw("conditions.json"), "ckd-stage-4")
MG = group_index(raw("conditions.json"), "myasthenia-gravis")

CORRUPTIONS: list[tuple[str, str, Callable[[dict[str, Any]], Any], tuple[str, ...]]] = [
    (
        "missing required field",
        "conditions.json",
        lambda d: d["groups"][CKD4].pop("display"),
        (f"$.groups[{CKD4}]", "'display' is a required property"),
    ),
    (
        "wrong type",
        "conditions.json",
        lambda d: d["groups"][MG].update(autoimmune="yes"),
        (f"$.groups[{MG}].autoimmune", "is not of type 'boolean'"),
    ),
    (
        "bad SNOMED code pattern",
        "conditions.json",
        lambda d: d["groups"][CKD4]["snomed"][0].update(code="43185700X"),
        (f"$.groups[{CKD4}].snomed[0].code", "does not match"),
    ),
    (
        "dotted ICD-10 code",
        "conditions.json",
        lambda d: d["groups"][MG]["icd10cm"][0].update(code="G70.0"),
        (f"$.groups[{MG}].icd10cm[0].code", "does not match"),
    ),
    (
        "bad status",
        "interactions.json",
        lambda d: d["interactions"][1].update(status="probably"),
        ("$.interactions[1].status", "is not one of"),
    ),
    (
        "entry without a source",
        "rules.json",
        lambda d: d["rules"][2].update(sources=[]),
        ("$.rules[2].sources", "should be non-empty"),
    ),
    (
        "unknown property",
        "thresholds.json",
        lambda d: d["thresholds"][0].update(valu=3),
        ("$.thresholds[0]", "'valu' was unexpected"),
    ),
    (
        "bad file version",
        "labs.json",
        lambda d: d.update(version="v1"),
        ("$.version", "does not match"),
    ),
    (
        "product made of a form its salt does not have",
        "medications.json",
        lambda d: d["magnesium"]["salts"][8]["products"][0].update(form="dihydrate"),
        ("$.magnesium.salts[8].products[0].form", "'dihydrate' is not one of"),
    ),
    (
        "unknown source id",
        "rules.json",
        lambda d: d["rules"][0]["sources"].append("no-such-source"),
        ("$.rules[0].sources[3]", "unknown source id 'no-such-source'"),
    ),
    (
        "unknown source id deep in a file",
        "conditions.json",
        lambda d: d["groups"][MG]["guidance"][0]["sources"].append("made-up"),
        (f"$.groups[{MG}].guidance[0].sources[2]", "unknown source id 'made-up'"),
    ),
    (
        "SNOMED code in two condition groups",
        "conditions.json",
        lambda d: d["groups"][CKD4]["snomed"].append(
            {"code": "91637004", "display": "Myasthenia gravis", "status": "verified"}
        ),
        (f"$.groups[{CKD4}].snomed[1].code", "SNOMED CT 91637004 also in", "myasthenia-gravis"),
    ),
    (
        "ICD-10-CM prefix in two condition groups",
        "conditions.json",
        lambda d: d["groups"][CKD4]["icd10cm"].append(
            {"code": "N1830", "display": "CKD stage 3", "status": "verified"}
        ),
        (f"$.groups[{CKD4}].icd10cm[1].code", "ICD-10-CM N1830 also in", "ckd-stage-3"),
    ),
    (
        "RxNorm code for magnesium and for an interacting drug",
        "medications.json",
        lambda d: d["drug_groups"][0]["ingredients"].append(
            {"code": "6585", "name": "not magnesium", "status": "verified"}
        ),
        ("$.drug_groups[0].ingredients[7].code", "RxNorm '6585' also at", "salts[0]"),
    ),
    (
        "text synonym for two salts",
        "medications.json",
        lambda d: d["magnesium"]["salts"][1]["synonyms"].append("epsom salt"),
        ("$.magnesium.salts[1].synonyms", "text synonym 'epsom salt' also at"),
    ),
    (
        "two default elemental fractions",
        "medications.json",
        lambda d: d["magnesium"]["salts"][0]["elemental_fractions"][1].update(default=True),
        ("$.magnesium.salts[0].elemental_fractions", "exactly one fraction must be the default"),
    ),
    (
        "interaction with a drug outside its group",
        "interactions.json",
        lambda d: d["interactions"][1].update(ingredient_code="3640"),
        ("$.interactions[1].ingredient_code", "3640 is not an ingredient of 'fluoroquinolone'"),
    ),
    (
        "interaction for an unknown drug group",
        "interactions.json",
        lambda d: d["interactions"][0].update(drug_group="antacids"),
        ("$.interactions[0].drug_group", "unknown drug group 'antacids'"),
    ),
    (
        "LOINC code in two lab groups",
        "labs.json",
        lambda d: d["groups"][1]["codes"].append(
            {"code": "2601-3", "display": "Magnesium", "status": "verified"}
        ),
        ("$.groups[1].codes[13].code", "LOINC 2601-3 also at"),
    ),
    (
        "threshold id defined twice",
        "thresholds.json",
        lambda d: d["thresholds"][0].update(id="serum-magnesium-reference-range"),
        ("$.thresholds[0].id", "also defined in labs.json"),
    ),
    (
        "duplicate override reason",
        "rules.json",
        lambda d: d["rules"][0]["override_reasons"].append(
            dict(d["rules"][0]["override_reasons"][0])
        ),
        ("$.rules[0].override_reasons[3].code", "repeats"),
    ),
]


@pytest.mark.parametrize(
    ("file_name", "change", "expected"),
    [pytest.param(f, c, e, id=label) for label, f, c, e in CORRUPTIONS],
)
def test_corrupted_file_stops_loading_naming_file_and_entry(
    tmp_path: Path,
    file_name: str,
    change: Callable[[dict[str, Any]], Any],
    expected: tuple[str, ...],
) -> None:
    directory = copy_data(tmp_path)
    edit(directory, file_name, change)
    with pytest.raises(KnowledgeError) as caught:
        load_knowledge(directory)
    message = str(caught.value)
    assert message.startswith(f"{file_name}: "), message
    for part in expected:
        assert part in message, message


def test_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    directory = copy_data(tmp_path)
    (directory / "labs.json").write_text('{\n  "version": "1.0.0",\n  oops\n}', encoding="utf-8")
    with pytest.raises(KnowledgeError, match=r"^labs\.json: invalid JSON at line 3"):
        load_knowledge(directory)


def test_duplicate_json_key_is_refused(tmp_path: Path) -> None:
    directory = copy_data(tmp_path)
    path = directory / "rules.json"
    version = f'"version": "{raw("rules.json")["version"]}",'
    text = path.read_text(encoding="utf-8").replace(
        version, version + '\n  "version": "9.9.9",', 1
    )
    path.write_text(text, encoding="utf-8")
    with pytest.raises(KnowledgeError, match=r"^rules\.json: duplicate key 'version'"):
        load_knowledge(directory)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    directory = copy_data(tmp_path)
    (directory / "interactions.json").unlink()
    with pytest.raises(KnowledgeError, match=r"^interactions\.json: cannot read"):
        load_knowledge(directory)


def test_manifest_must_name_every_kind(tmp_path: Path) -> None:
    directory = copy_data(tmp_path)
    edit(directory, "manifest.json", lambda d: d["files"].pop("labs.json"))
    with pytest.raises(KnowledgeError, match=r"^manifest\.json: \$\.files: .*'labs'"):
        load_knowledge(directory)


def test_knowledge_error_is_a_value_error() -> None:
    assert issubclass(KnowledgeError, ValueError)


# ---------------------------------------------------------------- sources and statuses


def _cited(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = []
        for key, value in node.items():
            if key == "sources" and isinstance(value, list):
                found += [v for v in value if isinstance(v, str)]
            else:
                found += _cited(value)
        return found
    if isinstance(node, list):
        return [s for item in node for s in _cited(item)]
    return []


def test_every_cited_source_exists(kb: Knowledge) -> None:
    known = {s["id"] for s in raw("sources.json")["sources"]}
    for name in raw("manifest.json")["files"]:
        if name != "sources.json":
            for source_id in _cited(raw(name)):
                assert source_id in known, (name, source_id)
                assert kb.source(source_id).id == source_id


def test_every_entry_cites_a_source() -> None:
    conditions = raw("conditions.json")["groups"]
    medications = raw("medications.json")
    entries = [
        *conditions,
        *(g for group in conditions for g in group.get("guidance", [])),
        *medications["magnesium"]["salts"],
        *medications["drug_groups"],
        *(e for g in medications["drug_groups"] for e in g["effects"]),
        *raw("interactions.json")["interactions"],
        *raw("labs.json")["groups"],
        *raw("labs.json")["thresholds"],
        *raw("labs.json")["unit_conversions"]["units"],
        *raw("thresholds.json")["thresholds"],
        *raw("rules.json")["rules"],
    ]
    for entry in entries:
        assert entry["sources"], entry


def test_sources_have_urls_only_where_confirmed(kb: Knowledge) -> None:
    review = kb.source("magnesium-autoimmunity")
    assert review.title == (
        "NIH PMC: A narrative review on the role of magnesium in immune regulation"
    )
    assert kb.source("nih-ods-magnesium").url == (
        "https://ods.od.nih.gov/factsheets/Magnesium-HealthProfessional/"
    )
    for source in raw("sources.json")["sources"]:
        assert source["status"] in STATUSES
        if "url" in source:
            assert source["url"].startswith(("https://", "http://"))


def test_sources_are_documents_a_clinician_can_open(kb: Knowledge) -> None:
    """No local file, no API record: a DailyMed label page (or its search when the setid was
    not confirmed, and the note says so), a fact sheet, a guideline."""
    ids = {s["id"] for s in raw("sources.json")["sources"]}
    assert "project-reference" not in ids
    for source in raw("sources.json")["sources"]:
        url = source.get("url", "")
        assert "api.fda.gov" not in url and ".json" not in url, source["id"]
        assert "clinical-knowledge.md" not in json.dumps(source), source["id"]
        if "dailymed" in url and "search.cfm" in url:
            assert "setid of this label was not confirmed" in source["note"], source["id"]
        if source["id"] != "local-policy":
            assert url, source["id"]
    mg = kb.source("mgso4-dextrose-pi")
    assert mg.url is not None and "drugInfo.cfm?setid=" in mg.url


def test_statuses_follow_the_reference(kb: Knowledge) -> None:
    def status_of(group: str, code: str) -> str:
        return next(c.status for c in kb.condition_group(group).codes if c.code == code)

    assert status_of("myasthenia-gravis", "91637004") == "verified"
    assert status_of("ckd-stage-3", "700378005") == "secondary"
    assert status_of("fibromyalgia", "203082005") == "secondary"
    assert kb.interaction_for("fluoroquinolone", "82122").status == "unverified"
    assert kb.interaction_for("fluoroquinolone", "138099").status == "secondary"
    assert kb.threshold("supplemental-magnesium-ul").status == "secondary"
    assert kb.threshold("serum-magnesium-reference-range").status == "verified"
    pyridostigmine = kb.drug_group("cholinesterase-inhibitor").effect("antagonised-by-magnesium")
    assert pyridostigmine is not None and pyridostigmine.status == "unverified"
    assert any("levofloxacin" in fact for fact in kb.unverified_facts)


# ---------------------------------------------------------------- conditions


@pytest.mark.parametrize("code", ["G70.00", "G7000", "g70.01", "G70.0", " G70.01 "])
def test_myasthenia_icd10cm_codes_match_by_prefix(kb: Knowledge, code: str) -> None:
    assert kb.condition_groups([icd(code)]) == {"myasthenia-gravis"}


@pytest.mark.parametrize("code", ["G70.2", "G70", "P94.0", "G70.1"])
def test_other_myoneural_codes_are_not_myasthenia_gravis(kb: Knowledge, code: str) -> None:
    assert "myasthenia-gravis" not in kb.condition_groups([icd(code)])


@pytest.mark.parametrize("code", ["G35.A", "G35.D", "G35", "g35b"])
def test_multiple_sclerosis_is_a_prefix(kb: Knowledge, code: str) -> None:
    assert kb.condition_groups([icd(code)]) == {"multiple-sclerosis"}


@pytest.mark.parametrize(
    ("code", "group"),
    [
        ("N18.4", "ckd-stage-4"),
        ("N18.9", "ckd-unspecified"),
        ("N18", "ckd-unspecified"),
        ("N18.30", "ckd-stage-3"),
        ("N18.32", "ckd-stage-3"),
        ("N18.5", "ckd-stage-5"),
        ("N18.6", "esrd-dialysis"),
        ("Z99.2", "esrd-dialysis"),
        ("I13.11", "esrd-dialysis"),
        ("N17.9", "acute-kidney-injury"),
        ("E06.3", "hashimoto"),
        ("E03.9", "hypothyroidism"),
        ("M05.79", "rheumatoid-arthritis"),
        ("M32.14", "sle"),
        ("M79.7", "fibromyalgia"),
        ("M35.00", "sjogren"),
        ("L40.50", "psoriasis"),
        ("K50.90", "ibd-celiac-malabsorption"),
        ("K90.0", "ibd-celiac-malabsorption"),
        ("E83.41", "hypermagnesemia"),
        ("E83.42", "hypomagnesemia"),
        ("G70.81", "lambert-eaton"),
        ("G73.1", "lambert-eaton"),
    ],
)
def test_icd10cm_groups(kb: Knowledge, code: str, group: str) -> None:
    assert kb.condition_groups([icd(code)]) == {group}


def test_staged_ckd_is_not_also_unspecified(kb: Knowledge) -> None:
    assert "ckd-unspecified" not in kb.condition_groups([icd("N18.4")])


def test_who_icd10_codes(kb: Knowledge) -> None:
    assert kb.condition_groups([icd("G70.0", ICD10)]) == {"myasthenia-gravis"}
    assert kb.condition_groups([icd("N18.3", ICD10)]) == {"ckd-stage-3"}
    assert kb.condition_groups([icd("E83.4", ICD10)]) == {"hypermagnesemia"}
    # The CM-only split of E83.4 does not exist in WHO ICD-10.
    assert kb.condition_groups([icd("E83.42", ICD10)]) == frozenset()


@pytest.mark.parametrize(
    ("code", "group"),
    [
        ("91637004", "myasthenia-gravis"),
        ("230684008", "myasthenia-gravis"),
        ("433144002", "ckd-stage-3"),
        ("431857002", "ckd-stage-4"),
        ("714152005", "esrd-dialysis"),
        ("709044004", "ckd-unspecified"),
        ("21983002", "hashimoto"),
        ("24700007", "multiple-sclerosis"),
        ("190855004", "hypomagnesemia"),
    ],
)
def test_snomed_groups(kb: Knowledge, code: str, group: str) -> None:
    assert kb.condition_groups([Coding(SNOMED, code)]) == {group}


def test_unverifiable_snomed_parent_is_not_matched(kb: Knowledge) -> None:
    # 60853003 'Disorder of magnesium metabolism' covers hypo- and hypermagnesemia.
    assert kb.condition_groups([Coding(SNOMED, "60853003")]) == frozenset()


@pytest.mark.parametrize(
    "system",
    [
        "urn:oid:2.16.840.1.113883.6.96",
        "http://snomed.info/sct/",
        "https://snomed.info/sct",
        " HTTP://SNOMED.INFO/SCT ",
    ],
)
def test_code_systems_match_tolerantly(kb: Knowledge, system: str) -> None:
    assert kb.condition_groups([Coding(system, "91637004")]) == {"myasthenia-gravis"}


def test_icd10cm_oid_and_unknown_systems(kb: Knowledge) -> None:
    assert kb.condition_groups([icd("N18.4", "urn:oid:2.16.840.1.113883.6.90")]) == {"ckd-stage-4"}
    assert kb.condition_groups([icd("N18.4", "http://example.org/local")]) == frozenset()


def test_several_codings_collect_several_groups(kb: Knowledge) -> None:
    codings = [icd("G70.01"), Coding(SNOMED, "431857002"), icd("E06.3")]
    assert kb.condition_groups(codings) == {"myasthenia-gravis", "ckd-stage-4", "hashimoto"}


def test_condition_group_details(kb: Knowledge) -> None:
    assert set(kb.condition_group_ids) == set(CONDITION_IDS)
    mg = kb.condition_group("myasthenia-gravis")
    assert (mg.category, mg.autoimmune, mg.renal_severity) == ("neuromuscular", True, None)
    assert "mgso4-pi" in mg.sources
    assert kb.condition_group("ckd-stage-4").renal_severity == "severe"
    assert kb.condition_group("ckd-stage-3").renal_severity == "moderate"
    assert kb.condition_group("fibromyalgia").autoimmune is False
    with pytest.raises(KeyError, match="unknown condition group 'nope'"):
        kb.condition_group("nope")


# ---------------------------------------------------------------- magnesium


def test_magnesium_by_product_code(kb: Knowledge) -> None:
    match = kb.match_magnesium([Coding(RXNORM, "198741", "magnesium oxide 400 MG Oral Tablet")])
    assert match is not None
    assert (match.salt, match.route, match.strength_mg, match.strength_unit) == (
        "oxide",
        "oral",
        400.0,
        "tablet",
    )
    assert match.elemental_fraction == pytest.approx(0.603)
    assert match.elemental_mg_per_unit == pytest.approx(241.2, abs=0.2)
    assert (match.matched_by, match.matched_value, match.product_code) == (
        "rxnorm-product",
        "198741",
        "198741",
    )
    assert match.multi_ingredient is False


def test_parenteral_sulfate_product(kb: Knowledge) -> None:
    match = kb.match_magnesium([Coding("urn:oid:2.16.840.1.113883.6.88", "1658221")])
    assert match is not None
    assert (match.salt, match.route, match.strength_mg, match.strength_unit) == (
        "sulfate",
        "parenteral",
        500.0,
        "mL",
    )
    assert match.elemental_fraction == pytest.approx(0.099)


def test_product_with_elemental_strength(kb: Knowledge) -> None:
    match = kb.match_magnesium([Coding(RXNORM, "198936")])
    assert match is not None and match.salt == "lactate"
    assert match.elemental_fraction == 1.0
    assert match.elemental_mg_per_unit == 84.0


def test_magnesium_by_ingredient_code(kb: Knowledge) -> None:
    match = kb.match_magnesium([Coding(RXNORM, "6585")])
    assert match is not None
    assert (match.salt, match.matched_by, match.matched_value) == (
        "sulfate",
        "rxnorm-ingredient",
        "6585",
    )
    assert match.route is None and match.strength_mg is None
    assert match.elemental_fraction == pytest.approx(0.099)


def test_ingredient_route_from_display(kb: Knowledge) -> None:
    coding = Coding(RXNORM, "6585", "magnesium sulfate 500 MG/ML Injectable Solution")
    match = kb.match_magnesium([coding])
    assert match is not None and match.route == "parenteral"


def test_product_code_wins_over_ingredient_code(kb: Knowledge) -> None:
    match = kb.match_magnesium([Coding(RXNORM, "52356"), Coding(RXNORM, "1052760")])
    assert match is not None and match.matched_by == "rxnorm-product"
    assert (match.salt, match.strength_mg, match.strength_unit) == ("citrate", 58.2, "mL")


@pytest.mark.parametrize(
    ("code", "salt", "route"),
    [
        ("A12CC04", "citrate", "oral"),
        ("B05XA05", "sulfate", "parenteral"),
        ("a02aa04", "hydroxide", "oral"),
    ],
)
def test_magnesium_by_atc(kb: Knowledge, code: str, salt: str, route: str) -> None:
    match = kb.match_magnesium([Coding(ATC, code)])
    assert match is not None
    assert (match.salt, match.route, match.matched_by) == (salt, route, "atc")


def test_epsom_salt_is_sulfate_heptahydrate_without_a_route(kb: Knowledge) -> None:
    # Decision: Epsom salt can be a laxative or a soak, so the route is left to the order.
    match = kb.match_magnesium([], "Epsom salt")
    assert match is not None
    assert (match.salt, match.route, match.matched_by, match.matched_value) == (
        "sulfate",
        None,
        "text",
        "epsom salt",
    )
    assert match.elemental_fraction == pytest.approx(0.099)


def test_epsom_salt_soak_is_topical(kb: Knowledge) -> None:
    match = kb.match_magnesium([], "EPSOM SALTS foot soak")
    assert match is not None and (match.salt, match.route) == ("sulfate", "topical")


def test_milk_of_magnesia_is_hydroxide(kb: Knowledge) -> None:
    match = kb.match_magnesium([], "Milk of Magnesia 30 mL PO at bedtime")
    assert match is not None
    assert (match.salt, match.route, match.matched_by) == ("hydroxide", "oral", "text")
    assert match.elemental_fraction == pytest.approx(0.417)


@pytest.mark.parametrize(
    ("text", "salt"),
    [
        ("Mag-Ox 400", "oxide"),
        ("mag ox 400 mg tablet", "oxide"),
        ("Magnesium glycinate 120 mg", "glycinate"),
        ("magnesium bisglycinate chelate", "glycinate"),
        ("Magnesium malate 1250 mg", "malate"),
        ("Magnesium L-threonate", "l-threonate"),
        ("Slow-Mag", "chloride"),
    ],
)
def test_text_synonyms(kb: Knowledge, text: str, salt: str) -> None:
    match = kb.match_magnesium([], text)
    assert match is not None and match.salt == salt and match.matched_by == "text"


def test_named_anhydrous_sulfate_uses_the_anhydrous_fraction(kb: Knowledge) -> None:
    match = kb.match_magnesium([], "magnesium sulfate anhydrous powder")
    assert match is not None and match.elemental_fraction == pytest.approx(0.202)


@pytest.mark.parametrize(
    "text",
    [
        "magnesium stearate",
        "Ciprofloxacin 500 mg tablet (excipients: Magnesium Stearate, starch)",
        "Vitamin D3 1000 IU",
        "Magnificent multivitamin",
        "",
    ],
)
def test_not_magnesium(kb: Knowledge, text: str) -> None:
    assert kb.match_magnesium([], text) is None


def test_text_is_ignored_when_coded_as_another_drug(kb: Knowledge) -> None:
    coding = Coding(RXNORM, "2551", "ciprofloxacin")
    assert kb.match_magnesium([coding], "ciprofloxacin; keep apart from magnesium") is None


def test_generic_magnesium_text(kb: Knowledge) -> None:
    match = kb.match_magnesium([], "Magnesium 250 mg daily (supplement)")
    assert match is not None
    assert match.salt is None and match.elemental_fraction is None
    assert match.matched_by == "text" and match.matched_value == "magnesium"


def test_unknown_product_code_falls_back_to_display_text(kb: Knowledge) -> None:
    coding = Coding(RXNORM, "999999", "magnesium citrate 1.745 GM in 30 mL Oral Solution")
    match = kb.match_magnesium([coding])
    assert match is not None
    assert (match.salt, match.route, match.matched_by) == ("citrate", "oral", "text")


@pytest.mark.parametrize(
    "text",
    ["Maalox suspension", "aluminum hydroxide / magnesium hydroxide oral suspension"],
)
def test_combination_products(kb: Knowledge, text: str) -> None:
    match = kb.match_magnesium([], text)
    assert match is not None and match.salt == "hydroxide" and match.multi_ingredient is True


def test_magnesium_salt_catalogue(kb: Knowledge) -> None:
    sulfate = kb.magnesium_salt("sulfate")
    by_form = {f.form: f for f in sulfate.fractions}
    assert by_form["heptahydrate"].fraction == pytest.approx(0.099)
    assert by_form["anhydrous"].fraction == pytest.approx(0.202)
    assert by_form["heptahydrate"].default
    assert set(by_form["heptahydrate"].routes) == {"oral", "parenteral", "topical"}
    assert kb.magnesium_salt("malate").text_only
    assert {a.status for a in sulfate.atc} == {"secondary"}


# ---------------------------------------------------------------- other drugs


def test_drug_group_by_rxnorm(kb: Knowledge) -> None:
    assert kb.drug_groups([Coding(RXNORM, "2551")]) == (frozenset({"fluoroquinolone"}), "rxnorm")
    assert kb.drug_groups([Coding(RXNORM, "9000")]) == (
        frozenset({"cholinesterase-inhibitor"}),
        "rxnorm",
    )


def test_drug_group_by_atc_prefix(kb: Knowledge) -> None:
    assert kb.drug_groups([Coding(ATC, "J01MA02")]) == (frozenset({"fluoroquinolone"}), "atc")
    assert kb.drug_groups([Coding(ATC, "J01AA02")]) == (frozenset({"tetracycline"}), "atc")


@pytest.mark.parametrize(
    ("text", "group"),
    [
        ("Doxycycline hyclate 100 mg capsule", "tetracycline"),
        ("Levothyroxine 75 mcg", "thyroid-hormone"),
        ("Armour Thyroid 60 mg", "thyroid-hormone"),
        ("rocuronium 50 mg IV", "neuromuscular-blocker"),
        ("Polymyxin B for injection", "aminoglycoside-polymyxin"),
        ("alendronate 70 mg weekly", "bisphosphonate"),
    ],
)
def test_drug_group_by_text(kb: Knowledge, text: str, group: str) -> None:
    assert kb.drug_groups([], text) == (frozenset({group}), "text")


def test_drug_group_text_from_coding_display(kb: Knowledge) -> None:
    # A code no knowledge file holds: the display decides.
    coding = Coding(RXNORM, "999999991", "ciprofloxacin 500 MG Oral Tablet")
    assert kb.drug_groups([coding]) == (frozenset({"fluoroquinolone"}), "text")


@pytest.mark.parametrize("text", ["thyroid cancer follow-up", "Amoxicillin 500 mg", ""])
def test_no_drug_group(kb: Knowledge, text: str) -> None:
    assert kb.drug_groups([], text) == (frozenset(), None)


def test_drug_group_details(kb: Knowledge) -> None:
    assert set(kb.drug_group_ids) == set(DRUG_GROUP_IDS)
    fq = kb.drug_group("fluoroquinolone")
    assert "ciprofloxacin" in fq.ingredient_names
    boxed = fq.effect("aggravates-myasthenia")
    assert boxed is not None and boxed.status == "verified"
    chelators = kb.drug_group("other-chelator").ingredient_names
    assert set(chelators) == {"eltrombopag", "penicillamine"}


def test_matched_ingredients(kb: Knowledge) -> None:
    (ingredient,) = kb.matched_ingredients([], "Ciprofloxacin 250 mg")
    assert (ingredient.code, ingredient.group) == ("2551", "fluoroquinolone")


# ---------------------------------------------------------------- interactions


def test_ciprofloxacin_has_its_own_label_figure(kb: Knowledge) -> None:
    cipro = kb.interaction_for("fluoroquinolone", "2551")
    assert cipro is not None
    assert (cipro.hours_before, cipro.hours_after, cipro.status) == (2.0, 6.0, "verified")
    assert cipro.sources == ("ciprofloxacin-label",)
    assert cipro.magnesium_routes == ("oral",)


def test_doxycycline_falls_back_to_the_group_entry(kb: Knowledge) -> None:
    doxy = kb.interaction_for("tetracycline", "3640")
    assert doxy is not None and doxy.ingredient_code is None
    assert (doxy.hours_before, doxy.hours_after, doxy.hours_after_max) == (2.0, 4.0, 6.0)
    assert doxy.status == "unverified"


def test_other_interaction_figures(kb: Knowledge) -> None:
    moxi = kb.interaction_for("fluoroquinolone", "139462")
    assert moxi is not None and (moxi.hours_before, moxi.hours_after) == (4.0, 8.0)
    levo = kb.interaction_for("thyroid-hormone", "10582")
    assert levo is not None and (levo.hours_before, levo.status) == (4.0, "secondary")
    dolutegravir = kb.interaction_for("integrase-inhibitor", "1433868")
    assert dolutegravir is not None and (dolutegravir.hours_before, dolutegravir.hours_after) == (
        2.0,
        6.0,
    )
    raltegravir = kb.interaction_for("integrase-inhibitor", "719872")
    assert raltegravir is not None and raltegravir.hours_before is None
    ofloxacin = kb.interaction_for("fluoroquinolone", "7623")
    assert ofloxacin is not None and ofloxacin.ingredient_code is None


def test_interaction_lookup_by_name_and_misses(kb: Knowledge) -> None:
    by_name = kb.interaction_for("fluoroquinolone", "ciprofloxacin")
    assert by_name is not None and by_name.ingredient_code == "2551"
    group = kb.interaction_for("fluoroquinolone", None)
    assert group is not None and group.ingredient_code is None
    assert kb.interaction_for("neuromuscular-blocker", "68139") is None
    assert kb.interaction_for("no-such-group", "2551") is None


# ---------------------------------------------------------------- labs and thresholds


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("19123-9", "serum-magnesium"),
        ("2601-3", "serum-magnesium"),
        ("98979-8", "egfr"),
        ("62238-1", "egfr"),
        ("2160-0", "creatinine"),
        ("38483-4", "creatinine"),
        ("2597-3", None),
        ("2598-1", None),
    ],
)
def test_lab_kind(kb: Knowledge, code: str, kind: str | None) -> None:
    assert kb.lab_kind([Coding(LOINC, code)]) == kind


def test_lab_kind_other_systems(kb: Knowledge) -> None:
    assert kb.lab_kind([Coding("urn:oid:2.16.840.1.113883.6.1", "2601-3")]) == "serum-magnesium"
    assert kb.lab_kind([Coding("http://example.org/lab", "2601-3")]) is None
    assert kb.lab_group("serum-magnesium").unit_for("19123-9") == "mg/dL"


@pytest.mark.parametrize(
    ("value", "unit", "mmol"),
    [(2.4305, "mg/dL", 1.0), (2.0, "meq/l", 1.0), (0.8, "mmol/L", 0.8), (4.861, "mg/dl", 2.0)],
)
def test_unit_conversion(kb: Knowledge, value: float, unit: str, mmol: float) -> None:
    assert kb.to_mmol_per_l(value, unit) == pytest.approx(mmol)


def test_unknown_unit(kb: Knowledge) -> None:
    assert kb.to_mmol_per_l(1.0, "g/L") is None


def band_id(threshold: Threshold, x: float) -> str:
    band = threshold.band_for_value(x)
    assert band is not None, (threshold.id, x)
    return band.id


def band_value(threshold: Threshold, age: float, sex: str | None = None) -> float:
    band = threshold.band_for(age, sex)
    assert band is not None and band.value is not None, (threshold.id, age, sex)
    return band.value


def test_lab_thresholds(kb: Knowledge) -> None:
    normal = kb.threshold("serum-magnesium-reference-range")
    assert (normal.low, normal.high, normal.unit) == (0.7, 1.1, "mmol/L")
    assert kb.threshold("serum-magnesium-reflexes-diminish").value == 4.0
    assert kb.threshold("serum-magnesium-respiratory-paralysis").value == 10.0
    kdigo = kb.threshold("kdigo-gfr-categories")
    categories = [band_id(kdigo, x) for x in (59.9, 45, 44, 29, 14.9)]
    assert categories == ["G3a", "G3a", "G3b", "G4", "G5"]
    assert kdigo.band_for_value(90) is None


def test_intake_and_renal_thresholds(kb: Knowledge) -> None:
    ul = kb.threshold("supplemental-magnesium-ul")
    assert [band_value(ul, age) for age in (2, 6, 9, 70)] == [65, 110, 350, 350]
    assert ul.band_for(0.5) is None
    rda = kb.threshold("magnesium-rda")
    assert band_value(rda, 40, "female") == 320
    assert band_value(rda, 25, "male") == 400
    # Sex unknown: the lower allowance.
    assert band_value(rda, 40) == 320
    renal = kb.threshold("egfr-renal-impairment")
    assert band_id(renal, 25) == "severe"
    assert band_id(renal, 30) == "moderate"
    assert renal.band_for_value(60) is None
    assert kb.threshold("iv-mgso4-severe-renal-max").value == 20.0
    with pytest.raises(KeyError):
        kb.threshold("no-such-threshold")


# ---------------------------------------------------------------- rules and describe


def test_rule_catalogue(kb: Knowledge) -> None:
    assert set(kb.rule_ids) == set(RULE_IDS)
    rule = kb.rule("myasthenia-magnesium")
    assert rule.indicator == "critical"
    # Both spellings are used by callers.
    assert rule.source_ids == rule.sources == (
        "mgso4-dextrose-pi",
        "mgso4-pi",
        "magnesium-autoimmunity",
    )
    assert {r.display for r in rule.override_reasons} >= {
        "Treating documented severe hypomagnesemia under monitoring",
        "Myasthenia gravis diagnosis not confirmed",
        "Neurology consulted and agrees",
    }
    for rule_id in RULE_IDS:
        info = kb.rule(rule_id)
        assert info.indicator in {"info", "warning", "critical"}
        assert len(info.title) < 140
        assert info.sources and info.override_reasons
        for reason in info.override_reasons:
            assert reason.system == "urn:magnesium-cds:override-reason"
            assert reason.code and reason.display


def test_describe_lists_rules_value_sets_and_versions(kb: Knowledge) -> None:
    text = kb.describe()
    assert kb.version in text
    for rule_id in RULE_IDS:
        assert rule_id in text
    for group_id in (*CONDITION_IDS, *DRUG_GROUP_IDS):
        assert group_id in text
    for name in kb.file_versions:
        assert name in text
    assert "Unverified facts" in text


def test_rule_facts_added_for_the_clinical_rules(kb: Knowledge) -> None:
    # Which form suits which aim (the clinical source's comparison table, unverified).
    fits = {s.id: s.autoimmune_use.fit for s in kb.magnesium_salts if s.autoimmune_use}
    assert fits == {
        "glycinate": "preferred",
        "malate": "preferred",
        "citrate": "short-term-only",
        "sulfate": "topical-only",
    }
    glycinate = kb.magnesium_salt("glycinate").autoimmune_use
    assert glycinate is not None and glycinate.status == "unverified"
    assert set(glycinate.aims) == {"inflammation", "stress", "sleep"}
    # How serious the label wording is.
    fq = kb.drug_group("fluoroquinolone").effect("aggravates-myasthenia")
    ag = kb.drug_group("aminoglycoside-polymyxin").effect("aggravates-myasthenia")
    assert (fq and fq.indicator, ag and ag.indicator) == ("critical", "warning")
    # Statements the cards quote, and the local policy for "recent".
    assert kb.rule("autoimmune-guidance").statement("diet-first").status == "secondary"
    # The contraindication is the PLR premix label's (section 5.6), read with the search tool.
    assert kb.rule("myasthenia-magnesium").statement("label").status == "verified"
    assert kb.source("mgso4-dextrose-pi").status == "verified"
    with pytest.raises(KeyError):
        kb.rule("renal-magnesium").statement("no-such-statement")
    recent = kb.threshold("serum-magnesium-recent-days")
    assert (recent.value, recent.status, recent.sources) == (30.0, "unverified", ("local-policy",))
    assert kb.source("local-policy").status == "unverified"


# --- route vocabulary (one, for every drug) and MG-specific drugs ------------------------------


@pytest.mark.parametrize(
    ("code", "route"),
    [
        ("26643006", "oral"),
        ("po", "oral"),
        ("47625008", "parenteral"),
        ("IVINFUS", "parenteral"),
        ("6064005", "topical"),
        ("54485002", "topical"),  # ophthalmic: local, so not systemic
        ("10547007", "topical"),  # otic
        ("46713006", "topical"),  # nasal
        ("18679011", "topical"),  # inhalation
        ("37161004", None),  # rectal: magnesium enemas are absorbed, so not listed
    ],
)
def test_route_codes(kb: Knowledge, code: str, route: str | None) -> None:
    assert kb.route_of_codings((Coding(SNOMED, code),)) == route


@pytest.mark.parametrize(
    ("text", "route"),
    [
        ("ciprofloxacin 400 MG in 200 ML IV infusion", "parenteral"),
        ("ciprofloxacin 3 MG/ML Ophthalmic Solution", "topical"),
        ("ciprofloxacin 0.3% otic suspension", "topical"),  # the site wins over the form
        ("ciprofloxacin 500 MG Oral Tablet", "oral"),
        ("tobramycin eye drops", "topical"),
        ("magnesium sulfate inhalation", "topical"),
        ("injectable suspension", None),  # conflicting forms say nothing
        ("ciprofloxacin", None),
    ],
)
def test_route_words(kb: Knowledge, text: str, route: str | None) -> None:
    assert kb.route_from_text(text) == route


def test_only_mg_specific_drugs_imply_myasthenia(kb: Knowledge) -> None:
    implying = {
        ingredient.name
        for group_id in kb.drug_group_ids
        for ingredient in kb.drug_group(group_id).ingredients
        if ingredient.implies_myasthenia is not None
    }
    assert implying == {"pyridostigmine", "efgartigimod alfa", "rozanolixizumab", "zilucoplan"}


# --- issue 20: corrected and added facts --------------------------------------------------


def test_lambert_eaton_codes(kb: Knowledge) -> None:
    for code in ("G70.80", "G70.81", "G73.1"):
        assert kb.condition_groups([icd(code)]) == {"lambert-eaton"}
    assert kb.condition_groups([Coding(SNOMED, "56989000")]) == {"lambert-eaton"}
    # "Myasthenic syndrome due to another disorder" is not Lambert-Eaton syndrome.
    assert kb.condition_groups([Coding(SNOMED, "193209005")]) == set()
    assert kb.condition_group("lambert-eaton").counts_while_inactive
    assert kb.condition_group("myasthenia-gravis").counts_while_inactive
    assert not kb.condition_group("ckd-stage-4").counts_while_inactive
    assert kb.condition_groups([icd("O14.13")]) == {"pre-eclampsia-eclampsia"}


def test_label_spacings_of_issue_20(kb: Knowledge) -> None:
    def figures(group: str, code: str | None) -> tuple[float | None, float | None]:
        entry = kb.interaction_for(group, code)
        assert entry is not None
        return entry.hours_before, entry.hours_after

    assert figures("fluoroquinolone", "1927663") == (2.0, 6.0)  # delafloxacin
    assert figures("tetracycline", "2059269") == (4.0, 4.0)  # omadacycline
    assert figures("antimalarial", "5521") == (4.0, 4.0)  # hydroxychloroquine
    assert figures("mycophenolate", None) == (None, None)  # "not at the same time"
    assert figures("gabapentinoid", None) == (None, 2.0)
    assert figures("cardiac-glycoside", None) == (2.0, 2.0)
    assert kb.interaction_for("fluoroquinolone", "1927663").sources == ("delafloxacin-label",)


def test_maginex_holds_61_mg_elemental(kb: Knowledge) -> None:
    maginex = kb.match_magnesium([Coding(RXNORM, "359739")])
    assert maginex is not None and maginex.elemental_mg_per_unit == pytest.approx(61, abs=1)
    aspartate = kb.magnesium_salt("aspartate").fraction_for("oral")
    assert aspartate is not None and aspartate.fraction == pytest.approx(0.084)


def test_balanced_fluids_are_recognised_by_name(kb: Knowledge) -> None:
    for text in ("Plasma-Lyte A injection", "Normosol-R pH 7.4", "PrismaSol BGK 4/2.5",
                 "Dianeal PD-2 with 1.5% dextrose", "TPN adult standard"):
        groups, _ = kb.drug_groups([], text)
        assert "magnesium-carrier-fluid" in groups, text
