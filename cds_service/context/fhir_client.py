"""Server access for the prefetch fallback: the only module here that talks to a FHIR server.

Missing prefetch keys are fetched concurrently (one thread per key, bounded), each with the
EHR's bearer token, a connect timeout, and one time budget (the read timeout) and one byte
budget for the key as a whole, across all its pages and redirects, plus a bound on pages.
The token is only ever sent to the ``fhirServer`` origin, as the connecting library reads
URLs (``fhir_origin``): redirects, ``next`` links and reads that leave it are not followed.

The whole hook call has one deadline (``call_deadline``) whatever the server does: every
socket wait is bounded by what is left of it, and when it passes, the sockets still in use
are shut down (a server dripping its headers a byte at a time never trips a read timeout),
so no fetch thread outlives the call for long.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import urljoin

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.response import BaseHTTPResponse

from cds_service.context.fhir_origin import FhirServerAllowlist, Origin, UnsafeUrl, origin_of
from cds_service.settings import Settings

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
    # Seconds from the client's creation (the call's first fetch) after which nothing more is
    # waited for: what was not had by then is reported as not had.
    call_deadline: float = 5.0


class FetchFailed(Exception):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


NOT_IN_TIME = "the FHIR server did not answer in time"
UNEXPECTED = "reading the FHIR server's answer failed"
# After the deadline has shut a fetch's sockets, how long the call still waits for its
# threads to notice (they are not blocked any more; this is scheduling slack).
_ABORT_GRACE_SECONDS = 0.5


class _Budget:
    """What one prefetch key may still spend, across all its pages and redirects.

    A per-request bound would let a server answer 5 pages x 5 redirects, each just under the
    limits; the key as a whole is what must stay bounded, and never past the call's deadline.
    """

    def __init__(self, config: FhirClientConfig, call_deadline: float) -> None:
        self.deadline = min(time.monotonic() + config.read_timeout, call_deadline)
        self.bytes_left = config.max_response_bytes

    def seconds_left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise FetchFailed(NOT_IN_TIME)
        return left

    def expired(self) -> bool:
        return time.monotonic() >= self.deadline


class _InFlight:
    """The sockets a client's fetches are waiting on, by thread; shut down at the deadline.

    A read timeout bounds one wait for bytes, not the answer: a server sending a header byte
    every few seconds holds a thread for as long as it likes. Shutting the socket down wakes
    the blocked read at once, whatever phase (headers, body) it is in.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: dict[int, socket.socket] = {}
        self._aborted = False

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            if not self._aborted:
                self._sockets[threading.get_ident()] = sock
                return
        _shut(sock)

    def release(self) -> None:
        with self._lock:
            self._sockets.pop(threading.get_ident(), None)

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            sockets = list(self._sockets.values())
            self._sockets.clear()
        for sock in sockets:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed: nothing waits on it
        sock.shutdown(socket.SHUT_RDWR)


# Which _InFlight the fetch running on this thread registers its sockets with.
_current = threading.local()


def _register_socket(sock: socket.socket | None) -> None:
    in_flight: _InFlight | None = getattr(_current, "in_flight", None)
    if in_flight is not None and sock is not None:
        in_flight.add(sock)


class _GuardedHTTPConnection(HTTPConnection):
    def getresponse(self) -> Any:  # the socket is known (connected or reused) from here on
        _register_socket(self.sock)
        return super().getresponse()


