"""Facts several rules derive from the clinical picture, each computed in exactly one place.

- ``daily_elemental_mg``: elemental magnesium per day of an order (strength x elemental
  fraction x dose quantity x frequency), or why it cannot be known.
- ``serum_magnesium``: the latest serum magnesium in mmol/L against its reference range (the
  Observation's own when present, else the knowledge default), with high / low / toxic.
- ``is_recent`` and ``serum_magnesium_ordered``: whether a new serum magnesium is needed.
- ``kidney_function``: severe / moderate impairment from coded conditions and the latest eGFR.
- ``autoimmune_related``: the conditions for which magnesium guidance applies.

Every number comes from the knowledge base; the unit spellings below are UCUM and FHIR
interoperability vocabulary, not clinical facts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from cds_service.context.model import Dose, Lab, LabOrder, Quantity
from cds_service.knowledge import Ingredient, Knowledge, MagnesiumMatch, ThresholdBand
from cds_service.knowledge.model import ConditionGroup
from cds_service.rules.describe import (
    condition_evidence,
    lab_text,
    lab_value_text,
    lab_when,
    medication_evidence,
    mid_sentence,
    order_text,
    short_display,
)
from cds_service.rules.findings import Evidence
from cds_service.rules.picture import ClinicalPicture, ConditionFact, MedicationFact

# Dose units: a count of the product's units, a mass, or a volume.
_COUNT_UNITS = frozenset(
    {
        "{pill}", "{pills}", "{tbl}", "{tablet}", "{tablets}", "{tab}", "{capsule}", "{cap}",
        "{caplet}", "{count}", "{each}", "1", "pill", "pills", "tablet", "tablets", "tab",
        "tabs", "capsule", "capsules", "cap", "caps", "caplet", "caplets", "each",
    }
)  # fmt: skip
_MG_PER_UNIT = {"mg": 1.0, "g": 1000.0, "ug": 0.001, "mcg": 0.001}
_ML_PER_UNIT = {"ml": 1.0, "l": 1000.0}
_COUNTABLE = frozenset({"tablet", "capsule", "unit"})  # strength_per values ("unit": per 1)
_SEVERITY_RANK = {None: 0, "moderate": 1, "severe": 2}
_INACTIVE_LAB_ORDER = frozenset({"revoked", "entered-in-error", "completed"})
# Observation.interpretation codes for "high" (HL7 v3 ObservationInterpretation, the same codes
# in STU3's v2 table 0078): high, critically high, significantly high. FHIR vocabulary.
HIGH_INTERPRETATION = frozenset({"H", "HH", "HU"})
# Condition categories that get autoimmune magnesium guidance besides autoimmune groups
# (the clinical source names fibromyalgia; absorption disorders impair uptake).
GUIDANCE_CATEGORIES = frozenset({"musculoskeletal", "absorption"})


def is_systemic_magnesium(fact: MedicationFact) -> bool:
    """Magnesium that reaches the blood stream: any route but topical (a soak or cream) or
    local (eye, ear, nose, airway), which the knowledge's route vocabulary folds into topical."""
    return fact.is_magnesium and fact.route != "topical"


# ---------------------------------------------------------------------------- dose


@dataclass(frozen=True)
class DailyDose:
    elemental_mg: float | None  # None: unknown
    how: str  # the working, or why it is unknown

    @property
    def known(self) -> bool:
        return self.elemental_mg is not None


def daily_elemental_mg(fact: MedicationFact) -> DailyDose:
    """Elemental magnesium per day: salt per administration x fraction x administrations/day.

    Conservative: any factor the data do not state makes the whole dose unknown, so that no
    card rests on a guessed dose.
    """
    total, why, salts_mg = _daily_total(fact)
    if total is None:
        return DailyDose(None, why)
    # Known: every factor below is stated (``_daily_total`` checked them).
    match = fact.magnesium
    assert match is not None and match.elemental_fraction is not None
    fraction = match.elemental_fraction
    parts: list[str] = []
    for dose, salt_mg in zip(fact.medication.doses, salts_mg, strict=True):
        per_day = _administrations_per_day(dose, fact)
        assert dose.quantity is not None and per_day is not None
        amount = f"{dose.quantity.value:g} {dose.quantity.unit}".strip()
        per_dose = "" if amount == f"{salt_mg:g} mg" else f" = {salt_mg:g} mg"
        once = dose.once or dose.frequency_per_day is None
        parts.append(f"{amount}{per_dose} {'once' if once else f'x {per_day:g}/day'}")
    basis = (
        "stated as elemental magnesium"
        if fraction == 1.0
        else f"x {fraction * 100:.1f}% elemental magnesium in {match.salt_display.lower()}"
    )
    return DailyDose(total, f"{' + '.join(parts)} {basis} = {total:.0f} mg elemental/day")


