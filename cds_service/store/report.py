"""``cds-service report``: which cards clinicians accept, which they override, and why.

Counting rules (also printed under every report):
- a card counts once, by its latest feedback (outcomeTimestamp, then arrival): a card
  accepted and later overridden counts as overridden;
- override rate = overridden / (accepted + overridden), over cards that got feedback; cards
  with no feedback (ignored, or a client that sends none) are shown separately;
- ``--since`` selects cards issued on or after that day (UTC);
- feedback that matches no card issued here, or came to another service's endpoint, is
  counted apart and never attributed to a rule.
Clinicians' free-text comments are stored but never printed here.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import Engine, func, select

from cds_service.store.models import FLAG_OTHER_SERVICE, FLAG_UNKNOWN_CARD, Feedback, IssuedCard

TOP_REASONS = 3
NO_REASON = "(no reason given)"
FORMATS = ("text", "json", "html")
# Beyond this many days of cards, the chart and its series go by ISO week instead of by day.
DAILY_SPAN_DAYS = 62

ReasonKey = tuple[str, str] | None  # (system, code); None = overridden without a reason


@dataclass
class _Tally:
    shown: int = 0
    accepted: int = 0
    overridden: int = 0
    reasons: Counter[ReasonKey] = field(default_factory=Counter)

    def add(self, outcome: str | None, reason: ReasonKey) -> None:
        self.shown += 1
        if outcome == "accepted":
            self.accepted += 1
        elif outcome == "overridden":
            self.overridden += 1
            self.reasons[reason] += 1

    @property
    def rate(self) -> float | None:
        answered = self.accepted + self.overridden
        return round(self.overridden / answered, 4) if answered else None

    def to_json(self, names: Mapping[tuple[str, str], str]) -> dict[str, Any]:
        return {
            "shown": self.shown,
            "accepted": self.accepted,
            "overridden": self.overridden,
            "noFeedback": self.shown - self.accepted - self.overridden,
            "overrideRate": self.rate,
            "topOverrideReasons": [
                _reason_json(key, count, names)
                for key, count in sorted(
                    self.reasons.items(), key=lambda item: (-item[1], _reason_sort(item[0]))
                )[:TOP_REASONS]
            ],
        }


def _reason_sort(key: ReasonKey) -> tuple[int, str, str]:
    return (1, "", "") if key is None else (0, key[1], key[0])


def _reason_json(
    key: ReasonKey, count: int, names: Mapping[tuple[str, str], str]
) -> dict[str, Any]:
    if key is None:
        return {"reason": NO_REASON, "count": count}
    out: dict[str, Any] = {"code": key[1]}
    if key[0]:
        out["system"] = key[0]
    if key in names:
        out["display"] = names[key]
    out["count"] = count
    return out


def build_report(
    engine: Engine,
    since: date | None = None,
    *,
    reason_names: Mapping[tuple[str, str], str] | None = None,
    rule_titles: Mapping[str, str] | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The report as JSON-ready data; text and HTML are renderings of it.

    ``reason_names`` maps (system, code) to a display (from the knowledge's override reasons);
    displays sent with the feedback fill the gaps, since some clients (the sandbox) omit them.
    """
    since_at = datetime.combine(since, time.min, UTC) if since else None
    names: dict[tuple[str, str], str] = {}
    cards: dict[str, tuple[str, str, datetime]] = {}  # uuid → service, rule, issued_at
    final: dict[str, tuple[str | None, ReasonKey]] = {}  # uuid → latest outcome, its reason
    with engine.connect() as connection:
        card_query = select(
            IssuedCard.card_uuid, IssuedCard.service_id, IssuedCard.rule_id, IssuedCard.issued_at
        )
        if since_at:
            card_query = card_query.where(IssuedCard.issued_at >= since_at)
        for uuid, service_id, rule_id, issued_at in connection.execute(
            card_query.execution_options(yield_per=2000)
        ):
            cards[uuid] = (service_id, rule_id, issued_at)

        feedback_query = (
            select(
                Feedback.card_uuid, Feedback.outcome, Feedback.override_reason_system,
                Feedback.override_reason_code, Feedback.override_reason_display,
            )
            .join(IssuedCard, IssuedCard.card_uuid == Feedback.card_uuid)
            .where(Feedback.flag.is_(None))  # flagged feedback is counted apart, below
            .order_by(Feedback.outcome_at, Feedback.id)  # the last one seen per card wins
        )
        if since_at:
            feedback_query = feedback_query.where(IssuedCard.issued_at >= since_at)
        for uuid, outcome, system, code, display in connection.execute(
            feedback_query.execution_options(yield_per=2000)
        ):
            reason = (system or "", code) if code else None
            if reason and display:
                names[reason] = display
            final[uuid] = (outcome, reason if outcome == "overridden" else None)

        flagged_query = select(Feedback.flag, func.count()).where(Feedback.flag.is_not(None))
        if since_at:
            flagged_query = flagged_query.where(Feedback.received_at >= since_at)
        flagged = dict(connection.execute(flagged_query.group_by(Feedback.flag)).all())
    names.update(reason_names or {})

    totals = _Tally()
    by_rule: dict[str, _Tally] = defaultdict(_Tally)
    by_service: dict[str, _Tally] = defaultdict(_Tally)
    issued_days = [issued_at for _, _, issued_at in cards.values()]
    weekly = bool(issued_days) and (max(issued_days) - min(issued_days)).days > DAILY_SPAN_DAYS
    by_period: dict[tuple[str, date], _Tally] = defaultdict(_Tally)
    for uuid, (service_id, rule_id, issued_at) in cards.items():
        last_outcome, last_reason = final.get(uuid, (None, None))
        for tally in (
            totals, by_rule[rule_id], by_service[service_id],
            by_period[(rule_id, _period(issued_at, weekly=weekly))],
        ):
            tally.add(last_outcome, last_reason)

    titles = rule_titles or {}
    return {
        "generatedAt": (now or datetime.now(UTC)).isoformat(timespec="seconds"),
        "since": since.isoformat() if since else None,
        "definitions": {
            "overrideRate": "overridden / (accepted + overridden), each card by its latest outcome",
            "since": "cards issued on or after this day (UTC)",
        },
        "totals": {k: v for k, v in totals.to_json(names).items() if k != "topOverrideReasons"},
        "byRule": [
            {"ruleId": rule_id, **({"title": titles[rule_id]} if rule_id in titles else {}),
             **tally.to_json(names)}
            for rule_id, tally in sorted(by_rule.items())
        ],
        "byService": [
            {"serviceId": service_id, **tally.to_json(names)}
            for service_id, tally in sorted(by_service.items())
        ],
        "unmatchedFeedback": {
            "unknownCard": flagged.get(FLAG_UNKNOWN_CARD, 0),
            "otherService": flagged.get(FLAG_OTHER_SERVICE, 0),
        },
        "overrideRateOverTime": {
            "period": "week" if weekly else "day",
            "series": [
                {"ruleId": rule_id, "periodStart": start.isoformat(), "shown": tally.shown,
                 "accepted": tally.accepted, "overridden": tally.overridden,
                 "overrideRate": tally.rate}
                for (rule_id, start), tally in sorted(by_period.items())
            ],
        },
    }


