"""Typed, immutable views of the knowledge files.

Every fact keeps the evidence ``status`` of the reference ("verified", "secondary",
"unverified") and the ids of its sources, so that a card can say how well a number is
backed. Nothing here reads files; see ``loader.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from cds_service.fhir_types import Coding

# Evidence statuses, strongest first.
STATUSES = ("verified", "secondary", "unverified")

# Canonical code-system URIs. Aliases (OIDs, trailing slashes, https) are folded onto these
# in ``normalise_system``; they are interoperability constants, not clinical knowledge.
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ATC = "http://www.whocc.no/atc"
LOINC = "http://loinc.org"

_SYSTEM_ALIASES: dict[str, str] = {
    "http://hl7.org/fhir/sid/icd-10-cm": ICD10CM,
    "urn:oid:2.16.840.1.113883.6.90": ICD10CM,
    "http://hl7.org/fhir/sid/icd-10": ICD10,
    "urn:oid:2.16.840.1.113883.6.3": ICD10,
    "http://terminology.hl7.org/codesystem/icd10": ICD10,
    "http://snomed.info/sct": SNOMED,
    "urn:oid:2.16.840.1.113883.6.96": SNOMED,
    "http://www.nlm.nih.gov/research/umls/rxnorm": RXNORM,
    "urn:oid:2.16.840.1.113883.6.88": RXNORM,
    "http://www.whocc.no/atc": ATC,
    "urn:oid:2.16.840.1.113883.6.73": ATC,
    "http://loinc.org": LOINC,
    "urn:oid:2.16.840.1.113883.6.1": LOINC,
}


def normalise_system(system: str) -> str | None:
    """The canonical URI for ``system``, or None when it is not a system we index."""
    key = system.strip().lower().rstrip("/")
    if key.startswith("https://"):
        key = "http://" + key[len("https://") :]
    return _SYSTEM_ALIASES.get(key)


class KnowledgeError(ValueError):
    """A knowledge file is missing, malformed or contradicts another.

    The message always starts with the file name and the JSON path of the entry, e.g.
    ``conditions.json: $.groups[3].snomed[0].code: '12x' does not match ...``.
    """


class _Cited:
    """``sources`` reads the same as ``source_ids``: both spellings are in use."""

    source_ids: tuple[str, ...]

    @property
    def sources(self) -> tuple[str, ...]:
        return self.source_ids


@dataclass(frozen=True)
class EvidenceSource:
    id: str
    title: str
    status: str
    url: str | None = None
    note: str = ""


@dataclass(frozen=True)
class Guidance(_Cited):
    text: str
    status: str
    source_ids: tuple[str, ...]
    id: str = ""  # set where a rule quotes one statement by name


@dataclass(frozen=True)
class CodeEntry:
    """One code of a value set, with its evidence status."""

    system: str
    code: str  # ICD-10 normalised (upper case, no dot)
    display: str
    status: str
    match: str = "exact"  # "prefix" | "exact"
    note: str = ""
    route: str | None = None  # ATC entries: the route the class implies (B05XA -> parenteral)


@dataclass(frozen=True)
class ConditionGroup(_Cited):
    id: str
    display: str
    category: str  # neuromuscular | renal | autoimmune | thyroid | musculoskeletal | ...
    autoimmune: bool
    renal_severity: str | None  # "moderate" | "severe" | None
    codes: tuple[CodeEntry, ...]
    source_ids: tuple[str, ...]
    guidance: tuple[Guidance, ...] = ()
    note: str = ""
    # Still counts while inactive or in remission (a contraindication for a known diagnosis).
    counts_while_inactive: bool = False


@dataclass(frozen=True)
class Ingredient:
    code: str | None  # RxNorm ingredient; None when only the name is known
    name: str
    status: str
    text_synonyms: tuple[str, ...]  # words used for last-resort text matching
    group: str  # drug group id
    note: str = ""
    # Status of the claim that this drug is specific to myasthenia gravis therapy (so that it
    # stands for an uncoded diagnosis); None: it has other common uses and implies nothing.
    implies_myasthenia: str | None = None


@dataclass(frozen=True)
class DrugEffect(_Cited):
    # chelation | aggravates-myasthenia | myasthenia-therapy | antagonised-by-magnesium |
    # potentiated-by-iv-magnesium
    kind: str
    text: str
    status: str
    source_ids: tuple[str, ...]
    indicator: str | None = None  # what the label's wording warrants; None: the rule's default


@dataclass(frozen=True)
class DrugGroup(_Cited):
    id: str
    display: str
    ingredients: tuple[Ingredient, ...]
    effects: tuple[DrugEffect, ...]
    source_ids: tuple[str, ...]
    atc_prefixes: tuple[CodeEntry, ...] = ()
    note: str = ""

    @property
    def ingredient_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.ingredients)

    def effect(self, kind: str) -> DrugEffect | None:
        return next((e for e in self.effects if e.kind == kind), None)


@dataclass(frozen=True)
class ElementalFraction:
    form: str  # heptahydrate | anhydrous | hexahydrate ...
    fraction: float
    status: str
    default: bool
    routes: tuple[str, ...]
    note: str = ""


@dataclass(frozen=True)
class MagnesiumProduct:
    code: str  # RxNorm clinical drug
    name: str
    salt: str
    route: str
    dose_form: str | None
    strength_mg: float
    strength_per: str | None  # tablet | capsule | mL | g | None (not known)
    strength_basis: str  # "salt" | "elemental"
    status: str
    note: str = ""
    form: str | None = None  # the salt form it is made of, when not the salt's default


@dataclass(frozen=True)
class FormUse(_Cited):
    """What the clinical source says a salt suits in autoimmune disease."""

    fit: str  # "preferred" | "short-term-only" | "topical-only"
    aims: tuple[str, ...]
    summary: str  # a few words for a card summary
    text: str
    status: str
    source_ids: tuple[str, ...]

    @property
    def poor_oral_fit(self) -> bool:
        return self.fit != "preferred"


@dataclass(frozen=True)
class MagnesiumSalt(_Cited):
    id: str
    display: str
    text_only: bool
    ingredient_codes: tuple[str, ...]
    fractions: tuple[ElementalFraction, ...]
    products: tuple[MagnesiumProduct, ...]
    atc: tuple[CodeEntry, ...]
    synonyms: tuple[str, ...]
    source_ids: tuple[str, ...]
    note: str = ""
    autoimmune_use: FormUse | None = None

    def fraction_for(self, route: str | None, form: str | None = None) -> ElementalFraction | None:
        """Named form first, then the fraction for the route, then the default."""
        if form:
            named = next((f for f in self.fractions if f.form == form), None)
            if named:
                return named
        if route:
            by_route = next((f for f in self.fractions if route in f.routes), None)
            if by_route:
                return by_route
        return next((f for f in self.fractions if f.default), None)


@dataclass(frozen=True)
class MagnesiumMatch:
    """What a medication is, as far as magnesium goes.

    ``strength_mg`` is mg of the salt per ``strength_unit`` as named by RxNorm, so
    ``strength_mg * elemental_fraction`` is elemental magnesium per unit. Where RxNorm states
    the strength as elemental magnesium already (``MagnesiumProduct.strength_basis``), the
    fraction is 1.0 so that the same product stays right.
    """

    salt: str | None
    salt_display: str
    product_code: str | None
    route: str | None  # "oral" | "parenteral" | "topical" | None
    strength_mg: float | None
    strength_unit: str | None  # "tablet", "mL", ...
    elemental_fraction: float | None
    matched_by: str  # "rxnorm-product" | "rxnorm-ingredient" | "atc" | "text"
    matched_value: str
    multi_ingredient: bool

    @property
    def elemental_mg_per_unit(self) -> float | None:
        if self.strength_mg is None or self.elemental_fraction is None:
            return None
        return self.strength_mg * self.elemental_fraction


@dataclass(frozen=True)
class Interaction(_Cited):
    """A chelation interaction between oral magnesium and another oral drug.

    The other drug should be taken at least ``hours_before`` hours before magnesium, or at
    least ``hours_after`` (up to ``hours_after_max`` for ranges such as 4-6 h) after it.
    None means no verified figure: say "separate as the label directs".
    """

    drug_group: str
    ingredient_code: str | None  # None for the group-wide entry
    ingredient_name: str | None
    hours_before: float | None
    hours_after: float | None
    hours_after_max: float | None
    text: str
    status: str
    source_ids: tuple[str, ...]
    magnesium_routes: tuple[str, ...] = ("oral",)
    note: str = ""


@dataclass(frozen=True)
class Lookback(_Cited):
    """How old a lab result may be and still raise a card to critical."""

    days: float
    status: str
    source_ids: tuple[str, ...]
    note: str = ""


@dataclass(frozen=True)
class LabGroup(_Cited):
    id: str  # serum-magnesium | egfr | creatinine
    display: str
    codes: tuple[CodeEntry, ...]
    source_ids: tuple[str, ...]
    lookback: Lookback
    units: tuple[tuple[str, str], ...] = ()  # (code, unit) where the code implies a unit

    def unit_for(self, code: str) -> str | None:
        return next((unit for c, unit in self.units if c == code), None)


@dataclass(frozen=True)
class UnitConversion(_Cited):
    unit: str
    aliases: tuple[str, ...]
    divide_by: float  # value in this unit / divide_by = mmol/L
    status: str
    source_ids: tuple[str, ...]


@dataclass(frozen=True)
class ThresholdBand:
    """One row of a banded threshold: ``low``/``age_min`` inclusive, ``high``/``age_max`` not."""

    id: str
    label: str
    value: float | None = None
    low: float | None = None
    high: float | None = None
    age_min: float | None = None
    age_max: float | None = None
    sex: str | None = None  # "male" | "female" | None (both)

    def contains(self, x: float) -> bool:
        return (self.low is None or x >= self.low) and (self.high is None or x < self.high)

    def applies_to(self, age: float | None, sex: str | None = None) -> bool:
        if age is not None:
            if self.age_min is not None and age < self.age_min:
                return False
            if self.age_max is not None and age >= self.age_max:
                return False
        elif self.age_min is not None or self.age_max is not None:
            return False
        return self.sex is None or sex is None or self.sex == sex


@dataclass(frozen=True)
class Threshold(_Cited):
    id: str
    display: str
    unit: str
    status: str
    source_ids: tuple[str, ...]
    value: float | None = None
    low: float | None = None  # inclusive
    high: float | None = None  # exclusive
    bands: tuple[ThresholdBand, ...] = ()
    note: str = ""

    def band_for_value(self, x: float) -> ThresholdBand | None:
        return next((b for b in self.bands if b.contains(x)), None)

    def band_for(self, age: float | None, sex: str | None = None) -> ThresholdBand | None:
        """The band for a patient; with sex unknown, the lowest matching value (safer)."""
        matching = [b for b in self.bands if b.applies_to(age, sex)]
        if not matching:
            return None
        with_values = [b for b in matching if b.value is not None]
        return min(with_values, key=lambda b: b.value or 0.0) if with_values else matching[0]


@dataclass(frozen=True)
class RuleInfo(_Cited):
    id: str
    title: str
    description: str
    indicator: str  # info | warning | critical
    source_ids: tuple[str, ...]
    override_reasons: tuple[Coding, ...]
    guidance: tuple[Guidance, ...] = ()

    def statement(self, guidance_id: str) -> Guidance:
        """One of the rule's quoted statements, by id (KeyError names it when missing)."""
        for item in self.guidance:
            if item.id == guidance_id:
                return item
        raise KeyError(f"rule {self.id!r} has no guidance {guidance_id!r}")


@dataclass(frozen=True)
class GeneratedProduct:
    """An RxNorm product concept (SCD, SBD, pack...) and what it contains, from the generated
    ``terminology/rxnorm-products.json``. ``magnesium``: (salt id, mg of salt per ``per`` or
    None when the sources disagree, per "unit" | "mL" | None)."""

    rxcui: str
    ingredients: tuple[str, ...]  # ingredient names of the drug groups
    magnesium: tuple[tuple[str, float | None, str | None], ...]
    multi_ingredient: bool
    route: str | None = None  # "oral" | "parenteral" | "topical" when the sources agree


@dataclass(frozen=True)
class BrandName:
    """A brand name (lower case) and the ingredients most of its products contain."""

    phrase: str
    ingredients: tuple[str, ...]
    magnesium: tuple[str, ...]  # salt ids
    multi_ingredient: bool


@dataclass(frozen=True)
class Terminology:
    """Generated terminology merged into the curated groups at load time."""

    products: tuple[GeneratedProduct, ...] = ()
    brands: tuple[BrandName, ...] = ()
    # (descendant or related SNOMED CT code, the concept a condition group names)
    snomed: tuple[tuple[str, str], ...] = ()
