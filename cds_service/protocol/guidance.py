"""Explanation pages: ``GET /guidance/<ruleId>``, what a card links to for everything that does
not fit on it.

Plain, self-contained HTML (no scripts, fonts or images from elsewhere; inline CSS that reads
on a phone and prints), built from the knowledge alone: it carries no patient data. The
optional ``topic`` parameters are knowledge ids (a condition or drug group, a magnesium salt)
that pick the sections relevant to the card, so that a Hashimoto's card's page speaks of
Hashimoto's thyroiditis and not of myasthenia gravis.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from html import escape

from flask import Blueprint, Response, current_app, request
from flask.typing import ResponseReturnValue

from cds_service.knowledge import Knowledge
from cds_service.knowledge.model import CodeEntry, EvidenceSource, Threshold
from cds_service.protocol.errors import ApiError
from cds_service.rules.describe import system_name
from cds_service.settings import Settings

guidance_bp = Blueprint("guidance", __name__)

MAX_TOPICS = 8
# Sections a rule's page adds to its own statements (ids in the knowledge files). A rule the
# table does not name still gets a full page: its statements, sources and what is unverified.
_RULE_CONDITIONS = {
    "myasthenia-magnesium": ("myasthenia-gravis",),
    "myasthenia-aggravating-drug": ("myasthenia-gravis",),
}
_SERUM_LEVELS = (
    "serum-magnesium-reference-range",
    "serum-magnesium-reflexes-diminish",
    "serum-magnesium-respiratory-paralysis",
)
_RULE_THRESHOLDS = {
    "myasthenia-magnesium": ("myasthenia-oral-low-dose",),
    "renal-magnesium": (
        "egfr-renal-impairment",
        "iv-mgso4-severe-renal-max",
        "iv-mgso4-urine-output-min",
        "serum-magnesium-recent-days",
    ),
    "high-serum-magnesium": (*_SERUM_LEVELS, "serum-magnesium-anticonvulsant-range"),
    "obstetric-magnesium-monitoring": (
        "serum-magnesium-anticonvulsant-range",
        "serum-magnesium-reflexes-diminish",
        "serum-magnesium-respiratory-paralysis",
        "obstetric-respiratory-rate-min",
    ),
    "patient-view-contraindication": ("egfr-renal-impairment", *_SERUM_LEVELS),
    "patient-view-low-magnesium": ("serum-magnesium-reference-range",),
    "magnesium-dose-limit": ("supplemental-magnesium-ul", "supervised-laxative-course-max-days"),
}
_RULE_DRUG_EFFECTS = {
    "myasthenia-aggravating-drug": ("aggravates-myasthenia", "potentiated-by-iv-magnesium"),
    "magnesium-neuromuscular-blocker": ("potentiated-by-iv-magnesium",),
    "chelation-interaction": ("chelation",),
}
_DIET_FIRST = ("autoimmune-guidance", "diet-first")
_CHECK_LEVELS = ("autoimmune-guidance", "check-levels")
_STATUS_WORDS = {
    "verified": "verified against the source",
    "secondary": "from a secondary source",
    "unverified": "unverified",
}


def public_base_url(settings: Settings, host_url: str) -> str:
    """The service's public URL for links: CDS_EXTERNAL_BASE_URL's first entry, else the URL
    the request came in on."""
    if settings.external_base_urls:
        return settings.external_base_urls[0]
    return host_url.rstrip("/")


def configured_base_url(settings: Settings) -> str:
    """Without a request (``cds-service evaluate``): CDS_EXTERNAL_BASE_URL, else the bind
    address."""
    if settings.external_base_urls:
        return settings.external_base_urls[0]
    host = settings.host if settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    return f"http://{f'[{host}]' if ':' in host else host}:{settings.port}"


@guidance_bp.get("/guidance/<rule_id>")
def guidance_page(rule_id: str) -> ResponseReturnValue:
    knowledge: Knowledge = current_app.extensions["cds_knowledge"]
    if rule_id not in knowledge.rule_ids:
        raise ApiError(
            404,
            "unknown-rule",
            f"no rule with id {rule_id[:80]!r}; the rules are: {', '.join(knowledge.rule_ids)}",
        )
    topics = request.args.getlist("topic")
    if len(topics) > MAX_TOPICS:
        raise ApiError(400, "too-many-topics", f"at most {MAX_TOPICS} topic parameters")
    unknown = [t for t in topics if not _known_topic(knowledge, t)]
    if unknown:
        raise ApiError(
            400,
            "unknown-topic",
            "topic must be a condition group, drug group or magnesium salt id of the knowledge",
            [{"path": "$.query.topic", "message": f"unknown topic {t[:80]!r}"} for t in unknown],
        )
    page = GuidancePage(knowledge, rule_id, tuple(dict.fromkeys(topics)))
    response = Response(page.render(), mimetype="text/html")
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
        "form-action 'none'; frame-ancestors *"
    )
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "public, max-age=300"
    return response


def _known_topic(knowledge: Knowledge, topic: str) -> bool:
    return (
        topic in knowledge.condition_group_ids
        or topic in knowledge.drug_group_ids
        or any(salt.id == topic for salt in knowledge.magnesium_salts)
    )


class GuidancePage:
    """One rule's page; collects the sources and unverified statements as it writes."""

    def __init__(self, knowledge: Knowledge, rule_id: str, topics: tuple[str, ...]) -> None:
        self.knowledge = knowledge
        self.rule = knowledge.rule(rule_id)
        self.topics = topics
        self.source_ids: list[str] = list(self.rule.source_ids)
        self.unverified: list[str] = []

    def render(self) -> str:
        rule = self.rule
        body = [
            f"<header><p class=kicker>magnesium-cds explanation</p><h1>{escape(rule.title)}</h1>"
            f"<p>{escape(rule.description)}</p>"
            f"<p>Card level: <strong>{escape(rule.indicator)}</strong> by default.</p></header>",
            self._reasoning(),
            self._conditions(),
            self._drug_effects(),
            self._interactions(),
            self._thresholds(),
            self._forms(),
            self._diet_first(),
            self._lab_advice(),
            self._recognised(),
            self._unverified(),  # after every section: they collect what is unverified
            self._sources(),
            f"<footer><p>Knowledge version {escape(self.knowledge.version)}. This page is built "
            "from the service's knowledge files and holds no patient data.</p></footer>",
        ]
        main = _number_citations("\n".join(part for part in body if part), self.source_ids)
        return (
            "<!doctype html>\n<html lang=en>\n<head>\n<meta charset=utf-8>\n"
            '<meta name=viewport content="width=device-width, initial-scale=1">\n'
            f"<title>{escape(rule.title)} · magnesium-cds</title>\n<style>{_CSS}</style>\n"
            f"</head>\n<body>\n<main>\n{main}\n</main>\n</body>\n</html>\n"
        )

    # --- sections ---------------------------------------------------------------------------

    def _statement(self, text: str, status: str, source_ids: Iterable[str]) -> str:
        ids = list(source_ids)
        self.source_ids += ids
        if status == "unverified":
            self.unverified.append(text)
        cites = _cite_links(ids)
        return (
            f"<li>{_inline(text)} <span class=meta>({escape(_STATUS_WORDS.get(status, status))}"
            + (f"; {cites}" if cites else "")
            + ")</span></li>"
        )

    def _reasoning(self) -> str:
        own_sections = {s for r, s in (_DIET_FIRST, _CHECK_LEVELS) if r == self.rule.id}
        shown = [g for g in self.rule.guidance if g.id not in own_sections]
        if not shown:
            return ""
        items = [self._statement(g.text, g.status, g.source_ids) for g in shown]
        return _section("reasoning", "Why, in full", f"<ul>{''.join(items)}</ul>")

    def _condition_ids(self) -> list[str]:
        ids = [t for t in self.topics if t in self.knowledge.condition_group_ids]
        known = self.knowledge.condition_group_ids  # a renamed group drops out, not a 500
        return ids or [g for g in _RULE_CONDITIONS.get(self.rule.id, ()) if g in known]

    def _conditions(self) -> str:
        parts = []
        for group_id in self._condition_ids():
            group = self.knowledge.condition_group(group_id)
            self.source_ids += group.source_ids
            if not group.guidance:
                continue
            items = [self._statement(g.text, g.status, g.source_ids) for g in group.guidance]
            parts.append(f"<h3>{escape(group.display)}</h3><ul>{''.join(items)}</ul>")
        return _section("conditions", "About the condition", "".join(parts)) if parts else ""

    def _drug_group_ids(self) -> list[str]:
        ids = [t for t in self.topics if t in self.knowledge.drug_group_ids]
        return ids or list(self.knowledge.drug_group_ids)

    def _drug_effects(self) -> str:
        kinds = _RULE_DRUG_EFFECTS.get(self.rule.id, ())
        if not kinds or self.rule.id == "chelation-interaction":
            return ""  # chelation has its own table
        rows = []
        for group_id in self._drug_group_ids():
            group = self.knowledge.drug_group(group_id)
            for effect in group.effects:
                if effect.kind in kinds:
                    rows.append(
                        f"<h3>{escape(group.display)}</h3>"
                        f"<ul>{self._statement(effect.text, effect.status, effect.source_ids)}</ul>"
                    )
        return _section("drugs", "The drugs", "".join(rows)) if rows else ""

    def _interactions(self) -> str:
        if self.rule.id != "chelation-interaction":
            return ""
        groups = set(self._drug_group_ids())
        rows = []
        for item in self.knowledge.interactions:
            if item.drug_group not in groups:
                continue
            self.source_ids += item.source_ids
            if item.status == "unverified":
                self.unverified.append(item.text)
            drug = item.ingredient_name or (
                self.knowledge.drug_group(item.drug_group).display + " (any)"
            )
            status = _STATUS_WORDS.get(item.status, item.status)
            rows.append(
                (escape(drug), _inline(item.text), escape(status), _cite_links(item.source_ids))
            )
        table = _table(
            "Spacing between oral magnesium and each drug",
            ("Drug", "Advice", "Status", "Sources"),
            rows,
        )
        return _section("spacing", "How far apart", table) if rows else ""

    def _thresholds(self) -> str:
        rows = []
        for threshold_id in _RULE_THRESHOLDS.get(self.rule.id, ()):
            try:
                threshold = self.knowledge.threshold(threshold_id)
            except KeyError:  # renamed in the knowledge: the page goes on without it
                continue
            rows.append(_threshold_row(self, threshold))
        if not rows:
            return ""
        table = _table("Figures the rule uses", ("What", "Value", "Status", "Sources"), rows)
        return _section("figures", "Figures", table)

    def _forms(self) -> str:
        rows = []
        for salt in self.knowledge.magnesium_salts:
            use = salt.autoimmune_use
            if use is None:
                continue
            self.source_ids += use.source_ids
            if use.status == "unverified":
                self.unverified.append(use.text)
            mark = " <strong>(this order)</strong>" if salt.id in self.topics else ""
            rows.append(
                (
                    escape(salt.display) + mark,
                    escape(", ".join(a.replace("-", " ") for a in use.aims)),
                    _inline(use.text),
                    escape(_STATUS_WORDS.get(use.status, use.status)),
                )
            )
        table = _table(
            "Magnesium forms by aim, where magnesium is appropriate at all",
            ("Form", "Aim", "Notes", "Status"),
            rows,
        )
        return _section("forms", "Which form for which aim", table) if rows else ""

    def _quoted(self, rule_id: str, statement_id: str) -> str:
        try:
            item = self.knowledge.rule(rule_id).statement(statement_id)
        except KeyError:
            return ""
        return f"<ul>{self._statement(item.text, item.status, item.source_ids)}</ul>"

    def _diet_first(self) -> str:
        text = self._quoted(*_DIET_FIRST)
        return _section("diet", "Diet first", text) if text else ""

    def _lab_advice(self) -> str:
        parts = [self._quoted(*_CHECK_LEVELS)]
        lab = self.knowledge.lab_group("serum-magnesium")
        self.source_ids += lab.source_ids
        codes = ", ".join(f"{c.code} ({c.display})" for c in lab.codes)
        parts.append(f"<p>Serum magnesium is recognised by LOINC {escape(codes)}.</p>")
        reference = self.knowledge.threshold("serum-magnesium-reference-range")
        parts.append(
            "<p>A result is compared with its own reference range; without one, with "
            f"{reference.low:g}-{reference.high:g} {escape(reference.unit)} "
            f"({_cite_links(reference.source_ids)}).</p>"
        )
        self.source_ids += reference.source_ids
        return _section("labs", "Laboratory checks", "".join(parts))

    def _recognised(self) -> str:
        """Which codes the rule's conditions are recognised by: the provenance a card's
        extension names per patient, here per rule."""
        items = []
        for group_id in self._condition_ids():
            group = self.knowledge.condition_group(group_id)
            codes = ", ".join(
                dict.fromkeys(
                    f"{system_name(c.system)} {_dotted(c)}{'*' if c.match == 'prefix' else ''}"
                    for c in group.codes[:24]
                )
            )
            more = " and more" if len(group.codes) > 24 else ""
            name = escape(group.display)
            items.append(f"<li><strong>{name}</strong>: {escape(codes)}{more}</li>")
        if not items:
            return ""
        return _section(
            "codes",
            "Codes the rule recognises",
            f"<ul>{''.join(items)}</ul><p class=meta>* and every code below it. A card's own "
            "extension lists the codes and records that triggered it.</p>",
        )

    def _unverified(self) -> str:
        items = list(dict.fromkeys(self.unverified))
        if not items:
            body = "<p>Every statement on this page rests on a cited source.</p>"
        else:
            body = (
                "<p>These statements rest on the clinical narrative or on a figure no primary "
                "source confirmed here; weigh them accordingly.</p><ul>"
                + "".join(f"<li>{_inline(t)}</li>" for t in items)
                + "</ul>"
            )
        return _section("unverified", "What is unverified", body)

    def _sources(self) -> str:
        items = []
        for source_id in dict.fromkeys(self.source_ids):
            items.append(_source_item(self.knowledge.source(source_id)))
        return _section("sources", "Sources", f"<ol>{''.join(items)}</ol>")


