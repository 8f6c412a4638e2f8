"""JWK Sets: parsing public signing keys, and fetching issuers' sets with a cache.

A fetched set is cached for ``ttl`` seconds and refetched once when a token names a ``kid``
it lacks (the issuer rotated its keys). Every fetch has a timeout, a bound on bytes and on
total time, and never follows redirects; a set that cannot be had raises ``JwksError`` (the
caller answers 401), and a failed URL is not retried for ``min_refetch_seconds`` so that a
dead issuer costs each call nothing rather than a timeout.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
import requests
from urllib3.exceptions import HTTPError as Urllib3Error

log = logging.getLogger(__name__)

# Public-key parameters only: a JWK with private or symmetric material is never a trust anchor.
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
MAX_JWKS_BYTES = 512_000


class JwksError(Exception):
    """No usable key; the message is safe to log (it never holds a token)."""


@dataclass(frozen=True)
class SigningKey:
    kid: str
    kty: str  # "EC" or "RSA"
    alg: str | None  # as declared in the JWK; None = not declared
    public_key: Any  # a cryptography public key object


def parse_jwks(document: Any, source: str) -> dict[str, SigningKey]:
    """The usable signing keys of a JWK Set, by kid. Unusable keys are skipped and logged."""
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise JwksError(f"{source} is not a JWK Set (an object with a 'keys' array)")
    keys: dict[str, SigningKey] = {}
    for index, item in enumerate(document["keys"]):
        where = f"{source} keys[{index}]"
        if not isinstance(item, Mapping):
            log.warning("skipping %s: not an object", where)
            continue
        kid = item.get("kid")
        if not isinstance(kid, str) or not kid:
            log.warning("skipping %s: no kid", where)
            continue
        if item.get("kty") not in {"EC", "RSA"} or item.get("use", "sig") != "sig":
            log.warning("skipping %s (kid %s): not an EC or RSA signing key", where, kid)
            continue
        if any(member in item for member in _PRIVATE_MEMBERS):
            log.warning("skipping %s (kid %s): holds private key material", where, kid)
            continue
        alg = item.get("alg")
        try:
            public_key = jwt.PyJWK(dict(item)).key
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            log.warning("skipping %s (kid %s): %s", where, kid, type(exc).__name__)
            continue
        keys[kid] = SigningKey(kid, item["kty"], alg if isinstance(alg, str) else None, public_key)
    return keys


def read_bounded(response: requests.Response, max_bytes: int, deadline: float) -> bytes:
    """The body, or an exception once it exceeds ``max_bytes`` or runs past ``deadline``.

    ``read1`` returns after one socket read, so a server that drips bytes cannot hold us past
    the deadline by more than one read timeout (``iter_content`` would block per 64 KiB).
    """
    chunks: list[bytes] = []
    size = 0
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError("the answer took too long")
        chunk = response.raw.read1(65536, decode_content=True)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise ValueError(f"the answer exceeds {max_bytes} bytes")
        chunks.append(chunk)


@dataclass(frozen=True)
class _Entry:
    keys: dict[str, SigningKey]
    fetched_at: float


class JwksCache:
    """Fetched JWK Sets by URL; thread-safe (gunicorn gthread workers share one per process)."""

    def __init__(
        self,
        *,
        ttl: float,
        timeout: float,
        min_refetch_seconds: float = 2.0,
        max_bytes: int = MAX_JWKS_BYTES,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.timeout = timeout
        self.min_refetch_seconds = min_refetch_seconds
        self.max_bytes = max_bytes
        self._session = session or requests.Session()
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._failures: dict[str, float] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def key(self, url: str, kid: str) -> SigningKey:
        """The key ``kid`` of the set at ``url``; raises JwksError."""
        with self._lock_for(url):
            now = self._clock()
            entry = self._entries.get(url)
            if entry is None or now - entry.fetched_at >= self.ttl:
                entry = self._refresh(url, now)
            if kid in entry.keys:
                return entry.keys[kid]
            # Unknown kid: the issuer may have rotated; refetch once, but not on every call
            # (random kids must not turn us into a request amplifier).
            if now - entry.fetched_at >= self.min_refetch_seconds:
                entry = self._refresh(url, now)
                if kid in entry.keys:
                    log.info("JWK Set %s refetched: new key %s", url, kid)
                    return entry.keys[kid]
            raise JwksError(f"no key with kid {kid!r} in the JWK Set at {url}")

    def _lock_for(self, url: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(url, threading.Lock())

    def _refresh(self, url: str, now: float) -> _Entry:
        failed_at = self._failures.get(url)
        if failed_at is not None and now - failed_at < self.min_refetch_seconds:
            raise JwksError(f"the JWK Set at {url} could not be fetched moments ago")
        try:
            keys = parse_jwks(self._fetch(url), url)
        except JwksError:
            self._failures[url] = now
            raise
        self._failures.pop(url, None)
        entry = _Entry(keys, now)
        self._entries[url] = entry
        return entry

    def _fetch(self, url: str) -> Any:
        deadline = time.monotonic() + self.timeout
        try:
            response = self._session.get(
                url,
                headers={"Accept": "application/json"},
                timeout=(self.timeout, self.timeout),
                allow_redirects=False,
                stream=True,
            )
            with response:
                if response.status_code != 200:
                    status = response.status_code
                    raise JwksError(f"fetching the JWK Set at {url} gave HTTP {status}")
                body = read_bounded(response, self.max_bytes, deadline)
        except JwksError:
            raise
        except (requests.RequestException, Urllib3Error, OSError, ValueError) as exc:
            reason = type(exc).__name__
            raise JwksError(f"fetching the JWK Set at {url} failed ({reason})") from None
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise JwksError(f"the JWK Set at {url} is not JSON") from None
