"""Write the CDS Hooks request fixtures (``fixtures/requests``) from the patient fixtures.

Each prefetch value is what the key's template (``PREFETCH_KEYS``) returns from the fixture
store, answered by the same search code the fixture server runs, so a request "with prefetch"
and one answered live from the server agree. Output is deterministic (hookInstance is a uuid5
of the file name), and ``tests/test_fixtures.py`` checks that the files on disk are current.

    python -m cds_service.fixture_server.build_requests [--out DIR] [--check]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

from cds_service.context.prefetch import render_template
from cds_service.fixture_server.store import FixtureStore, parse_search
from cds_service.fixture_server.versions import convert_searchset, to_dstu2, to_stu3
from cds_service.protocol.services import PREFETCH_KEYS
from cds_service.resources import bundled_dir

Resource = dict[str, Any]

# The fixture server's default address (Settings.fixture_server_host/port); tests that run a
# live server substitute its URL.
FIXTURE_FHIR_SERVER = "http://127.0.0.1:8090"
USER_ID = "Practitioner/example"
SANDBOX_USER_ID = "Practitioner/COREPRACTITIONER1"
# "Today" for the draft orders: after every lab in the patient fixtures.
AUTHORED_ON = "2026-11-24"
_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://magnesium-cds.example.org/fixtures")

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
MR_CATEGORY = "http://terminology.hl7.org/CodeSystem/medicationrequest-category"
ROUTES = {
    "oral": {"coding": [{"system": SNOMED, "code": "26643006", "display": "Oral route"}]},
    "iv": {"coding": [{"system": SNOMED, "code": "47625008", "display": "Intravenous route"}]},
    "topical": {"coding": [{"system": SNOMED, "code": "6064005", "display": "Topical route"}]},
    "ophthalmic": {
        "coding": [{"system": SNOMED, "code": "54485002", "display": "Ophthalmic route"}]
    },
}
# Draft laboratory orders (ServiceRequest): LOINC code and display.
LAB_ORDERS = {
    "serum-mg": ("draft-serum-mg", "19123-9", "Magnesium [Mass/volume] in Serum or Plasma"),
}


@dataclass(frozen=True)
class Product:
    """A draft order's drug and dose."""

    order_id: str
    codings: tuple[tuple[str, str], ...]  # RxNorm (code, display); the first is the product
    text: str
    route: str  # key of ROUTES
    dose: tuple[float, str, str]  # value, unit (human), UCUM code
    timing: dict[str, Any]  # Timing.repeat
    sig: str
    category: str = "outpatient"
    patient_instruction: str = ""


