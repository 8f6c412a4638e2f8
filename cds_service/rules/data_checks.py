"""Cards about the data rather than the patient: when the checks cannot stand.

- patient-deceased: the Patient resource records a death. No magnesium check runs; one card
  asks to check the chart (warning when ordering, info on opening the chart).
- incomplete-data: a required prefetch key held resources, none of them this patient's
  (``PatientContext.unusable``). The other checks still run; this card says what could not
  be checked, so that an answer without other cards does not read as "no risk".
"""

from __future__ import annotations

from collections.abc import Iterator

from cds_service.knowledge import Knowledge
from cds_service.rules.describe import medication_text
from cds_service.rules.findings import Evidence, Finding, Indicator
from cds_service.rules.picture import ClinicalPicture

DECEASED_RULE_ID = "patient-deceased"
INCOMPLETE_RULE_ID = "incomplete-data"

# What each required prefetch key holds, and what could not be checked without it, in a
# clinician's words (the key's own description is for the EHR's developers, a 412's words).
_KEY_WORDS = {
    "patient": "patient record",
    "conditions": "conditions",
    "medicationRequests": "medication orders",
    "medicationStatements": "reported medications",
    "observations": "lab results",
}
_NOT_CHECKED = {
    "patient": "age-based dose limits",
    "conditions": "myasthenia gravis, kidney disease and other conditions",
    "medicationRequests": "interacting drugs, myasthenia treatment and magnesium already taken",
    "medicationStatements": "magnesium and interacting drugs the patient reports taking",
    "observations": "serum magnesium and kidney function",
}


def deceased(picture: ClinicalPicture, knowledge: Knowledge, hook: str) -> Finding:
    patient = picture.context.patient
    rule = knowledge.rule(DECEASED_RULE_ID)
    when = f" on {patient.deceased_on.isoformat()}" if patient.deceased_on else ""
    indicator: Indicator = "info" if hook == "patient-view" else "warning"
    return Finding(
        rule_id=DECEASED_RULE_ID,
        indicator=indicator,
        summary=f"Patient is recorded as deceased{when}: check the chart; no magnesium check run",
        detail=rule.statement("not-checked").text,
        action=rule.statement("not-checked").text,
        evidence=(
            Evidence(f"Patient recorded as deceased{when}", patient.source),
            *(
                Evidence(f"Not checked: {medication_text(fact.medication)}", fact.medication.source)
                for fact in picture.actionable_drafts
            ),
        ),
        source_ids=(),
        key=DECEASED_RULE_ID,
    )


def evaluate(picture: ClinicalPicture, knowledge: Knowledge, hook: str) -> Iterator[Finding]:
    """The incomplete-data card, when required data was sent but none is this patient's."""
    unusable = picture.context.unusable
    if not unusable:
        return
    rule = knowledge.rule(INCOMPLETE_RULE_ID)
    names = [_KEY_WORDS.get(missing.key, missing.key) for missing in unusable]
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    facts = tuple(
        Evidence(
            f"{_KEY_WORDS.get(missing.key, missing.key).capitalize()} sent belong to another "
            f"patient or cannot be read: "
            f"{_NOT_CHECKED.get(missing.key, 'what they hold')} not checked"
        )
        for missing in unusable
    )
    check_chart = rule.statement("check-chart").text
    yield Finding(
        rule_id=INCOMPLETE_RULE_ID,
        indicator="warning",
        summary=f"Magnesium checks incomplete: the {listed} sent are not this patient's",
        detail="\n\n".join([*(fact.text + "." for fact in facts), check_chart]),
        action=check_chart,
        evidence=facts,
        source_ids=(),
        key=INCOMPLETE_RULE_ID,
    )
