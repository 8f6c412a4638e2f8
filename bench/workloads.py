"""Deterministic benchmark workloads: synthetic FHIR R4 patients and the hook requests about them.

Every resource is generated from a seed with real codes (ICD-10-CM + SNOMED CT conditions,
RxNorm medications, LOINC labs with UCUM units): a few the knowledge base cares about, so
the rules do real work and a card is expected, and many it does not, so the service has to
read and discard them. Same seed, same bytes.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from typing import Any

from cds_service.protocol.services import PREFETCH_BY_NAME, PREFETCH_KEYS

Resource = dict[str, Any]

ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
TERMINOLOGY = "http://terminology.hl7.org/CodeSystem/"
FHIR_BASE = "http://127.0.0.1:8090"  # what the EHR says fullUrls are relative to
_NAMESPACE = uuid.UUID("0b5e7c1a-2f39-4c4e-8f59-6d1f7a3e9b21")
TODAY = date(2026, 11, 25)

# (ICD-10-CM, SNOMED CT, display): none of these is in a knowledge value set
# (tests/test_bench_smoke.py checks that against the loaded knowledge).
IRRELEVANT_CONDITIONS: tuple[tuple[str, str, str], ...] = (
    ("I10", "38341003", "Essential hypertension"),
    ("E11.9", "44054006", "Type 2 diabetes mellitus without complications"),
    ("E78.5", "55822004", "Hyperlipidemia"),
    ("J45.909", "195967001", "Asthma"),
    ("K21.9", "235595009", "Gastro-esophageal reflux disease"),
    ("M54.50", "279039007", "Low back pain"),
    ("F41.1", "21897009", "Generalized anxiety disorder"),
    ("F32.9", "35489007", "Depressive disorder"),
    ("G43.909", "37796009", "Migraine"),
    ("E66.9", "414916001", "Obesity"),
    ("I48.91", "49436004", "Atrial fibrillation"),
    ("J44.9", "13645005", "Chronic obstructive pulmonary disease"),
    ("M17.9", "239873007", "Osteoarthritis of knee"),
    ("N40.0", "266569009", "Benign prostatic hyperplasia"),
    ("G47.33", "78275009", "Obstructive sleep apnea"),
    ("I25.10", "53741008", "Coronary arteriosclerosis"),
    ("E55.9", "34713006", "Vitamin D deficiency"),
    ("D64.9", "271737000", "Anemia"),
    ("J30.9", "61582004", "Allergic rhinitis"),
    ("I50.9", "42343007", "Congestive heart failure"),
    ("N39.0", "68566005", "Urinary tract infectious disease"),
    ("J06.9", "54150009", "Upper respiratory infection"),
    ("H40.9", "23986001", "Glaucoma"),
    ("F17.210", "56294008", "Nicotine dependence"),
    ("M10.9", "90560007", "Gout"),
    ("R73.03", "714628002", "Prediabetes"),
    ("I73.9", "400047006", "Peripheral vascular disease"),
    ("L70.0", "88616000", "Acne vulgaris"),
)
MYASTHENIA = ("G70.00", "91637004", "Myasthenia gravis")
CKD_3A = ("N18.31", "700378005", "Chronic kidney disease stage 3A")
HASHIMOTO = ("E06.3", "21983002", "Hashimoto thyroiditis")

# (RxNorm ingredient, name, dose text): no interaction or myasthenia group, no magnesium.
IRRELEVANT_MEDICATIONS: tuple[tuple[str, str, str], ...] = (
    ("29046", "lisinopril", "10 mg by mouth once daily"),
    ("6809", "metformin", "500 mg by mouth twice daily"),
    ("83367", "atorvastatin", "20 mg by mouth at bedtime"),
    ("17767", "amlodipine", "5 mg by mouth once daily"),
    ("7646", "omeprazole", "20 mg by mouth once daily"),
    ("36437", "sertraline", "50 mg by mouth once daily"),
    ("6918", "metoprolol", "25 mg by mouth twice daily"),
    ("5487", "hydrochlorothiazide", "12.5 mg by mouth once daily"),
    ("52175", "losartan", "50 mg by mouth once daily"),
    ("435", "albuterol", "2 puffs inhaled every 6 hours as needed"),
    ("88249", "montelukast", "10 mg by mouth at bedtime"),
    ("321988", "escitalopram", "10 mg by mouth once daily"),
    ("77492", "tamsulosin", "0.4 mg by mouth once daily"),
    ("1364430", "apixaban", "5 mg by mouth twice daily"),
    ("161", "acetaminophen", "500 mg by mouth every 6 hours as needed"),
    ("20610", "cetirizine", "10 mg by mouth once daily"),
    ("519", "allopurinol", "100 mg by mouth once daily"),
    ("32968", "clopidogrel", "75 mg by mouth once daily"),
    ("1191", "aspirin", "81 mg by mouth once daily"),
    ("20352", "carvedilol", "6.25 mg by mouth twice daily"),
    ("10737", "trazodone", "50 mg by mouth at bedtime"),
    ("301542", "rosuvastatin", "10 mg by mouth once daily"),
    ("4821", "glipizide", "5 mg by mouth once daily"),
    ("2418", "cholecalciferol", "1000 units by mouth once daily"),
    ("11248", "cyanocobalamin", "1000 mcg by mouth once daily"),
)
PYRIDOSTIGMINE = ("9000", "pyridostigmine", "60 mg by mouth three times daily")
LEVOTHYROXINE = ("10582", "levothyroxine", "75 mcg by mouth once daily before breakfast")

# (LOINC, display, UCUM unit, typical value, low, high)
MAGNESIUM = ("19123-9", "Magnesium [Mass/volume] in Serum or Plasma", "mg/dL", 2.0, 1.6, 2.6)
EGFR = (
    "98979-8",
    "Glomerular filtration rate/1.73 sq M.predicted [Volume Rate/Area] in Serum, Plasma or "
    "Blood by Creatinine-based formula (CKD-EPI 2021)",
    "mL/min/{1.73_m2}",
    85.0,
    60.0,
    None,
)
CREATININE = ("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL", 0.9, 0.6, 1.2)
# Labs the observations prefetch does not ask for; lenient EHRs send some anyway.
OTHER_LABS: tuple[tuple[str, str, str, float, float | None, float | None], ...] = (
    ("2823-3", "Potassium [Moles/volume] in Serum or Plasma", "mmol/L", 4.2, 3.5, 5.1),
    ("2951-2", "Sodium [Moles/volume] in Serum or Plasma", "mmol/L", 140.0, 136.0, 145.0),
    ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", 6.1, None, 5.7),
    ("3016-3", "Thyrotropin [Units/volume] in Serum or Plasma", "m[IU]/L", 2.1, 0.4, 4.0),
    ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", 13.5, 12.0, 16.0),
    ("2345-7", "Glucose [Mass/volume] in Serum or Plasma", "mg/dL", 102.0, 70.0, 99.0),
)


@dataclass(frozen=True)
class Draft:
    """A draft MedicationRequest of the hook call."""

    key: str
    codings: tuple[tuple[str, str], ...]  # (RxNorm code, display)
    text: str
    dose_text: str
    dose: tuple[float, str]  # (value, UCUM code)
    route: tuple[str, str]  # (SNOMED route code, display)
    category: str = "outpatient"


MAGNESIUM_OXIDE_DRAFT = Draft(
    "mg-oxide",
    (("198741", "magnesium oxide 400 MG Oral Tablet"),),
    "magnesium oxide 400 MG Oral Tablet",
    "400 mg by mouth once daily",
    (400, "mg"),
    ("26643006", "Oral route"),
)
MAGNESIUM_SULFATE_IV_DRAFT = Draft(
    "mg-sulfate-iv",
    (
        ("1658221", "2 ML magnesium sulfate 500 MG/ML Injection"),
        ("6585", "magnesium sulfate"),
    ),
    "magnesium sulfate 500 MG/ML Injection (2 mL vial)",
    "2 g intravenously over 1 hour, once",
    (2, "g"),
    ("47625008", "Intravenous route"),
    category="inpatient",
)
CIPROFLOXACIN_DRAFT = Draft(
    "ciprofloxacin",
    (("2551", "ciprofloxacin"),),
    "ciprofloxacin 500 MG Oral Tablet",
    "500 mg by mouth twice daily for 7 days",
    (500, "mg"),
    ("26643006", "Oral route"),
)


@dataclass(frozen=True)
class PatientSpec:
    patient_id: str
    seed: int
    conditions: int
    medication_requests: int
    medication_statements: int
    observations: int
    relevant_conditions: tuple[tuple[str, str, str], ...]
    relevant_medications: tuple[tuple[str, str, str], ...]
    egfr: float
    # Share of observations with codes the prefetch query does not ask for.
    other_lab_share: float = 0.0
    # Share of conditions / orders that are no longer active (servers that ignore the status
    # search parameter send them; the service must drop them).
    inactive_share: float = 0.0


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    service_id: str
    request: dict[str, Any]
    patient: list[Resource]  # every resource of the patient (for the fixture FHIR server)
    expected_rule_ids: frozenset[str]  # rule ids whose cards must be in the answer
    fhir_server_delay_ms: int | None = None  # set: prefetch keys are fetched from the server
    missing_keys: tuple[str, ...] = field(default=())

    def patient_bundle(self) -> Resource:
        """The patient as the collection Bundle the fixture server loads."""
        return {
            "resourceType": "Bundle",
            "id": f"{self.request['context']['patientId']}-bundle",
            "type": "collection",
            "entry": [
                {"fullUrl": f"{FHIR_BASE}/{r['resourceType']}/{r['id']}", "resource": r}
                for r in self.patient
            ],
        }


TYPICAL = PatientSpec(
    patient_id="bench-typical",
    seed=20261125,
    conditions=20,
    medication_requests=12,
    medication_statements=3,
    observations=10,
    relevant_conditions=(MYASTHENIA,),
    relevant_medications=(PYRIDOSTIGMINE,),
    egfr=85.0,
)
LARGE = PatientSpec(
    patient_id="bench-large",
    seed=20261126,
    conditions=1000,
    medication_requests=300,
    medication_statements=200,
    observations=500,
    relevant_conditions=(MYASTHENIA, CKD_3A, HASHIMOTO),
    relevant_medications=(PYRIDOSTIGMINE, LEVOTHYROXINE),
    egfr=52.0,
    other_lab_share=0.2,
    inactive_share=0.05,
)


# ------------------------------------------------------------------------ resources


def _ref(patient_id: str) -> dict[str, str]:
    return {"reference": f"Patient/{patient_id}"}


def _day(rng: random.Random, start: date, end: date) -> date:
    return start + timedelta(days=rng.randrange((end - start).days + 1))


def _concept(system: str, code: str, display: str, text: str | None = None) -> Resource:
    coding = {"system": system, "code": code, "display": display}
    return {"coding": [coding], "text": text or display}


def _category(system: str, code: str, display: str) -> list[Resource]:
    return [{"coding": [{"system": TERMINOLOGY + system, "code": code, "display": display}]}]


def _quantity(value: float, code: str, unit: str | None = None) -> Resource:
    return {"value": value, "unit": unit or code, "system": UCUM, "code": code}


def patient_resource(spec: PatientSpec) -> Resource:
    return {
        "resourceType": "Patient",
        "id": spec.patient_id,
        "meta": {"tag": _category("v3-ActReason", "HTEST", "test health data")[0]["coding"]},
        "identifier": [
            {"system": "https://magnesium-cds.example.org/bench/mrn", "value": spec.patient_id}
        ],
        "active": True,
        "name": [{"use": "official", "family": "Benchmark", "given": ["Pat"]}],
        "gender": "female",
        "birthDate": "1961-06-15",
    }


def condition(
    spec: PatientSpec, index: int, codes: tuple[str, str, str], onset: date, active: bool
) -> Resource:
    icd, snomed, display = codes
    return {
        "resourceType": "Condition",
        "id": f"{spec.patient_id}-cond-{index:04d}",
        "clinicalStatus": _concept(
            TERMINOLOGY + "condition-clinical",
            "active" if active else "resolved",
            "Active" if active else "Resolved",
        ),
        "verificationStatus": _concept(
            TERMINOLOGY + "condition-ver-status", "confirmed", "Confirmed"
        ),
        "category": _category("condition-category", "problem-list-item", "Problem List Item"),
        "code": {
            "coding": [
                {"system": ICD10CM, "code": icd, "display": display},
                {"system": SNOMED, "code": snomed, "display": display},
            ],
            "text": display,
        },
        "subject": _ref(spec.patient_id),
        "onsetDateTime": onset.isoformat(),
        "recordedDate": (onset + timedelta(days=3)).isoformat(),
    }


def _dosage(text: str, per_day: int, dose: tuple[float, str] | None) -> Resource:
    dosage: Resource = {
        "text": text,
        "timing": {"repeat": {"frequency": per_day, "period": 1, "periodUnit": "d"}},
        "route": _concept(SNOMED, "26643006", "Oral route"),
    }
    if dose is not None:
        dosage["doseAndRate"] = [{"doseQuantity": _quantity(*dose)}]
    return dosage


def _per_day(text: str) -> int:
    return 3 if "three times" in text else 2 if "twice" in text else 1


def medication_request(
    spec: PatientSpec, index: int, drug: tuple[str, str, str], authored: date, active: bool
) -> Resource:
    code, name, text = drug
    return {
        "resourceType": "MedicationRequest",
        "id": f"{spec.patient_id}-medreq-{index:04d}",
        "status": "active" if active else "stopped",
        "intent": "order",
        "category": _category("medicationrequest-category", "outpatient", "Outpatient"),
        "medicationCodeableConcept": _concept(RXNORM, code, name, f"{name} ({text})"),
        "subject": _ref(spec.patient_id),
        "authoredOn": authored.isoformat(),
        "requester": {"reference": "Practitioner/example"},
        "dosageInstruction": [_dosage(text, _per_day(text), (1, "{tbl}"))],
        "dispenseRequest": {
            "numberOfRepeatsAllowed": 3,
            "quantity": _quantity(90, "{tbl}", "tablet"),
        },
    }


def medication_statement(
    spec: PatientSpec, index: int, drug: tuple[str, str, str], asserted: date, active: bool
) -> Resource:
    code, name, text = drug
    return {
        "resourceType": "MedicationStatement",
        "id": f"{spec.patient_id}-medstmt-{index:04d}",
        "status": "active" if active else "completed",
        "medicationCodeableConcept": _concept(RXNORM, code, name, f"{name} ({text})"),
        "subject": _ref(spec.patient_id),
        "effectivePeriod": {"start": (asserted - timedelta(days=90)).isoformat()},
        "dateAsserted": asserted.isoformat(),
        "informationSource": _ref(spec.patient_id),
        "dosage": [_dosage(text, _per_day(text), (1, "{tbl}"))],
    }


def observation(
    spec: PatientSpec,
    index: int,
    lab: tuple[str, str, str, float, float | None, float | None],
    value: float,
    effective: date,
) -> Resource:
    code, display, unit, _, low, high = lab
    reference_range = {
        name: _quantity(limit, unit)
        for name, limit in (("low", low), ("high", high))
        if limit is not None
    }
    below, above = low is not None and value < low, high is not None and value > high
    flag = "L" if below else "H" if above else "N"
    resource: Resource = {
        "resourceType": "Observation",
        "id": f"{spec.patient_id}-obs-{index:04d}",
        "status": "final",
        "category": _category("observation-category", "laboratory", "Laboratory"),
        "code": _concept(LOINC, code, display),
        "subject": _ref(spec.patient_id),
        "effectiveDateTime": f"{effective.isoformat()}T08:15:00-05:00",
        "issued": f"{effective.isoformat()}T12:00:00-05:00",
        "valueQuantity": _quantity(value, unit),
        "interpretation": [_concept(TERMINOLOGY + "v3-ObservationInterpretation", flag, flag)],
    }
    if reference_range:
        resource["referenceRange"] = [reference_range]
    return resource


def generate_patient(spec: PatientSpec) -> list[Resource]:
    """The patient's resources; the same spec always gives the same list."""
    rng = random.Random(spec.seed)
    resources: list[Resource] = [patient_resource(spec)]
    start, end = date(2000, 1, 1), TODAY - timedelta(days=30)

    for index in range(spec.conditions):
        if index < len(spec.relevant_conditions):
            codes, active = spec.relevant_conditions[index], True
        else:
            codes = rng.choice(IRRELEVANT_CONDITIONS)
            active = rng.random() >= spec.inactive_share
        resources.append(condition(spec, index, codes, _day(rng, start, end), active))

    drugs = list(spec.relevant_medications)
    for index in range(spec.medication_requests):
        drug = drugs[index] if index < len(drugs) else rng.choice(IRRELEVANT_MEDICATIONS)
        active = index < len(drugs) or rng.random() >= spec.inactive_share
        resources.append(medication_request(spec, index, drug, _day(rng, start, end), active))
    for index in range(spec.medication_statements):
        drug = rng.choice(IRRELEVANT_MEDICATIONS)
        active = rng.random() >= spec.inactive_share
        resources.append(medication_statement(spec, index, drug, _day(rng, start, end), active))

    # Newest results first, as the prefetch query sorts them; the newest of each kind is normal.
    queried = (MAGNESIUM, (*EGFR[:3], spec.egfr, *EGFR[4:]), CREATININE)
    effective = TODAY - timedelta(days=15)
    for index in range(spec.observations):
        if index >= len(queried) and rng.random() < spec.other_lab_share:
            lab = rng.choice(OTHER_LABS)
        else:
            lab = queried[index % len(queried)]
        jitter = 1.0 if index < len(queried) else rng.uniform(0.9, 1.1)
        value = round(lab[3] * jitter, 1 if lab[3] < 50 else 0)
        resources.append(observation(spec, index, lab, value, effective))
        if index % len(queried) == len(queried) - 1:
            effective -= timedelta(days=rng.randrange(7, 60))
    return resources


