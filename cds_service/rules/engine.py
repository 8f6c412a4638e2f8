"""Runs every rule over one clinical picture: pure, no Flask, no I/O, no clock.

A rule is a function ``(picture, knowledge, hook) -> Iterable[Finding]``; adding a clinical
concern means adding a module and listing it in ``RULES``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import date

from cds_service.context.model import PatientContext
from cds_service.knowledge import Knowledge
from cds_service.rules import myasthenia
from cds_service.rules.findings import Finding
from cds_service.rules.picture import ClinicalPicture, build_picture

Rule = Callable[[ClinicalPicture, Knowledge, str], Iterable[Finding]]

RULES: tuple[Rule, ...] = (myasthenia.evaluate,)

SEVERITY = {"critical": 0, "warning": 1, "info": 2}


def evaluate(
    context: PatientContext, knowledge: Knowledge, hook: str, today: date
) -> list[Finding]:
    """All findings for this hook call, most serious first, each finding once."""
    picture = build_picture(context, knowledge, today)
    return prioritise(finding for rule in RULES for finding in rule(picture, knowledge, hook))


def prioritise(findings: Iterable[Finding]) -> list[Finding]:
    """Drop repeats of one finding (keeping the most serious), most serious first."""
    best: dict[str, Finding] = {}
    for finding in findings:
        kept = best.get(finding.key)
        if kept is None or SEVERITY[finding.indicator] < SEVERITY[kept.indicator]:
            best[finding.key] = finding
    return sorted(best.values(), key=lambda f: SEVERITY[f.indicator])
