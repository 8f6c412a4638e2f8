"""Build the generated terminology files of the knowledge from their committed inputs.

    python scripts/build_terminology.py [--check]

Reads ``scripts/terminology-inputs/`` (extracts of public sources, each naming where every
record came from) and the hand-curated ``medications.json`` / ``conditions.json``, and writes
``cds_service/knowledge/data/terminology/rxnorm-products.json`` and ``snomed-descendants.json``.
The output depends only on those files (the date written is the extract's retrieval date), so
a re-run reproduces the committed files byte for byte; ``--check`` fails when they differ.

RxNorm: an openFDA NDC record lists the RxCUIs (clinical and branded drugs, packs) of one
marketed product and that product's active ingredients; every listed RxCUI contains every
active ingredient. Brand names come from the same records; a brand stands for an ingredient
when most of its records contain it (Rolaids: calcium carbonate with magnesium hydroxide in
all but one). Strength is kept only for magnesium, only from records naming a single RxCUI,
and only where all such records agree (a label may state elemental magnesium instead).

Published value sets (VSAC expansions and US Core's allergy-substance set, extracted into
``vsac-valueset-extract.json``) add ingredient (IN), multiple-ingredient (MIN), clinical drug
(SCD) and pack (GPCK) concepts with their RxNorm names. The sets do not state term types, so
each concept's TTY is derived from RxNorm's naming conventions: ``{...} Pack`` is a pack (BPCK
when a ``[Brand]`` follows, else GPCK); a ``[Brand]`` suffix makes a branded drug (SBD, or SBDC
without a dose form); a name with a strength is a clinical drug (SCD with a dose form, SCDC
without), one with a dose form only a drug form (SCDF, SBDF); a bare name is an ingredient (IN),
several joined by `` / `` a MIN. A bare brand name (BN) or salt name (PIN) cannot be told from an
IN by its name: none of the concepts kept from the value sets is one (each bare name kept is an
ingredient name the knowledge lists). Each component of a name ("doxycycline hyclate 100 MG")
counts for the knowledge's ingredient when it names it, alone or with a salt word (hyclate,
hydrochloride...): "pitavastatin magnesium" or "gabapentin enacarbil" name other ingredients and
count for none.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
INPUTS = ROOT / "scripts" / "terminology-inputs"
DATA = ROOT / "cds_service" / "knowledge" / "data"
OUT = DATA / "terminology"
NDC_EXTRACT = INPUTS / "openfda-ndc-extract.json"
SNOMED_EXTRACT = INPUTS / "snomed-isa-extract.json"
VSAC_EXTRACT = INPUTS / "vsac-valueset-extract.json"
RXNORM_FILE = "rxnorm-products.json"
SNOMED_FILE = "snomed-descendants.json"
SCRIPT = "scripts/build_terminology.py"

# Words that describe a product rather than name a brand: stripped from the end of a brand
# name; a name made only of them ("Maximum Strength Antacid") is no brand at all.
DESCRIPTOR_WORDS = frozenset(
    [
        "advanced",
        "antacid",
        "anti-gas",
        "antigas",
        "chews",
        "chewable",
        "cherry",
        "extra",
        "liquid",
        "max",
        "maximum",
        "mint",
        "original",
        "plus",
        "power",
        "regular",
        "soft",
        "strength",
        "strawberry",
        "suspension",
        "tablet",
        "tablets",
        "ultra",
        "mixed",
        "berry",
        "nta",
        "xs",
    ]
)
_STRENGTH = re.compile(
    r"^\s*([0-9]*\.?[0-9]+)\s*(mg|g|ug|mcg)\s*/\s*([0-9]*\.?[0-9]*)\s*(ml|1)?\s*$", re.I
)
_MG_PER = {"mg": 1.0, "g": 1000.0, "ug": 0.001, "mcg": 0.001}

Json = dict[str, Any]

# Salt and hydrate words an RxNorm precise-ingredient name adds to its ingredient
# ("doxycycline hyclate", "ciprofloxacin hydrochloride", "levothyroxine sodium").
SALT_WORDS = frozenset(
    [
        "anhydrous",
        "bromide",
        "calcium",
        "chloride",
        "hyclate",
        "hydrochloride",
        "methylsulfate",
        "monohydrate",
        "sodium",
        "sulfate",
    ]
)
# Dose forms that give a clinical drug its route (the rest, eye drops or inhalers, say none).
_FORM_ROUTES = (("inject", "parenteral"), ("oral", "oral"), ("chewable", "oral"))
_PACK = re.compile(r"^\{(.*)\}\s*Pack(?:\s*\[(.+)\])?$")
_BRAND = re.compile(r"^(.*?)\s*\[([^\]]+)\]$")
_DOSE_FORM = re.compile(
    r"\b(Tablet|Capsule|Solution|Suspension|Injection|Injectable|Oral|Topical|Ophthalmic|Otic"
    r"|Pill|Product|Powder|Cream|Ointment|Inhal\w*)\b",
    re.I,
)
_NUMBER = re.compile(r"(?<![A-Za-z])[0-9]*\.?[0-9]+\b")


def _load(path: Path) -> Json:
    data: Json = json.loads(path.read_text(encoding="utf-8"))
    return data


def _version(day: str) -> str:
    """'2026-12-08' -> '2026.12.8': the extract's date as the file's semantic version."""
    return ".".join(str(int(part)) for part in day.split("-"))


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _words(text: str) -> str:
    return " " + re.sub(r"[^a-z0-9]+", " ", text.lower()).strip() + " "


class _Vocabulary:
    """Maps an openFDA active-ingredient name onto the knowledge's ingredients and salts."""

    def __init__(self, medications: Json) -> None:
        self.salts: list[tuple[str, str]] = []  # (phrase, salt id), longest first
        for salt in medications["magnesium"]["salts"]:
            for phrase in salt["synonyms"]:
                self.salts.append((_words(phrase), salt["id"]))
        self.drugs: list[tuple[str, str]] = []  # (phrase, ingredient name)
        for group in medications["drug_groups"]:
            for ingredient in group["ingredients"]:
                for phrase in ingredient.get("text_synonyms", [ingredient["name"]]):
                    self.drugs.append((_words(phrase), ingredient["name"]))
        self.salts.sort(key=lambda p: -len(p[0]))
        self.drugs.sort(key=lambda p: -len(p[0]))
        self.names = {name for _, name in self.drugs}

    def salt(self, active: str) -> str | None:
        words = _words(active)
        return next((salt for phrase, salt in self.salts if phrase in words), None)

    def drug(self, active: str) -> str | None:
        words = _words(active)
        # "CIPROFLOXACIN HYDROCHLORIDE", "DOXYCYCLINE HYCLATE": the ingredient leads the name.
        return next((name for phrase, name in self.drugs if words.startswith(phrase)), None)