def draft_order(patient_id: str, draft: Draft) -> Resource:
    return {
        "resourceType": "MedicationRequest",
        "id": f"draft-{draft.key}",
        "status": "draft",
        "intent": "order",
        "category": _category(
            "medicationrequest-category", draft.category, draft.category.capitalize()
        ),
        "medicationCodeableConcept": {
            "coding": [
                {"system": RXNORM, "code": code, "display": display}
                for code, display in draft.codings
            ],
            "text": draft.text,
        },
        "subject": _ref(patient_id),
        "authoredOn": (TODAY - timedelta(days=1)).isoformat(),
        "requester": {"reference": "Practitioner/example"},
        "dosageInstruction": [
            {
                "text": draft.dose_text,
                "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}},
                "route": _concept(SNOMED, *draft.route),
                "doseAndRate": [{"doseQuantity": _quantity(*draft.dose)}],
            }
        ],
    }


# ------------------------------------------------------------------------ requests


def searchset(resources: Iterable[Resource], query: str) -> Resource:
    entries = [
        {
            "fullUrl": f"{FHIR_BASE}/{r['resourceType']}/{r['id']}",
            "resource": r,
            "search": {"mode": "match"},
        }
        for r in resources
    ]
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(entries),
        "link": [{"relation": "self", "url": f"{FHIR_BASE}/{query}"}],
        "entry": entries,
    }