def _period(moment: datetime, *, weekly: bool) -> date:
    day = moment.astimezone(UTC).date()
    return day - timedelta(days=day.weekday()) if weekly else day


# --- renderings -----------------------------------------------------------------------------


def render(report: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(report, indent=2) + "\n"
    if fmt == "html":
        return render_html(report)
    if fmt == "text":
        return render_text(report)
    raise ValueError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.1f}%"


def _reason_label(reason: dict[str, Any]) -> str:
    if "code" not in reason:
        return str(reason["reason"])
    label = reason["code"]
    return f"{label} \"{reason['display']}\"" if "display" in reason else label


def _scope(report: dict[str, Any]) -> str:
    return f"cards issued since {report['since']}" if report["since"] else "all cards issued"


def render_text(report: dict[str, Any]) -> str:
    lines = [
        f"magnesium-cds feedback report: {_scope(report)} (generated {report['generatedAt']})",
        "Under each row: its most frequent override reasons, with how many cards had each.",
        "",
    ]
    for title, rows, key in (("By rule", report["byRule"], "ruleId"),
                             ("By service", report["byService"], "serviceId")):
        lines.append(title)
        width = max([len(key)] + [len(row[key]) for row in rows])
        lines.append(
            f"  {key:<{width}}  {'shown':>6}  {'accepted':>8}  {'overridden':>10}"
            f"  {'no feedback':>11}  {'override rate':>13}"
        )
        for row in rows:
            lines.append(
                f"  {row[key]:<{width}}  {row['shown']:>6}  {row['accepted']:>8}"
                f"  {row['overridden']:>10}  {row['noFeedback']:>11}"
                f"  {_percent(row['overrideRate']):>13}"
            )
            lines.extend(
                f"      ×{r['count']:<4} {_reason_label(r)}" for r in row["topOverrideReasons"]
            )
        if not rows:
            lines.append("  (no cards issued)")
        lines.append("")
    totals, unmatched = report["totals"], report["unmatchedFeedback"]
    lines += [
        f"Total: {totals['shown']} cards shown, {totals['accepted']} accepted, "
        f"{totals['overridden']} overridden, {totals['noFeedback']} without feedback; "
        f"override rate {_percent(totals['overrideRate'])}.",
        f"Feedback not attributed to a rule: {unmatched['unknownCard']} for card uuids never "
        f"issued here, {unmatched['otherService']} sent to another service's endpoint.",
        f"Override rate = {report['definitions']['overrideRate']}.",
    ]
    return "\n".join(lines) + "\n"


