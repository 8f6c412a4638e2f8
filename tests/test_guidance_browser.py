"""The explanation pages in headless Chromium, served by a real `cds-service serve` process.

Every page a card can link to (each rule's, and each one the fixture scenarios' cards link
to) renders: English, one h1, readable text contrast, no request leaves 127.0.0.1, no
sideways scrolling on a phone, printable; every link in it resolves (on the page or on the
service) or is an external http(s) URL. Screenshots at 1366x768 and 390x844 go to
test-artifacts/guidance/ (git-ignored): each rule's own page whole, with a printed PDF; a
topic variant as the screen first shows it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urljoin, urlsplit

import pytest
import requests
from browser_support import ARTIFACTS, chromium
from processes import Served, free_port, run_cds

from cds_service.knowledge import default_knowledge
from cds_service.resources import bundled_dir

FIXTURES = bundled_dir("fixtures")
TABLE = json.loads((FIXTURES / "scenarios.json").read_text(encoding="utf-8"))
VIEWPORTS = {"desktop": (1366, 768), "phone": (390, 844)}
SHOTS = ARTIFACTS / "guidance"

# WCAG 2 contrast of each text element's colour against the page background.
_CONTRAST_JS = """
() => {
  const rgb = s => s.match(/[\\d.]+/g).slice(0, 3).map(Number);
  const lum = c => {
    const [r, g, b] = c.map(v => { v /= 255; return v <= 0.03928 ? v / 12.92
      : Math.pow((v + 0.055) / 1.055, 2.4); });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const bg = rgb(getComputedStyle(document.documentElement).backgroundColor);
  const worst = [];
  for (const el of document.querySelectorAll('p, li, td, th, a, h1, h2, h3, span, caption')) {
    if (!el.textContent.trim()) continue;
    const fg = rgb(getComputedStyle(el).color);
    const [hi, lo] = [lum(fg), lum(bg)].sort((a, b) => b - a);
    worst.push((hi + 0.05) / (lo + 0.05));
  }
  return Math.min(...worst);
}
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    port = free_port()
    directory = tmp_path_factory.mktemp("guidance-serve")
    env = {
        "CDS_AUTH": "off",
        "CDS_FHIR_SERVER_ALLOWLIST": "*",  # scenarios without prefetch read the fixture server
        "CDS_WORKERS": "1",
        "CDS_DATABASE_URL": f"sqlite:///{directory / 'cds.sqlite3'}",
    }
    command = ["serve", "--host", "127.0.0.1", "--port", str(port)]
    with run_cds(command, env, directory / "serve.log", port=port, workers=1) as server:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


@pytest.fixture(scope="module")
def linked_pages(served: Served, fixture_fhir_server: str) -> list[str]:
    """Every explanation page: each rule's, and every one a scenario's card links to."""
    pages = {f"{served.url}/guidance/{rule_id}" for rule_id in default_knowledge().rule_ids}
    for scenario in TABLE["scenarios"]:
        body = json.loads((FIXTURES / "requests" / scenario["request"]).read_text())
        body["fhirServer"] = fixture_fhir_server
        answer = requests.post(
            f"{served.url}/cds-services/{scenario['service']}", json=body, timeout=30
        ).json()
        for card in answer["cards"]:
            pages |= {link["url"] for link in card.get("links", [])}
    return sorted(pages)


def _file_name(url: str) -> str:
    parts = urlsplit(url)
    return re.sub(r"[^\w.-]+", "_", parts.path.rsplit("/", 1)[-1] + "_" + parts.query).strip("_")


def test_every_explanation_page_renders_and_every_link_resolves(
    served: Served, browser: Any, linked_pages: list[str]
) -> None:
    assert len(linked_pages) > len(default_knowledge().rule_ids)  # topic pages too
    SHOTS.mkdir(parents=True, exist_ok=True)
    requested: list[str] = []
    pages = {}
    for label, (width, height) in VIEWPORTS.items():
        page = browser.new_page(viewport={"width": width, "height": height})
        page.on("request", lambda request: requested.append(request.url))
        pages[label] = page
    for url in linked_pages:
        for label, page in pages.items():
            requested.clear()
            _check_page(page, label, served.url, url, requested)
    for page in pages.values():
        page.close()


def _check_page(page: Any, label: str, base: str, url: str, requested: list[str]) -> None:
    """Each rule's own page is shot whole and printed; a topic variant, as the screen shows."""
    name = _file_name(url)
    whole = "?" not in url
    width, height = VIEWPORTS[label]
    page.emulate_media(media="screen")
    response = page.goto(url, wait_until="load")
    assert response is not None and response.status == 200, url
    assert page.evaluate("document.documentElement.lang") == "en"
    assert page.locator("h1").count() == 1 and page.locator("h2").count() >= 4, url
    assert page.title().endswith("magnesium-cds")
    for heading in ("Why, in full", "What is unverified", "Sources"):
        assert page.get_by_role("heading", name=heading).count() <= 1
    assert page.get_by_role("heading", name="Sources").count() == 1, url
    assert "Knowledge version" in page.inner_text("footer")
    outside = [u for u in requested if not u.startswith((base, "data:"))]
    assert outside == [], f"{url} loaded {outside}"  # no external assets
    assert page.evaluate(_CONTRAST_JS) >= 4.5, url  # WCAG AA for body text
    # Readable at phone width: nothing wider than the screen (tables stack on a phone).
    assert page.evaluate("document.documentElement.scrollWidth") <= width, (url, label)
    shot = SHOTS / f"{name}-{width}x{height}.png"
    page.screenshot(path=str(shot), full_page=whole)
    assert shot.stat().st_size > 10_000
    if label == "desktop":
        _check_links(page, base, url)
        if whole:
            page.emulate_media(media="print")
            pdf = SHOTS / f"{name}.pdf"
            page.pdf(path=str(pdf), format="A4")
            assert pdf.stat().st_size > 10_000


def _check_links(page: Any, base: str, url: str) -> None:
    hrefs: list[str] = page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)")
    raw: list[str] = page.eval_on_selector_all(
        "a[href]", "els => els.map(e => e.getAttribute('href'))"
    )
    assert hrefs, url
    for href, written in zip(hrefs, raw, strict=True):
        if written.startswith("#"):
            assert page.locator(f"[id='{written[1:]}']").count() == 1, (url, written)
        elif href.startswith(base):
            assert requests.get(urljoin(url, written), timeout=10).status_code == 200, href
        else:  # external: well-formed, openable by a browser; not fetched (no network in CI)
            parts = urlsplit(href)
            assert parts.scheme in ("http", "https") and parts.netloc, (url, href)
            assert " " not in href and parts.netloc.lower() != "127.0.0.1", (url, href)

