"""Build the real-world corpus (``fixtures/corpus``) from Synthea patient Bundles, and report on it.

The source is the public repository ``smart-on-fhir/generated-sample-data`` (Synthea-generated
R4, STU3 and DSTU2 patient Bundles), as a git directory or a checkout:

    python scripts/build_corpus.py --source PATH [--out fixtures/corpus] [--per-version 50]
    python scripts/build_corpus.py --report          # run the committed corpus in process

For each FHIR version the patients are ranked by how much of their chart the knowledge is
about (conditions, drugs and labs of its groups, read from the knowledge files), then by a
hash of their path, and the first ``--per-version`` are kept. Each kept patient becomes one
file ``<VERSION>/<patient id>.json``: the prefetch the discovery templates ask for, filtered
from the Bundle as a FHIR server would answer them, and the hook calls made for that patient
(every hook the service offers, with draft orders of oral magnesium oxide, IV magnesium
sulfate and ciprofloxacin in that version's shape). ``corpus_requests`` joins the two into
complete CDS Hooks requests. Resources are copied as they are, ``urn:uuid:`` references
included: that is part of the test. ``manifest.json`` records the source (repository, commit,
paths and blob ids) and the date of the build. Same source, same files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from flask import Flask

from cds_service.app import create_app
from cds_service.context.prefetch import render_template
from cds_service.fixture_server.build_requests import (
    AUTHORED_ON,
    PRODUCTS,
    ROUTES,
    USER_ID,
    Product,
    _collection,
    _dose_quantity,
    _rxnorm_concept,
    r4_draft_order,
    stable_uuid,
    stu3_draft_order,
)
from cds_service.fixture_server.store import parse_fhir_datetime
from cds_service.pipeline import HookPipeline
from cds_service.protocol.blueprint import PIPELINE_EXTENSION
from cds_service.protocol.services import PREFETCH_KEYS, SERVICES
from cds_service.resources import bundled_dir
from cds_service.settings import Settings

Resource = dict[str, Any]

REPOSITORY = "https://github.com/smart-on-fhir/generated-sample-data"
# Source folder per FHIR version, and the corpus folder it becomes.
VERSIONS = {"R4": "R4/SYNTHEA/", "STU3": "STU-3/SYNTHEA/", "DSTU2": "DSTU-2/SYNTHEA/"}
DRAFTS = ("mg-oxide", "mg-sulfate", "ciprofloxacin")
KNOWLEDGE_DIR = Path(__file__).resolve().parents[1] / "cds_service" / "knowledge" / "data"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
LOINC = "http://loinc.org"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
# Clinical-status words that mean "current" in the conditions template (all versions).
ACTIVE_CONDITION = frozenset({"active", "recurrence", "relapse"})

# SNOMED CT is-a facts for codes found in this corpus whose parent the knowledge names but which
# the knowledge files do not list themselves (SNOMED CT International Edition, concept
# hierarchy; the first and last are named in issue 19). A generated expansion in
# knowledge/data/terminology/ makes this table redundant code by code.
SNOMED_PARENTS = {
    "95417003": "203082005",  # primary fibromyalgia syndrome is-a fibromyalgia
    "83664006": "40930008",  # idiopathic atrophic hypothyroidism is-a hypothyroidism
    "431855005": "709044004",  # chronic kidney disease stage 1 is-a chronic kidney disease
    "431856006": "709044004",  # chronic kidney disease stage 2 is-a chronic kidney disease
}


# --- what the knowledge files are about (read directly, not through the service) -------------


@dataclass(frozen=True, order=True)
class CorpusCode:
    """A coded fact of the corpus and the knowledge group it belongs to."""

    kind: str  # condition | medication | lab
    system: str
    code: str
    group: str
    display: str = field(default="", compare=False)


_NAMING_KEYS = ("group", "group_id", "ingredient", "ingredient_code", "concept", "parent", "root")


def _group_codes(
    data: Any, known: set[str], found: dict[str, set[str]], group: str | None = None
) -> None:
    """Every code under a generated terminology file's entries, by what names their group: a
    naming key's value (``"concept": "91637004"``, ``"ingredient": {"code": "2551"}``) or a
    mapping key that is a known group id, concept, ingredient code or name. Codes are the
    ``code`` of an entry and plain strings in a list."""
    if isinstance(data, dict):
        for key in _NAMING_KEYS:
            value = data.get(key)
            value = value.get("code") or value.get("id") if isinstance(value, dict) else value
            if isinstance(value, str) and value:
                group = value
                break
        if group and isinstance(data.get("code"), str):
            found.setdefault(group, set()).add(data["code"])
        for key, value in data.items():
            _group_codes(value, known, found, key if key in known else group)
    elif isinstance(data, list):
        for item in data:
            if isinstance(item, str) and group:
                found.setdefault(group, set()).add(item)
            else:
                _group_codes(item, known, found, group)


class KnowledgeCodes:
    """The knowledge files' code lists: ``knowledge/data/*.json`` and, when present, the
    generated files of ``knowledge/data/terminology/`` (codes under an entry that names a group,
    an ingredient or a concept of the hand-curated files).

    RxNorm: a drug belongs to a group when its code is an ingredient or product code of the
    group, or when its name (RxNorm names start with the ingredients) contains an ingredient's
    name as whole words. Magnesium salts are the group ``magnesium``.
    """

    def __init__(self, directory: Path = KNOWLEDGE_DIR) -> None:
        def load(name: str) -> Any:
            return json.loads((directory / name).read_text(encoding="utf-8"))

        conditions, medications, labs = (
            load("conditions.json"), load("medications.json"), load("labs.json")
        )
        self.snomed: dict[str, str] = {}
        self.icd: list[tuple[str, bool, str]] = []  # (normalised code, exact only, group)
        for group in conditions["groups"]:
            for entry in group.get("snomed", []):
                self.snomed[entry["code"]] = group["id"]
            for system in ("icd10cm", "icd10"):
                for entry in group.get(system, []):
                    self.icd.append((entry["code"], entry.get("match") == "exact", group["id"]))
        self.rxnorm: dict[str, str] = {}
        names: dict[str, str] = {}
        for group in medications["drug_groups"]:
            for ingredient in group["ingredients"]:
                if ingredient.get("code"):
                    self.rxnorm[ingredient["code"]] = group["id"]
                for name in [ingredient["name"], *ingredient.get("text_synonyms", [])]:
                    if name != "thyroid":  # too common a word (see medications.json)
                        names[name.lower()] = group["id"]
        for salt in medications["magnesium"]["salts"]:
            for entry in [*salt.get("rxnorm_ingredients", []), *salt.get("products", [])]:
                self.rxnorm[entry["code"]] = "magnesium"
            for name in salt.get("synonyms", []):
                names[name.lower()] = "magnesium"
        self.loinc = {
            entry["code"]: group["id"] for group in labs["groups"] for entry in group["codes"]
        }
        condition_groups = {group["id"] for group in conditions["groups"]}
        drug_groups = {group["id"] for group in medications["drug_groups"]}
        salts = {salt["id"] for salt in medications["magnesium"]["salts"]}
        self.terminology_files: list[str] = []
        terminology = directory / "terminology"
        for path in sorted(terminology.glob("*.json")) if terminology.is_dir() else []:
            self.terminology_files.append(path.name)
            found: dict[str, set[str]] = {}
            known = {*self.snomed, *self.rxnorm, *names, *condition_groups, *drug_groups, *salts}
            _group_codes(json.loads(path.read_text(encoding="utf-8")), known, found)
            for named, codes in found.items():
                # A SNOMED CT concept or condition group id names a condition group; an RxNorm
                # ingredient, ingredient name, drug group or salt names a drug group.
                condition = self.snomed.get(named) or (named if named in condition_groups
                                                       else None)
                drug = self.rxnorm.get(named) or names.get(named.lower()) or (
                    named if named in drug_groups else "magnesium" if named in salts else None)
                for code in codes:
                    if condition:
                        self.snomed.setdefault(code, condition)
                    if drug:
                        self.rxnorm.setdefault(code, drug)
        for child, parent in SNOMED_PARENTS.items():
            if parent in self.snomed:
                self.snomed.setdefault(child, self.snomed[parent])
        alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
        self._names = names
        self._name_pattern = re.compile(rf"(?<![a-z0-9])({alternatives})(?![a-z0-9])")

    def condition_group(self, system: str, code: str) -> str | None:
        if system == SNOMED:
            return self.snomed.get(code)
        if system in (ICD10CM, ICD10):
            plain = re.sub(r"[^A-Z0-9]", "", code.upper())
            for known, exact, group in self.icd:
                if plain == known or (not exact and plain.startswith(known)):
                    return group
        return None

    def medication_group(self, system: str, code: str, name: str) -> str | None:
        if system == RXNORM and code in self.rxnorm:
            return self.rxnorm[code]
        found = self._name_pattern.search(name.lower())
        return self._names[found.group(1)] if found else None

    def lab_group(self, system: str, code: str) -> str | None:
        return self.loinc.get(code) if system == LOINC else None


def _status(value: Any) -> str | None:
    """A status as a plain code: R4 CodeableConcept or the STU3/DSTU2 string."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return next((c.get("code") for c in value.get("coding", []) if c.get("code")), None)
    return None


