"""Runs every rule over one clinical picture: pure, no Flask, no I/O, no clock.

A rule is a function ``(picture, knowledge, hook) -> Iterable[Finding]``; adding a clinical
concern means adding a module and listing it in ``RULES``.

Hook policy (after the HL7 PDDI-CDS guidance: advise early, do not nag at signing):

- One card per finding. Findings with the same ``Finding.key`` are one finding: two rules
  that would say the same thing about one order (kidneys and a high serum magnesium) share a
  key, and the more serious is kept (the first listed on a tie).
- order-select advises: a finding is at most a warning there, except the myasthenia gravis
  rules, which stay critical (``ALWAYS_SEVERE``). The full indicator applies at signing.
  Only the selected drafts (``context.selections``) get findings of their own; the others
  still count as context (``ClinicalPicture.actionable_drafts``). CDS Hooks 1.0
  medication-prescribe fires while the prescription is being written, so it is advised like
  order-select (its discovery entry says "the order-select checks").
- order-sign repeats only what is still unresolved: info-level advice was shown while the
  order was being built and is not repeated (the ``magnesium-order-sign-only`` service, for
  EHRs that fire no order-select, shows it at signing); a chelation warning whose draft
  already states the spacing is resolved (``interactions``); a serum magnesium test already
  among the drafts is not suggested again (``renal``). Warnings and critical findings stay:
  the risk has not gone. A finding critical at signing but capped while ordering says why, in
  one clause, on both cards.
- Cards come most serious first (critical, warning, info); the order of ``RULES`` breaks ties.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from datetime import date

from cds_service.context.model import PatientContext
from cds_service.knowledge import Knowledge
from cds_service.rules import (
    autoimmune,
    blockade,
    data_checks,
    dose,
    interactions,
    mg_drugs,
    myasthenia,
    renal,
    serum_magnesium,
)
from cds_service.rules.describe import mid_sentence
from cds_service.rules.findings import Finding
from cds_service.rules.picture import ClinicalPicture, build_picture

Rule = Callable[[ClinicalPicture, Knowledge, str], Iterable[Finding]]

RULES: tuple[Rule, ...] = (
    myasthenia.evaluate,
    mg_drugs.evaluate,
    blockade.evaluate,
    renal.evaluate,
    serum_magnesium.evaluate,
    interactions.evaluate,
    autoimmune.evaluate,
    dose.evaluate,
    data_checks.evaluate,
)

SEVERITY = {"critical": 0, "warning": 1, "info": 2}
# Rules whose critical cards are shown as critical at order-select too.
ALWAYS_SEVERE = frozenset({myasthenia.RULE_ID, mg_drugs.RULE_ID})
SIGNING_HOOKS = frozenset({"order-sign"})
# Hooks that fire while the order is being chosen or written: advice, capped at warning.
ADVISING_HOOKS = frozenset({"order-select", "medication-prescribe"})


def evaluate(
    context: PatientContext,
    knowledge: Knowledge,
    hook: str,
    today: date,
    *,
    advice_shown_before: bool = True,
) -> list[Finding]:
    """All findings for this hook call, most serious first, each finding once.
    ``advice_shown_before=False``: an EHR that fires no order-select (its own service), so
    order-sign shows the info advice too."""
    picture = build_picture(context, knowledge, today)
    if context.patient.deceased:
        # On purpose: no clinical card for a patient recorded as deceased, one to say so.
        deceased = [data_checks.deceased(picture, knowledge, hook)]
        return apply_hook_policy(deceased, hook, advice_shown_before=advice_shown_before)
    found = prioritise(_run_rules(picture, knowledge, hook))
    if picture.stale_labs and any(f.indicator == "critical" for f in found):
        found = cap_stale(found, picture, knowledge, hook)
    return apply_hook_policy(found, hook, advice_shown_before=advice_shown_before)


def _run_rules(picture: ClinicalPicture, knowledge: Knowledge, hook: str) -> Iterable[Finding]:
    return (finding for rule in RULES for finding in rule(picture, knowledge, hook))


def cap_stale(
    findings: list[Finding], picture: ClinicalPicture, knowledge: Knowledge, hook: str
) -> list[Finding]:
    """A result older than its look-back window cannot raise a card above warning.

    The rules run again without the old results: a critical finding that is not critical
    then (or not there at all) rests on old data, and is shown as a warning that names
    them with their dates. Criticals that stand without them (a coded dialysis, a current
    value) stay.
    """
    without = {
        f.key: f.indicator
        for f in prioritise(_run_rules(picture.without_stale_labs(), knowledge, hook))
    }
    capped: list[Finding] = []
    for finding in findings:
        if finding.indicator == "critical" and without.get(finding.key) != "critical":
            old = _old_results(finding, picture, knowledge)
            note = f"Not critical: it rests on {old}."
            finding = dataclasses.replace(finding, indicator="warning", severity_note=note)
        capped.append(finding)
    return sorted(capped, key=lambda f: SEVERITY[f.indicator])


def prioritise(findings: Iterable[Finding]) -> list[Finding]:
    """Drop repeats of one finding (keeping the most serious), most serious first."""
    best: dict[str, Finding] = {}
    for finding in findings:
        kept = best.get(finding.key)
        if kept is None or SEVERITY[finding.indicator] < SEVERITY[kept.indicator]:
            best[finding.key] = finding
    return sorted(best.values(), key=lambda f: SEVERITY[f.indicator])


def _old_results(finding: Finding, picture: ClinicalPicture, knowledge: Knowledge) -> str:
    """'estimated glomerular filtration rate from 1978-05-01, older than its 90-day
    look-back; recheck it' (mid-sentence: 'Not critical: it rests on ...')."""
    cited = {e.source for e in finding.evidence}
    old = [f for f in picture.stale_labs if f.lab.source in cited] or list(picture.stale_labs)
    parts = []
    for fact in old:
        name = mid_sentence(knowledge.lab_group(fact.kind).display)
        days = knowledge.lab_group(fact.kind).lookback.days
        if fact.lab.effective is None:
            parts.append(f"{name} with no date")
        else:
            when = fact.lab.effective.date().isoformat()
            parts.append(f"{name} from {when}, older than its {days:g}-day look-back")
    return f"{'; '.join(parts)}; recheck {'them' if len(parts) > 1 else 'it'}"