PRODUCTS: dict[str, Product] = {
    "mg-oxide": Product(
        "draft-mg-oxide", (("198741", "magnesium oxide 400 MG Oral Tablet"),),
        "magnesium oxide 400 MG Oral Tablet", "oral", (400, "mg", "mg"),
        {"frequency": 1, "period": 1, "periodUnit": "d"}, "400 mg by mouth once daily",
    ),
    "mg-sulfate": Product(
        "draft-mg-sulfate",
        (("1658221", "2 ML magnesium sulfate 500 MG/ML Injection"),
         ("6585", "magnesium sulfate")),
        "magnesium sulfate 500 MG/ML Injection (2 mL vial)", "iv", (2, "g", "g"),
        {"count": 1, "frequency": 1, "period": 1, "periodUnit": "d"},
        "2 g intravenously over 1 hour, once", category="inpatient",
    ),
    # A single dose written as EHRs write a one-off infusion: count 1, no frequency or period.
    "mg-sulfate-once": Product(
        "draft-mg-sulfate-once",
        (("1658221", "2 ML magnesium sulfate 500 MG/ML Injection"),
         ("6585", "magnesium sulfate")),
        "magnesium sulfate 500 MG/ML Injection (2 mL vial)", "iv", (2, "g", "g"),
        {"count": 1}, "2 g intravenously over 1 hour, once", category="inpatient",
    ),
    "mg-citrate": Product(
        "draft-mg-citrate", (("1052760", "magnesium citrate 58.2 MG/ML Oral Solution"),),
        "magnesium citrate 58.2 MG/ML Oral Solution", "oral", (10, "mL", "mL"),
        {"frequency": 2, "period": 1, "periodUnit": "d"}, "10 mL by mouth twice daily",
    ),
    "mg-glycinate": Product(
        "draft-mg-glycinate",
        (("849497", "magnesium glycinate 100 MG Oral Tablet"), ("476818", "magnesium glycinate")),
        "magnesium glycinate 100 MG Oral Tablet", "oral", (2, "tablet", "{tbl}"),
        {"frequency": 1, "period": 1, "periodUnit": "d"}, "2 tablets by mouth once daily",
    ),
    # Ingredient code only: no clinical drug code for this product is in the reviewed sources.
    "ciprofloxacin": Product(
        "draft-ciprofloxacin", (("2551", "ciprofloxacin"),), "ciprofloxacin 500 MG Oral Tablet",
        "oral", (500, "mg", "mg"),
        {"boundsDuration": {"value": 7, "unit": "days", "system": UCUM, "code": "d"},
         "frequency": 2, "period": 1, "periodUnit": "d"},
        "500 mg by mouth twice daily for 7 days",
    ),
    "lisinopril": Product(
        "draft-lisinopril", (("29046", "lisinopril"),), "lisinopril 10 MG Oral Tablet", "oral",
        (10, "mg", "mg"), {"frequency": 1, "period": 1, "periodUnit": "d"},
        "10 mg by mouth once daily",
    ),
    # 2 x 400 mg three times a day: 1447 mg elemental magnesium a day.
    "mg-oxide-high": Product(
        "draft-mg-oxide-high", (("198741", "magnesium oxide 400 MG Oral Tablet"),),
        "magnesium oxide 400 MG Oral Tablet", "oral", (2, "tablet", "{tbl}"),
        {"frequency": 3, "period": 1, "periodUnit": "d"}, "2 tablets by mouth three times daily",
    ),
    # The chelation suggestion taken up: the draft already states the spacing.
    "mg-oxide-spaced": Product(
        "draft-mg-oxide-spaced", (("198741", "magnesium oxide 400 MG Oral Tablet"),),
        "magnesium oxide 400 MG Oral Tablet", "oral", (400, "mg", "mg"),
        {"frequency": 1, "period": 1, "periodUnit": "d"}, "400 mg by mouth once daily",
        patient_instruction="Take at least 4 hours apart from levothyroxine.",
    ),
    # Text only: magnesium malate has no RxNorm code.
    "mg-malate": Product(
        "draft-mg-malate", (), "Magnesium malate 500 mg capsule (supplement)", "oral",
        (2, "capsule", "{capsule}"), {"frequency": 1, "period": 1, "periodUnit": "d"},
        "2 capsules by mouth once daily",
    ),
    "epsom-soak": Product(
        "draft-epsom-soak", (("6585", "magnesium sulfate"),),
        "Epsom salt (magnesium sulfate) bath soak", "topical", (2, "cup", "{cup}"),
        {"frequency": 2, "period": 1, "periodUnit": "wk"},
        "2 cups in a warm bath, soak 15 minutes, twice weekly",
    ),
    "gentamicin": Product(
        "draft-gentamicin", (("1596450", "gentamicin"),), "gentamicin 40 MG/ML Injectable Solution",
        "iv", (350, "mg", "mg"), {"frequency": 1, "period": 1, "periodUnit": "d"},
        "350 mg intravenously once daily", category="inpatient",
    ),
    "levofloxacin": Product(
        "draft-levofloxacin", (("82122", "levofloxacin"),), "levofloxacin 500 MG Oral Tablet",
        "oral", (500, "mg", "mg"),
        {"boundsDuration": {"value": 7, "unit": "days", "system": UCUM, "code": "d"},
         "frequency": 1, "period": 1, "periodUnit": "d"},
        "500 mg by mouth once daily for 7 days",
    ),
    # Recognised through the generated terminology (knowledge/data/terminology): a product
    # RxCUI with no display or text, a brand name with no code, an excipient that is not one.
    "ciprofloxacin-code-only": Product(
        "draft-ciprofloxacin", (("309309", ""),), "", "oral", (500, "mg", "mg"),
        {"frequency": 2, "period": 1, "periodUnit": "d"}, "500 mg by mouth twice daily",
    ),
    "ciprofloxacin-brand": Product(
        "draft-ciprofloxacin", (), "CIPRO 250 MG TABS", "oral", (1, "tablet", "{tbl}"),
        {"frequency": 2, "period": 1, "periodUnit": "d"}, "1 tablet by mouth twice daily",
    ),
    "mg-sulfate-code-only": Product(
        "draft-mg-sulfate", (("1658236", ""),), "", "iv", (2, "g", "g"),
        {"count": 1, "frequency": 1, "period": 1, "periodUnit": "d"},
        "2 g intravenously over 1 hour, once", category="inpatient",
    ),
    "rolaids": Product(
        "draft-rolaids", (), "Rolaids Ultra Strength chewable tablet", "oral",
        (1, "tablet", "{tbl}"), {"frequency": 1, "period": 1, "periodUnit": "d"},
        "chew 1 tablet as needed for heartburn, up to once daily",
    ),
    "acetaminophen-stearate": Product(
        "draft-acetaminophen", (),
        "acetaminophen 500 MG Oral Tablet (inactive ingredient: magnesium stearate)", "oral",
        (500, "mg", "mg"), {"frequency": 4, "period": 1, "periodUnit": "d"},
        "500 mg by mouth every 6 hours as needed",
    ),
    # Issue 20: a balanced IV fluid (its RxNorm ingredients include magnesium chloride) is not
    # magnesium therapy; a neuromuscular blocker; a multivitamin's small magnesium; drugs whose
    # labels give their own spacing from magnesium.
    "plasma-lyte": Product(
        "draft-plasma-lyte", (("6579", "magnesium chloride"),),
        "Plasma-Lyte A injection pH 7.4 (multiple electrolytes), 1000 mL", "iv",
        (1000, "mL", "mL"), {"frequency": 1, "period": 1, "periodUnit": "d"},
        "1000 mL intravenously over 8 hours", category="inpatient",
    ),
    "rocuronium": Product(
        "draft-rocuronium", (("68139", "rocuronium"),), "rocuronium 10 MG/ML Injectable Solution",
        "iv", (50, "mg", "mg"), {"count": 1, "frequency": 1, "period": 1, "periodUnit": "d"},
        "50 mg intravenously once, at induction", category="inpatient",
    ),
    "multivitamin": Product(
        "draft-multivitamin", (("6585", "magnesium sulfate"),),
        "Multivitamin with minerals tablet (magnesium sulfate 70 mg)", "oral", (70, "mg", "mg"),
        {"frequency": 1, "period": 1, "periodUnit": "d"},
        "1 tablet (magnesium sulfate 70 mg) by mouth once daily",
    ),
    "delafloxacin": Product(
        "draft-delafloxacin", (("1927663", "delafloxacin"),), "delafloxacin 450 MG Oral Tablet",
        "oral", (450, "mg", "mg"),
        {"boundsDuration": {"value": 5, "unit": "days", "system": UCUM, "code": "d"},
         "frequency": 2, "period": 1, "periodUnit": "d"},
        "450 mg by mouth twice daily for 5 days",
    ),
    "omadacycline": Product(
        "draft-omadacycline", (("2059269", "omadacycline"),), "omadacycline 150 MG Oral Tablet",
        "oral", (300, "mg", "mg"),
        {"boundsDuration": {"value": 7, "unit": "days", "system": UCUM, "code": "d"},
         "frequency": 1, "period": 1, "periodUnit": "d"},
        "300 mg by mouth once daily for 7 days",
    ),
    "gabapentin": Product(
        "draft-gabapentin", (("25480", "gabapentin"),), "gabapentin 300 MG Oral Capsule", "oral",
        (300, "mg", "mg"), {"frequency": 3, "period": 1, "periodUnit": "d"},
        "300 mg by mouth three times daily",
    ),
    # A bowel-preparation style course: one 300 mL bottle, once (supervised laxative use).
    "mg-citrate-laxative": Product(
        "draft-mg-citrate-laxative", (("1052760", "magnesium citrate 58.2 MG/ML Oral Solution"),),
        "magnesium citrate 58.2 MG/ML Oral Solution", "oral", (300, "mL", "mL"),
        {"count": 1, "frequency": 1, "period": 1, "periodUnit": "d"},
        "300 mL by mouth once, the evening before the procedure",
    ),
    "digoxin": Product(
        "draft-digoxin", (("3407", "digoxin"),), "digoxin 0.125 MG Oral Tablet", "oral",
        (0.125, "mg", "mg"), {"frequency": 1, "period": 1, "periodUnit": "d"},
        "0.125 mg by mouth once daily",
    ),
    "mg-citrate-infant": Product(
        "draft-mg-citrate-infant", (("1052760", "magnesium citrate 58.2 MG/ML Oral Solution"),),
        "magnesium citrate 58.2 MG/ML Oral Solution", "oral", (2, "mL", "mL"),
        {"frequency": 1, "period": 1, "periodUnit": "d"}, "2 mL by mouth once daily",
    ),
    # Eye drops share the ingredient code with the tablets: local, not systemic.
    "ciprofloxacin-eye": Product(
        "draft-ciprofloxacin-eye",
        (("2551", "ciprofloxacin"),),
        "ciprofloxacin 3 MG/ML Ophthalmic Solution",
        "ophthalmic",
        (1, "drop", "[drp]"),
        {"frequency": 4, "period": 1, "periodUnit": "d"},
        "1 drop in the affected eye four times daily",
    ),
}