def _entries(bundle: Any) -> Iterator[Resource]:
    for entry in bundle.get("entry", []) if isinstance(bundle, dict) else []:
        if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
            yield entry["resource"]


def request_codes(request: Resource, knowledge: KnowledgeCodes) -> set[CorpusCode]:
    """The codes of a request's data that belong to a knowledge group: conditions with a
    current clinical status, medications on file with status active and the drafts (by their
    own codings, or by those of the Medication they reference), labs."""
    found: set[CorpusCode] = set()
    prefetch = request.get("prefetch", {})
    medications = {}
    for key in ("medicationRequests", "medicationStatements"):
        for entry in prefetch.get(key, {}).get("entry", []):
            resource = entry.get("resource", {})
            if resource.get("resourceType") == "Medication":
                for ref in (entry.get("fullUrl"), f"Medication/{resource.get('id')}"):
                    medications[ref] = resource.get("code", {})
    for condition in _entries(prefetch.get("conditions")):
        if _status(condition.get("clinicalStatus")) not in ACTIVE_CONDITION:
            continue
        for coding in condition.get("code", {}).get("coding", []):
            group = knowledge.condition_group(coding.get("system", ""), coding.get("code", ""))
            if group:
                found.add(CorpusCode("condition", coding["system"], coding["code"], group,
                                     coding.get("display", "")))
    drugs = [r for key in ("medicationRequests", "medicationStatements")
             for r in _entries(prefetch.get(key)) if r.get("resourceType") != "Medication"
             and r.get("status") == "active"]
    context = request.get("context", {})
    for key in ("draftOrders", "medications"):
        drugs.extend(_entries(context.get(key)))
    for drug in drugs:
        concept = drug.get("medicationCodeableConcept") or medications.get(
            drug.get("medicationReference", {}).get("reference"), {})
        for coding in concept.get("coding", []):
            name = coding.get("display") or concept.get("text") or ""
            group = knowledge.medication_group(coding.get("system", ""), coding.get("code", ""),
                                               name)
            if group:
                found.add(CorpusCode("medication", coding["system"], coding["code"], group, name))
    for lab in _entries(prefetch.get("observations")):
        for coding in lab.get("code", {}).get("coding", []):
            group = knowledge.lab_group(coding.get("system", ""), coding.get("code", ""))
            if group:
                found.add(CorpusCode("lab", coding["system"], coding["code"], group,
                                     coding.get("display", "")))
    return found


