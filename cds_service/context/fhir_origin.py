"""Which origin a URL names, read as the HTTP client that connects reads it; and which
``fhirServer`` origins this service may fetch from at all.

Two URL parsers can disagree: ``http://A\\@B/`` is host B to ``urllib.parse`` but host A to
urllib3, which requests connects with. An origin check must use the connecting parser's
reading, and a URL the two read differently (or that holds what only one of them tolerates:
backslashes, user info, whitespace, control or non-ASCII characters) is refused outright.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests
from urllib3.util import parse_url

DEFAULT_PORTS = {"http": 80, "https": 443}
ANY_ORIGIN = "*"


class UnsafeUrl(ValueError):
    """A URL this service will not send a request (and a token) to; the message says why."""


@dataclass(frozen=True, order=True)
class Origin:
    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = DEFAULT_PORTS.get(self.scheme)
        return f"{self.scheme}://{host}" + ("" if self.port == default else f":{self.port}")


def origin_of(url: str) -> Origin:
    """The origin a request to ``url`` connects to; UnsafeUrl if that is not certain."""
    if not url.isascii() or any(c <= " " or c == "\x7f" or c == "\\" for c in url):
        raise UnsafeUrl("the URL holds whitespace, control, non-ASCII or backslash characters")
    try:
        split = urlsplit(url)
        split_port = split.port
        # What requests sends, read by the parser urllib3 connects with.
        prepared = requests.Request("GET", url).prepare().url or ""
        connected = parse_url(prepared)
    except (ValueError, requests.RequestException) as exc:
        raise UnsafeUrl(f"the URL cannot be read ({type(exc).__name__})") from None
    scheme = (split.scheme or "").lower()
    if scheme not in DEFAULT_PORTS:
        raise UnsafeUrl("the URL is not http(s)")
    if "@" in split.netloc or connected.auth:
        raise UnsafeUrl("the URL holds user information")
    if "%" in split.netloc:
        raise UnsafeUrl("the URL's host is percent-encoded")
    if split_port == 0:
        raise UnsafeUrl("the URL names port 0")
    host = (connected.host or "").strip("[]").lower()
    if not host or host != (split.hostname or "").lower():
        raise UnsafeUrl("the URL's host reads differently to different parsers")
    port = connected.port or DEFAULT_PORTS[scheme]
    if (connected.scheme or "").lower() != scheme or port != (split_port or DEFAULT_PORTS[scheme]):
        raise UnsafeUrl("the URL's scheme or port reads differently to different parsers")
    return Origin(scheme, host, port)


def parse_origins(raw: str | Iterable[str], where: str) -> frozenset[Origin] | None:
    """Origins from ``a,b`` (or a list); None for ``*`` (any). ValueError naming ``where``.

    An entry is an origin: scheme, host and port, without path, query or user information.
    """
    entries = raw.split(",") if isinstance(raw, str) else list(raw)
    origins: set[Origin] = set()
    for entry in entries:
        text = entry.strip()
        if not text:
            continue
        if text == ANY_ORIGIN:
            return None
        try:
            origin = origin_of(text)
        except UnsafeUrl as exc:
            raise ValueError(f"{where}: {text!r} is not an http(s) origin ({exc})") from None
        split = urlsplit(text)
        if split.path not in {"", "/"} or "?" in text or "#" in text:
            raise ValueError(
                f"{where}: {text!r} must be an origin like https://fhir.example.org:8443 "
                "(no path, query or fragment)"
            )
        origins.add(origin)
    return frozenset(origins)


@dataclass(frozen=True)
class FhirServerAllowlist:
    """The ``fhirServer`` origins a call may make this service fetch from.

    ``everywhere``: the global list (``CDS_FHIR_SERVER_ALLOWLIST``), None for any origin.
    ``by_issuer``: per trusted JWT issuer, the FHIR servers its entry lists; they add to the
    global list for calls that issuer authenticated.
    """

    everywhere: frozenset[Origin] | None = frozenset()
    by_issuer: Mapping[str, frozenset[Origin]] | None = None

    def refusal(self, fhir_server: str, issuer: str | None) -> str | None:
        """None when a call authenticated by ``issuer`` (None: authentication off) may fetch
        from ``fhir_server``; otherwise why not, in words for the caller."""
        try:
            origin = origin_of(fhir_server)
        except UnsafeUrl as exc:
            return f"the fhirServer URL is refused: {exc}"
        if self.everywhere is None or origin in self.everywhere:
            return None
        if issuer is not None and origin in (self.by_issuer or {}).get(issuer, frozenset()):
            return None
        return (
            "the fhirServer is not one this service is allowed to fetch from "
            "(CDS_FHIR_SERVER_ALLOWLIST, or the issuer's fhirServers in the trusted issuers file)"
        )