def _strength(text: str) -> tuple[float, str | None] | None:
    """'400 mg/1' -> (400, 'unit'); '1200 mg/15mL' -> (80, 'mL'); None when not per unit/mL."""
    match = _STRENGTH.match(text)
    if not match:
        return None
    value, unit, amount, per = match.groups()
    if per is None or (per.lower() == "1" and not amount):
        per_unit, divisor = "unit", 1.0
    elif per.lower() == "ml":
        per_unit, divisor = "mL", float(amount) if amount else 1.0
    else:
        return None
    if per_unit == "unit" and amount not in ("", "1"):
        return None
    mg = float(value) * _MG_PER[unit.lower()] / divisor
    return round(mg, 4), per_unit


def _brand_phrase(record: Json, vocabulary: _Vocabulary) -> str | None:
    name = record.get("brand_name") or ""
    suffix = record.get("brand_name_suffix") or ""
    if suffix and name.lower().endswith(suffix.lower()):
        name = name[: -len(suffix)]
    tokens = [t for t in re.split(r"[\s,]+", name.lower().strip()) if t]
    while tokens and (tokens[-1] in DESCRIPTOR_WORDS or tokens[-1].isdigit()):
        tokens.pop()
    phrase = " ".join(tokens)
    if not phrase:
        return None
    # A generic name ("Ciprofloxacin Hydrochloride", "50% Magnesium Sulfate") is no brand.
    leading = {_words(a["name"]).split()[0] for a in record["active_ingredients"]}
    if leading & set(_words(phrase).split()):
        return None
    return phrase