def override_rate_chart(report: dict[str, Any]) -> bytes | None:
    """PNG of override rate by rule over time; None when no card has feedback yet."""
    series: dict[str, list[tuple[date, float]]] = defaultdict(list)
    for point in report["overrideRateOverTime"]["series"]:
        if point["overrideRate"] is not None:
            series[point["ruleId"]].append(
                (date.fromisoformat(point["periodStart"]), point["overrideRate"] * 100)
            )
    if not series:
        return None
    # The object API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.dates import AutoDateLocator, DateFormatter
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for rule_id, points in sorted(series.items()):
        # Dates go through matplotlib's unit converters; its type stubs accept only numbers.
        days = [p[0] for p in points]
        axes.plot(days, [p[1] for p in points], marker="o", label=rule_id)  # type: ignore[arg-type]
    periods = sorted({p[0] for points in series.values() for p in points})
    if len(periods) <= 12:
        axes.set_xticks(periods)  # type: ignore[arg-type]  # on the periods, never on hours
    else:
        axes.xaxis.set_major_locator(AutoDateLocator(minticks=3, maxticks=12))
    axes.xaxis.set_major_formatter(DateFormatter("%Y-%m-%d"))
    axes.margins(x=0.05)
    axes.set_ylim(-3, 103)  # 0 % and 100 % points stay fully visible
    axes.set_ylabel("override rate (%)")
    axes.set_xlabel(f"cards issued, by {report['overrideRateOverTime']['period']} (UTC)")
    axes.set_title("Override rate by rule")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small", loc="best")
    figure.autofmt_xdate()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def render_html(report: dict[str, Any]) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>magnesium-cds feedback report</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:64em}"
        "table{border-collapse:collapse;margin-bottom:1.5em}"
        "th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}"
        "th:first-child,td:first-child,td.reasons{text-align:left}</style>",
        "</head><body>",
        "<h1>magnesium-cds feedback report</h1>",
        f"<p>{esc(_scope(report)).capitalize()}; generated {esc(report['generatedAt'])}.</p>",
    ]
    chart = override_rate_chart(report)
    if chart is not None:
        data = base64.b64encode(chart).decode("ascii")
        parts.append(
            f'<img src="data:image/png;base64,{data}" alt="Override rate by rule over time">'
        )
    else:
        parts.append("<p>No card has feedback yet, so there is no chart.</p>")
    for title, rows, key in (("By rule", report["byRule"], "ruleId"),
                             ("By service", report["byService"], "serviceId")):
        parts.append(f"<h2>{title}</h2><table><tr><th>{key}</th><th>shown</th><th>accepted</th>"
                     "<th>overridden</th><th>no feedback</th><th>override rate</th>"
                     "<th>top override reasons</th></tr>")
        for row in rows:
            reasons = "; ".join(
                f"{esc(_reason_label(r))} ×{r['count']}" for r in row["topOverrideReasons"]
            )
            title = f"<br><small>{esc(row['title'])}</small>" if "title" in row else ""
            parts.append(
                f"<tr><td>{esc(row[key])}{title}</td><td>{row['shown']}</td>"
                f"<td>{row['accepted']}</td>"
                f"<td>{row['overridden']}</td><td>{row['noFeedback']}</td>"
                f"<td>{_percent(row['overrideRate'])}</td><td class=\"reasons\">{reasons}</td></tr>"
            )
        parts.append("</table>")
    unmatched = report["unmatchedFeedback"]
    parts += [
        f"<p>Feedback not attributed to a rule: {unmatched['unknownCard']} for card uuids never "
        f"issued here, {unmatched['otherService']} sent to another service's endpoint.</p>",
        f"<p>Override rate = {esc(report['definitions']['overrideRate'])}.</p>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