def prefetch_for(
    patient_id: str, resources: list[Resource], omit: Iterable[str] = ()
) -> dict[str, Any]:
    """The prefetch the EHR sends, under the exact keys of ``PREFETCH_KEYS``."""
    omitted = set(omit)
    unknown = omitted - set(PREFETCH_BY_NAME)
    if unknown:
        raise ValueError(f"not prefetch keys: {sorted(unknown)}")
    prefetch: dict[str, Any] = {}
    for key in PREFETCH_KEYS:
        if key.name in omitted:
            continue
        query = key.template.replace("{{context.patientId}}", patient_id)
        matching = [r for r in resources if r["resourceType"] == key.resource_type]
        if key.resource_type == "Patient":
            prefetch[key.name] = matching[0]
        else:
            prefetch[key.name] = searchset(matching, query)
    return prefetch


def hook_instance(label: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, label))


def order_sign_request(
    patient_id: str,
    drafts: Iterable[Draft],
    prefetch: dict[str, Any],
    label: str,
    fhir_server: str = FHIR_BASE,
) -> dict[str, Any]:
    orders = [draft_order(patient_id, draft) for draft in drafts]
    return {
        "hook": "order-sign",
        "hookInstance": hook_instance(label),
        "fhirServer": fhir_server,
        "context": {
            "userId": "Practitioner/example",
            "patientId": patient_id,
            "draftOrders": {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [
                    {"fullUrl": f"urn:uuid:{hook_instance(label + o['id'])}", "resource": o}
                    for o in orders
                ],
            },
        },
        "prefetch": prefetch,
    }