def rxnorm_tty(name: str) -> str:
    """The RxNorm term type a concept name has by RxNorm's naming conventions."""
    pack = _PACK.match(name)
    if pack:
        return "BPCK" if pack.group(2) else "GPCK"
    branded = _BRAND.match(name)
    body = branded.group(1) if branded else name
    if not _NUMBER.search(body):
        # "ciprofloxacin Oral Tablet [Cipro]" names a dose form without a strength.
        if _DOSE_FORM.search(body):
            return "SBDF" if branded else "SCDF"
        return "MIN" if " / " in body else "IN"
    has_form = not re.search(r"\b(MG|MCG|UNT|MEQ|ML)(/[A-Z]+)?$", body.strip(), re.I)
    if branded:
        return "SBD" if has_form else "SBDC"
    return "SCD" if has_form else "SCDC"


def _components(name: str) -> list[str]:
    """Ingredient names in a concept name: 'ciprofloxacin hydrochloride', 'magnesium salicylate'."""
    pack = _PACK.match(name)
    parts = re.findall(r"\(([^()]*(?:\([^()]*\)[^()]*)*)\)", pack.group(1)) if pack else [name]
    found = []
    for part in parts:
        branded = _BRAND.match(part)
        part = branded.group(1) if branded else part
        # "24 HR ...", "100 ML ...", "Once-Daily ...": what precedes the ingredient.
        part = re.sub(r"^(?:[0-9.]+ (?:HR|ML|MG) |Once-Daily )+", "", part.strip())
        for component in part.split(" / "):
            words = []
            for word in component.replace("(USP)", "").split():
                if _NUMBER.fullmatch(word):
                    break
                words.append(word)
            if words:
                found.append(" ".join(words).lower())
    return found


def _route_of_form(name: str) -> str | None:
    lowered = name.lower()
    routes = {route for word, route in _FORM_ROUTES if word in lowered}
    return routes.pop() if len(routes) == 1 else None


def _vsac_concepts(extract: Json, vocabulary: _Vocabulary) -> list[Json]:
    """Each concept of the value sets that contains a knowledge ingredient or magnesium salt."""
    drug_names = {name: name for name in vocabulary.names}
    drug_names.update({phrase.strip(): name for phrase, name in vocabulary.drugs})
    rows: dict[str, Json] = {}
    value_sets = [v for repository in extract["repositories"] for v in repository["value_sets"]]
    for value_set in value_sets:
        source = f"{value_set['url']}|{value_set['version']}"
        for concept in value_set["concepts"]:
            name = concept["name"]
            drugs, salts, others = set(), {}, 0
            for component in _components(name):
                words = component.split()
                base = next(
                    (
                        drug_names[" ".join(words[:n])]
                        for n in range(len(words), 0, -1)
                        if " ".join(words[:n]) in drug_names and set(words[n:]) <= SALT_WORDS
                    ),
                    None,
                )
                salt = vocabulary.salt(component) if words[0] == "magnesium" else None
                if base:
                    drugs.add(base)
                elif salt:
                    salts[salt] = component
                else:
                    others += 1
            if not drugs and not salts:
                continue
            row = rows.setdefault(
                concept["rxcui"],
                {
                    "name": name,
                    "tty": rxnorm_tty(name),
                    "drugs": drugs,
                    "salts": salts,
                    "multi": len(drugs) + len(salts) + others > 1,
                    "sources": set(),
                },
            )
            row["sources"].add(source)
    return [{"rxcui": code, **row} for code, row in rows.items()]


def _strength_in_name(name: str, salt_component: str) -> Json | None:
    """'... magnesium salicylate 580 MG Oral Tablet' -> 580 mg per unit (SCD names only)."""
    found = re.search(re.escape(salt_component) + r" ([0-9]*\.?[0-9]+) (MG|MG/ML)\b", name, re.I)
    if not found or _PACK.match(name):
        return None
    return {
        "value": float(found.group(1)),
        "unit": "mg",
        "per": "mL" if found.group(2).upper() == "MG/ML" else "unit",
    }