def apply_hook_policy(
    findings: list[Finding], hook: str, *, advice_shown_before: bool = True
) -> list[Finding]:
    """Cap order-select at warning (but myasthenia), drop info at signing (unless no
    order-select showed it); keep the order. Where the indicator differs between the two,
    the card says why in one clause."""
    if hook in ADVISING_HOOKS:
        capped = [
            _with_clause(
                dataclasses.replace(f, indicator="warning"),
                "A warning while ordering; critical at signing",
            )
            if f.indicator == "critical" and f.rule_id not in ALWAYS_SEVERE
            else f
            for f in findings
        ]
        return sorted(capped, key=lambda f: SEVERITY[f.indicator])
    if hook in SIGNING_HOOKS:
        # Only where order-select ran is there a warning to explain: a sign-only EHR never saw it.
        return [
            _with_clause(f, "Critical at signing (a warning while ordering)")
            if f.indicator == "critical" and f.rule_id not in ALWAYS_SEVERE and advice_shown_before
            else f
            for f in findings
            if f.indicator != "info" or not advice_shown_before
        ]
    return findings


def _with_clause(finding: Finding, lead: str) -> Finding:
    """The card's one clause on its severity change and why: 'Critical at signing (a warning
    while ordering): IV magnesium with severe kidney impairment.'"""
    because = finding.critical_because or "harm is likely once the order is signed"
    return dataclasses.replace(finding, severity_note=f"{lead}: {because}.")