NO_PREFETCH_MISSING = ("patient", "conditions", "medicationRequests", "observations")
EXPECTED = frozenset({"myasthenia-magnesium"})


def _workload(
    name: str,
    description: str,
    spec: PatientSpec,
    drafts: tuple[Draft, ...],
    expected: frozenset[str] = EXPECTED,
    delay_ms: int | None = None,
) -> Workload:
    """An order-sign call about the patient ``spec`` generates; with ``delay_ms``, the keys
    of ``NO_PREFETCH_MISSING`` are left for the service to fetch from the fixture server."""
    resources = generate_patient(spec)
    missing = NO_PREFETCH_MISSING if delay_ms is not None else ()
    prefetch = prefetch_for(spec.patient_id, resources, omit=missing)
    request = order_sign_request(spec.patient_id, drafts, prefetch, name)
    service = "magnesium-order-sign"
    return Workload(name, description, service, request, resources, expected, delay_ms, missing)


def typical() -> Workload:
    return _workload(
        "typical",
        "order-sign, full prefetch: 20 conditions, 15 medications, 10 labs, 1 draft",
        TYPICAL,
        (MAGNESIUM_OXIDE_DRAFT,),
    )


def large() -> Workload:
    return _workload(
        "large",
        "order-sign, chronic patient: 1,000 conditions, 500 medications, 500 labs, 3 drafts",
        LARGE,
        (MAGNESIUM_SULFATE_IV_DRAFT, MAGNESIUM_OXIDE_DRAFT, CIPROFLOXACIN_DRAFT),
    )