def build_rxnorm(extract: Json, medications: Json, value_sets: Json | None = None) -> Json:
    vocabulary = _Vocabulary(medications)
    products: dict[str, dict[str, Any]] = {}
    strengths: dict[tuple[str, str], set[tuple[float, str | None]]] = defaultdict(set)
    brands: dict[str, list[Json]] = defaultdict(list)
    for record in extract["records"]:
        actives = record["active_ingredients"]
        drugs = sorted({d for a in actives if (d := vocabulary.drug(a["name"]))})
        salts = {s: a["strength"] for a in actives if (s := vocabulary.salt(a["name"]))}
        # Two salts of one drug (Atelvia: two risedronate hydrates) are one ingredient.
        others = [a for a in actives if not vocabulary.drug(a["name"])]
        others = [a for a in others if not vocabulary.salt(a["name"])]
        multi = len(drugs) + len(salts) + len(others) > 1
        for rxcui in record["rxcui"]:
            entry = products.setdefault(
                rxcui,
                {
                    "ingredients": set(),
                    "salts": set(),
                    "multi": False,
                    "routes": set(),
                    "sources": set(),
                },
            )
            entry["ingredients"].update(drugs)
            entry["salts"].update(salts)
            entry["multi"] |= multi
            if record.get("route"):
                entry["routes"].add(record["route"])
            entry["sources"].add(record["url"])
            if len(record["rxcui"]) == 1:
                for salt, text in salts.items():
                    parsed = _strength(text)
                    strengths[(rxcui, salt)].add(parsed if parsed else (-1.0, None))
        phrase = _brand_phrase(record, vocabulary)
        if phrase:
            brands[phrase].append(
                {
                    "drugs": drugs,
                    "salts": sorted(salts),
                    "multi": multi,
                    "url": record["url"],
                }
            )

    named: dict[str, Json] = {}
    for row in _vsac_concepts(value_sets or {"repositories": []}, vocabulary):
        named[row["rxcui"]] = row
        entry = products.setdefault(
            row["rxcui"],
            {
                "ingredients": set(),
                "salts": set(),
                "multi": False,
                "routes": set(),
                "sources": set(),
            },
        )
        entry["ingredients"].update(row["drugs"])
        entry["salts"].update(row["salts"])
        entry["multi"] |= row["multi"]
        if row["tty"] in ("SCD", "SBD") and (route := _route_of_form(row["name"])):
            entry["routes"].add(route)
        entry["sources"].update(row["sources"])
        for salt, component in row["salts"].items():
            stated = _strength_in_name(row["name"], component) if row["tty"] == "SCD" else None
            if stated and (row["rxcui"], salt) not in strengths:
                strengths[(row["rxcui"], salt)].add((stated["value"], stated["per"]))

    product_rows = []
    for rxcui in sorted(products, key=int):
        entry = products[rxcui]
        if not entry["ingredients"] and not entry["salts"]:
            continue
        magnesium = []
        for salt in sorted(entry["salts"]):
            seen = strengths.get((rxcui, salt), set())
            one = next(iter(seen)) if len(seen) == 1 else None
            strength = (
                {"value": one[0], "unit": "mg", "per": one[1]}
                if one is not None and one[0] >= 0
                else None
            )
            magnesium.append({"salt": salt, "strength": strength})
        product_rows.append(
            {
                "rxcui": rxcui,
                # RxNorm's name and term type where a value set names the concept.
                "name": named[rxcui]["name"] if rxcui in named else None,
                "tty": named[rxcui]["tty"] if rxcui in named else None,
                "ingredients": sorted(entry["ingredients"]),
                "magnesium": magnesium,
                "multi_ingredient": entry["multi"],
                # Only when every record that states a route agrees.
                "route": next(iter(entry["routes"])) if len(entry["routes"]) == 1 else None,
                "sources": sorted(entry["sources"]),
            }
        )

    brand_rows = []
    for phrase in sorted(brands):
        records = brands[phrase]
        half = len(records) / 2

        def most(key: str, rows: list[Json] = records, half: float = half) -> list[str]:
            counts: dict[str, int] = defaultdict(int)
            for row in rows:
                for item in row[key]:
                    counts[item] += 1
            return sorted(item for item, n in counts.items() if n > half)

        brand_drugs, brand_salts = most("drugs"), most("salts")
        if not brand_drugs and not brand_salts:
            continue
        brand_rows.append(
            {
                "phrase": phrase,
                "ingredients": brand_drugs,
                "magnesium": brand_salts,
                "multi_ingredient": sum(row["multi"] for row in records) > half,
                "products_seen": len(records),
                "sources": sorted({row["url"] for row in records}),
            }
        )
    return {
        "version": _version(extract["retrieved"]),
        "description": (
            "RxNorm product concepts (clinical and branded drugs, packs) and brand names of the "
            "ingredients the knowledge names. Generated: do not edit; run "
            f"`python {SCRIPT}`."
        ),
        "generated": {
            "by": SCRIPT,
            "from": [_rel(NDC_EXTRACT), _rel(VSAC_EXTRACT), _rel(DATA / "medications.json")],
            "source": "; ".join(
                [extract["source"]]
                + [
                    f"{r['repository']} at commit {r['commit']} ({r['commit_date']})"
                    for r in (value_sets or {}).get("repositories", [])
                ]
            ),
            "date": extract["retrieved"],
        },
        "products": product_rows,
        "brands": brand_rows,
    }