@dataclass(frozen=True)
class Scenario:
    """One request fixture. ``shape`` picks the client: r4 (a conformant CDS Hooks 2.0 EHR),
    stu3 (CDS Hooks 1.0 medication-prescribe), sandbox / sandbox-nodrug (the public sandbox
    with an R4 server) or dstu2 (the sandbox with its default DSTU2 server); urn-uuid (r4
    with Bundle-internal references: the Patient sent in a collection Bundle under a
    ``urn:uuid:`` fullUrl, every resource naming it by that fullUrl) and
    conditions-of-another (r4 whose prefetched Conditions all name another patient)."""

    patient_id: str
    hook: str
    orders: tuple[str, ...] = ()
    variant: str = ""
    prefetch: bool = True
    shape: str = "r4"
    authorization: bool = False
    lab_orders: tuple[str, ...] = ()  # keys of LAB_ORDERS, added to draftOrders (r4 only)

    @property
    def file_name(self) -> str:
        parts = [self.patient_id, self.hook, *([self.variant] if self.variant else [])]
        return ".".join(parts) + ".json"


MG = "mg-pyridostigmine"
SCENARIOS: tuple[Scenario, ...] = (
    Scenario(MG, "order-select", ("mg-oxide",)),
    Scenario(MG, "order-select", ("mg-oxide",), "noprefetch", prefetch=False, authorization=True),
    Scenario(MG, "order-select", ("ciprofloxacin",), "ciprofloxacin"),
    Scenario(MG, "order-sign", ("mg-sulfate",)),
    Scenario(MG, "patient-view"),
    Scenario(MG, "medication-prescribe", ("mg-oxide",), "stu3", shape="stu3"),
    Scenario(MG, "order-select", ("mg-oxide",), "sandbox", shape="sandbox"),
    Scenario(MG, "order-select", (), "nodrug", shape="sandbox-nodrug"),
    Scenario(MG, "order-select", ("mg-oxide",), "dstu2", shape="dstu2"),
    Scenario("ckd4-low-egfr", "order-select", ("mg-oxide",)),
    Scenario("ckd4-low-egfr", "order-select", ("ciprofloxacin",), "ciprofloxacin"),
    Scenario("ckd4-low-egfr", "patient-view"),
    Scenario("hashimoto-levothyroxine", "order-select", ("mg-oxide",)),
    Scenario("hashimoto-levothyroxine", "order-sign", ("mg-citrate", "mg-glycinate")),
    Scenario("rheumatoid-arthritis", "order-select", ("mg-oxide",)),
    Scenario("ciprofloxacin", "order-select", ("mg-oxide",)),
    Scenario("no-relevant", "order-select", ("mg-oxide",)),
    Scenario("no-relevant", "order-select", ("lisinopril",), "lisinopril"),
    Scenario("mg-inactive", "order-select", ("mg-oxide",)),
    Scenario(MG, "order-select", ("gentamicin",), "gentamicin"),
    Scenario(MG, "order-select", ("epsom-soak",), "epsom"),
    Scenario("hashimoto-levothyroxine", "order-select", ("mg-citrate",), "citrate"),
    Scenario("hashimoto-levothyroxine", "order-sign", ("mg-oxide-spaced",), "spaced"),
    Scenario("no-relevant", "order-select", ("mg-oxide-high",), "high-dose"),
    Scenario("egfr-75", "order-select", ("mg-oxide",)),
    Scenario("ckd3-egfr40", "order-select", ("mg-oxide",)),
    Scenario("ckd3-egfr40", "order-sign", ("mg-oxide",)),
    Scenario("esrd-dialysis", "order-select", ("mg-oxide",)),
    Scenario("esrd-dialysis", "order-sign", ("mg-sulfate",), "nolab"),
    Scenario("esrd-dialysis", "order-sign", ("mg-sulfate",), lab_orders=("serum-mg",)),
    Scenario("aki", "order-select", ("mg-oxide",)),
    Scenario("high-magnesium", "order-select", ("mg-oxide",)),
    Scenario("high-magnesium", "patient-view"),
    Scenario("sle", "order-select", ("mg-glycinate",)),
    Scenario("multiple-sclerosis", "order-select", ("mg-citrate",)),
    Scenario("multiple-sclerosis", "order-sign", ("mg-citrate",)),
    Scenario("fibromyalgia", "order-select", ("mg-malate",)),
    Scenario("ra-low-magnesium", "patient-view"),
    Scenario("doxycycline", "order-select", ("mg-oxide",)),
    Scenario("mg-supplement", "order-select", ("levofloxacin",), "levofloxacin"),
    # Review fixes: MG inferred from an MG-specific drug (no code) is only "possible"; coded
    # hypermagnesemia; eye drops are not systemic; order-select advises on the selection only
    # (the last order is the selected one).
    Scenario("pyridostigmine-uncoded", "order-select", ("mg-oxide",)),
    Scenario("pyridostigmine-uncoded", "order-sign", ("ciprofloxacin",), "ciprofloxacin"),
    Scenario("hypermagnesemia", "order-select", ("mg-oxide",)),
    Scenario(MG, "order-select", ("ciprofloxacin-eye",), "eye-drops"),
    Scenario(
        "ckd4-low-egfr", "order-select", ("mg-oxide", "ciprofloxacin"), "selected-ciprofloxacin"
    ),
    # Data age and identity: a patient recorded as deceased; an eGFR from 1978; references
    # by urn:uuid fullUrl; every Condition another patient's; a single IV dose.
    Scenario("deceased", "order-select", ("mg-oxide",)),
    Scenario("stale-egfr", "order-sign", ("mg-sulfate",)),
    Scenario(MG, "order-select", ("mg-oxide",), "urn-uuid", shape="urn-uuid"),
    Scenario(
        MG, "order-select", ("mg-oxide",), "conditions-of-another", shape="conditions-of-another"
    ),
    Scenario("esrd-dialysis", "order-sign", ("mg-sulfate-once",), "once"),
    # Real-world coding (issue 19): SNOMED CT descendants, product codes, brands, excipients.
    Scenario("mg-generalized", "order-select", ("mg-sulfate-code-only",), "iv-code-only"),
    Scenario(MG, "order-select", ("ciprofloxacin-code-only",), "cipro-code-only"),
    Scenario(MG, "order-select", ("ciprofloxacin-brand",), "cipro-brand"),
    Scenario(MG, "order-select", ("acetaminophen-stearate",), "stearate"),
    Scenario("levothyroxine-code-only", "order-select", ("mg-oxide",)),
    Scenario("hashimoto-levothyroxine", "order-select", ("rolaids",), "rolaids"),
    # Issue 20 (clinical precision): missed criticals, false criticals, autoimmune co-medication.
    Scenario("mg-remission", "order-sign", ("mg-sulfate",)),
    Scenario("mg-remission", "order-sign", ("mg-sulfate",), "noprefetch", prefetch=False),
    Scenario("lambert-eaton", "order-sign", ("mg-sulfate",)),
    Scenario("lambert-eaton", "order-select", ("mg-oxide",)),
    Scenario("no-relevant", "order-sign", ("mg-sulfate", "rocuronium"), "rocuronium"),
    Scenario(MG, "order-sign", ("plasma-lyte",), "plasma-lyte"),
    Scenario("esrd-dialysis", "order-sign", ("plasma-lyte",), "plasma-lyte"),
    Scenario("no-relevant", "order-select", ("plasma-lyte",), "plasma-lyte"),
    Scenario("preeclampsia", "order-sign", ("mg-sulfate",)),
    Scenario("preeclampsia", "patient-view"),
    Scenario("preeclampsia-no-magnesium", "order-select", ("mg-oxide",)),
    Scenario(MG, "order-select", ("multivitamin",), "multivitamin"),
    Scenario("mg-supplement", "order-select", ("delafloxacin",), "delafloxacin"),
    Scenario("mg-supplement", "order-select", ("omadacycline",), "omadacycline"),
    Scenario("mg-supplement", "order-select", ("gabapentin",), "gabapentin"),
    Scenario("mg-supplement", "order-select", ("digoxin",), "digoxin"),
    Scenario("sle", "order-sign", ("mg-sulfate",), "iv-magnesium"),
    Scenario("infant", "order-select", ("mg-citrate-infant",)),
    Scenario("no-relevant", "order-select", ("mg-citrate-laxative",), "laxative-course"),
    # An EHR that fires only order-sign calls magnesium-order-sign-only (same request shape).
    Scenario("multiple-sclerosis", "order-sign", ("mg-citrate",), "sign-only"),
)