def daily_elemental_mg_value(fact: MedicationFact) -> float | None:
    """``daily_elemental_mg(fact).elemental_mg`` without writing out the working (most of the
    cost), for rules that only compare the number."""
    return _daily_total(fact)[0]


def _daily_total(fact: MedicationFact) -> tuple[float | None, str, tuple[float, ...]]:
    """(elemental mg/day, "", mg of product per dose) or (None, why it is unknown, ()): the one
    computation of the dose."""
    match = fact.magnesium
    if match is None:
        return None, "not a magnesium product", ()
    fraction = match.elemental_fraction
    if fraction is None:
        return (
            None,
            f"dose unknown: the elemental magnesium content of {match.salt_display.lower()} "
            "is not known",
            (),
        )
    doses = fact.medication.doses
    if not doses:
        return None, "dose unknown: the order has no dosage instruction", ()
    total = 0.0
    salts_mg: list[float] = []
    for dose in doses:
        if dose.quantity is None:
            return None, "dose unknown: no dose quantity", ()
        per_day = _administrations_per_day(dose, fact)
        if per_day is None:
            return None, "dose unknown: no dose frequency", ()
        salt_mg, why = _product_mg(dose.quantity, match)
        if salt_mg is None:
            return None, f"dose unknown: {why}", ()
        salts_mg.append(salt_mg)
        total += salt_mg * fraction * per_day
    if not math.isfinite(total):
        # Finite inputs can still overflow (e.g. 1e308 g x 1000/day): not a dose to reason on.
        return None, "dose unknown: the stated amounts are out of any plausible range", ()
    return total, "", tuple(salts_mg)


def _administrations_per_day(dose: Dose, fact: MedicationFact) -> float | None:
    """A single dose is one administration: stated (count 1), or a parenteral order with no
    timing at all (a one-off infusion or injection is written so)."""
    if dose.frequency_per_day is not None:
        return dose.frequency_per_day
    if dose.untimed and fact.route == "parenteral":
        return 1.0
    return None


def _product_mg(quantity: Quantity, match: MagnesiumMatch) -> tuple[float | None, str]:
    """Milligrams of product (as RxNorm states its strength) in one administration."""
    unit = quantity.unit.strip().lower()
    if unit in _MG_PER_UNIT:
        return quantity.value * _MG_PER_UNIT[unit], ""
    if match.strength_mg is None:
        return None, "the product's strength is not known"
    if unit in _COUNT_UNITS:
        if match.strength_unit not in _COUNTABLE:
            return None, f"a count of units, but the strength is per {match.strength_unit}"
        return quantity.value * match.strength_mg, ""
    if unit in _ML_PER_UNIT:
        if match.strength_unit != "mL":
            return None, f"a volume, but the strength is per {match.strength_unit}"
        return quantity.value * _ML_PER_UNIT[unit] * match.strength_mg, ""
    return None, f"dose unit {quantity.unit!r} not understood" if unit else "no dose unit"


# ---------------------------------------------------------------------------- serum magnesium