def suggestion() -> Workload:
    """The typical patient also on levothyroxine: the answer carries an update suggestion
    (space the two drugs), whose draft the service checks with the fhir.resources models."""
    return _workload(
        "suggestion",
        "typical, with levothyroxine on file: a chelation card with an update suggestion",
        replace(
            TYPICAL,
            patient_id="bench-suggestion",
            relevant_medications=(PYRIDOSTIGMINE, LEVOTHYROXINE),
        ),
        (MAGNESIUM_OXIDE_DRAFT,),
        EXPECTED | {"chelation-interaction"},
    )


def no_prefetch(delay_ms: int) -> Workload:
    """The typical patient with 4 keys left for the service to fetch (statements prefetched)."""
    return _workload(
        f"no-prefetch-{delay_ms}ms",
        f"typical patient, {len(NO_PREFETCH_MISSING)} keys fetched from the fixture server "
        f"(+{delay_ms} ms per request)",
        TYPICAL,
        (MAGNESIUM_OXIDE_DRAFT,),
        delay_ms=delay_ms,
    )


def all_workloads() -> list[Workload]:
    return [typical(), large(), suggestion(), no_prefetch(0), no_prefetch(50)]


# ------------------------------------------------------------------------ request bodies


class BodyTemplate:
    """A request body whose hookInstance changes per call without re-encoding the JSON.

    A real EHR sends a new hookInstance every time, and the feedback store writes one row per
    new (hookInstance, card): reusing one would benchmark a store that never writes.
    """

    def __init__(self, request: dict[str, Any], fhir_server: str | None = None) -> None:
        body = dict(request)
        if fhir_server is not None:
            body["fhirServer"] = fhir_server
        self.placeholder = body["hookInstance"]
        encoded = json.dumps(body, separators=(",", ":")).encode()
        marker = f'"hookInstance":"{self.placeholder}"'.encode()
        if encoded.count(marker) != 1:
            raise ValueError("hookInstance must occur exactly once in the body")
        head, tail = encoded.split(marker)
        self.prefix = head + b'"hookInstance":"'
        self.suffix = b'"' + tail
        self.size = len(encoded)

    def parts(self, index: int) -> tuple[bytes, bytes, bytes]:
        """The body in three pieces (no copy of the big ones): for a streaming sender."""
        return self.prefix, hook_instance(f"{self.placeholder}/{index}").encode(), self.suffix

    def render(self, index: int) -> bytes:
        return b"".join(self.parts(index))