def stable_uuid(name: str) -> str:
    """The same UUID for the same name on every run, so regenerating changes nothing."""
    return str(uuid.uuid5(_UUID_NAMESPACE, name))


def hook_instance(file_name: str) -> str:
    return stable_uuid(f"requests/{file_name}")


def _rxnorm_concept(product: Product) -> Resource:
    # A code-only order has no text or display; a text-only one no coding (FHIR forbids empty
    # strings and arrays).
    concept: Resource = {"text": product.text} if product.text else {}
    if product.codings:
        concept = {"coding": [{"system": RXNORM, "code": code,
                               **({"display": display} if display else {})}
                              for code, display in product.codings], **concept}
    return concept


def _dose_quantity(product: Product) -> Resource:
    value, unit, code = product.dose
    return {"value": value, "unit": unit, "system": UCUM, "code": code}


def r4_draft_order(product: Product, patient_id: str) -> Resource:
    dosage: Resource = {"text": product.sig}
    if product.patient_instruction:
        dosage["patientInstruction"] = product.patient_instruction
    dosage.update({
        "timing": {"repeat": dict(product.timing)},
        "route": ROUTES[product.route],
        "doseAndRate": [{"doseQuantity": _dose_quantity(product)}],
    })
    return {
        "resourceType": "MedicationRequest",
        "id": product.order_id,
        "status": "draft",
        "intent": "order",
        "category": [{"coding": [{"system": MR_CATEGORY, "code": product.category,
                                  "display": product.category.capitalize()}]}],
        "medicationCodeableConcept": _rxnorm_concept(product),
        "subject": {"reference": f"Patient/{patient_id}"},
        "authoredOn": AUTHORED_ON,
        "requester": {"reference": USER_ID},
        "dosageInstruction": [dosage],
    }