class _GuardedHTTPSConnection(HTTPSConnection):
    def getresponse(self) -> Any:
        _register_socket(self.sock)
        return super().getresponse()


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class GuardedAdapter(HTTPAdapter):
    """An HTTPAdapter whose connections let the call's deadline shut their sockets down."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {  # type: ignore[assignment]
            "http": _GuardedHTTPPool,
            "https": _GuardedHTTPSPool,
        }


def guarded_session(adapter: HTTPAdapter | None = None) -> requests.Session:
    """A Session for one call. ``trust_env`` off: no proxy from the environment (its
    connections would escape the deadline) and no ``.netrc`` credentials sent anywhere."""
    session = requests.Session()
    session.trust_env = False
    adapter = adapter or GuardedAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class FhirClient:
    def __init__(
        self,
        base_url: str,
        config: FhirClientConfig,
        access_token: str | None = None,
        session: requests.Session | None = None,
        refused: str | None = None,
    ) -> None:
        """``refused``: why this service may not fetch from ``base_url`` at all (every fetch
        then fails with that reason, and nothing is sent)."""
        self.base_url = base_url.rstrip("/") + "/"
        self.config = config
        self._session = session or guarded_session()
        self._headers = {"Accept": FHIR_JSON}
        if access_token:
            self._headers["Authorization"] = f"Bearer {access_token}"
        self._deadline = time.monotonic() + config.call_deadline
        self._in_flight = _InFlight()
        self._origin: Origin | None = None
        try:
            self._origin = origin_of(self.base_url)
        except UnsafeUrl as exc:
            refused = f"the fhirServer URL is refused: {exc}"
        self.refused = refused

    def fetch_all(
        self,
        queries: Mapping[str, str],
        continuations: Mapping[str, dict[str, Any]] | None = None,
    ) -> dict[str, FetchResult]:
        """Run every ``key -> relative query`` concurrently; never raises, never waits past
        the call's deadline.

        ``continuations``: ``key -> first page`` of searchsets the client prefetched whose
        remaining pages are to be read (see ``continue_pages``), in the same pool.
        """
        continuations = continuations or {}
        jobs: dict[str, Callable[[], FetchResult]] = {
            key: partial(self.fetch, key, query) for key, query in queries.items()
        }
        for key, first_page in continuations.items():
            jobs[key] = partial(self.continue_pages, key, first_page)
        if not jobs:
            return {}

        def not_had(key: str, reason: str) -> FetchResult:
            if key in continuations:
                return FetchResult(key, continuations[key], incomplete=f"has more pages: {reason}")
            return FetchResult(key, None, reason)

        if self.refused is not None:
            log.warning(
                "not fetching from fhirServer %s: %s", self._origin or "(unreadable)", self.refused
            )
            return {key: not_had(key, self.refused) for key in jobs}
        left = self._deadline - time.monotonic()
        if left <= 0:
            return {key: not_had(key, NOT_IN_TIME) for key in jobs}
        watchdog = threading.Timer(left, self._in_flight.abort)
        watchdog.daemon = True
        watchdog.start()
        try:
            if len(jobs) == 1:
                key, job = next(iter(jobs.items()))
                return {key: self._guarded(job, not_had(key, UNEXPECTED))}
            workers = max(1, min(self.config.max_workers, len(jobs)))
            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fhir-fetch")
            futures: dict[str, Future[FetchResult]] = {
                key: pool.submit(self._guarded, job, not_had(key, UNEXPECTED))
                for key, job in jobs.items()
            }
            wait(futures.values(), timeout=left + _ABORT_GRACE_SECONDS)
            # Jobs not started are dropped; a thread still running ends with its socket,
            # which the watchdog has shut: the pool does not outlive the call for long.
            pool.shutdown(wait=False, cancel_futures=True)
            return {
                key: future.result() if future.done() and not future.cancelled()
                else not_had(key, NOT_IN_TIME)
                for key, future in futures.items()
            }
        finally:
            watchdog.cancel()

    def _guarded(self, job: Callable[[], FetchResult], failed: FetchResult) -> FetchResult:
        """``job`` with its sockets under the deadline's watchdog; ``failed`` if it raises."""
        _current.in_flight = self._in_flight
        try:
            return job()
        except Exception as exc:
            # Whatever a server answers must not turn into a 500. The type only: an
            # exception's text may hold a query URL, and with it the patient's id.
            log.error("FHIR fetch failed unexpectedly (%s)", type(exc).__name__)
            return failed
        finally:
            self._in_flight.release()
            _current.in_flight = None

    def fetch(self, key: str, query: str) -> FetchResult:
        url = urljoin(self.base_url, query.lstrip("/"))
        budget = _Budget(self.config, self._deadline)
        try:
            first = self._get_json(url, budget)
            if first.get("resourceType") == "OperationOutcome":
                return FetchResult(key, None, "the FHIR server answered with an OperationOutcome")
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
        budget = _Budget(self.config, self._deadline)
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
            try:
                next_url = self._same_origin(urljoin(self.base_url, next_url))
            except FetchFailed:
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

    def _same_origin(self, url: str) -> str:
        """``url`` if a request to it goes to the ``fhirServer`` origin; else FetchFailed.

        Every URL is checked here before it is fetched with the token: the first query,
        each redirect, each ``next`` page, each Medication read.
        """
        if self.refused is not None:
            raise FetchFailed(self.refused)
        try:
            same = origin_of(url) == self._origin
        except UnsafeUrl:
            same = False
        if not same:
            raise FetchFailed("the FHIR server pointed to another origin; not followed")
        return url

    def _get_json(
        self, url: str, budget: _Budget, redirects_left: int = MAX_REDIRECTS
    ) -> dict[str, Any]:
        url = self._same_origin(url)
        seconds_left = budget.seconds_left()
        try:
            prepared = self._session.prepare_request(
                requests.Request("GET", url, headers=self._headers)
            )
            # The adapter, not Session.send: that one reads a redirect's body and parses its
            # Location (raising on an odd port) even when told not to follow it.
            response = self._session.get_adapter(url).send(
                prepared,
                stream=True,
                timeout=(min(self.config.connect_timeout, seconds_left), seconds_left),
            )
        except requests.Timeout as exc:
            raise FetchFailed(NOT_IN_TIME) from exc
        except (requests.RequestException, Urllib3Error) as exc:
            if budget.expired():
                raise FetchFailed(NOT_IN_TIME) from exc
            raise FetchFailed(
                f"the FHIR server could not be reached ({type(exc).__name__})"
            ) from exc
        with response:
            try:
                if response.is_redirect:
                    location = response.headers.get("Location", "")
                    try:
                        target = self._same_origin(urljoin(url, location))
                    except FetchFailed:
                        # Never carry the EHR's token to another host.
                        raise FetchFailed(
                            "the FHIR server redirected to another origin; not followed"
                        ) from None
                    if redirects_left <= 0:
                        raise FetchFailed("the FHIR server redirected too many times")
                    self._in_flight.release()
                    return self._get_json(target, budget, redirects_left - 1)
                body = self._read_bounded(response, budget)
            finally:
                # Before the connection goes back to the pool: the watchdog must never shut
                # a socket another call has taken.
                self._in_flight.release()
            if response.status_code >= 400:
                # The caller learns the status class only: an answer echoing another server's
                # words would make this service a probe. Its words are not logged either
                # (an OperationOutcome may name the patient).
                log.warning("FHIR fetch answered HTTP %d", response.status_code)
                status_class = f"HTTP {response.status_code // 100}xx"
                raise FetchFailed(
                    f"the FHIR server answered with an error ({status_class})",
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
        raw: BaseHTTPResponse = response.raw
        # The deadline bounds the whole key, not each socket read: read1 returns after one
        # read, so a server dripping bytes is cut off (iter_content blocks per 64 KiB).
        try:
            while chunk := raw.read1(65536, decode_content=True):
                budget.bytes_left -= len(chunk)
                if budget.bytes_left < 0:
                    raise FetchFailed(
                        f"the FHIR server's answer exceeds {self.config.max_response_bytes} bytes"
                    )
                chunks.append(chunk)
                budget.seconds_left()
        except (requests.RequestException, Urllib3Error, OSError) as exc:
            if budget.expired():
                raise FetchFailed(NOT_IN_TIME) from exc
            raise FetchFailed(
                f"reading the FHIR server's answer failed ({type(exc).__name__})"
            ) from exc
        if budget.expired():
            raise FetchFailed(NOT_IN_TIME)  # perhaps cut short by the deadline's shutdown
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


def client_config(settings: Settings) -> FhirClientConfig:
    return FhirClientConfig(
        connect_timeout=settings.fhir_connect_timeout,
        read_timeout=settings.fhir_read_timeout,
        max_pages=settings.fhir_max_pages,
        max_workers=settings.fhir_max_workers,
        max_response_bytes=settings.fhir_max_response_bytes,
        call_deadline=settings.call_deadline_seconds,
    )


# (fhirServer, the EHR's access token, the JWT issuer that authenticated the call or None)
ClientFactory = Callable[[str, str | None, str | None], FhirClient]


def default_client_factory(
    settings: Settings, issuer_fhir_servers: Mapping[str, frozenset[Origin]] | None = None
) -> ClientFactory:
    """FhirClients for the origins allowed on purpose: ``CDS_FHIR_SERVER_ALLOWLIST``, plus,
    for a call a trusted issuer authenticated, the FHIR servers its entry lists."""
    config = client_config(settings)
    allowlist = FhirServerAllowlist(settings.fhir_server_origins, issuer_fhir_servers)
    # One connection pool per process, so consecutive calls to the same EHR reuse their
    # connections; each call still gets its own Session (no cookies shared between calls).
    adapter = GuardedAdapter(pool_connections=16, pool_maxsize=max(10, config.max_workers * 4))

    def make(base_url: str, token: str | None, issuer: str | None = None) -> FhirClient:
        refused = allowlist.refusal(base_url, issuer)
        return FhirClient(
            base_url, config, access_token=token, session=guarded_session(adapter), refused=refused
        )

    return make