def build_snomed(extract: Json, conditions: Json) -> Json:
    named = {
        entry["code"]: entry["display"]
        for group in conditions["groups"]
        for entry in group.get("snomed", [])
    }
    by_concept: dict[str, list[Json]] = defaultdict(list)
    for relation, key in (("is-a", "descendants"), ("related", "related")):
        for row in extract[key]:
            if row["ancestor"] not in named:
                raise SystemExit(f"{_rel(SNOMED_EXTRACT)}: {row['ancestor']} names no group")
            if row["code"] in named:
                continue  # the curated file has it already
            item = {"code": row["code"], "display": row["display"], "relation": relation}
            if "reason" in row:
                item["reason"] = row["reason"]
            item["source"] = extract["sources"][row["source"]]
            by_concept[row["ancestor"]].append(item)
    excludes: dict[str, list[Json]] = defaultdict(list)
    for row in extract.get("exclusions", []):
        if row["ancestor"] not in named:
            raise SystemExit(f"{_rel(SNOMED_EXTRACT)}: {row['ancestor']} names no group")
        excludes[row["ancestor"]].append(
            {"code": row["code"], "display": row["display"], "reason": row["reason"]}
        )
        by_concept.setdefault(row["ancestor"], [])
    return {
        "version": _version(extract["retrieved"]),
        "description": (
            "SNOMED CT descendants of the concepts the condition groups name. Generated: do not "
            f"edit; run `python {SCRIPT}`, or refresh from a terminology server with "
            "`cds-service knowledge expand --terminology-server URL`."
        ),
        "generated": {
            "by": SCRIPT,
            "from": [_rel(SNOMED_EXTRACT), _rel(DATA / "conditions.json")],
            "source": extract["description"],
            "edition": extract["edition"],
            "edition_version": extract["version"],
            "server": None,
            "date": extract["retrieved"],
        },
        "expansions": [
            {
                "concept": concept,
                "display": named[concept],
                "contains": rows,
                **({"excludes": excludes[concept]} if concept in excludes else {}),
            }
            for concept, rows in sorted(by_concept.items(), key=lambda kv: int(kv[0]))
        ],
    }


def render(document: Json) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def outputs() -> dict[Path, str]:
    medications = _load(DATA / "medications.json")
    conditions = _load(DATA / "conditions.json")
    return {
        OUT / RXNORM_FILE: render(
            build_rxnorm(_load(NDC_EXTRACT), medications, _load(VSAC_EXTRACT))
        ),
        OUT / SNOMED_FILE: render(build_snomed(_load(SNOMED_EXTRACT), conditions)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the files differ")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(_rel(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {_rel(path)}")
    if stale:
        print("out of date (run scripts/build_terminology.py): " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
