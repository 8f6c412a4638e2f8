"""Server access for the prefetch fallback: the only module here that talks to a FHIR server.

Missing prefetch keys are fetched concurrently (one thread per key, bounded), each with the
EHR's bearer token, connect/read timeouts, a bound on pages and on bytes read. The token is
only ever sent to the ``fhirServer`` origin: redirects and ``next`` links that leave it are
not followed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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


@dataclass(frozen=True)
class FhirClientConfig:
    connect_timeout: float
    read_timeout: float
    max_pages: int
    max_workers: int
    max_response_bytes: int


class FetchFailed(Exception):
    pass


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

    def fetch_all(self, queries: dict[str, str]) -> dict[str, FetchResult]:
        """Run every ``key -> relative query`` concurrently; never raises."""
        if not queries:
            return {}
        if len(queries) == 1:
            key, query = next(iter(queries.items()))
            return {key: self.fetch(key, query)}
        workers = max(1, min(self.config.max_workers, len(queries)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fhir-fetch") as pool:
            futures = {key: pool.submit(self.fetch, key, query) for key, query in queries.items()}
            return {key: future.result() for key, future in futures.items()}

    def fetch(self, key: str, query: str) -> FetchResult:
        url = urljoin(self.base_url, query.lstrip("/"))
        try:
            first = self._get_json(url)
            if first.get("resourceType") == "OperationOutcome":
                return FetchResult(key, None, f"the FHIR server answered {_outcome_text(first)}")
            if first.get("resourceType") == "Bundle":
                return FetchResult(key, self._follow_pages(first))
            return FetchResult(key, first)
        except FetchFailed as exc:
            return FetchResult(key, None, str(exc))

    def _follow_pages(self, bundle: dict[str, Any]) -> dict[str, Any]:
        entries = list(_as_list(bundle.get("entry")))
        page = bundle
        for _ in range(max(0, self.config.max_pages - 1)):
            next_url = _next_link(page)
            if not next_url:
                break
            next_url = urljoin(self.base_url, next_url)
            if _origin(next_url) != _origin(self.base_url):
                log.warning("not following a next link to another origin")
                break
            page = self._get_json(next_url)
            entries.extend(_as_list(page.get("entry")))
        merged = dict(bundle)
        merged["entry"] = entries
        merged.pop("link", None)
        return merged

    def _get_json(self, url: str, redirects_left: int = MAX_REDIRECTS) -> dict[str, Any]:
        try:
            response = self._session.get(
                url,
                headers=self._headers,
                timeout=(self.config.connect_timeout, self.config.read_timeout),
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
                return self._get_json(target, redirects_left - 1)
            body = self._read_bounded(response)
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
                raise FetchFailed(f"the FHIR server answered HTTP {response.status_code}{detail}")
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise FetchFailed("the FHIR server's answer is not JSON") from exc
        if not isinstance(parsed, dict) or not isinstance(parsed.get("resourceType"), str):
            raise FetchFailed("the FHIR server's answer is not a FHIR resource")
        return parsed

    def _read_bounded(self, response: requests.Response) -> bytes:
        limit = self.config.max_response_bytes
        chunks: list[bytes] = []
        size = 0
        # The read timeout bounds the whole body, not each socket read: read1 returns after one
        # read, so a server dripping bytes is cut off (iter_content blocks per 64 KiB).
        deadline = time.monotonic() + self.config.read_timeout
        try:
            while chunk := response.raw.read1(65536, decode_content=True):
                size += len(chunk)
                if size > limit:
                    raise FetchFailed(f"the FHIR server's answer exceeds {limit} bytes")
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise FetchFailed("the FHIR server did not answer in time")
        except (requests.RequestException, Urllib3Error, OSError) as exc:
            raise FetchFailed(
                f"reading the FHIR server's answer failed ({type(exc).__name__})"
            ) from exc
        return b"".join(chunks)


def _as_list(value: Any) -> Iterable[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _next_link(bundle: dict[str, Any]) -> str | None:
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
