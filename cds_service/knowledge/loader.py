"""Read, validate and index the knowledge files.

Validation happens in two passes, both at start-up: the JSON Schema
(``schemas/knowledge.schema.json``, draft 2020-12) checks each file's shape, then
``_check_*`` functions check what a schema cannot: that every cited source exists, that no
code is claimed by two groups, that interactions name real drugs. Any problem raises
``KnowledgeError`` naming the file, the JSON path of the entry and the problem, so a bad
knowledge release stops the service instead of producing wrong cards.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from cds_service.fhir_types import Coding
from cds_service.knowledge.index import Knowledge
from cds_service.knowledge.model import (
    ATC,
    ICD10,
    ICD10CM,
    LOINC,
    SNOMED,
    BrandName,
    CodeEntry,
    ConditionGroup,
    DrugEffect,
    DrugGroup,
    ElementalFraction,
    EvidenceSource,
    FormUse,
    GeneratedProduct,
    Guidance,
    Ingredient,
    Interaction,
    KnowledgeError,
    LabGroup,
    Lookback,
    MagnesiumProduct,
    MagnesiumSalt,
    RuleInfo,
    Terminology,
    Threshold,
    ThresholdBand,
    UnitConversion,
)
from cds_service.resources import load_schema

SCHEMA_FILE = "knowledge.schema.json"
MANIFEST = "manifest.json"
DATA_DIR = Path(__file__).resolve().parent / "data"
# Kinds every release must have; the manifest maps file names onto them.
REQUIRED_KINDS = (
    "sources",
    "conditions",
    "medications",
    "interactions",
    "labs",
    "thresholds",
    "rules",
)
_MAX_REPORTED = 10
# Generated terminology (scripts/build_terminology.py, ``cds-service knowledge expand``): optional
# files under ``terminology/`` beside the manifest, merged into the curated groups by id.
TERMINOLOGY_DIR = "terminology"
RXNORM_FILE = "rxnorm-products.json"
SNOMED_FILE = "snomed-descendants.json"
TERMINOLOGY_FILES = {RXNORM_FILE: "rxnormTerminologyFile", SNOMED_FILE: "snomedTerminologyFile"}

Json = dict[str, Any]


def load_knowledge(directory: Path | None = None) -> Knowledge:
    """Load, validate and index every knowledge file in ``directory`` (default: bundled)."""
    directory = Path(directory) if directory is not None else DATA_DIR
    manifest_raw = _read_bytes(directory, MANIFEST)
    manifest = _parse(MANIFEST, manifest_raw)
    _validate_schema(MANIFEST, manifest, "manifestFile")
    files: dict[str, str] = manifest["files"]
    kinds = list(files.values())
    for kind in REQUIRED_KINDS:
        if kinds.count(kind) != 1:
            raise KnowledgeError(
                f"{MANIFEST}: $.files: needs exactly one file of kind {kind!r},"
                f" has {kinds.count(kind)}"
            )

    docs: dict[str, tuple[str, Json]] = {}  # kind -> (file name, parsed)
    digest = hashlib.sha256(manifest_raw)
    file_versions = {MANIFEST: manifest["version"]}
    for name in sorted(files):
        raw = _read_bytes(directory, name)
        doc = _parse(name, raw)
        _validate_schema(name, doc, f"{files[name]}File")
        docs[files[name]] = (name, doc)
        file_versions[name] = doc["version"]
        digest.update(name.encode() + b"\0" + raw)

    generated: dict[str, Json] = {}
    for name, definition in TERMINOLOGY_FILES.items():
        path = directory / TERMINOLOGY_DIR / name
        if not path.exists():
            continue
        label = f"{TERMINOLOGY_DIR}/{name}"
        raw = _read_bytes(directory / TERMINOLOGY_DIR, name)
        doc = _parse(label, raw)
        _validate_schema(label, doc, definition)
        generated[name] = doc
        file_versions[label] = doc["version"]
        digest.update(label.encode() + b"\0" + raw)

    errors = list(_check_all(docs))
    errors += _check_terminology(generated, docs)
    if errors:
        raise KnowledgeError(_join(errors))
    knowledge = _build(
        docs,
        f"{manifest['version']}+{digest.hexdigest()[:8]}",
        file_versions,
        _terminology(generated),
    )
    return knowledge


@cache
def default_knowledge() -> Knowledge:
    """The bundled knowledge, loaded and validated once per process."""
    return load_knowledge(None)


# ---------------------------------------------------------------------------- reading


def _read_bytes(directory: Path, name: str) -> bytes:
    try:
        return (directory / name).read_bytes()
    except OSError as exc:
        raise KnowledgeError(
            f"{name}: cannot read {directory / name}: {exc.strerror or exc}"
        ) from exc


def _parse(name: str, raw: bytes) -> Json:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        # A repeated key silently overwrites in plain json.loads: a review hazard.
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise KnowledgeError(f"{name}: duplicate key {key!r} in one object")
            seen[key] = value
        return seen

    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except UnicodeDecodeError as exc:
        raise KnowledgeError(f"{name}: not UTF-8: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise KnowledgeError(
            f"{name}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc
    if not isinstance(doc, dict):
        raise KnowledgeError(f"{name}: $: the top level must be an object")
    return doc


@cache
def _validator(definition: str) -> Draft202012Validator:
    schema = load_schema(SCHEMA_FILE)
    resource = Resource.from_contents(schema, default_specification=DRAFT202012)
    registry: Registry = Registry().with_resource(schema["$id"], resource)
    return Draft202012Validator({"$ref": f"{schema['$id']}#/$defs/{definition}"}, registry=registry)


def _validate_schema(name: str, doc: Json, definition: str) -> None:
    errors = sorted(_validator(definition).iter_errors(doc), key=lambda e: e.json_path)
    if errors:
        messages = []
        for error in errors[:_MAX_REPORTED]:
            # best_match descends into oneOf/anyOf to the most specific problem.
            best = best_match([error])
            messages.append(f"{name}: {best.json_path}: {best.message}")
        raise KnowledgeError(_join(messages, total=len(errors)))


def _join(messages: list[str], total: int | None = None) -> str:
    total = len(messages) if total is None else total
    shown = messages[:_MAX_REPORTED]
    more = f"\n... and {total - len(shown)} more" if total > len(shown) else ""
    return "\n".join(shown) + more


# ---------------------------------------------------------------------------- checks


def _check_all(docs: dict[str, tuple[str, Json]]) -> Iterator[str]:
    yield from _check_sources(docs)
    yield from _check_conditions(*docs["conditions"])
    yield from _check_medications(*docs["medications"])
    yield from _check_interactions(docs["interactions"], docs["medications"][1])
    yield from _check_labs(*docs["labs"])
    yield from _check_thresholds(docs["labs"], docs["thresholds"])
    yield from _check_rules(*docs["rules"])


def _unique(name: str, items: list[Json], key: str, path: str) -> Iterator[str]:
    seen: dict[Any, int] = {}
    for i, item in enumerate(items):
        value = item[key]
        if value in seen:
            yield f"{name}: {path}[{i}].{key}: {value!r} repeats {path}[{seen[value]}]"
        else:
            seen[value] = i


def _walk_sources(node: Any, path: str) -> Iterator[tuple[str, str]]:
    """Every (json path, source id) cited anywhere under ``node``."""
    if isinstance(node, dict):
        for key, value in node.items():
            child = f"{path}.{key}"
            if key == "sources" and isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, str):
                        yield f"{child}[{i}]", item
            else:
                yield from _walk_sources(value, child)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _walk_sources(item, f"{path}[{i}]")


def _check_sources(docs: dict[str, tuple[str, Json]]) -> Iterator[str]:
    name, doc = docs["sources"]
    yield from _unique(name, doc["sources"], "id", "$.sources")
    known = {s["id"] for s in doc["sources"]}
    for kind, (file_name, other) in docs.items():
        if kind == "sources":
            continue
        for path, source_id in _walk_sources(other, "$"):
            if source_id not in known:
                yield f"{file_name}: {path}: unknown source id {source_id!r} (not in {name})"


def _check_conditions(name: str, doc: Json) -> Iterator[str]:
    groups = doc["groups"]
    yield from _unique(name, groups, "id", "$.groups")
    categories = set(doc["categories"])
    # A code in two groups would make the groups contradict each other.
    claimed: dict[tuple[str, str], tuple[str, str]] = {}
    for gi, group in enumerate(groups):
        if group["category"] not in categories:
            yield f"{name}: $.groups[{gi}].category: {group['category']!r} is not in $.categories"
        for field, label in (
            ("icd10cm", "ICD-10-CM"),
            ("icd10", "WHO ICD-10"),
            ("snomed", "SNOMED CT"),
        ):
            for ci, entry in enumerate(group.get(field, [])):
                here = f"$.groups[{gi}].{field}[{ci}]"
                key = (field, entry["code"])
                if key in claimed:
                    where, owner = claimed[key]
                    yield f"{name}: {here}.code: {label} {entry['code']} also in {where} ({owner})"
                else:
                    claimed[key] = (here, group["id"])


def _check_medications(name: str, doc: Json) -> Iterator[str]:
    mg = doc["magnesium"]
    salts = mg["salts"]
    yield from _unique(name, salts, "id", "$.magnesium.salts")
    salt_ids = {s["id"] for s in salts}
    rxnorm: dict[str, str] = {}
    atc: dict[str, str] = {}
    phrases: dict[str, str] = {}

    def claim(table: dict[str, str], value: str, here: str, label: str) -> Iterator[str]:
        if value in table:
            yield f"{name}: {here}: {label} {value!r} also at {table[value]}"
        else:
            table[value] = here

    for si, salt in enumerate(salts):
        base = f"$.magnesium.salts[{si}]"
        for ii, ing in enumerate(salt["rxnorm_ingredients"]):
            if ing["code"] is None:
                here = f"{base}.rxnorm_ingredients[{ii}].code"
                yield f"{name}: {here}: a magnesium ingredient needs a code"
            else:
                yield from claim(
                    rxnorm, ing["code"], f"{base}.rxnorm_ingredients[{ii}].code", "RxNorm"
                )
        forms = {f["form"] for f in salt["elemental_fractions"]}
        for pi, product in enumerate(salt["products"]):
            yield from claim(rxnorm, product["code"], f"{base}.products[{pi}].code", "RxNorm")
            if "form" in product and product["form"] not in forms:
                yield (
                    f"{name}: {base}.products[{pi}].form: {product['form']!r} is not one of "
                    "the salt's elemental_fractions forms"
                )
        for ai, entry in enumerate(salt["atc"]):
            yield from claim(atc, entry["code"], f"{base}.atc[{ai}].code", "ATC")
        for yi, phrase in enumerate(salt["synonyms"]):
            yield from claim(phrases, phrase, f"{base}.synonyms[{yi}]", "text synonym")
        fractions = salt["elemental_fractions"]
        if fractions and sum(1 for f in fractions if f.get("default")) != 1:
            yield f"{name}: {base}.elemental_fractions: exactly one fraction must be the default"
        yield from _unique(name, fractions, "form", f"{base}.elemental_fractions")
        if salt.get("text_only") and (salt["rxnorm_ingredients"] or salt["products"]):
            yield f"{name}: {base}.text_only: a text-only salt cannot have RxNorm codes"
    for yi, phrase in enumerate(mg["generic_synonyms"]):
        yield from claim(phrases, phrase, f"$.magnesium.generic_synonyms[{yi}]", "text synonym")
    for ci, combo in enumerate(mg["combination_synonyms"]):
        here = f"$.magnesium.combination_synonyms[{ci}]"
        yield from claim(phrases, combo["synonym"], f"{here}.synonym", "text synonym")
        if combo["salt"] not in salt_ids:
            yield f"{name}: {here}.salt: unknown salt {combo['salt']!r}"

    groups = doc["drug_groups"]
    yield from _unique(name, groups, "id", "$.drug_groups")
    drug_phrases: dict[str, str] = {}
    group_atc: dict[str, str] = {}
    for gi, group in enumerate(groups):
        base = f"$.drug_groups[{gi}]"
        for ii, ing in enumerate(group["ingredients"]):
            here = f"{base}.ingredients[{ii}]"
            if ing["code"] is not None:
                yield from claim(rxnorm, ing["code"], f"{here}.code", "RxNorm")
            for phrase in ing.get("text_synonyms", [ing["name"]]):
                yield from claim(drug_phrases, phrase, f"{here}.text_synonyms", "text synonym")
        for ai, entry in enumerate(group.get("atc_prefixes", [])):
            yield from claim(group_atc, entry["code"], f"{base}.atc_prefixes[{ai}].code", "ATC")


def _check_interactions(interactions: tuple[str, Json], medications: Json) -> Iterator[str]:
    name, doc = interactions
    members = {
        g["id"]: {i["code"]: i["name"] for i in g["ingredients"] if i["code"]}
        for g in medications["drug_groups"]
    }
    seen: dict[tuple[str, str | None], int] = {}
    for i, entry in enumerate(doc["interactions"]):
        here = f"$.interactions[{i}]"
        group, code = entry["drug_group"], entry.get("ingredient_code")
        if group not in members:
            yield f"{name}: {here}.drug_group: unknown drug group {group!r}"
            continue
        if code is not None:
            if code not in members[group]:
                yield f"{name}: {here}.ingredient_code: {code} is not an ingredient of {group!r}"
            elif members[group][code] != entry["ingredient_name"]:
                yield (
                    f"{name}: {here}.ingredient_name: {entry['ingredient_name']!r} but "
                    f"{code} is {members[group][code]!r} in medications.json"
                )
        if (group, code) in seen:
            first = seen[(group, code)]
            yield f"{name}: {here}: repeats $.interactions[{first}] for {group}/{code}"
        seen[(group, code)] = i
        after, after_max = entry["hours_after"], entry.get("hours_after_max")
        if after_max is not None and (after is None or after_max < after):
            yield f"{name}: {here}.hours_after_max: must be at least hours_after"


def _check_labs(name: str, doc: Json) -> Iterator[str]:
    yield from _unique(name, doc["groups"], "id", "$.groups")
    claimed: dict[str, str] = {}
    entries = [
        (f"$.groups[{gi}].codes[{ci}]", code)
        for gi, group in enumerate(doc["groups"])
        for ci, code in enumerate(group["codes"])
    ] + [(f"$.other_codes[{ci}]", code) for ci, code in enumerate(doc.get("other_codes", []))]
    for here, entry in entries:
        if entry["code"] in claimed:
            yield f"{name}: {here}.code: LOINC {entry['code']} also at {claimed[entry['code']]}"
        else:
            claimed[entry["code"]] = here
    units = doc["unit_conversions"]["units"]
    spellings: dict[str, str] = {}
    for ui, unit in enumerate(units):
        for spelling in (unit["unit"], *unit.get("aliases", [])):
            key, here = _unit_key(spelling), f"$.unit_conversions.units[{ui}]"
            if spellings.get(key, here) != here:
                yield f"{name}: {here}: unit {spelling!r} also at {spellings[key]}"
            spellings.setdefault(key, here)


def _check_thresholds(labs: tuple[str, Json], thresholds: tuple[str, Json]) -> Iterator[str]:
    seen: dict[str, str] = {}
    for name, doc in (labs, thresholds):
        for ti, entry in enumerate(doc["thresholds"]):
            here = f"$.thresholds[{ti}]"
            if entry["id"] in seen:
                yield f"{name}: {here}.id: {entry['id']!r} also defined in {seen[entry['id']]}"
            seen[entry["id"]] = f"{name} {here}"
            if "low" in entry and "high" in entry and entry["low"] >= entry["high"]:
                yield f"{name}: {here}: low must be below high"
            bands = entry.get("bands", [])
            yield from _unique(name, bands, "id", f"{here}.bands")
            for bi, band in enumerate(bands):
                if "low" in band and "high" in band and band["low"] >= band["high"]:
                    yield f"{name}: {here}.bands[{bi}]: low must be below high"
                if "age_min" in band and "age_max" in band and band["age_min"] >= band["age_max"]:
                    yield f"{name}: {here}.bands[{bi}]: age_min must be below age_max"


def _check_rules(name: str, doc: Json) -> Iterator[str]:
    yield from _unique(name, doc["rules"], "id", "$.rules")
    for ri, rule in enumerate(doc["rules"]):
        named = [g for g in rule.get("guidance", []) if "id" in g]
        yield from _unique(name, named, "id", f"$.rules[{ri}].guidance")
        yield from _unique(
            name, rule["override_reasons"], "code", f"$.rules[{ri}].override_reasons"
        )


def _check_terminology(generated: dict[str, Json], docs: dict[str, tuple[str, Json]]) -> list[str]:
    """Generated files name only ingredients, salts and concepts the curated files define."""
    errors: list[str] = []
    medications = docs["medications"][1]
    ingredients = {i["name"] for g in medications["drug_groups"] for i in g["ingredients"]}
    salts = {s["id"] for s in medications["magnesium"]["salts"]}
    label = f"{TERMINOLOGY_DIR}/{RXNORM_FILE}"
    for key in ("products", "brands"):
        for i, row in enumerate(generated.get(RXNORM_FILE, {}).get(key, [])):
            for name in row["ingredients"]:
                if name not in ingredients:
                    errors.append(f"{label}: $.{key}[{i}]: unknown ingredient {name!r}")
            for item in row["magnesium"]:
                salt = item if isinstance(item, str) else item["salt"]
                if salt not in salts:
                    errors.append(f"{label}: $.{key}[{i}]: unknown magnesium salt {salt!r}")
    concepts = {e["code"] for g in docs["conditions"][1]["groups"] for e in g.get("snomed", [])}
    label = f"{TERMINOLOGY_DIR}/{SNOMED_FILE}"
    for i, row in enumerate(generated.get(SNOMED_FILE, {}).get("expansions", [])):
        if row["concept"] not in concepts:
            errors.append(f"{label}: $.expansions[{i}].concept: {row['concept']} is in no group")
    return errors


def _terminology(generated: dict[str, Json]) -> Terminology:
    rxnorm = generated.get(RXNORM_FILE, {})
    products = tuple(
        GeneratedProduct(
            rxcui=p["rxcui"],
            ingredients=tuple(p["ingredients"]),
            magnesium=tuple(
                (
                    m["salt"],
                    _float(m["strength"]["value"]) if m["strength"] else None,
                    m["strength"]["per"] if m["strength"] else None,
                )
                for m in p["magnesium"]
            ),
            multi_ingredient=p["multi_ingredient"],
            route=p.get("route"),
        )
        for p in rxnorm.get("products", [])
    )
    brands = tuple(
        BrandName(
            b["phrase"], tuple(b["ingredients"]), tuple(b["magnesium"]), b["multi_ingredient"]
        )
        for b in rxnorm.get("brands", [])
    )
    snomed = tuple(
        (item["code"], row["concept"])
        for row in generated.get(SNOMED_FILE, {}).get("expansions", [])
        for item in row["contains"]
        if item["code"] != row["concept"]
        and item["code"] not in {x["code"] for x in row.get("excludes", [])}
    )
    return Terminology(products, brands, snomed)


# ---------------------------------------------------------------------------- building


def _float(value: float | None) -> float | None:
    # JSON integers become floats so that callers always see one numeric type.
    return None if value is None else float(value)


def _unit_key(unit: str) -> str:
    return unit.strip().replace(" ", "").lower()


def _unverified(docs: dict[str, tuple[str, Json]]) -> tuple[str, ...]:
    """Every fact flagged unverified, as 'file $.path (label)', for review and describe()."""
    found: list[str] = []

    def walk(name: str, node: Any, path: str) -> None:
        if isinstance(node, dict):
            if node.get("status") == "unverified":
                label = next(
                    (
                        str(node[k])
                        for k in (
                            "id",
                            "code",
                            "name",
                            "synonym",
                            "ingredient_name",
                            "drug_group",
                            "text",
                        )
                        if node.get(k)
                    ),
                    "",
                )
                found.append(f"{name} {path} ({label[:60]})")
            for key, value in node.items():
                walk(name, value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(name, item, f"{path}[{i}]")

    for kind in REQUIRED_KINDS:
        if kind != "sources":
            walk(*docs[kind], "$")
    return tuple(found)


def _build(
    docs: dict[str, tuple[str, Json]],
    version: str,
    file_versions: dict[str, str],
    terminology: Terminology | None = None,
) -> Knowledge:
    sources = tuple(
        EvidenceSource(s["id"], s["title"], s["status"], s.get("url"), s.get("note", ""))
        for s in docs["sources"][1]["sources"]
    )
    conditions = tuple(_condition_group(g) for g in docs["conditions"][1]["groups"])

    medications = docs["medications"][1]
    mg = medications["magnesium"]
    salts = tuple(_salt(s) for s in mg["salts"])
    drug_groups = tuple(_drug_group(g) for g in medications["drug_groups"])

    interactions_doc = docs["interactions"][1]
    mg_routes = tuple(interactions_doc["magnesium_routes"])
    interactions = tuple(
        Interaction(
            drug_group=e["drug_group"],
            ingredient_code=e.get("ingredient_code"),
            ingredient_name=e.get("ingredient_name"),
            hours_before=_float(e["hours_before"]),
            hours_after=_float(e["hours_after"]),
            hours_after_max=_float(e.get("hours_after_max")),
            text=e["text"],
            status=e["status"],
            source_ids=tuple(e["sources"]),
            magnesium_routes=mg_routes,
            note=e.get("note", ""),
        )
        for e in interactions_doc["interactions"]
    )

    labs = docs["labs"][1]
    lab_groups = tuple(
        LabGroup(
            id=g["id"],
            display=g["display"],
            codes=tuple(
                CodeEntry(LOINC, c["code"], c["display"], c["status"], "exact", c.get("note", ""))
                for c in g["codes"]
            ),
            source_ids=tuple(g["sources"]),
            lookback=Lookback(
                days=g["lookback"]["days"],
                status=g["lookback"]["status"],
                source_ids=tuple(g["lookback"]["sources"]),
                note=g["lookback"].get("note", ""),
            ),
            units=tuple((c["code"], c["unit"]) for c in g["codes"] if c.get("unit")),
        )
        for g in labs["groups"]
    )
    conversions = tuple(
        UnitConversion(
            u["unit"],
            tuple(u.get("aliases", [])),
            float(u["divide_by"]),
            u["status"],
            tuple(u["sources"]),
        )
        for u in labs["unit_conversions"]["units"]
    )
    thresholds = tuple(
        _threshold(t) for t in (*labs["thresholds"], *docs["thresholds"][1]["thresholds"])
    )

    rules_doc = docs["rules"][1]
    system = rules_doc["override_reason_system"]
    rules = tuple(
        RuleInfo(
            id=r["id"],
            title=r["title"],
            description=r["description"],
            indicator=r["indicator"],
            source_ids=tuple(r["sources"]),
            override_reasons=tuple(
                Coding(system, o["code"], o["display"]) for o in r["override_reasons"]
            ),
            guidance=tuple(_guidance(x) for x in r.get("guidance", [])),
        )
        for r in rules_doc["rules"]
    )

    return Knowledge(
        version=version,
        file_versions=file_versions,
        sources=sources,
        conditions=conditions,
        salts=salts,
        generic_synonyms=tuple(mg["generic_synonyms"]),
        excipient_phrases=tuple(mg["excipient_phrases"]),
        combination_markers=tuple(mg["combination_markers"]),
        combination_synonyms=tuple((c["synonym"], c["salt"]) for c in mg["combination_synonyms"]),
        route_hints={route: tuple(words) for route, words in mg["route_hints"].items()},
        route_codes={
            route: tuple(entry["code"] for entry in entries)
            for route, entries in mg["route_codes"].items()
        },
        drug_groups=drug_groups,
        interactions=interactions,
        lab_groups=lab_groups,
        unit_conversions=conversions,
        thresholds=thresholds,
        rules=rules,
        unverified=_unverified(docs),
        terminology=terminology,
    )


def _icd_entries(system: str, entries: list[Json]) -> list[CodeEntry]:
    return [
        CodeEntry(
            system,
            e["code"],
            e["display"],
            e["status"],
            e.get("match", "prefix"),
            e.get("note", ""),
        )
        for e in entries
    ]


def _guidance(x: Json) -> Guidance:
    return Guidance(x["text"], x["status"], tuple(x["sources"]), x.get("id", ""))


def _form_use(x: Json | None) -> FormUse | None:
    if x is None:
        return None
    return FormUse(
        x["fit"], tuple(x["aims"]), x["summary"], x["text"], x["status"], tuple(x["sources"])
    )


def _condition_group(g: Json) -> ConditionGroup:
    codes = [
        *_icd_entries(ICD10CM, g["icd10cm"]),
        *_icd_entries(ICD10, g.get("icd10", [])),
        *(
            CodeEntry(SNOMED, e["code"], e["display"], e["status"], "exact", e.get("note", ""))
            for e in g["snomed"]
        ),
    ]
    return ConditionGroup(
        id=g["id"],
        display=g["display"],
        category=g["category"],
        autoimmune=g["autoimmune"],
        renal_severity=g.get("renal_severity"),
        codes=tuple(codes),
        source_ids=tuple(g["sources"]),
        guidance=tuple(_guidance(x) for x in g.get("guidance", [])),
        note=g.get("note", ""),
        counts_while_inactive=g.get("counts_while_inactive", False),
    )


def _salt(s: Json) -> MagnesiumSalt:
    return MagnesiumSalt(
        id=s["id"],
        display=s["display"],
        text_only=s.get("text_only", False),
        ingredient_codes=tuple(i["code"] for i in s["rxnorm_ingredients"]),
        fractions=tuple(
            ElementalFraction(
                f["form"],
                float(f["fraction"]),
                f["status"],
                f.get("default", False),
                tuple(f.get("routes", [])),
                f.get("note", ""),
            )
            for f in s["elemental_fractions"]
        ),
        products=tuple(
            MagnesiumProduct(
                code=p["code"],
                name=p["name"],
                salt=s["id"],
                route=p["route"],
                dose_form=p["dose_form"],
                strength_mg=float(p["strength"]["value"]),
                strength_per=p["strength"]["per"],
                strength_basis=p.get("strength_basis", "salt"),
                status=p["status"],
                note=p.get("note", ""),
                form=p.get("form"),
            )
            for p in s["products"]
        ),
        atc=tuple(
            CodeEntry(ATC, a["code"], a["display"], a["status"], "exact", route=a.get("route"))
            for a in s["atc"]
        ),
        synonyms=tuple(s["synonyms"]),
        source_ids=tuple(s["sources"]),
        note=s.get("note", ""),
        autoimmune_use=_form_use(s.get("autoimmune_use")),
    )


def _drug_group(g: Json) -> DrugGroup:
    return DrugGroup(
        id=g["id"],
        display=g["display"],
        ingredients=tuple(
            Ingredient(
                code=i["code"],
                name=i["name"],
                status=i["status"],
                text_synonyms=tuple(i.get("text_synonyms", [i["name"]])),
                group=g["id"],
                note=i.get("note", ""),
                implies_myasthenia=(i.get("implies_myasthenia") or {}).get("status"),
            )
            for i in g["ingredients"]
        ),
        effects=tuple(
            DrugEffect(e["kind"], e["text"], e["status"], tuple(e["sources"]), e.get("indicator"))
            for e in g["effects"]
        ),
        source_ids=tuple(g["sources"]),
        atc_prefixes=tuple(
            CodeEntry(ATC, a["code"], a["display"], a["status"], "prefix")
            for a in g.get("atc_prefixes", [])
        ),
        note=g.get("note", ""),
    )


def _threshold(t: Json) -> Threshold:
    return Threshold(
        id=t["id"],
        display=t["display"],
        unit=t["unit"],
        status=t["status"],
        source_ids=tuple(t["sources"]),
        value=_float(t.get("value")),
        low=_float(t.get("low")),
        high=_float(t.get("high")),
        bands=tuple(
            ThresholdBand(
                id=b["id"],
                label=b["label"],
                value=_float(b.get("value")),
                low=_float(b.get("low")),
                high=_float(b.get("high")),
                age_min=_float(b.get("age_min")),
                age_max=_float(b.get("age_max")),
                sex=b.get("sex"),
            )
            for b in t.get("bands", [])
        ),
        note=t.get("note", ""),
    )