def r4_lab_order(name: str, patient_id: str) -> Resource:
    order_id, code, display = LAB_ORDERS[name]
    return {
        "resourceType": "ServiceRequest",
        "id": order_id,
        "status": "draft",
        "intent": "order",
        "code": {"coding": [{"system": LOINC, "code": code, "display": display}],
                 "text": "Serum magnesium"},
        "subject": {"reference": f"Patient/{patient_id}"},
        "authoredOn": AUTHORED_ON,
        "requester": {"reference": USER_ID},
    }


def stu3_draft_order(product: Product, patient_id: str) -> Resource:
    return {
        "resourceType": "MedicationRequest",
        "id": product.order_id,
        "status": "draft",
        "intent": "order",
        "medicationCodeableConcept": _rxnorm_concept(product),
        "subject": {"reference": f"Patient/{patient_id}"},
        # STU3 names the encounter `context`; this one is not in the fixture store.
        "context": {"reference": f"Encounter/{patient_id}-encounter-{AUTHORED_ON}",
                    "display": "Neurology outpatient visit"},
        "authoredOn": AUTHORED_ON,
        "requester": {"agent": {"reference": USER_ID}},
        "dosageInstruction": [{
            "text": product.sig,
            "timing": {"repeat": dict(product.timing)},
            "route": ROUTES[product.route],
            "doseQuantity": _dose_quantity(product),
        }],
    }