@dataclass(frozen=True)
class SerumMagnesium:
    """The latest serum magnesium, in mmol/L, against its reference range."""

    lab: Lab
    mmol: float | None  # None: the unit is not one we can convert
    low: float | None  # reference range, mmol/L
    high: float | None
    range_text: str  # e.g. "reference range 1.6-2.6 mg/dL"
    toxic_above: float | None  # mmol/L above which reflexes weaken

    @property
    def is_high(self) -> bool:
        """Above the range, or toxic whatever the range says, or (when no number decides,
        e.g. a unit we cannot convert) flagged high by the laboratory."""
        if self.is_toxic:
            return True
        if self.mmol is not None and self.high is not None:
            return self.mmol > self.high
        return self.flagged_high

    @property
    def high_reason(self) -> str:
        """Why the value counts as high, for a sentence: 'above the default reference range'."""
        if self.mmol is not None and self.high is not None and self.mmol > self.high:
            return f"above the {self.range_text}"
        if self.is_toxic:
            return "above the level at which reflexes begin to diminish"
        return "flagged high by the laboratory"

    @property
    def flagged_high(self) -> bool:
        return any(c.code.strip() in HIGH_INTERPRETATION for c in self.lab.interpretation)

    @property
    def is_low(self) -> bool:
        return self.mmol is not None and self.low is not None and self.mmol < self.low

    @property
    def is_toxic(self) -> bool:
        return (
            self.mmol is not None and self.toxic_above is not None and self.mmol > self.toxic_above
        )

    @property
    def value_text(self) -> str:
        """'2.7 mg/dL', '1.30 mmol/L' (rounded as read), for summaries."""
        return lab_value_text(self.lab, "serum-magnesium")

    @property
    def describe(self) -> str:
        """'Serum magnesium 2.7 mg/dL on 2026-11-18 (high)': value, date, and where it stands."""
        value = lab_value_text(self.lab, "serum-magnesium")
        text = f"Serum magnesium {value} {lab_when(self.lab)}"
        if self.is_toxic:
            assert self.toxic_above is not None  # is_toxic compares with it
            # mEq/L = 2 x mmol/L for a divalent ion: the label's unit.
            text += f", above {2 * self.toxic_above:g} mEq/L, where reflexes begin to diminish"
        elif self.is_high:  # the range itself is on the explanation page and in provenance
            text += " (high)"
        elif self.is_low:
            text += " (low)"
        elif self.mmol is None:
            text += " (unit not understood)"
        return text

    @property
    def evidence(self) -> Evidence:
        return Evidence(self.describe, self.lab.source, self.lab.codings[:1])


def serum_magnesium(picture: ClinicalPicture, knowledge: Knowledge) -> SerumMagnesium | None:
    fact = picture.latest_lab("serum-magnesium")
    if fact is None or fact.lab.value is None:
        return None
    lab = fact.lab
    value = lab.value
    assert value is not None
    unit = value.unit or _implied_unit(lab, knowledge)
    mmol = knowledge.to_mmol_per_l(value.value, unit) if unit else None
    low, high, range_text = _reference_range(lab, unit, knowledge)
    return SerumMagnesium(lab, mmol, low, high, range_text, _serum_defaults(knowledge).toxic_above)


@dataclass(frozen=True)
class _SerumDefaults:
    """The knowledge's serum magnesium figures in mmol/L, converted once per knowledge."""

    low: float | None  # default reference range
    high: float | None
    toxic_above: float | None


@lru_cache(maxsize=8)  # keyed by the (immutable) knowledge: one entry per loaded knowledge
def _serum_defaults(knowledge: Knowledge) -> _SerumDefaults:
    default = knowledge.threshold("serum-magnesium-reference-range")
    d_low = knowledge.to_mmol_per_l(default.low, default.unit) if default.low is not None else None
    d_high = (
        knowledge.to_mmol_per_l(default.high, default.unit) if default.high is not None else None
    )
    toxic = knowledge.threshold("serum-magnesium-reflexes-diminish")
    toxic_above = knowledge.to_mmol_per_l(toxic.value, toxic.unit) if toxic.value else None
    return _SerumDefaults(d_low, d_high, toxic_above)


def _implied_unit(lab: Lab, knowledge: Knowledge) -> str:
    group = knowledge.lab_group("serum-magnesium")
    return next((u for c in lab.codings if (u := group.unit_for(c.code))), "")