def _table(caption: str, headers: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    """Cells are HTML already; the first is the row's header. On a phone each row stacks,
    each cell labelled with its column (data-label)."""
    head = "".join(f"<th scope=col>{h}</th>" for h in headers)
    body = "".join(
        f"<tr><th scope=row>{first}</th>"
        + "".join(f'<td data-label="{h}">{c}</td>' for h, c in zip(headers[1:], rest, strict=True))
        + "</tr>"
        for first, *rest in rows
    )
    return (
        f"<table><caption>{caption}</caption><thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table>"
    )


def _threshold_row(page: GuidancePage, threshold: Threshold) -> tuple[str, ...]:
    page.source_ids += threshold.source_ids
    if threshold.status == "unverified":
        page.unverified.append(threshold.display)
    if threshold.value is not None:
        value = f"{threshold.value:g} {threshold.unit}"
    elif threshold.low is not None and threshold.high is not None:
        value = f"{threshold.low:g}-{threshold.high:g} {threshold.unit}"
    else:
        value = "; ".join(
            f"{b.label}: {b.value:g} {threshold.unit}" if b.value is not None else b.label
            for b in threshold.bands
        )
    status = _STATUS_WORDS.get(threshold.status, threshold.status)
    return (
        escape(threshold.display),
        escape(value),
        escape(status),
        _cite_links(threshold.source_ids),
    )


def _dotted(code: CodeEntry) -> str:
    """ICD-10 codes are held without their dot (E063); shown as written (E06.3)."""
    if "icd-10" in code.system and len(code.code) > 3 and "." not in code.code:
        return f"{code.code[:3]}.{code.code[3:]}"
    return code.code


def _source_item(source: EvidenceSource) -> str:
    title = escape(source.title)
    if source.url:
        title = f'<a href="{escape(source.url)}" rel="noopener noreferrer">{title}</a>'
    note = f"<br><span class=meta>{escape(source.note)}</span>" if source.note else ""
    status = escape(_STATUS_WORDS.get(source.status, source.status))
    return f'<li id="source-{escape(source.id)}">{title} ({status}){note}</li>'


def _cite_links(source_ids: Iterable[str]) -> str:
    """Placeholders, numbered once every source of the page is known."""
    return ", ".join(f"\x00cite:{source_id}\x00" for source_id in source_ids)


def _number_citations(html: str, source_ids: list[str]) -> str:
    """[n] links to the n-th entry of the page's source list."""
    numbers = {source_id: n for n, source_id in enumerate(dict.fromkeys(source_ids), 1)}
    return re.sub(
        "\x00cite:([^\x00]*)\x00",
        lambda m: f'<a href="#source-{escape(m.group(1))}">[{numbers[m.group(1)]}]</a>',
        html,
    )


def _inline(text: str) -> str:
    """A knowledge text as HTML: escaped, its **bold** kept."""
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escape(text))