def _reference(resource: Resource) -> str:
    return f"{resource['resourceType']}/{resource['id']}"


def _collection(resources: list[Resource], patient_id: str) -> Resource:
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": "urn:uuid:" + stable_uuid(f"{patient_id}/{_reference(r)}"), "resource": r}
            for r in resources
        ],
    }


def _reason(store: FixtureStore, patient_id: str) -> Resource:
    """The sandbox copies the chosen condition's ``code`` as the order's reason."""
    search = parse_search("Condition", [("patient", patient_id), ("clinical-status", "active")])
    code: Resource = copy.deepcopy(store.search(search)[0]["code"])
    return code


def sandbox_draft_order(
    product: Product | None, patient_id: str, reason: Resource, dstu2: bool = False
) -> Resource:
    """A draft order as the public sandbox's Rx View builds it (not valid FHIR as it stands)."""
    order: Resource = {
        "resourceType": "MedicationOrder" if dstu2 else "MedicationRequest",
        "id": "order-123" if dstu2 else "request-123",
        "status": "draft",
    }
    if product is None:
        # Before a drug is chosen: no intent, no medication[x], no dose.
        order["subject"] = {"reference": f"Patient/{patient_id}"}
        order["authoredOn"] = AUTHORED_ON
        order["reasonCode"] = reason
        return order
    # The sandbox sets intent (and category below) for every FHIR version, DSTU2 included.
    order["intent"] = "order"
    order["patient" if dstu2 else "subject"] = {"reference": f"Patient/{patient_id}"}
    order["dateWritten" if dstu2 else "authoredOn"] = AUTHORED_ON
    dose = {"value": 1, "system": UCUM, "code": "{pill}"}
    repeat = {"frequency": 1, "period": 1, "periodUnits" if dstu2 else "periodUnit": "d"}
    dosage: Resource = {"timing": {"repeat": repeat}}
    if dstu2:
        dosage["doseQuantity"] = dose
    else:
        dosage["doseAndRate"] = [{"doseQuantity": dose}]
    order["dosageInstruction"] = [dosage]
    order["dispenseRequest"] = {
        "expectedSupplyDuration": {"value": 30, "unit": "days", "system": UCUM, "code": "d"},
    }
    order["category"] = {"coding": [{"system": MR_CATEGORY, "code": "community"}]}
    order["medicationCodeableConcept"] = {
        "text": product.text,
        "coding": [{"display": product.text, "system": RXNORM, "code": product.codings[0][0]}],
    }
    order["reasonCodeableConcept" if dstu2 else "reasonCode"] = reason
    return order