def _reference_range(
    lab: Lab, unit: str, knowledge: Knowledge
) -> tuple[float | None, float | None, str]:
    """The Observation's own range where it states a usable bound; a missing bound (a range
    with only a low limit is common) comes from the knowledge default, and the text says so."""
    default = knowledge.threshold("serum-magnesium-reference-range")
    defaults = _serum_defaults(knowledge)
    d_low, d_high = defaults.low, defaults.high
    for item in lab.reference_ranges:
        low = _to_mmol(item.low, unit, knowledge)
        high = _to_mmol(item.high, unit, knowledge)
        if low is None and high is None:
            continue
        if low is not None and high is not None:
            assert item.low is not None and item.high is not None
            shown = f"{item.low.value:g}-{item.high.value:g} {item.high.unit or unit}"
            return low, high, f"result's reference range {shown}"
        if low is not None:
            assert item.low is not None
            text = (
                f"result's reference range (low {item.low.value:g} {item.low.unit or unit}; "
                f"high {default.high:g} {default.unit} from the default range)"
            )
            return low, d_high, text
        assert item.high is not None
        text = (
            f"result's reference range (high {item.high.value:g} {item.high.unit or unit}; "
            f"low {default.low:g} {default.unit} from the default range)"
        )
        return d_low, high, text
    return d_low, d_high, f"default reference range {default.low:g}-{default.high:g} {default.unit}"


def _to_mmol(quantity: Quantity | None, unit: str, knowledge: Knowledge) -> float | None:
    if quantity is None:
        return None
    return knowledge.to_mmol_per_l(quantity.value, quantity.unit or unit)


def is_recent(picture: ClinicalPicture, knowledge: Knowledge, lab: Lab) -> bool:
    """Within the knowledge's recency window (a local policy value) before today."""
    if lab.effective is None:
        return False
    window = knowledge.threshold("serum-magnesium-recent-days").value or 0.0
    return (picture.today - lab.effective.date()).days <= window


def recency_window_days(knowledge: Knowledge) -> float:
    return knowledge.threshold("serum-magnesium-recent-days").value or 0.0


def serum_magnesium_ordered(picture: ClinicalPicture, knowledge: Knowledge) -> LabOrder | None:
    """A serum magnesium test already among this hook's draft orders."""
    return next(
        (
            order
            for order in picture.context.draft_lab_orders
            if order.status not in _INACTIVE_LAB_ORDER
            and knowledge.lab_kind(order.codings) == "serum-magnesium"
        ),
        None,
    )


# ---------------------------------------------------------------------------- kidneys


@dataclass(frozen=True)
class KidneyFunction:
    severity: str | None  # "severe" | "moderate" | None (no impairment known)
    conditions: tuple[ConditionFact, ...]  # renal conditions that count
    egfr: Lab | None  # the latest eGFR
    egfr_band: ThresholdBand | None  # its band in egfr-renal-impairment
    kdigo: ThresholdBand | None  # its KDIGO category
    # The knowledge's name for the worst coded renal condition: bounded, unlike the EHR's text.
    condition_display: str | None = None

    @property
    def label(self) -> str:
        """Short wording for mid-sentence: 'chronic kidney disease stage 4, eGFR 22'."""
        condition = self.condition_display
        parts = [mid_sentence(short_display(condition))] if condition else []
        if self.egfr is not None and self.egfr.value is not None:
            parts.append(f"eGFR {lab_value_text(self.egfr, 'egfr').split(' ')[0]}")
        return ", ".join(parts) or "reduced kidney function"

    @property
    def evidence(self) -> tuple[Evidence, ...]:
        items = [condition_evidence(f.condition) for f in self.conditions]
        if self.egfr is not None:
            text = lab_text(self.egfr, "eGFR", "egfr")
            items.append(Evidence(text, self.egfr.source, self.egfr.codings[:1]))
        return tuple(items)


def kidney_function(picture: ClinicalPicture, knowledge: Knowledge) -> KidneyFunction:
    """The worse of coded renal conditions and the latest eGFR's band."""
    latest = picture.latest_lab("egfr")
    egfr = latest.lab if latest is not None else None
    egfr_band = kdigo = None
    if egfr is not None and egfr.value is not None:
        egfr_band, kdigo = _egfr_bands(knowledge, egfr.value.value)
    severity: str | None = egfr_band.id if egfr_band else None
    graded = egfr is not None and egfr.value is not None
    renal: list[ConditionFact] = []
    for fact in picture.conditions:
        renal_groups = _renal_groups(knowledge, fact.groups)
        if not renal_groups:
            continue
        renal.append(fact)
        for group in renal_groups:
            # A CKD code without a stage is graded by the eGFR; without one it counts as moderate.
            coded = group.renal_severity or (None if graded else "moderate")
            if _SEVERITY_RANK[coded] > _SEVERITY_RANK[severity]:
                severity = coded
    renal.sort(key=lambda f: -max(_rank_of(knowledge, g) for g in f.groups))
    display = None
    if renal:
        groups = [knowledge.condition_group(g) for g in sorted(renal[0].groups)]
        worst = max(
            (g for g in groups if g.category == "renal"),
            key=lambda g: _SEVERITY_RANK[g.renal_severity],
        )
        display = worst.display
    return KidneyFunction(severity, tuple(renal), egfr, egfr_band, kdigo, display)


