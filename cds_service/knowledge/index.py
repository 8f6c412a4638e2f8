"""The indexed knowledge the rules query.

Built once per process by ``loader.load_knowledge``; after that every code look-up is a dict
or set hit. ICD-10 prefix matching tries each prefix length of the patient's code against a
dict of prefixes (O(len(code))), never a scan of all prefixes. Text matching, the last
resort, uses one compiled regular expression per vocabulary.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from cds_service.fhir_types import Coding
from cds_service.knowledge.model import (
    ATC,
    ICD10,
    ICD10CM,
    LOINC,
    RXNORM,
    SNOMED,
    ConditionGroup,
    DrugGroup,
    EvidenceSource,
    Ingredient,
    Interaction,
    LabGroup,
    MagnesiumMatch,
    MagnesiumProduct,
    MagnesiumSalt,
    RuleInfo,
    Terminology,
    Threshold,
    UnitConversion,
    normalise_system,
)

_ICD_SYSTEMS = (ICD10CM, ICD10)
# Routes the rules tell apart: a local route (eye, ear, nose, airway) is not systemic and does
# not reach the gut, exactly like a topical one.
_LOCAL_AS = {"local": "topical"}
_T = TypeVar("_T")
_NOT_ALNUM = re.compile(r"[^A-Z0-9]")


def normalise_icd(code: str) -> str:
    """'g70.01 ' -> 'G7001': upper case, dot and spaces dropped."""
    return _NOT_ALNUM.sub("", code.upper())


def _alternatives(phrases: Iterable[str]) -> str:
    """A regex alternation of phrases, longest first, spaces and hyphens matching either."""
    return "|".join(
        r"[\s\-]+".join(re.escape(token) for token in re.split(r"[\s\-]+", phrase))
        for phrase in sorted(set(phrases), key=lambda p: (-len(p), p))
    )


def _salt_names(salt: MagnesiumSalt) -> list[str]:
    return [phrase for phrase in salt.synonyms if phrase.startswith("magnesium")]


class _PhraseMatcher:
    """Finds whole-word, case-insensitive occurrences of known phrases in free text.

    Spaces and hyphens inside a phrase match any run of spaces or hyphens ("mag-ox" finds
    "Mag Ox"); longer phrases win at the same position ("magnesium citrate" over "magnesium").
    """

    def __init__(self, phrases: Iterable[str]) -> None:
        unique = sorted(set(phrases), key=lambda p: (-len(p), p))
        self._pattern: re.Pattern[str] | None = None
        if unique:
            alternatives = "|".join(
                r"[\s\-]+".join(re.escape(token) for token in re.split(r"[\s\-]+", phrase))
                for phrase in unique
            )
            self._pattern = re.compile(rf"(?<![a-z0-9])(?:{alternatives})(?![a-z0-9])")
        self._canonical = {self._key(p): p for p in unique}

    @staticmethod
    def _key(text: str) -> str:
        return re.sub(r"[\s\-]+", " ", text)

    def find(self, text: str) -> list[str]:
        """The known phrases found in ``text`` (already lower-cased), in text order."""
        if self._pattern is None:
            return []
        return [self._canonical[self._key(m.group(0))] for m in self._pattern.finditer(text)]

    def remove(self, text: str) -> str:
        return self._pattern.sub(" ", text) if self._pattern is not None else text


@dataclass(frozen=True)
class _SaltHit:
    salt: str | None  # None: generic "magnesium"
    combination: bool = False


class Knowledge:
    """Everything the rules know, indexed for constant-time look-ups."""

    def __init__(
        self,
        *,
        version: str,
        file_versions: Mapping[str, str],
        sources: tuple[EvidenceSource, ...],
        conditions: tuple[ConditionGroup, ...],
        salts: tuple[MagnesiumSalt, ...],
        generic_synonyms: tuple[str, ...],
        excipient_phrases: tuple[str, ...],
        combination_markers: tuple[str, ...],
        combination_synonyms: tuple[tuple[str, str], ...],
        route_hints: Mapping[str, tuple[str, ...]],
        drug_groups: tuple[DrugGroup, ...],
        interactions: tuple[Interaction, ...],
        lab_groups: tuple[LabGroup, ...],
        unit_conversions: tuple[UnitConversion, ...],
        thresholds: tuple[Threshold, ...],
        rules: tuple[RuleInfo, ...],
        unverified: tuple[str, ...] = (),
        route_codes: Mapping[str, tuple[str, ...]] | None = None,
        terminology: Terminology | None = None,
    ) -> None:
        terminology = terminology or Terminology()
        self._generated_counts = (
            len(terminology.products),
            len(terminology.brands),
            len(terminology.snomed),
        )
        self.version = version
        self.file_versions: dict[str, str] = dict(file_versions)
        self.unverified_facts = unverified
        self._sources = {s.id: s for s in sources}
        self._conditions = {g.id: g for g in conditions}
        self._salts = {s.id: s for s in salts}
        self._drug_groups = {g.id: g for g in drug_groups}
        self._labs = {g.id: g for g in lab_groups}
        self._thresholds = {t.id: t for t in thresholds}
        self._rules = {r.id: r for r in rules}
        self._interactions = {(i.drug_group, i.ingredient_code): i for i in interactions}
        self._conversions = unit_conversions
        self._build_condition_index(conditions, terminology)
        self._build_magnesium_index(
            salts,
            generic_synonyms,
            excipient_phrases,
            combination_markers,
            combination_synonyms,
            route_hints,
            terminology,
        )
        self._build_drug_index(drug_groups, terminology)
        # One route vocabulary for every drug; "local" (eye, ear, nose, airway) acts where it is
        # applied, so for every rule it is topical.
        self._route_of_code = {
            code.upper(): _LOCAL_AS.get(route, route)
            for route, codes in (route_codes or {}).items()
            for code in codes
        }
        self._loinc = {c.code: g.id for g in lab_groups for c in g.codes}
        self._units = {
            self._unit_key(spelling): conv
            for conv in unit_conversions
            for spelling in (conv.unit, *conv.aliases)
        }

    # ------------------------------------------------------------------ index building

    def _build_condition_index(
        self, conditions: tuple[ConditionGroup, ...], terminology: Terminology
    ) -> None:
        prefix: dict[tuple[str, str], set[str]] = {}
        exact: dict[tuple[str, str], set[str]] = {}
        for group in conditions:
            for entry in group.codes:
                table = prefix if entry.match == "prefix" else exact
                table.setdefault((entry.system, entry.code), set()).add(group.id)
        # A SNOMED CT descendant belongs to every group its ancestor is in (one dict entry per
        # descendant, built here once: a look-up stays a dict hit).
        named = {
            code: frozenset(groups) for (system, code), groups in exact.items() if system == SNOMED
        }
        for code, concept in terminology.snomed:
            exact.setdefault((SNOMED, code), set()).update(named.get(concept, ()))
        self._cond_prefix = {k: frozenset(v) for k, v in prefix.items()}
        self._cond_exact = {k: frozenset(v) for k, v in exact.items()}

    def _build_magnesium_index(
        self,
        salts: tuple[MagnesiumSalt, ...],
        generic_synonyms: tuple[str, ...],
        excipient_phrases: tuple[str, ...],
        combination_markers: tuple[str, ...],
        combination_synonyms: tuple[tuple[str, str], ...],
        route_hints: Mapping[str, tuple[str, ...]],
        terminology: Terminology,
    ) -> None:
        self._mg_products: dict[str, MagnesiumProduct] = {}
        # Generated product codes (curated products win): code -> (salt, mg, per, combination)
        self._mg_generated: dict[str, tuple[str, float | None, str | None, bool]] = {}
        # The route a product code's sources agree on (curated magnesium products included).
        self._product_route: dict[str, str] = {
            made.rxcui: made.route for made in terminology.products if made.route
        }
        self._mg_ingredients: dict[str, str] = {}
        self._mg_atc: dict[str, tuple[str, str | None]] = {}  # code -> (salt, route)
        phrases: dict[str, _SaltHit] = {}
        for salt in salts:
            for product in salt.products:
                self._mg_products[product.code] = product
            for code in salt.ingredient_codes:
                self._mg_ingredients[code] = salt.id
            for entry in salt.atc:
                self._mg_atc[entry.code] = (salt.id, entry.route)
            for phrase in salt.synonyms:
                phrases[phrase] = _SaltHit(salt.id)
        for phrase in generic_synonyms:
            phrases[phrase] = _SaltHit(None)
        for phrase, salt_id in combination_synonyms:
            phrases[phrase] = _SaltHit(salt_id, combination=True)
        for made in terminology.products:
            if made.magnesium and made.rxcui not in self._mg_products:
                salt_id, strength, per = made.magnesium[0]
                combination = made.multi_ingredient or len(made.magnesium) > 1
                self._mg_generated[made.rxcui] = (salt_id, strength, per, combination)
        for brand in terminology.brands:
            if brand.magnesium and brand.phrase not in phrases:
                phrases[brand.phrase] = _SaltHit(
                    brand.magnesium[0], combination=brand.multi_ingredient
                )
        self._mg_phrases = phrases
        self._brand_phrases = frozenset(brand.phrase for brand in terminology.brands)
        self._mg_matcher = _PhraseMatcher(phrases)
        self._excipients = _PhraseMatcher(excipient_phrases)
        self._combination_markers = _PhraseMatcher(combination_markers)
        self._route_hint_of = {
            word: route
            for route, words in route_hints.items()
            if route != "local"
            for word in words
        }
        self._route_hints = _PhraseMatcher(self._route_hint_of)
        # Site words win over dose-form words: an "otic suspension" is an ear drop.
        self._local_hints = _PhraseMatcher(route_hints.get("local", ()))
        forms = {f.form for salt in salts for f in salt.fractions}
        self._forms = _PhraseMatcher(forms)
        # "Magnesium Sulfate 70 MG" inside an RxNorm name (a multivitamin's SCD): the salt's
        # strength per unit, or per mL for "MG/ML". Salt names only: a brand's number
        # ("Mag-Ox 400") is not always a strength.
        self._strength_patterns = {
            salt.id: re.compile(
                rf"(?<![a-z0-9])(?:{_alternatives(_salt_names(salt))})"
                rf"(?:\s+(?:{_alternatives(forms)}))?"
                r"\s+([0-9]+(?:\.[0-9]+)?)\s*(mg/ml|mg)(?![a-z0-9/])"
            )
            for salt in salts
            if _salt_names(salt) and forms
        }

    def _build_drug_index(
        self, drug_groups: tuple[DrugGroup, ...], terminology: Terminology
    ) -> None:
        self._drug_by_code: dict[str, Ingredient] = {}
        # RxNorm product codes (SCD, SBD, packs...) -> the ingredients they contain.
        self._drug_products: dict[str, tuple[Ingredient, ...]] = {}
        self._drug_by_name: dict[str, Ingredient] = {}
        phrases: dict[str, Ingredient] = {}
        atc: dict[str, set[str]] = {}
        for group in drug_groups:
            for ingredient in group.ingredients:
                if ingredient.code:
                    self._drug_by_code[ingredient.code] = ingredient
                self._drug_by_name[ingredient.name] = ingredient
                for phrase in ingredient.text_synonyms:
                    phrases[phrase] = ingredient
            for entry in group.atc_prefixes:
                atc.setdefault(entry.code, set()).add(group.id)
        for product in terminology.products:
            found = tuple(self._drug_by_name[n] for n in product.ingredients)
            if found and product.rxcui not in self._drug_by_code:
                self._drug_products[product.rxcui] = found
        for brand in terminology.brands:
            if brand.ingredients and brand.phrase not in phrases:
                phrases[brand.phrase] = self._drug_by_name[brand.ingredients[0]]
        self._drug_phrases = phrases
        self._drug_matcher = _PhraseMatcher(phrases)
        self._drug_atc = {k: frozenset(v) for k, v in atc.items()}

    # ------------------------------------------------------------------ conditions

    def condition_groups(self, codings: Iterable[Coding]) -> frozenset[str]:
        """Condition groups of ICD-10-CM, WHO ICD-10 and SNOMED CT codings."""
        found: set[str] = set()
        for coding in codings:
            system = normalise_system(coding.system)
            if system in _ICD_SYSTEMS:
                code = normalise_icd(coding.code)
                exact = self._cond_exact.get((system, code))
                if exact:
                    found |= exact
                # Each prefix length of the patient's code, not each known prefix.
                for end in range(1, len(code) + 1):
                    hit = self._cond_prefix.get((system, code[:end]))
                    if hit:
                        found |= hit
            elif system == SNOMED:
                hit = self._cond_exact.get((SNOMED, coding.code.strip()))
                if hit:
                    found |= hit
        return frozenset(found)

    def condition_group(self, group_id: str) -> ConditionGroup:
        return _get(self._conditions, group_id, "condition group")

    @property
    def condition_group_ids(self) -> tuple[str, ...]:
        return tuple(self._conditions)

    # ------------------------------------------------------------------ magnesium

    def match_magnesium(self, codings: Iterable[Coding], text: str = "") -> MagnesiumMatch | None:
        """Is this medication magnesium, and which product?

        RxNorm product codes first, then RxNorm ingredient, then ATC codes; the text (with the
        codings' displays) only when no coding matched. Excipient phrases such as "magnesium
        stearate" are removed before text matching.
        """
        codings = tuple(codings)
        product: MagnesiumProduct | None = None
        generated: tuple[str, tuple[str, float | None, str | None, bool]] | None = None
        ingredient: tuple[str, str] | None = None  # (salt, code)
        atc: tuple[str, str, str | None] | None = None  # (salt, code, route)
        salts_coded: set[str] = set()
        for coding in codings:
            system = normalise_system(coding.system)
            code = coding.code.strip()
            if system == RXNORM:
                if code in self._mg_products:
                    hit = self._mg_products[code]
                    product = product or hit
                    salts_coded.add(hit.salt)
                elif code in self._mg_ingredients:
                    ingredient = ingredient or (self._mg_ingredients[code], code)
                    salts_coded.add(self._mg_ingredients[code])
                elif code in self._mg_generated:
                    generated = generated or (code, self._mg_generated[code])
                    salts_coded.add(self._mg_generated[code][0])
            elif system == ATC:
                code = code.upper()
                if code in self._mg_atc:
                    salt_id, route = self._mg_atc[code]
                    atc = atc or (salt_id, code, route)
                    salts_coded.add(salt_id)

        words = self._clean_text(text, codings)
        combination = bool(self._combination_markers.find(words)) or len(salts_coded) > 1
        forms = self._forms.find(words)
        form = forms[0] if forms else None

        if product is not None:
            salt = self._salts[product.salt]
            elemental = product.strength_basis == "elemental"
            form = product.form or form  # a product made of a named form (Maginex) says so
            fraction = 1.0 if elemental else self._fraction(salt, product.route, form)
            return MagnesiumMatch(
                salt=salt.id,
                salt_display=salt.display,
                product_code=product.code,
                route=product.route,
                strength_mg=product.strength_mg,
                strength_unit=product.strength_per,
                elemental_fraction=fraction,
                matched_by="rxnorm-product",
                matched_value=product.code,
                multi_ingredient=combination,
            )
        if generated is not None:
            code, (salt_id, strength, per, multi) = generated
            salt = self._salts[salt_id]
            route = self._product_route.get(code) or self._route_from_text(words)
            if strength is None:
                strength, per = self._strength_in_name(salt_id, words)
            return MagnesiumMatch(
                salt=salt.id,
                salt_display=salt.display,
                product_code=code,
                route=route,
                strength_mg=strength,
                strength_unit=per,
                elemental_fraction=self._fraction(salt, route, form),
                matched_by="rxnorm-product",
                matched_value=code,
                multi_ingredient=combination or multi,
            )
        if ingredient is not None or atc is not None:
            if ingredient is not None:
                salt_id, value, matched_by, route = (
                    ingredient[0],
                    ingredient[1],
                    "rxnorm-ingredient",
                    None,
                )
                if atc is not None and atc[0] == salt_id:
                    route = atc[2]
            else:
                assert atc is not None
                salt_id, value, matched_by, route = atc[0], atc[1], "atc", atc[2]
            route = route or self._route_from_text(words)
            salt = self._salts[salt_id]
            return MagnesiumMatch(
                salt=salt.id,
                salt_display=salt.display,
                product_code=None,
                route=route,
                strength_mg=None,
                strength_unit=None,
                elemental_fraction=self._fraction(salt, route, form),
                matched_by=matched_by,
                matched_value=value,
                multi_ingredient=combination,
            )
        if self._coded_ingredients(codings):
            # Coded as another drug: a mention of magnesium in its text is not magnesium therapy.
            return None
        return self._match_magnesium_text(words, form, combination)

    def _match_magnesium_text(
        self, words: str, form: str | None, combination: bool
    ) -> MagnesiumMatch | None:
        found = self._mg_matcher.find(words)
        if not found:
            return None
        hits = [(phrase, self._mg_phrases[phrase]) for phrase in found]
        specific = [(p, h) for p, h in hits if h.salt is not None]
        phrase, hit = specific[0] if specific else hits[0]
        salts = {h.salt for _, h in specific}
        route = self._route_from_text(words)
        salt = self._salts[hit.salt] if hit.salt else None
        strength, per = self._strength_in_name(salt.id, words) if salt else (None, None)
        return MagnesiumMatch(
            salt=salt.id if salt else None,
            salt_display=salt.display if salt else "Magnesium (salt not stated)",
            product_code=None,
            route=route,
            strength_mg=strength,
            strength_unit=per,
            elemental_fraction=self._fraction(salt, route, form) if salt else None,
            matched_by="text",
            matched_value=phrase,
            multi_ingredient=combination
            or len(salts) > 1
            or any(h.combination for _, h in specific),
        )

    def _strength_in_name(self, salt_id: str, words: str) -> tuple[float | None, str | None]:
        """Strength of ``salt_id`` as the product's name states it, e.g. 'magnesium sulfate 70
        mg' -> (70.0, 'unit'); (None, None) when the name states none."""
        pattern = self._strength_patterns.get(salt_id)
        found = pattern.search(words) if pattern is not None else None
        if found is None:
            return None, None
        return float(found.group(1)), "mL" if found.group(2) == "mg/ml" else "unit"

    def starts_with_brand(self, text: str) -> bool:
        """Whether a medication's name begins with a known brand name ("Rolaids chewable
        tablet"): a proper name, so its capital stays mid-sentence."""
        words = text.lower().split()
        return any(" ".join(words[:n]) in self._brand_phrases for n in range(1, 4))

    def magnesium_salt(self, salt_id: str) -> MagnesiumSalt:
        return _get(self._salts, salt_id, "magnesium salt")

    @property
    def magnesium_salts(self) -> tuple[MagnesiumSalt, ...]:
        """Every salt, in file order (the order cards list forms in)."""
        return tuple(self._salts.values())

    @staticmethod
    def _fraction(salt: MagnesiumSalt, route: str | None, form: str | None) -> float | None:
        chosen = salt.fraction_for(route, form)
        return chosen.fraction if chosen else None

    def _clean_text(self, text: str, codings: tuple[Coding, ...]) -> str:
        """Lower-cased text plus coding displays, excipient phrases removed."""
        parts = [text, *(c.display for c in codings if c.display)]
        return self._excipients.remove(" | ".join(p for p in parts if p).lower())

    def _route_from_text(self, words: str) -> str | None:
        if self._local_hints.find(words):
            return _LOCAL_AS["local"]
        routes = {self._route_hint_of[w] for w in self._route_hints.find(words)}
        # Conflicting hints ("oral" and "injection") say nothing reliable.
        return routes.pop() if len(routes) == 1 else None

    # ------------------------------------------------------------------ routes

    def route_of_codings(self, codings: Iterable[Coding]) -> str | None:
        """'oral' | 'parenteral' | 'topical' from a route coding (SNOMED CT or HL7 v3 code)."""
        for coding in codings:
            route = self._route_of_code.get(coding.code.strip().upper())
            if route is not None:
                return route
        return None

    def product_route(self, codings: Iterable[Coding]) -> str | None:
        """The route of an RxNorm product code when its sources state one (an injection's
        vial, a tablet), None otherwise: what a code-only order cannot say itself."""
        for coding in codings:
            if normalise_system(coding.system) == RXNORM:
                route = self._product_route.get(coding.code.strip())
                if route is not None:
                    return route
        return None

    def route_from_text(self, text: str) -> str | None:
        """The route the words say ("IV infusion", "eye drops"), None when unclear."""
        return self._route_from_text(text.lower()) if text else None

    # ------------------------------------------------------------------ other drugs

    def drug_groups(
        self, codings: Iterable[Coding], text: str = ""
    ) -> tuple[frozenset[str], str | None]:
        """Interacting / myasthenia-relevant drug groups, and how they were matched."""
        codings = tuple(codings)
        by_rxnorm = {i.group for i in self._coded_ingredients(codings)}
        if by_rxnorm:
            return frozenset(by_rxnorm), "rxnorm"
        by_atc: set[str] = set()
        for coding in codings:
            if normalise_system(coding.system) == ATC:
                code = coding.code.strip().upper()
                for end in range(1, len(code) + 1):
                    by_atc |= self._drug_atc.get(code[:end], frozenset())
        if by_atc:
            return frozenset(by_atc), "atc"
        by_text = {i.group for i in self._text_ingredients(codings, text)}
        if by_text:
            return frozenset(by_text), "text"
        return frozenset(), None

    def matched_ingredients(
        self, codings: Iterable[Coding], text: str = ""
    ) -> tuple[Ingredient, ...]:
        """The interacting ingredients themselves (for ``interaction_for``); codes before text."""
        codings = tuple(codings)
        return self._coded_ingredients(codings) or self._text_ingredients(codings, text)

    def _coded_ingredients(self, codings: tuple[Coding, ...]) -> tuple[Ingredient, ...]:
        found: list[Ingredient] = []
        for coding in codings:
            if normalise_system(coding.system) != RXNORM:
                continue
            code = coding.code.strip()
            if code in self._drug_by_code:
                found.append(self._drug_by_code[code])
            else:
                found.extend(self._drug_products.get(code, ()))
        return tuple(dict.fromkeys(found))

    def _text_ingredients(self, codings: tuple[Coding, ...], text: str) -> tuple[Ingredient, ...]:
        words = self._clean_text(text, codings)
        return tuple(dict.fromkeys(self._drug_phrases[p] for p in self._drug_matcher.find(words)))

    def drug_group(self, group_id: str) -> DrugGroup:
        return _get(self._drug_groups, group_id, "drug group")

    @property
    def interactions(self) -> tuple[Interaction, ...]:
        """Every interaction entry, in file order (the explanation pages list them)."""
        return tuple(self._interactions.values())

    @property
    def drug_group_ids(self) -> tuple[str, ...]:
        return tuple(self._drug_groups)

    def interaction_for(self, drug_group: str, ingredient_code: str | None) -> Interaction | None:
        """The chelation advice for a drug: the per-drug entry wins over the group's.

        ``ingredient_code`` is an RxNorm ingredient code; an ingredient name (as found by a
        text match) is accepted too.
        """
        if ingredient_code:
            key = ingredient_code.strip()
            by_name = self._drug_by_name.get(key.lower())
            code = by_name.code if by_name and by_name.group == drug_group else key
            specific = self._interactions.get((drug_group, code))
            if specific is not None:
                return specific
        return self._interactions.get((drug_group, None))

    # ------------------------------------------------------------------ labs

    def lab_kind(self, codings: Iterable[Coding]) -> str | None:
        """'serum-magnesium', 'egfr' or 'creatinine' for a LOINC-coded Observation."""
        for coding in codings:
            if normalise_system(coding.system) == LOINC:
                kind = self._loinc.get(coding.code.strip())
                if kind:
                    return kind
        return None

    def lab_group(self, kind: str) -> LabGroup:
        return _get(self._labs, kind, "lab group")

    def to_mmol_per_l(self, value: float, unit: str) -> float | None:
        """Serum magnesium in mmol/L from mg/dL, mEq/L or mmol/L; None for an unknown unit."""
        conversion = self._units.get(self._unit_key(unit))
        return value / conversion.divide_by if conversion else None

    @staticmethod
    def _unit_key(unit: str) -> str:
        return unit.strip().replace(" ", "").lower()

    # ------------------------------------------------------------------ catalogue

    def source(self, source_id: str) -> EvidenceSource:
        return _get(self._sources, source_id, "source")

    def rule(self, rule_id: str) -> RuleInfo:
        return _get(self._rules, rule_id, "rule")

    @property
    def rule_ids(self) -> tuple[str, ...]:
        return tuple(self._rules)

    def threshold(self, threshold_id: str) -> Threshold:
        return _get(self._thresholds, threshold_id, "threshold")

    def describe(self) -> str:
        """Human-readable listing for ``cds-service knowledge``."""
        lines = [f"Knowledge {self.version}", "", "Files:"]
        lines += [f"  {name:<20} {version}" for name, version in self.file_versions.items()]
        lines += ["", f"Rules ({len(self._rules)}):"]
        lines += [f"  {r.id:<32} {r.indicator:<8} {r.title}" for r in self._rules.values()]
        lines += ["", "Condition value sets:"]
        for group in self._conditions.values():
            per_system = Counter(c.system for c in group.codes)
            lines.append(
                f"  {group.id:<28} {per_system[ICD10CM]:>2} ICD-10-CM"
                f"  {per_system[ICD10]:>2} WHO ICD-10"
                f"  {per_system[SNOMED]:>2} SNOMED CT  [{group.category}]"
            )
        lines += ["", f"Magnesium salts ({len(self._salts)}):"]
        for salt in self._salts.values():
            fractions = (
                ", ".join(f"{f.form} {f.fraction:g}" for f in salt.fractions) or "fraction unknown"
            )
            lines.append(
                f"  {salt.id:<20} {len(salt.ingredient_codes)} RxNorm ingredient"
                f"  {len(salt.products)} products  {len(salt.atc)} ATC"
                f"  {len(salt.synonyms)} synonyms  ({fractions})"
            )
        lines += ["", "Drug groups:"]
        for dg in self._drug_groups.values():
            coded = sum(1 for i in dg.ingredients if i.code)
            effects = ", ".join(e.kind for e in dg.effects)
            lines.append(
                f"  {dg.id:<26} {coded:>2}/{len(dg.ingredients)} coded ingredients  [{effects}]"
            )
        lines += ["", "Lab value sets:"]
        lines += [
            f"  {g.id:<20} {len(g.codes):>2} LOINC, look-back {g.lookback.days:g} days"
            f" ({', '.join(g.lookback.source_ids)}; {g.lookback.status})"
            for g in self._labs.values()
        ]
        status_counts = Counter(i.status for i in self._interactions.values())
        lines += [
            "",
            f"Chelation interactions: {len(self._interactions)} ({_counts(status_counts)})",
        ]
        lines += [
            f"  {i.ingredient_name or i.drug_group + ' (group)':<28} {_spacing(i):<24}"
            f" {i.status:<10} {', '.join(i.source_ids)}"
            for i in self._interactions.values()
        ]
        lines += ["", f"Thresholds ({len(self._thresholds)}): " + ", ".join(self._thresholds)]
        products, brands, descendants = self._generated_counts
        lines += [
            "",
            f"Generated terminology: {products} RxNorm products, {brands} brand names, "
            f"{descendants} SNOMED CT descendants",
        ]
        source_counts = Counter(s.status for s in self._sources.values())
        lines += ["", f"Sources: {len(self._sources)} ({_counts(source_counts)})"]
        lines += [
            "",
            f"Unverified facts ({len(self.unverified_facts)}), shown on cards as unverified:",
        ]
        lines += [f"  {fact}" for fact in self.unverified_facts]
        return "\n".join(lines)


def _spacing(interaction: Interaction) -> str:
    """'2 h before / 6 h after', '- before / 2 h after', or 'not together' without figures."""
    before, after = interaction.hours_before, interaction.hours_after
    if before is None and after is None:
        return "not together"
    upper = interaction.hours_after_max
    after_text = "-" if after is None else f"{after:g}" + (f"-{upper:g}" if upper else "") + " h"
    before_text = "-" if before is None else f"{before:g} h"
    return f"{before_text} before / {after_text} after"


def _counts(counter: Counter[str]) -> str:
    return ", ".join(
        f"{counter[s]} {s}" for s in ("verified", "secondary", "unverified") if counter[s]
    )


def _get(table: Mapping[str, _T], key: str, what: str) -> _T:
    try:
        return table[key]
    except KeyError:
        raise KeyError(f"unknown {what} {key!r}") from None
