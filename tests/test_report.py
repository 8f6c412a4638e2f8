"""`cds-service report` on a seeded database: exact numbers in JSON, the same in text, and an
HTML page with an embedded chart. Seeded on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest

from cds_service import cli
from cds_service.store import CardRecord, FeedbackEntry, FeedbackStore
from cds_service.store.report import build_report, render

S1, S2 = "magnesium-order-select", "magnesium-order-sign"
RULE_A, RULE_B = "rule-a-myasthenia", "rule-b-renal"
SYS = "http://example.org/test-override-reasons"
DAY1, DAY2 = date(2025, 3, 3), date(2025, 3, 4)


def at(day: date, hour: int) -> datetime:
    return datetime(day.year, day.month, day.day, hour, tzinfo=UTC)


def uuid(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


def seed(store: FeedbackStore) -> None:
    """Six cards on two days; the expected numbers are worked out in the tests below."""
    for n, service, rule, day in ((1, S1, RULE_A, DAY1), (2, S1, RULE_A, DAY1),
                                  (3, S1, RULE_A, DAY2), (4, S1, RULE_A, DAY2),
                                  (5, S2, RULE_B, DAY1), (6, S2, RULE_B, DAY2)):
        store.record_cards(service, f"hook-{n}", [CardRecord(uuid(n), rule, "warning")], at(day, 9))
    feedback: list[tuple[str, FeedbackEntry, datetime]] = [
        (S1, FeedbackEntry(uuid(1), "accepted", at(DAY1, 10), ("s1",)), at(DAY1, 10)),
        (S1, FeedbackEntry(uuid(2), "overridden", at(DAY1, 10), reason_system=SYS,
                           reason_code="benefit-outweighs-risk"), at(DAY1, 10)),
        # Card 3: the override happened last, though it arrived first; the latest outcome wins.
        (S1, FeedbackEntry(uuid(3), "overridden", at(DAY2, 11), reason_system=SYS,
                           reason_code="patient-informed"), at(DAY2, 11)),
        (S1, FeedbackEntry(uuid(3), "accepted", at(DAY2, 10), ("s3",)), at(DAY2, 12)),
        (S2, FeedbackEntry(uuid(5), "overridden", at(DAY1, 10)), at(DAY1, 10)),
        (S2, FeedbackEntry(uuid(6), "overridden", at(DAY2, 10), reason_system=SYS,
                           reason_code="benefit-outweighs-risk",
                           reason_display="Benefit outweighs risk",
                           user_comment="free text that no report prints"), at(DAY2, 10)),
        # Flagged, never attributed to a rule: two unknown cards, one sent to the wrong service.
        (S1, FeedbackEntry(uuid(90), "overridden", at(DAY1, 10)), at(DAY1, 10)),
        (S1, FeedbackEntry(uuid(91), "overridden", at(DAY2, 10)), at(DAY2, 10)),
        (S2, FeedbackEntry(uuid(4), "overridden", at(DAY2, 10)), at(DAY2, 10)),
    ]
    for service, entry, received in feedback:
        store.store_feedback(service, [entry], received)


@pytest.fixture
def seeded(store_url: str) -> FeedbackStore:
    store = FeedbackStore.open(store_url)
    seed(store)
    return store


def counts(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row[k] for k in ("shown", "accepted", "overridden", "noFeedback", "overrideRate"))


def test_report_numbers(seeded: FeedbackStore) -> None:
    names = {(SYS, "patient-informed"): "Patient informed of the risk"}
    report = build_report(seeded.engine, reason_names=names, rule_titles={RULE_A: "Myasthenia"})
    by_rule = {row["ruleId"]: row for row in report["byRule"]}
    by_service = {row["serviceId"]: row for row in report["byService"]}
    assert counts(by_rule[RULE_A]) == (4, 1, 2, 1, 0.6667)
    assert counts(by_rule[RULE_B]) == (2, 0, 2, 0, 1.0)
    assert counts(by_service[S1]) == (4, 1, 2, 1, 0.6667)
    assert counts(by_service[S2]) == (2, 0, 2, 0, 1.0)
    assert by_rule[RULE_A]["title"] == "Myasthenia"
    assert by_rule[RULE_A]["topOverrideReasons"] == [
        # The display the sandbox omitted is filled in from another client's feedback...
        {"code": "benefit-outweighs-risk", "system": SYS, "display": "Benefit outweighs risk",
         "count": 1},
        # ...or from the knowledge's override reasons.
        {"code": "patient-informed", "system": SYS, "display": "Patient informed of the risk",
         "count": 1},
    ]
    assert by_rule[RULE_B]["topOverrideReasons"] == [
        {"code": "benefit-outweighs-risk", "system": SYS, "display": "Benefit outweighs risk",
         "count": 1},
        {"reason": "(no reason given)", "count": 1},
    ]
    assert report["totals"] == {"shown": 6, "accepted": 1, "overridden": 4, "noFeedback": 1,
                                "overrideRate": 0.8}
    assert report["unmatchedFeedback"] == {"unknownCard": 2, "otherService": 1}
    over_time = report["overrideRateOverTime"]
    assert over_time["period"] == "day"
    assert [(p["ruleId"], p["periodStart"], p["shown"], p["overrideRate"])
            for p in over_time["series"]] == [
        (RULE_A, "2025-03-03", 2, 0.5), (RULE_A, "2025-03-04", 2, 1.0),
        (RULE_B, "2025-03-03", 1, 1.0), (RULE_B, "2025-03-04", 1, 1.0),
    ]
    assert "free text" not in json.dumps(report)


def test_report_since_a_day(seeded: FeedbackStore) -> None:
    report = build_report(seeded.engine, DAY2)
    by_rule = {row["ruleId"]: row for row in report["byRule"]}
    assert counts(by_rule[RULE_A]) == (2, 0, 1, 1, 1.0)
    assert counts(by_rule[RULE_B]) == (1, 0, 1, 0, 1.0)
    assert report["since"] == "2025-03-04"
    assert report["unmatchedFeedback"] == {"unknownCard": 1, "otherService": 1}


def test_long_periods_are_charted_by_week(tmp_path: Path) -> None:
    store = FeedbackStore.open(f"sqlite:///{tmp_path / 'weeks.sqlite3'}")
    for n, day in enumerate((date(2025, 1, 1), date(2025, 4, 30))):  # a Wednesday each
        store.record_cards(S1, f"h{n}", [CardRecord(uuid(n), RULE_A, "info")], at(day, 9))
        store.store_feedback(S1, [FeedbackEntry(uuid(n), "overridden", at(day, 10))])
    over_time = build_report(store.engine)["overrideRateOverTime"]
    assert over_time["period"] == "week"
    assert [p["periodStart"] for p in over_time["series"]] == ["2024-12-30", "2025-04-28"]


def test_text_and_html_show_the_same_numbers(seeded: FeedbackStore) -> None:
    report = build_report(seeded.engine)
    text = render(report, "text")
    line_a = next(line for line in text.splitlines() if line.strip().startswith(RULE_A))
    assert line_a.split() == [RULE_A, "4", "1", "2", "1", "66.7%"]
    assert "×1    benefit-outweighs-risk \"Benefit outweighs risk\"" in text
    assert "Total: 6 cards shown, 1 accepted, 4 overridden, 1 without feedback" in text
    assert "2 for card uuids never issued here, 1 sent to another service's endpoint" in text
    page = render(report, "html")
    image = re.search(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert image is not None
    assert base64.b64decode(image.group(1)).startswith(b"\x89PNG\r\n\x1a\n")
    assert RULE_A in page and RULE_B in page and "66.7%" in page


def test_cli_report_reads_cds_database_url(
    seeded: FeedbackStore, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("CDS_DATABASE_URL", seeded.engine.url.render_as_string(hide_password=False))
    assert cli.main(["report", "--format", "json", "--since", "2025-03-01"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["totals"]["shown"] == 6 and report["since"] == "2025-03-01"
    assert cli.main(["report"]) == 0
    assert "Total: 6 cards shown" in capsys.readouterr().out
    output = tmp_path / "report.html"
    assert cli.main(["report", "--format", "html", "--output", str(output)]) == 0
    assert "data:image/png;base64," in output.read_text(encoding="utf-8")


def test_cli_report_without_a_database_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("CDS_DATABASE_URL", f"sqlite:///{tmp_path / 'none.sqlite3'}")
    assert cli.main(["report"]) == 2
    assert "no feedback database" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["report", "--since", "last tuesday"])