# --- reading the source repository ------------------------------------------------------------


class SourceRepository:
    """The Bundles of a git directory or checkout, read at its HEAD commit."""

    def __init__(self, path: Path) -> None:
        self.git_dir = path / ".git" if (path / ".git").exists() else path
        self.commit = self._git("rev-parse", "HEAD").strip()
        self.commit_date = self._git("show", "-s", "--format=%cI", "HEAD").strip()

    def _git(self, *args: str) -> str:
        return subprocess.run(
            ["git", f"--git-dir={self.git_dir}", "-c", "core.quotepath=off", *args],
            check=True, capture_output=True, text=True,
        ).stdout

    def blobs(self, folder: str) -> list[tuple[str, str]]:
        """(path, blob id) of every ``*.json`` under ``folder``, sorted by path."""
        rows = self._git("ls-tree", "-r", "HEAD", "--", folder).splitlines()
        found = [(row.split("\t", 1)[1], row.split()[2]) for row in rows]
        return sorted((path, blob) for path, blob in found if path.endswith(".json"))

    def read(self, items: Sequence[tuple[str, str]]) -> Iterator[tuple[str, str, Resource]]:
        """(path, blob, parsed Bundle) for each item whose blob is present in the snapshot."""
        with subprocess.Popen(["git", f"--git-dir={self.git_dir}", "cat-file", "--batch"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE) as process:
            assert process.stdin is not None and process.stdout is not None
            for path, blob in items:
                process.stdin.write(f"{blob}\n".encode())
                process.stdin.flush()
                header = process.stdout.readline().split()
                if len(header) < 3:  # "<id> missing": a large file left out of the snapshot
                    continue
                data = process.stdout.read(int(header[2]))
                process.stdout.read(1)
                yield path, blob, json.loads(data)
            process.stdin.close()


# --- prefetch as the discovery templates ask --------------------------------------------------


def _references(resource: Resource) -> list[str]:
    subject = resource.get("subject") or resource.get("patient") or {}
    return [subject.get("reference", "")] if isinstance(subject, dict) else []


def _about(resource: Resource, patient_id: str, full_url: str) -> bool:
    """Does the resource's subject/patient name the patient, as a server searching
    ``patient=<id>`` would find it (Patient/<id>, or the Bundle's own fullUrl)?"""
    return any(ref in (f"Patient/{patient_id}", full_url) or ref.endswith(f"/Patient/{patient_id}")
               for ref in _references(resource))


def _codings_match(concept: Any, tokens: list[str]) -> bool:
    for coding in concept.get("coding", []) if isinstance(concept, dict) else []:
        for token in tokens:
            system, _, code = token.rpartition("|")
            if coding.get("code") == code and (not system or coding.get("system") == system):
                return True
    return False


def _effective(resource: Resource) -> datetime:
    value = resource.get("effectiveDateTime") or (resource.get("effectivePeriod") or {}).get(
        "start") or resource.get("issued")
    parsed = parse_fhir_datetime(value) if isinstance(value, str) else None
    return parsed or datetime.min.replace(tzinfo=UTC)


def _searchset(entries: list[Resource], total: int) -> Resource:
    return {"resourceType": "Bundle", "type": "searchset", "total": total, "entry": entries}


def prefetch_for(bundle: Resource, patient: Resource, version: str) -> Resource:
    """Each discovery prefetch key answered from the Bundle: the key's query (its DSTU2 form
    for a DSTU2 server), its filters applied, the first ``_count`` matches, the Medications it
    ``_include``s; entries keep the Bundle's fullUrl."""
    patient_id = patient["id"]
    patient_url = next(e.get("fullUrl", "") for e in bundle["entry"]
                       if e["resource"] is patient)
    by_url = {e["fullUrl"]: e for e in bundle["entry"] if e.get("fullUrl")}
    prefetch: Resource = {}
    for key in PREFETCH_KEYS:
        query = render_template(key.template_for(version), {"patientId": patient_id})
        path, _, query_string = query.partition("?")
        if not query_string:
            prefetch[key.name] = patient
            continue
        params = dict(parse_qsl(query_string))
        wanted_type = path.split("/")[0]
        matches = []
        for entry in bundle["entry"]:
            resource = entry["resource"]
            if resource.get("resourceType") != wanted_type:
                continue
            if not _about(resource, patient_id, patient_url):
                continue
            if "clinical-status" in params and _status(resource.get("clinicalStatus")) not in \
                    params["clinical-status"].split(","):
                continue
            if "status" in params and resource.get("status") not in params["status"].split(","):
                continue
            if "code" in params and not _codings_match(resource.get("code"),
                                                       params["code"].split(",")):
                continue
            matches.append(entry)
        if params.get("_sort") == "-date":
            matches.sort(key=lambda e: _effective(e["resource"]), reverse=True)
        page = matches[: int(params.get("_count", len(matches)))]
        entries = [{**({"fullUrl": e["fullUrl"]} if "fullUrl" in e else {}),
                    "resource": e["resource"], "search": {"mode": "match"}} for e in page]
        if "_include" in params:
            included: dict[str, Resource] = {}
            for entry in page:
                ref = entry["resource"].get("medicationReference", {}).get("reference", "")
                if ref in by_url and ref not in included:
                    included[ref] = {"fullUrl": ref, "resource": by_url[ref]["resource"],
                                     "search": {"mode": "include"}}
            entries.extend(included.values())
        prefetch[key.name] = _searchset(entries, len(matches))
    return prefetch


# --- the hook calls ---------------------------------------------------------------------------


def dstu2_draft_order(product: Product, patient_id: str) -> Resource:
    """A DSTU2 MedicationOrder draft: ``patient``, ``dateWritten``, ``dose[x]``,
    ``periodUnits`` and ``bounds[x]`` as DSTU2 names them."""
    repeat = {{"periodUnit": "periodUnits", "boundsDuration": "boundsQuantity"}.get(k, k): v
              for k, v in product.timing.items()}
    return {
        "resourceType": "MedicationOrder",
        "id": product.order_id,
        "status": "draft",
        "medicationCodeableConcept": _rxnorm_concept(product),
        "patient": {"reference": f"Patient/{patient_id}"},
        "dateWritten": AUTHORED_ON,
        "prescriber": {"reference": USER_ID},
        "dosageInstruction": [{
            "text": product.sig,
            "timing": {"repeat": repeat},
            "route": ROUTES[product.route],
            "doseQuantity": _dose_quantity(product),
        }],
    }


DRAFT_BUILDERS: dict[str, Callable[[Product, str], Resource]] = {
    "R4": r4_draft_order, "STU3": stu3_draft_order, "DSTU2": dstu2_draft_order,
}


def hook_calls(version: str, patient_id: str) -> list[Resource]:
    """Every service, every draft: patient-view once, the order hooks once per draft, and
    medication-prescribe (CDS Hooks 1.0) for the STU3 and DSTU2 clients that send it."""
    calls = []
    for service in SERVICES:
        if service.hook == "medication-prescribe" and version == "R4":
            continue
        for draft in DRAFTS if service.draft_orders_context_key else ("",):
            context: Resource = {"userId": USER_ID, "patientId": patient_id}
            if service.draft_orders_context_key:
                order = DRAFT_BUILDERS[version](PRODUCTS[draft], patient_id)
                context[service.draft_orders_context_key] = _collection([order], patient_id)
                if service.hook == "order-select":
                    context["selections"] = [f"{order['resourceType']}/{order['id']}"]
            name = f"{version}/{patient_id}/{service.id}/{draft}"
            calls.append({"serviceId": service.id, "request": {
                "hook": service.hook, "hookInstance": stable_uuid(f"corpus/{name}"),
                "context": context}})
    return calls


# --- choosing patients ------------------------------------------------------------------------


# Chart entries worth a place in the corpus though no knowledge group names their code (yet):
# kidney and thyroid disease, myasthenia, autoimmune and musculoskeletal conditions, the
# drugs magnesium interacts with.
WANTED_WORDS = re.compile(
    r"kidney|renal|nephro|dialysis|myasthen|fibromyalg|rheumat|lupus|sclerosis|thyro|"
    r"magnesium|floxacin|cycline|levothyrox", re.IGNORECASE)


def relevance(prefetch: Resource, knowledge: KnowledgeCodes) -> tuple[int, int, int]:
    """(distinct knowledge groups in the chart, other wanted entries, labs of the knowledge's
    kinds), from what the prefetch holds."""
    codes = request_codes({"prefetch": prefetch}, knowledge)
    groups = {code.group for code in codes if code.kind != "lab"}
    wanted = {
        coding.get("code")
        for key in ("conditions", "medicationRequests", "medicationStatements")
        for resource in _entries(prefetch.get(key))
        for concept in (resource.get("code"), resource.get("medicationCodeableConcept"))
        if isinstance(concept, dict)
        for coding in concept.get("coding", [])
        if WANTED_WORDS.search(coding.get("display") or "")
    }
    return len(groups), len(wanted), len(prefetch["observations"].get("entry", []))


def _patient(bundle: Resource) -> Resource | None:
    return next((r for r in _entries(bundle) if r.get("resourceType") == "Patient"), None)


def build(source: Path, out: Path, per_version: int) -> None:
    repository = SourceRepository(source)
    knowledge = KnowledgeCodes()
    manifest: Resource = {
        "description": "CDS Hooks requests derived from Synthea-generated patients; built by "
        "scripts/build_corpus.py (see docs/corpus.md). Prefetch filtered as the discovery "
        "templates ask; resources copied unchanged, urn:uuid references included.",
        "source": {"repository": REPOSITORY, "commit": repository.commit,
                   "commitDate": repository.commit_date, "license": "Apache-2.0"},
        "built": datetime.now(UTC).strftime("%Y-%m-%d"),
        "drafts": list(DRAFTS),
        "versions": {},
    }
    for version, folder in VERSIONS.items():
        ranked = []
        listed = repository.blobs(folder)
        read: set[str] = set()
        for path, blob, bundle in repository.read(listed):
            read.add(path)
            patient = _patient(bundle)
            if patient is None or not patient.get("id"):
                continue
            prefetch = prefetch_for(bundle, patient, version)
            groups, wanted, labs = relevance(prefetch, knowledge)
            tie = hashlib.sha256(path.encode()).hexdigest()
            rank = (-groups, -wanted, -min(labs, 1), tie)
            ranked.append((rank, path, blob, patient["id"], prefetch))
        ranked.sort(key=lambda item: item[0])
        chosen = ranked[:per_version]
        directory = out / version
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.json"):
            stale.unlink()
        for _, path, blob, patient_id, prefetch in chosen:
            document = {"source": {"path": path, "blob": blob}, "patientId": patient_id,
                        "prefetch": prefetch, "calls": hook_calls(version, patient_id)}
            text = json.dumps(document, ensure_ascii=False, separators=(",", ":"))
            (directory / f"{patient_id}.json").write_text(text + "\n", encoding="utf-8")
        manifest["versions"][version] = {
            "folder": folder, "bundles": len(ranked),
            # Listed at the commit but not in the snapshot read (a shallow mirror may leave out
            # its largest files).
            "absent": sorted(path for path, _ in listed if path not in read),
            "patients": [{"path": path, "blob": blob, "patientId": patient_id}
                         for _, path, blob, patient_id, _ in sorted(chosen, key=lambda c: c[1])],
        }
        print(f"{version}: {len(chosen)} of {len(ranked)} patients", file=sys.stderr)
    (out / "manifest.json").write_text(
        json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


# --- reading the corpus back and running it ---------------------------------------------------


def corpus_dir() -> Path:
    return bundled_dir("fixtures") / "corpus"


@dataclass(frozen=True)
class CorpusCall:
    version: str
    patient_file: str
    service_id: str
    request: Resource

    @property
    def name(self) -> str:
        instance = self.request["hookInstance"]
        return f"{self.version}/{self.patient_file}:{self.service_id}:{instance}"


def corpus_requests(directory: Path | None = None) -> list[CorpusCall]:
    """Every call of the corpus as a complete CDS Hooks request (prefetch joined in)."""
    directory = directory or corpus_dir()
    calls = []
    for version in VERSIONS:
        for path in sorted((directory / version).glob("*.json")):
            document = json.loads(path.read_text(encoding="utf-8"))
            for call in document["calls"]:
                request = {**call["request"], "prefetch": document["prefetch"]}
                calls.append(CorpusCall(version, path.name, call["serviceId"], request))
    return calls


@dataclass
class CallResult:
    call: CorpusCall
    status: int
    body: Any
    # (kind, system, code, group) the service's clinical picture held for this call.
    recognised: set[tuple[str, str, str, str]]
    # Did the rules run (a picture was built)? Not when the answer is a 4xx, nor when the
    # service decides on purpose not to evaluate (a deceased patient, say).
    evaluated: bool
    elapsed_ms: float = 0.0  # the POST through the test client, in this process


def _picture_codes(picture: Any) -> set[tuple[str, str, str, str]]:
    """What the service made of the facts: the groups its own look-ups gave each coding."""
    found: set[tuple[str, str, str, str]] = set()
    for fact in picture.conditions:
        for coding in fact.condition.codings:
            found.update(("condition", coding.system, coding.code, g) for g in fact.groups)
    for fact in (*picture.medications, *picture.drafts):
        groups = set(fact.groups) | ({"magnesium"} if fact.magnesium is not None else set())
        for coding in fact.medication.all_codings:
            found.update(("medication", coding.system, coding.code, g) for g in groups)
    for fact in picture.labs:
        for coding in fact.lab.codings:
            found.add(("lab", coding.system, coding.code, fact.kind))
    return found


@contextmanager
def pictures_seen() -> Iterator[list[Any]]:
    """Collects the clinical picture the rule engine builds for each call in this process."""
    from cds_service.rules import engine

    seen: list[Any] = []
    original = engine.build_picture

    def recording(*args: Any, **kwargs: Any) -> Any:
        picture = original(*args, **kwargs)
        seen.append(picture)
        return picture

    engine.build_picture = recording  # type: ignore[assignment]
    try:
        yield seen
    finally:
        engine.build_picture = original  # type: ignore[assignment]


def run_corpus(client: Any, calls: Sequence[CorpusCall]) -> list[CallResult]:
    """POST every call to its service through ``client`` (a Flask test client)."""
    results = []
    with pictures_seen() as seen:
        for call in calls:
            seen.clear()
            started = time.perf_counter()
            response = client.post(f"/cds-services/{call.service_id}", json=call.request)
            elapsed_ms = (time.perf_counter() - started) * 1000
            recognised = set().union(*(_picture_codes(p) for p in seen)) if seen else set()
            results.append(CallResult(call, response.status_code, response.get_json(silent=True),
                                      recognised, bool(seen), elapsed_ms))
    return results


def inventory(results: Sequence[CallResult], knowledge: KnowledgeCodes) -> dict[CorpusCode, bool]:
    """Each corpus code of a knowledge group → recognised: in every evaluated call whose data
    holds it the service's picture maps it to its group, and there is at least one such call."""
    outcomes: dict[CorpusCode, list[bool]] = {}
    for result in results:
        for code in request_codes(result.call.request, knowledge):
            seen = outcomes.setdefault(code, [])
            if result.evaluated:
                seen.append((code.kind, code.system, code.code, code.group) in result.recognised)
    return {code: bool(seen) and all(seen) for code, seen in outcomes.items()}


def report(results: Sequence[CallResult], knowledge: KnowledgeCodes) -> str:
    lines = []
    by_version: dict[str, Counter[int]] = defaultdict(Counter)
    cards: Counter[tuple[str, str]] = Counter()
    for result in results:
        by_version[result.call.version][result.status] += 1
        for card in (result.body or {}).get("cards", []) if result.status == 200 else []:
            rule = card.get("extension", {}).get("org.magnesium-cds", {}).get("ruleId", "?")
            cards[(rule, card.get("indicator", "?"))] += 1
    patients = {(r.call.version, r.call.patient_file) for r in results}
    times = sorted(r.elapsed_ms for r in results)
    lines.append(f"requests: {len(results)} ({len(patients)} patients) in "
                 f"{sum(times) / 1000:.1f} s, median {times[len(times) // 2]:.2f} ms a call "
                 "(Flask test client, in process)")
    for version, statuses in by_version.items():
        shown = ", ".join(f"{status}: {n}" for status, n in sorted(statuses.items()))
        lines.append(f"  {version}: {sum(statuses.values())} requests; {shown}")
    evaluated = sum(result.evaluated for result in results)
    lines.append(f"evaluated (the rules ran): {evaluated}; cards: {sum(cards.values())}")
    for (rule, indicator), n in sorted(cards.items()):
        lines.append(f"  {rule} ({indicator}): {n}")
    verdict = inventory(results, knowledge)
    recognised = sorted(c for c, ok in verdict.items() if ok)
    missed = sorted(c for c, ok in verdict.items() if not ok)
    files = ", ".join(knowledge.terminology_files) or "none"
    lines.append(f"codes of knowledge groups: {len(verdict)}; recognised {len(recognised)}, "
                 f"not recognised {len(missed)} (terminology files read: {files})")
    for title, codes in (("recognised", recognised), ("not recognised", missed)):
        lines.append(f"  {title}:")
        lines.extend(f"    {c.kind} {c.code} {c.display!r} -> {c.group}" for c in codes)
    return "\n".join(lines)


def corpus_app(database: Path) -> Flask:
    """The service as the corpus tests run it: authentication off, a SQLite store at
    ``database``, "today" pinned to the drafts' date (answers do not drift with the calendar)."""
    app = create_app(Settings(auth="off", database_url=f"sqlite:///{database}",
                              log_level="WARNING"))
    pipeline: HookPipeline = app.extensions[PIPELINE_EXTENSION]
    pipeline.clock = lambda: date.fromisoformat(AUTHORED_ON)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, help="git directory or checkout of "
                        "smart-on-fhir/generated-sample-data")
    parser.add_argument("--out", type=Path, default=None, help="default: fixtures/corpus")
    parser.add_argument("--per-version", type=int, default=50)
    parser.add_argument("--report", action="store_true", help="run the corpus and print figures")
    args = parser.parse_args(argv)
    if args.report:
        with tempfile.TemporaryDirectory(prefix="corpus-") as scratch:
            app = corpus_app(Path(scratch) / "cds.sqlite3")
            results = run_corpus(app.test_client(), corpus_requests(args.out))
        print(report(results, KnowledgeCodes()))
        return 0
    if args.source is None:
        parser.error("--source is required to build (or use --report)")
    build(args.source, args.out or corpus_dir(), args.per_version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