# Pure look-ups on the immutable knowledge, memoised: an eGFR value and a condition's set of
# groups recur from call to call; the bound keeps odd input from growing the memo.
@lru_cache(maxsize=1024)
def _egfr_bands(
    knowledge: Knowledge, egfr: float
) -> tuple[ThresholdBand | None, ThresholdBand | None]:
    """The eGFR's band in egfr-renal-impairment and its KDIGO category."""
    return (
        knowledge.threshold("egfr-renal-impairment").band_for_value(egfr),
        knowledge.threshold("kdigo-gfr-categories").band_for_value(egfr),
    )


@lru_cache(maxsize=1024)
def _renal_groups(knowledge: Knowledge, group_ids: frozenset[str]) -> tuple[ConditionGroup, ...]:
    """A condition's renal groups, in group id order."""
    groups = [knowledge.condition_group(g) for g in sorted(group_ids)]
    return tuple(g for g in groups if g.category == "renal")


def _rank_of(knowledge: Knowledge, group_id: str) -> int:
    return _SEVERITY_RANK[knowledge.condition_group(group_id).renal_severity]


# ---------------------------------------------------------------------------- autoimmunity


def autoimmune_related(
    picture: ClinicalPicture, knowledge: Knowledge, *, neuromuscular: bool = True
) -> tuple[tuple[ConditionFact, ConditionGroup], ...]:
    """Conditions (with their group) for which the clinical source's guidance applies:
    autoimmune groups plus the related categories above; ``neuromuscular=False`` leaves out
    myasthenia and Lambert-Eaton, where magnesium is a contraindication, not a choice."""
    found: list[tuple[ConditionFact, ConditionGroup]] = []
    for fact in picture.conditions:
        for group_id in sorted(fact.groups):
            group = knowledge.condition_group(group_id)
            if not (group.autoimmune or group.category in GUIDANCE_CATEGORIES):
                continue
            if not neuromuscular and group.category == "neuromuscular":
                continue
            found.append((fact, group))
            break
    return tuple(found)


# ---------------------------------------------------------------------------- wording


def ingredient_in(fact: MedicationFact, knowledge: Knowledge, group_id: str) -> Ingredient | None:
    """The ingredient that put this medication in ``group_id`` (codes before text)."""
    medication = fact.medication
    found = knowledge.matched_ingredients(medication.all_codings, medication.text)
    return next((i for i in found if i.group == group_id), None)


def ingredient_key(ingredient: Ingredient | None) -> str | None:
    """What ``Knowledge.interaction_for`` takes: the RxNorm code, else the name."""
    return (ingredient.code or ingredient.name) if ingredient is not None else None


def magnesium_name(fact: MedicationFact) -> str:
    """'Magnesium oxide'; the order's own name when the salt is not known."""
    match = fact.magnesium
    if match is not None and match.salt is not None:
        return match.salt_display
    return fact.medication.display


def order_evidence(fact: MedicationFact, *, with_dose: bool = True) -> Evidence:
    """'Ordered: magnesium oxide 400 mg oral tablet, 1 tablet twice a day (482 mg elemental
    magnesium a day)'; 'On file: ...' for one already taken."""
    prefix = "Ordered: " if fact.medication.is_draft else "On file: "
    text = prefix + order_text(fact)
    if with_dose and fact.is_magnesium:
        daily = daily_elemental_mg_value(fact)
        if daily is not None:
            single = all(dose.once for dose in fact.medication.doses)
            text += f" ({daily:.0f} mg elemental magnesium{'' if single else ' a day'})"
    return medication_evidence(fact, text)
