"""Optional live RxNorm look-up: the ingredients of an RxCUI the knowledge files do not hold.

Asks an RxNav-compatible REST API (NLM's RxNav, or RxNav-in-a-Box on site) for
``{base}/rxcui/{rxcui}/related.json?tty=IN+PIN`` and reads RxNav's documented shape,
``relatedGroup.conceptGroup[].conceptProperties[].{rxcui,name,tty}``. One hook call waits at
most ``budget_seconds`` for all its look-ups together (the request runs in a worker thread, so
a slow server cannot hold the call); answers are cached per process, bounded, with a TTL. A
look-up that outlives the budget keeps running in the background and its answer is cached for
the next call. A failure is reported as a data issue of the call, never raised.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from cds_service.context.model import Coding, DataIssue
from cds_service.knowledge.model import RXNORM, normalise_system
from cds_service.settings import Settings

# IN and PIN: a product's, brand's or precise ingredient's own ingredients. Not MIN: asked of an
# ingredient, MIN names the combinations that contain it (calcium carbonate would come back with
# "calcium carbonate / magnesium hydroxide" and read as magnesium).
_INGREDIENT_TYPES = ("IN", "PIN")
_MAX_BODY_BYTES = 1_000_000
_MAX_CODES_PER_MEDICATION = 3
# A failed look-up is retried after this long at most, not at every call.
_FAILURE_TTL_SECONDS = 60.0
# How long one background request may take (it never holds a hook call: see the budget).
_FETCH_TIMEOUT_SECONDS = 5.0
# Look-ups in flight at once; past it a new code waits for the next call (bounded threads).
_MAX_PENDING = 64

# (ingredient codings, problem or "")
Answer = tuple[tuple[Coding, ...], str]
MedicationCodes = tuple[tuple[Coding, ...], tuple[Coding, ...], str]


class RxNavClient:
    def __init__(
        self,
        base_url: str,
        *,
        budget_seconds: float = 0.150,
        cache_size: int = 10_000,
        ttl_seconds: float = 86_400.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.budget_seconds = budget_seconds
        self.cache_size = cache_size
        self.ttl_seconds = ttl_seconds
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, Answer]] = OrderedDict()
        self._lock = threading.Lock()
        self._pending: dict[str, Future[Answer]] = {}
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="rxnav")

    def deadline(self) -> float:
        """The moment the current hook call stops waiting for RxNav."""
        return self._clock() + self.budget_seconds

    def ingredients(self, rxcui: str, deadline: float) -> Answer:
        """Ingredient codings (IN, PIN) of ``rxcui``, or () with the reason."""
        now = self._clock()
        with self._lock:
            cached = self._cache.get(rxcui)
            if cached is not None and cached[0] > now:
                self._cache.move_to_end(rxcui)
                return cached[1]
            future = self._pending.get(rxcui)
            started = future is None and len(self._pending) < _MAX_PENDING
            if started:
                future = self._pool.submit(self._fetch, rxcui)
                self._pending[rxcui] = future
        if started and future is not None:
            # Outside the lock: a future already done runs the callback right here.
            future.add_done_callback(lambda done: self._remember(rxcui, done))
        if future is None:
            return (), f"more than {_MAX_PENDING} RxNorm look-ups are already under way"
        remaining = deadline - now
        if remaining <= 0:
            return (), "the RxNorm look-up's time budget for this call was spent"
        try:
            return future.result(timeout=remaining)
        except FutureTimeout:
            return (), f"the RxNorm look-up did not answer within {self._budget_ms()} ms"

    def _remember(self, rxcui: str, done: Future[Answer]) -> None:
        answer = done.result()  # _fetch never raises
        ttl = min(_FAILURE_TTL_SECONDS, self.ttl_seconds) if answer[1] else self.ttl_seconds
        with self._lock:
            self._pending.pop(rxcui, None)
            self._cache[rxcui] = (self._clock() + ttl, answer)
            self._cache.move_to_end(rxcui)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _budget_ms(self) -> int:
        return round(self.budget_seconds * 1000)

    def _fetch(self, rxcui: str) -> Answer:
        query = urllib.parse.urlencode({"tty": " ".join(_INGREDIENT_TYPES)})
        url = f"{self.base_url}/rxcui/{urllib.parse.quote(rxcui, safe='')}/related.json?{query}"
        try:
            with urllib.request.urlopen(url, timeout=_FETCH_TIMEOUT_SECONDS) as response:
                body = response.read(_MAX_BODY_BYTES + 1)
        except urllib.error.HTTPError as exc:
            return (), f"the RxNorm look-up answered HTTP {exc.code}"
        except (OSError, ValueError):
            return (), "the RxNorm look-up could not be reached"
        except Exception:  # a background look-up must always end in an answer
            return (), "the RxNorm look-up failed"
        if len(body) > _MAX_BODY_BYTES:
            return (), "the RxNorm look-up answered more than it should"
        return _parse_related(body)


def client_from_settings(settings: Settings) -> RxNavClient | None:
    """The process's RxNav client when ``CDS_RXNAV_URL`` is set, else None (never asked)."""
    if not settings.rxnav_url:
        return None
    return RxNavClient(
        settings.rxnav_url,
        budget_seconds=settings.rxnav_budget_ms / 1000,
        cache_size=settings.rxnav_cache_size,
        ttl_seconds=settings.rxnav_cache_seconds,
    )


def _parse_related(body: bytes) -> Answer:
    malformed: Answer = ((), "the RxNorm look-up answered something that is not RxNav JSON")
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return malformed
    # related.json answers relatedGroup; allrelated.json (same shape) allRelatedGroup.
    group = (
        document.get("relatedGroup") or document.get("allRelatedGroup")
        if isinstance(document, dict)
        else None
    )
    if not isinstance(group, dict):
        return malformed
    found: list[Coding] = []
    for concept_group in group.get("conceptGroup") or []:
        if not isinstance(concept_group, dict):
            return malformed
        for concept in concept_group.get("conceptProperties") or []:
            if not isinstance(concept, dict):
                return malformed
            code, name, tty = concept.get("rxcui"), concept.get("name"), concept.get("tty")
            if isinstance(code, str) and code.isdigit() and tty in _INGREDIENT_TYPES:
                found.append(Coding(RXNORM, code, name if isinstance(name, str) else ""))
    return tuple(found), ""


def with_ingredients(
    codes: MedicationCodes,
    client: RxNavClient,
    deadline: float,
    issues: list[DataIssue],
    where: str,
) -> MedicationCodes:
    """``codes`` with the RxNav ingredients of its RxNorm codings added to the ingredients."""
    named, ingredients, text = codes
    rxcuis = [c.code.strip() for c in named if normalise_system(c.system) == RXNORM]
    found: list[Coding] = []
    for rxcui in rxcuis[:_MAX_CODES_PER_MEDICATION]:
        if not rxcui.isdigit():
            continue
        got, problem = client.ingredients(rxcui, deadline)
        if problem:
            issues.append(DataIssue(where, f"RxNorm {rxcui} not in the knowledge files; {problem}"))
        found.extend(got)
    return (named, ingredients + tuple(found), text) if found else codes
