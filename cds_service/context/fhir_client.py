"""Server access for the prefetch fallback: the only module here that talks to a FHIR server.

Missing prefetch keys are fetched concurrently (one thread per key, bounded), each with the
EHR's bearer token, a connect timeout, and one time budget (the read timeout) and one byte
budget for the key as a whole, across all its pages and redirects, plus a bound on pages.
The token is only ever sent to the ``fhirServer`` origin: redirects and ``next`` links that
leave it are not followed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
from urllib3.exceptions import HTTPError as Urllib3Error

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
# Same-origin redirects followed per fetch; a loop must end in a problem, not a RecursionError.
MAX_REDIRECTS = 5


@dataclass(frozen=True)
class FetchResult:
    key: str
    resource: dict[str, Any] | None  # a Bundle (pages merged) or a single resource
    problem: str | None = None  # why nothing usable came back
    # HTTP status of a failed answer (404/400 for a resource type the server does not know).
    status: int | None = None
    # Why a Bundle is incomplete (a ``next`` page not read), when it is.
    incomplete: str | None = None


@dataclass(frozen=True)
class FhirClientConfig:
    connect_timeout: float
    read_timeout: float
    max_pages: int
    max_workers: int
    max_response_bytes: int


class FetchFailed(Exception):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _Budget:
    """What one prefetch key may still spend, across all its pages and redirects.

    A per-request bound would let a server answer 5 pages x 5 redirects, each just under the
    limits; the key as a whole is what must stay bounded.
    """

    def __init__(self, config: FhirClientConfig) -> None:
        self.deadline = time.monotonic() + config.read_timeout
        self.bytes_left = config.max_response_bytes

    def seconds_left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise FetchFailed("the FHIR server did not answer in time")
        return left


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


class FhirClient:
    def __init__(
        self,
        base_url: str,
        config: FhirClientConfig,
        access_token: str | None = None,
        session: requests.Session | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self.config = config
        self._session = session or requests.Session()
        self._headers = {"Accept": FHIR_JSON}
        if access_token:
            self._headers["Authorization"] = f"Bearer {access_token}"

    def fetch_all(
        self,
        queries: Mapping[str, str],
        continuations: Mapping[str, dict[str, Any]] | None = None,
    ) -> dict[str, FetchResult]:
        """Run every ``key -> relative query`` concurrently; never raises.

        ``continuations``: ``key -> first page`` of searchsets the client prefetched whose
        remaining pages are to be read (see ``continue_pages``), in the same pool.
        """
        jobs: dict[str, Callable[[], FetchResult]] = {
            key: partial(self.fetch, key, query) for key, query in queries.items()
        }
        for key, first_page in (continuations or {}).items():
            jobs[key] = partial(self.continue_pages, key, first_page)
        if not jobs:
            return {}
        if len(jobs) == 1:
            key, job = next(iter(jobs.items()))
            return {key: job()}
        workers = max(1, min(self.config.max_workers, len(jobs)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fhir-fetch") as pool:
            futures = {key: pool.submit(job) for key, job in jobs.items()}
            return {key: future.result() for key, future in futures.items()}

    def fetch(self, key: str, query: str) -> FetchResult:
        url = urljoin(self.base_url, query.lstrip("/"))
        budget = _Budget(self.config)
        try:
            first = self._get_json(url, budget)
            if first.get("resourceType") == "OperationOutcome":
                return FetchResult(key, None, f"the FHIR server answered {_outcome_text(first)}")
            if first.get("resourceType") == "Bundle":
                merged, incomplete = self._follow_pages(first, budget, pages_read=1)
                return FetchResult(key, merged, incomplete=incomplete)
            return FetchResult(key, first)
        except FetchFailed as exc:
            return FetchResult(key, None, str(exc), status=exc.status)
        except _PartialPages as exc:
            # A fetched key is all or nothing, as before: a silently partial condition list
            # could hide the one condition that matters.
            return FetchResult(key, None, exc.reason, status=exc.status)

    def continue_pages(self, key: str, first_page: dict[str, Any]) -> FetchResult:
        """The rest of a searchset whose first page the client prefetched; never raises.

        Pages after the first are read only from the ``fhirServer`` origin (the token never
        goes elsewhere), within the same page, byte and time bounds as a fetched key. On any
        failure the result keeps what was read and says why it is incomplete.
        """
        budget = _Budget(self.config)
        try:
            merged, incomplete = self._follow_pages(first_page, budget, pages_read=1)
        except _PartialPages as exc:
            return FetchResult(key, exc.merged, incomplete=exc.reason)
        return FetchResult(key, merged, incomplete=incomplete)

    def _follow_pages(
        self, bundle: dict[str, Any], budget: _Budget, pages_read: int
    ) -> tuple[dict[str, Any], str | None]:
        """All pages merged into one Bundle, and why it is incomplete (None when it is not)."""
        entries = list(_as_list(bundle.get("entry")))
        page = bundle
        incomplete: str | None = None

        def merged() -> dict[str, Any]:
            out = dict(bundle)
            out["entry"] = entries
            out.pop("link", None)
            return out

        while next_url := next_link(page):
            if pages_read >= self.config.max_pages:
                incomplete = f"has more than {self.config.max_pages} pages; the rest was not read"
                break
            next_url = urljoin(self.base_url, next_url)
            if _origin(next_url) != _origin(self.base_url):
                log.warning("not following a next link to another origin")
                incomplete = "has a next page on another origin than fhirServer; not read"
                break
            try:
                page = self._get_json(next_url, budget)
            except FetchFailed as exc:
                raise _PartialPages(
                    merged(), f"page {pages_read + 1} could not be read ({exc})", exc.status
                ) from exc
            pages_read += 1
            entries.extend(_as_list(page.get("entry")))
        return merged(), incomplete

    def _get_json(
        self, url: str, budget: _Budget, redirects_left: int = MAX_REDIRECTS
    ) -> dict[str, Any]:
        try:
            response = self._session.get(
                url,
                headers=self._headers,
                timeout=(self.config.connect_timeout, budget.seconds_left()),
                allow_redirects=False,
                stream=True,
            )
        except requests.Timeout as exc:
            raise FetchFailed("the FHIR server did not answer in time") from exc
        except requests.RequestException as exc:
            raise FetchFailed(
                f"the FHIR server could not be reached ({type(exc).__name__})"
            ) from exc
        with response:
            if response.is_redirect:
                location = response.headers.get("Location", "")
                target = urljoin(url, location)
                if _origin(target) != _origin(self.base_url):
                    # Never carry the EHR's token to another host.
                    raise FetchFailed("the FHIR server redirected to another origin")
                if redirects_left <= 0:
                    raise FetchFailed("the FHIR server redirected too many times")
                return self._get_json(target, budget, redirects_left - 1)
            body = self._read_bounded(response, budget)
            if response.status_code >= 400:
                detail = ""
                try:
                    parsed = json.loads(body)
                    if (
                        isinstance(parsed, dict)
                        and parsed.get("resourceType") == "OperationOutcome"
                    ):
                        detail = f": {_outcome_text(parsed)}"
                except ValueError:
                    pass
                raise FetchFailed(
                    f"the FHIR server answered HTTP {response.status_code}{detail}",
                    status=response.status_code,
                )
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise FetchFailed("the FHIR server's answer is not JSON") from exc
        if not isinstance(parsed, dict) or not isinstance(parsed.get("resourceType"), str):
            raise FetchFailed("the FHIR server's answer is not a FHIR resource")
        return parsed

    def _read_bounded(self, response: requests.Response, budget: _Budget) -> bytes:
        chunks: list[bytes] = []
        # The deadline bounds the whole key, not each socket read: read1 returns after one
        # read, so a server dripping bytes is cut off (iter_content blocks per 64 KiB).
        try:
            while chunk := response.raw.read1(65536, decode_content=True):
                budget.bytes_left -= len(chunk)
                if budget.bytes_left < 0:
                    raise FetchFailed(
                        f"the FHIR server's answer exceeds {self.config.max_response_bytes} bytes"
                    )
                chunks.append(chunk)
                budget.seconds_left()
        except (requests.RequestException, Urllib3Error, OSError) as exc:
            raise FetchFailed(
                f"reading the FHIR server's answer failed ({type(exc).__name__})"
            ) from exc
        return b"".join(chunks)


class _PartialPages(Exception):
    """A later page failed: what was read so far, and why the rest is missing."""

    def __init__(self, merged: dict[str, Any], reason: str, status: int | None) -> None:
        super().__init__(reason)
        self.merged = merged
        self.reason = reason
        self.status = status


def _as_list(value: Any) -> Iterable[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def next_link(bundle: dict[str, Any]) -> str | None:
    for link in _as_list(bundle.get("link")):
        if (
            isinstance(link, dict)
            and link.get("relation") == "next"
            and isinstance(link.get("url"), str)
        ):
            return link["url"]
    return None


def _outcome_text(outcome: dict[str, Any]) -> str:
    texts = []
    for issue in _as_list(outcome.get("issue")):
        if isinstance(issue, dict):
            details = issue.get("details")
            text = issue.get("diagnostics") or (
                details.get("text") if isinstance(details, dict) else None
            )
            texts.append(str(text or issue.get("code") or "error"))
    return "an OperationOutcome" + (f" ({'; '.join(texts)[:200]})" if texts else "")