def _dstu2_query(query_url: str) -> str:
    """A DSTU2 server knows no `clinical-status` (it was added in STU3) and ignores it."""
    path, _, query = query_url.partition("?")
    params = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True)
              if k != "clinical-status"]
    return f"{path}?{urlencode(params, safe=':/,|')}" if query else path


def build_prefetch(scenario: Scenario, context: Resource, store: FixtureStore) -> Resource:
    prefetch: Resource = {}
    for key in PREFETCH_KEYS:
        query = render_template(key.template, context)
        convert: Callable[[Resource], Resource] | None
        if scenario.shape == "dstu2":
            if key.resource_type == "MedicationRequest":
                continue  # no such type in DSTU2: the sandbox drops the failed key
            answer = store.answer(_dstu2_query(query), FIXTURE_FHIR_SERVER)
            convert = to_dstu2
        else:
            answer = store.answer(query, FIXTURE_FHIR_SERVER)
            convert = to_stu3 if scenario.shape == "stu3" else None
        if convert is not None:
            is_bundle = answer["resourceType"] == "Bundle"
            answer = convert_searchset(answer, convert) if is_bundle else convert(answer)
        prefetch[key.name] = answer
    return prefetch


def build_request(scenario: Scenario, store: FixtureStore) -> Resource:
    patient_id = scenario.patient_id
    products = [PRODUCTS[name] for name in scenario.orders]
    sandbox = scenario.shape in ("sandbox", "sandbox-nodrug", "dstu2")
    context: Resource = {
        "userId": SANDBOX_USER_ID if sandbox else USER_ID,
        "patientId": patient_id,
    }
    if sandbox:
        reason = _reason(store, patient_id)
        dstu2 = scenario.shape == "dstu2"
        order = sandbox_draft_order(products[0] if products else None, patient_id, reason, dstu2)
        # The sandbox's Bundle has no `type` and its entries no `fullUrl`.
        context["draftOrders"] = {"resourceType": "Bundle", "entry": [{"resource": order}]}
        context["selections"] = [_reference(order)]
    elif scenario.shape == "stu3":
        context["medications"] = _collection(
            [stu3_draft_order(product, patient_id) for product in products], patient_id
        )
    elif scenario.hook in ("order-select", "order-sign"):
        orders = [r4_draft_order(product, patient_id) for product in products]
        labs = [r4_lab_order(name, patient_id) for name in scenario.lab_orders]
        context["draftOrders"] = _collection([*orders, *labs], patient_id)
        if scenario.hook == "order-select":
            # The order being worked on; any others in draftOrders were picked earlier.
            context["selections"] = [_reference(orders[-1])]

    request: Resource = {
        "hook": scenario.hook,
        "hookInstance": hook_instance(scenario.file_name),
        "fhirServer": FIXTURE_FHIR_SERVER,
    }
    if scenario.authorization:
        request["fhirAuthorization"] = {
            # Not a secret: the fixture server ignores it; tests check it is forwarded.
            "access_token": f"fixture-access-token-{patient_id}",
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/Patient.read patient/Condition.read "
            "patient/MedicationRequest.read patient/MedicationStatement.read "
            "patient/Observation.read",
            "subject": "magnesium-cds",
            "patient": patient_id,
        }
    request["context"] = context
    if scenario.prefetch:
        request["prefetch"] = build_prefetch(scenario, context, store)
    if scenario.shape == "urn-uuid":
        _bundle_internal_references(request)
    elif scenario.shape == "conditions-of-another":
        for entry in request["prefetch"]["conditions"]["entry"]:
            entry["resource"]["subject"] = {"reference": "Patient/another-patient"}
    return request


