"""The benchmark's hook calls, built from the hand-written fixture patients (fixtures/patients):
a patient's clinically relevant resources once, and fixture resources the knowledge base has
nothing to say about (``NOISE``) repeated, each copy under new ids and dated a year further
back. Same fixtures, same bytes.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from cds_service.fixture_server.build_requests import PRODUCTS, r4_draft_order
from cds_service.protocol.services import PREFETCH_KEYS
from cds_service.resources import bundled_dir

Resource = dict[str, Any]
FHIR_BASE = "http://127.0.0.1:8090"  # what the EHR says fullUrls are relative to
SERVICE_ID = "magnesium-order-sign"
# Ids (or id prefixes: a fixture resource's id starts with its patient's) of fixture resources
# that match no knowledge entry (tests/test_bench_smoke.py checks): hypertension, diabetes
# entered in error, bronchitis, lisinopril, amoxicillin, vitamin D, furosemide, methotrexate,
# folic acid, prednisone, and the normal labs of two patients.
NOISE = (
    "no-relevant-",
    "egfr-75-",
    "mg-pyridostigmine-cond-bronchitis",
    "mg-pyridostigmine-medreq-amoxicillin",
    "mg-pyridostigmine-medstmt-cholecalciferol",
    "ckd4-low-egfr-medreq-furosemide",
    "rheumatoid-arthritis-medreq-",
)
NO_PREFETCH_MISSING = ("patient", "conditions", "medicationRequests", "observations")


@dataclass(frozen=True)
class Workload:
    name: str
    request: dict[str, Any]
    patient: list[Resource]  # every resource of the patient (for the fixture FHIR server)
    expected_rule_ids: frozenset[str]  # rule ids whose cards must be in the answer
    fhir_server_delay_ms: int | None = None  # set: NO_PREFETCH_MISSING are left to fetch


def _fixture(name: str) -> list[Resource]:
    bundle = json.loads((bundled_dir("fixtures") / "patients" / f"{name}.json").read_bytes())
    return [entry["resource"] for entry in bundle["entry"]]


def _sources(names: list[str]) -> list[tuple[str, Resource]]:
    """(fixture patient, resource) for every resource of these fixtures but the Patient."""
    return [(n, r) for n in names for r in _fixture(n) if r["resourceType"] != "Patient"]


def patient(patient_id: str, relevant: tuple[str, ...], noise_copies: int) -> list[Resource]:
    """The first fixture's Patient and every other resource of the ``relevant`` fixtures, then
    ``noise_copies`` copies of ``NOISE``, all about ``patient_id`` under new ids."""
    fixtures = sorted(p.stem for p in (bundled_dir("fixtures") / "patients").glob("*.json"))
    noise = [(n, r) for n, r in _sources(fixtures) if r["id"].startswith(NOISE)]
    copies = [(0, *s) for s in _sources(list(relevant))]
    copies += [(copy, *s) for copy in range(1, noise_copies + 1) for s in noise]
    resources = [{**_fixture(relevant[0])[0], "id": patient_id}]
    for index, (copy, source, resource) in enumerate(copies):
        text = json.dumps(resource).replace(f'"Patient/{source}"', f'"Patient/{patient_id}"')
        # A year further back per copy, over 20 years (the fixtures date their data in 2026).
        text = text.replace('"2026-', f'"{2026 - 1 - (copy - 1) % 20}-') if copy else text
        resources.append({**json.loads(text), "id": f"{patient_id}-{index:04d}"})
    return resources


def bundle(kind: str, resources: list[Resource]) -> Resource:
    entries = [
        {"fullUrl": f"{FHIR_BASE}/{r['resourceType']}/{r['id']}", "resource": r} for r in resources
    ]
    return {"resourceType": "Bundle", "type": kind, "entry": entries}


def request(patient_id: str, resources: list[Resource], products: tuple[str, ...]) -> Resource:
    """An order-sign call with every prefetch key answered, inactive resources included (as
    servers that ignore the status parameter send them: the service must drop them)."""
    prefetch = {
        key.name: [r for r in resources if r["resourceType"] == key.resource_type]
        for key in PREFETCH_KEYS
    }
    orders = [r4_draft_order(PRODUCTS[name], patient_id) for name in products]
    context = {"userId": "Practitioner/example", "patientId": patient_id}
    return {
        "hook": "order-sign",
        "hookInstance": str(uuid.uuid5(uuid.NAMESPACE_URL, f"bench/{patient_id}")),
        "fhirServer": FHIR_BASE,
        "context": {**context, "draftOrders": bundle("collection", orders)},
        "prefetch": {
            name: found[0] if name == "patient" else bundle("searchset", found)
            for name, found in prefetch.items()
        },
    }


MG, HASHIMOTO, MG_CARD = (
    "mg-pyridostigmine",
    "hashimoto-levothyroxine",
    frozenset({"myasthenia-magnesium"}),
)


def _workload(
    name: str,
    relevant: tuple[str, ...],
    copies: int,
    products: tuple[str, ...],
    expected: frozenset[str] = MG_CARD,
    delay_ms: int | None = None,
) -> Workload:
    resources = patient(f"bench-{name}", relevant, copies)
    call = request(f"bench-{name}", resources, products)
    for key in NO_PREFETCH_MISSING if delay_ms is not None else ():
        del call["prefetch"][key]
    return Workload(name, call, resources, expected, delay_ms)


def all_workloads() -> dict[str, Workload]:
    """typical: a patient with myasthenia gravis on pyridostigmine, two copies of the noise (about
    40 resources), a magnesium oxide draft; large: a chronic patient (myasthenia, CKD 3b,
    Hashimoto's on levothyroxine), 100 copies of the noise (about 1,700 resources, 600 lab
    results), three drafts; suggestion: typical also on levothyroxine, so the answer carries an
    update suggestion (the path that checks the draft with the fhir.resources models);
    no-prefetch: typical with four keys left to fetch from a fixture server, 0 or 50 ms a
    request."""
    chelation = MG_CARD | {"chelation-interaction"}
    drafts = ("mg-sulfate", "mg-oxide", "ciprofloxacin")
    workloads = [
        _workload("typical", (MG,), 2, ("mg-oxide",)),
        _workload("suggestion", (MG, HASHIMOTO), 2, ("mg-oxide",), chelation),
        _workload("large", (MG, "ckd3-egfr40", HASHIMOTO), 100, drafts, chelation),
        _workload("no-prefetch-0ms", (MG,), 2, ("mg-oxide",), delay_ms=0),
        _workload("no-prefetch-50ms", (MG,), 2, ("mg-oxide",), delay_ms=50),
    ]
    return {w.name: w for w in workloads}


class BodyTemplate:
    """A request body whose hookInstance changes per call without re-encoding the JSON: a real
    EHR sends a new one every time, and the feedback store writes a row per (hookInstance,
    card), so reusing one would benchmark a store that never writes."""

    def __init__(self, request: Resource, fhir_server: str | None = None) -> None:
        body = {**request, **({"fhirServer": fhir_server} if fhir_server else {})}
        self.prefix, self.suffix = json.dumps(body).encode().split(body["hookInstance"].encode())
        self.size = len(self.prefix) + 36 + len(self.suffix)

    def render(self, index: int) -> bytes:
        instance = uuid.uuid5(uuid.NAMESPACE_OID, str(index))
        return self.prefix + str(instance).encode() + self.suffix


def typical() -> Workload:  # also for tests/test_context_relevance.py
    return all_workloads()["typical"]


def large() -> Workload:
    return all_workloads()["large"]