def _section(anchor: str, heading: str, body: str) -> str:
    return f'<section aria-labelledby="{anchor}"><h2 id="{anchor}">{heading}</h2>{body}</section>'


# Dark text on white (contrast above 12:1), links underlined, tables scroll on a phone.
_CSS = """
:root{color:#1a1a1a;background:#fff;font:16px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif}
body{margin:0;overflow-wrap:anywhere}main{max-width:48rem;margin:0 auto;padding:1rem}
h1{font-size:1.6rem;line-height:1.25;margin:.25rem 0 .75rem}h2{font-size:1.25rem;
margin:1.75rem 0 .5rem;border-bottom:2px solid #d0d7de}h3{font-size:1.05rem;margin:1rem 0 .25rem}
a{color:#0b4f9c;text-decoration:underline}a:focus{outline:3px solid #f0b400}
.kicker{margin:0;color:#4a4a4a;font-size:.9rem;text-transform:uppercase;letter-spacing:.04em}
.meta{color:#4a4a4a;font-size:.9rem}li{margin:.3rem 0}
table{border-collapse:collapse;width:100%;font-size:.95rem}
caption{text-align:left;font-weight:600;padding:.25rem 0}th,td{border:1px solid #d0d7de;
padding:.4rem .5rem;text-align:left;vertical-align:top}thead th{background:#f3f5f7}
footer{margin-top:2rem;color:#4a4a4a;font-size:.9rem}
@media screen and (max-width:40rem){thead{position:absolute;left:-9999px}
table,caption,tbody,tr,th,td{display:block}tr{border:1px solid #d0d7de;margin:0 0 .75rem}
th,td{border:0;padding:.25rem .5rem}tbody th{background:#f3f5f7}
td::before{content:attr(data-label) ": ";font-weight:600}}
@media print{a{color:#000}a[href^="http"]::after{content:" (" attr(href) ")";font-size:.8rem;
word-break:break-all}main{max-width:none}}
"""