def _bundle_internal_references(request: Resource) -> None:
    """Name the patient by a ``urn:uuid:`` fullUrl, as transaction Bundles and Synthea do."""
    patient_id = request["context"]["patientId"]
    full_url = "urn:uuid:" + stable_uuid(f"{patient_id}/Patient/{patient_id}")
    prefetch = request["prefetch"]
    prefetch["patient"] = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"fullUrl": full_url, "resource": prefetch["patient"]}],
    }
    bundles = [value for key, value in prefetch.items() if key != "patient"]
    for bundle in [*bundles, request["context"]["draftOrders"]]:
        for entry in bundle.get("entry", []):
            resource = entry["resource"]
            if "subject" in resource:
                resource["subject"] = {"reference": full_url}
            entry["fullUrl"] = "urn:uuid:" + stable_uuid(f"{patient_id}/{_reference(resource)}")


def render(request: Resource) -> str:
    return json.dumps(request, indent=2, ensure_ascii=False) + "\n"


def build_all(store: FixtureStore | None = None) -> dict[str, str]:
    """File name → file text for every scenario."""
    store = store or FixtureStore.from_directory()
    files = {scenario.file_name: render(build_request(scenario, store)) for scenario in SCENARIOS}
    if len(files) != len(SCENARIOS):
        raise ValueError("two scenarios share a file name")
    return files


def default_output_dir() -> Path:
    return bundled_dir("fixtures") / "requests"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output directory")
    parser.add_argument("--check", action="store_true",
                        help="only report files that are missing, stale or unexpected")
    args = parser.parse_args(argv)
    out_dir: Path = args.out or default_output_dir()
    files = build_all()
    on_disk = {path.name for path in out_dir.glob("*.json")}
    stale = sorted(
        name for name, text in files.items()
        if name not in on_disk or (out_dir / name).read_text(encoding="utf-8") != text
    )
    unexpected = sorted(on_disk - files.keys())
    if args.check:
        for name in stale:
            print(f"out of date: {name}")
        for name in unexpected:
            print(f"not generated: {name}")
        return 1 if stale or unexpected else 0
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in stale:
        (out_dir / name).write_text(files[name], encoding="utf-8")
        print(f"wrote {out_dir / name}")
    for name in unexpected:
        print(f"warning: {name} is not generated by any scenario", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
