"""GET /guidance/<ruleId>: the explanation page each card links to (HTTP, Flask test client).

The browser checks (rendering, links, phone width, screenshots) are in
test_guidance_browser.py; these are the page's content and the protocol around it.
"""

from __future__ import annotations

import json
import re
from datetime import date
from html import escape as html_escape
from html.parser import HTMLParser
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from cds_service.app import create_app
from cds_service.knowledge import default_knowledge
from cds_service.pipeline import HookPipeline
from cds_service.protocol.blueprint import PIPELINE_EXTENSION
from cds_service.resources import bundled_dir
from cds_service.settings import Settings

KNOWLEDGE = default_knowledge()
FIXTURES = bundled_dir("fixtures")


def _app(tmp_path: Path, **settings: str) -> Flask:
    values = {"auth": "off", "database_url": f"sqlite:///{tmp_path / 'cds.sqlite3'}", **settings}
    app = create_app(Settings(**values))  # type: ignore[arg-type]
    pipeline: HookPipeline = app.extensions[PIPELINE_EXTENSION]
    pipeline.clock = lambda: date(2026, 11, 25)
    return app


@pytest.fixture
def client(tmp_path: Path) -> FlaskClient:
    return _app(tmp_path).test_client()


class _Page(HTMLParser):
    """Headings, links and anything that would load from elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.links: list[str] = []
        self.loads: list[str] = []
        self.ids: set[str] = set()
        self.lang = ""
        self._in_heading = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "html":
            self.lang = values.get("lang") or ""
        if values.get("id"):
            self.ids.add(values["id"] or "")
        if tag in ("h1", "h2"):
            self._in_heading = True
            self.headings.append("")
        if tag == "a" and values.get("href"):
            self.links.append(values["href"] or "")
        if tag in ("script", "img", "iframe", "link") or values.get("src"):
            self.loads.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("h1", "h2"):
            self._in_heading = False

    def handle_data(self, data: str) -> None:
        if self._in_heading:
            self.headings[-1] += data


def _page(client: FlaskClient, url: str) -> tuple[str, _Page]:
    response = client.get(url)
    assert response.status_code == 200, response.data[:300]
    assert response.content_type == "text/html; charset=utf-8"
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    html = response.get_data(as_text=True)
    parsed = _Page()
    parsed.feed(html)
    return html, parsed


@pytest.mark.parametrize("rule_id", KNOWLEDGE.rule_ids)
def test_every_rule_has_a_complete_self_contained_page(client: FlaskClient, rule_id: str) -> None:
    html, page = _page(client, f"/guidance/{rule_id}")
    assert page.lang == "en" and page.loads == []  # nothing fetched from anywhere
    assert page.headings[0] == KNOWLEDGE.rule(rule_id).title
    for section in ("Which form for which aim", "Diet first", "Laboratory checks"):
        assert section in page.headings, (rule_id, section)
    assert {"What is unverified", "Sources"} <= set(page.headings)
    assert f"Knowledge version {KNOWLEDGE.version}" in html
    # Every source the rule cites is listed, with a link where it has a URL.
    for source_id in KNOWLEDGE.rule(rule_id).source_ids:
        source = KNOWLEDGE.source(source_id)
        assert f'id="source-{source_id}"' in html
        if source.url:
            assert f'href="{source.url.replace("&", "&amp;")}"' in html
    for link in page.links:
        assert (link.startswith("#") and link[1:] in page.ids) or re.match(r"https?://\w", link)


def test_the_full_reasoning_cut_from_the_card_is_on_the_page(client: FlaskClient) -> None:
    html, _ = _page(client, "/guidance/myasthenia-magnesium?topic=myasthenia-gravis")
    for statement in KNOWLEDGE.rule("myasthenia-magnesium").guidance:
        # Markdown bold becomes HTML; the words are all there.
        text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", _escaped(statement.text))
        assert text in html
    # The claim the card flags in one clause is given in full here, under "unverified".
    unverified = html.split('id="unverified"')[1]
    assert "Magnesium may counteract anticholinesterase drugs" in unverified


@pytest.mark.parametrize(
    ("rule_id", "threshold"),
    [
        ("obstetric-magnesium-monitoring", "obstetric-respiratory-rate-min"),
        ("obstetric-magnesium-monitoring", "serum-magnesium-anticonvulsant-range"),
        ("high-serum-magnesium", "serum-magnesium-respiratory-paralysis"),
        ("myasthenia-magnesium", "myasthenia-oral-low-dose"),
        ("magnesium-dose-limit", "supervised-laxative-course-max-days"),
    ],
)
def test_a_page_shows_the_figures_its_cards_rest_on(
    client: FlaskClient, rule_id: str, threshold: str
) -> None:
    """The figures of the grading merged this round are on the rule's page (the obstetric
    page had no figures at all)."""
    html, _ = _page(client, f"/guidance/{rule_id}")
    figures = html.split('id="figures"')[1].split("</section>")[0]
    assert _escaped(KNOWLEDGE.threshold(threshold).display) in figures


def test_the_blocker_page_says_how_magnesium_acts_on_blockers(client: FlaskClient) -> None:
    html, _ = _page(client, "/guidance/magnesium-neuromuscular-blocker")
    drugs = html.split('id="drugs"')[1].split("</section>")[0]
    assert "Neuromuscular" in drugs


def test_a_hashimoto_page_speaks_of_hashimoto_not_of_myasthenia(client: FlaskClient) -> None:
    html, _ = _page(client, "/guidance/autoimmune-guidance?topic=hashimoto&topic=citrate")
    conditions = html.split('id="conditions"')[1].split("</section>")[0]
    assert "Hashimoto" in conditions and "Myasthenia" not in conditions
    assert "Magnesium citrate <strong>(this order)</strong>" in html


def test_the_spacing_table_shows_the_drug_group_of_the_card(client: FlaskClient) -> None:
    html, _ = _page(client, "/guidance/chelation-interaction?topic=thyroid-hormone")
    assert "levothyroxine" in html and "ciprofloxacin" not in html
    html, _ = _page(client, "/guidance/chelation-interaction")
    assert "levothyroxine" in html and "ciprofloxacin" in html


def test_an_unknown_rule_is_404_json_and_an_unknown_topic_400(client: FlaskClient) -> None:
    response = client.get("/guidance/no-such-rule")
    assert response.status_code == 404 and response.get_json()["error"] == "unknown-rule"
    response = client.get("/guidance/renal-magnesium?topic=<script>")
    body = response.get_json()
    assert response.status_code == 400 and body["error"] == "unknown-topic"
    assert body["problems"][0]["path"] == "$.query.topic"
    response = client.get("/guidance/renal-magnesium?" + "&".join(["topic=sle"] * 9))
    assert response.status_code == 400 and response.get_json()["error"] == "too-many-topics"
    for odd in ("%00", "x" * 5000, "..%2F..%2Fetc", "%C3%28", "renal-magnesium%0A"):
        response = client.get(f"/guidance/{odd}")
        assert response.status_code == 404 and response.is_json, odd
        assert len(response.get_json()["message"]) < 500


def test_the_page_needs_no_token_even_with_authentication_on(tmp_path: Path) -> None:
    issuers = tmp_path / "issuers.json"
    issuers.write_text(json.dumps({"issuers": []}))
    app = _app(
        tmp_path,
        auth="on",
        trusted_issuers_file=str(issuers),
        external_base_url="https://cds.example.org",
    )
    assert app.test_client().get("/guidance/renal-magnesium").status_code == 200


def _escaped(text: str) -> str:
    return html_escape(text)


def _mg_request() -> dict[str, object]:
    body: dict[str, object] = json.loads(
        (FIXTURES / "requests" / "mg-pyridostigmine.order-select.json").read_text()
    )
    return body


def test_cards_link_their_page_from_the_configured_public_url(tmp_path: Path) -> None:
    client = _app(tmp_path, external_base_url="https://cds.example.org,https://other").test_client()
    [card] = client.post("/cds-services/magnesium-order-select", json=_mg_request()).get_json()[
        "cards"
    ]
    assert card["links"] == [
        {
            "label": "Why, and what else to consider",
            "url": "https://cds.example.org/guidance/myasthenia-magnesium?topic=myasthenia-gravis",
            "type": "absolute",
        }
    ]


def test_without_a_public_url_cards_link_the_host_they_were_called_on(
    client: FlaskClient,
) -> None:
    response = client.post(
        "/cds-services/magnesium-order-select",
        json=_mg_request(),
        base_url="http://ehr-facing.example:8080",
    )
    [card] = response.get_json()["cards"]
    assert card["links"][0]["url"].startswith(
        "http://ehr-facing.example:8080/guidance/myasthenia-magnesium"
    )
