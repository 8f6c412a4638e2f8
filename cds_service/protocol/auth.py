"""CDS Hooks JWT authentication: only trusted EHRs may call discovery, services and feedback.

Every request under ``/cds-services`` (except CORS preflight) needs ``Authorization: Bearer
<JWT>``, verified as CDS Hooks 2.0 prescribes: asymmetric alg from an allowlist, signature by
a key of the issuer's JWK Set, ``iss`` trusted, ``jku`` allowlisted for that issuer, ``aud`` the
exact URL called (a configured base URL + the path: never built from the Host header, which the
caller chooses), ``exp``/``iat`` with leeway, ``jti`` not seen before, ``tenant`` allowed.
Any failure answers 401 with a generic body; the reason goes to the log, never the token.

Replays are caught at two levels: a bounded cache in process memory (no database round trip
for a replay to the same worker), then a ``replay_guard`` shared by every worker and instance
(``create_app`` backs it with the database). If the shared guard cannot answer (the database is
down), decision support goes on: the token is checked by this process's cache alone, an ERROR
line says so (once per outage, then once a minute) and a metric counts it; the shared guard is
tried again at most every ``SHARED_REPLAY_RETRY_S`` meanwhile, so that calls do not each wait
for the database to time out.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from flask import Flask, Response, g, jsonify, request

from cds_service.context.fhir_origin import Origin, parse_origins
from cds_service.metrics import REPLAY_SHARED_CACHE_DEGRADED, REPLAY_SHARED_CACHE_UNAVAILABLE
from cds_service.protocol.jwks import JwksCache, JwksError, SigningKey, parse_jwks
from cds_service.protocol.validation import schema_problems
from cds_service.settings import Settings, SettingsError

log = logging.getLogger(__name__)

AUTH_EXTENSION = "cds_auth"
PROTECTED_PREFIX = "/cds-services"
# CDS Hooks: asymmetric signatures only; "none" and HMAC (a shared secret) are never accepted.
ALLOWED_ALGORITHMS = ("ES256", "ES384", "ES512", "RS256", "RS384", "RS512")
_EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
MIN_RSA_BITS = 2048
MAX_TOKEN_CHARS = 16_384
# Tokens are per call (the sandbox's live 5 minutes); a longer one would pin a replay-cache
# entry for its whole life.
MAX_TOKEN_LIFETIME_SECONDS = 3600

SANDBOX_ISSUER = "https://sandbox.cds-hooks.org"
SANDBOX_JKU = "https://sandbox.cds-hooks.org/.well-known/jwks.json"
SANDBOX_JWKS_FILE = Path(__file__).with_name("sandbox-jwks.json")
TRUSTED_ISSUERS_SCHEMA = "trusted-issuers.schema.json"

UNAUTHORIZED_BODY = {"error": "unauthorized", "message": "authentication failed"}

# While the shared replay cache is down: how often a call tries it again, and how often the
# ERROR line is repeated.
SHARED_REPLAY_RETRY_S = 1.0
SHARED_REPLAY_LOG_EVERY_S = 60.0

# Records ``(iss, jti)`` until ``expires_at`` (epoch seconds): True on first use, False on a
# replay; raises when it cannot tell (the token is then refused).
ReplayGuard = Callable[[tuple[str, str], float], bool]


class AuthError(Exception):
    """Why a token was refused: for the log only, never for the client."""


class TrustedIssuersError(SettingsError):
    """The trusted-issuers configuration cannot be used; the message names file and entry."""


@dataclass(frozen=True)
class TrustedIssuer:
    iss: str
    # JWK Set URLs a token's ``jku`` header may name.
    jku: tuple[str, ...] = ()
    # Keys configured out of band (inline, file, bundled); None = fetch from ``jku``.
    keys: Mapping[str, SigningKey] | None = None
    # None = any tenant (or none); else the token's ``tenant`` claim must be one of these.
    tenants: frozenset[str] | None = None
    # Origins this issuer's calls may name as ``fhirServer`` (on top of the global allowlist).
    fhir_servers: frozenset[Origin] = frozenset()


def load_trusted_issuers(path: Path) -> dict[str, TrustedIssuer]:
    """The enabled entries of a trusted-issuers file, checked against its JSON Schema."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TrustedIssuersError(
            f"cannot read trusted-issuers file {path}: {exc.strerror}"
        ) from None
    except (ValueError, RecursionError) as exc:
        raise TrustedIssuersError(f"trusted-issuers file {path} is not JSON: {exc}") from None
    problems = schema_problems(document, TRUSTED_ISSUERS_SCHEMA)
    if problems:
        details = "; ".join(f"{p['path']}: {p['message']}" for p in problems)
        raise TrustedIssuersError(f"trusted-issuers file {path} is invalid: {details}")
    issuers: dict[str, TrustedIssuer] = {}
    for index, entry in enumerate(document["issuers"]):
        where = f"trusted-issuers file {path}, issuers[{index}] ({entry['iss']})"
        if not entry.get("enabled", True):
            continue
        if entry["iss"] in issuers:
            raise TrustedIssuersError(f"{where}: the issuer is listed twice")
        keys: dict[str, SigningKey] | None = None
        if "jwks" in entry:
            keys = _configured_keys(entry["jwks"], where)
        elif "jwksFile" in entry:
            key_file = path.parent / entry["jwksFile"]
            try:
                key_document = json.loads(key_file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise TrustedIssuersError(
                    f"{where}: cannot read jwksFile {key_file}: {exc}"
                ) from None
            keys = _configured_keys(key_document, f"{where} jwksFile {key_file}")
        tenants = entry.get("tenants")
        try:
            fhir_servers = parse_origins(entry.get("fhirServers", ()), f"{where} fhirServers")
        except ValueError as exc:
            raise TrustedIssuersError(str(exc)) from None
        if fhir_servers is None:
            raise TrustedIssuersError(f"{where}: fhirServers lists origins; '*' is not one")
        issuers[entry["iss"]] = TrustedIssuer(
            iss=entry["iss"],
            jku=tuple(entry.get("jku", ())),
            keys=keys,
            tenants=frozenset(tenants) if tenants else None,
            fhir_servers=fhir_servers,
        )
    return issuers


def _configured_keys(document: Any, where: str) -> dict[str, SigningKey]:
    try:
        keys = parse_jwks(document, where)
    except JwksError as exc:
        raise TrustedIssuersError(str(exc)) from None
    if not keys:
        raise TrustedIssuersError(f"{where}: the JWK Set holds no usable public signing key")
    return keys


def sandbox_issuer() -> TrustedIssuer:
    """The public CDS Hooks sandbox, with its bundled JWKS: no network access needed."""
    document = json.loads(SANDBOX_JWKS_FILE.read_text(encoding="utf-8"))
    keys = parse_jwks(document, str(SANDBOX_JWKS_FILE))
    return TrustedIssuer(iss=SANDBOX_ISSUER, jku=(SANDBOX_JKU,), keys=keys)


def trusted_issuers(settings: Settings) -> dict[str, TrustedIssuer]:
    issuers: dict[str, TrustedIssuer] = {}
    if settings.trusted_issuers_file:
        issuers = load_trusted_issuers(Path(settings.trusted_issuers_file))
    if settings.trust_sandbox and SANDBOX_ISSUER not in issuers:
        issuers[SANDBOX_ISSUER] = sandbox_issuer()
    return issuers


def issuer_fhir_servers(settings: Settings) -> dict[str, frozenset[Origin]]:
    """Per trusted issuer, the FHIR servers its entry lists (for the FHIR fetch allowlist).

    With authentication off no call has an issuer: nothing. An issuer with no list (and no
    ``CDS_FHIR_SERVER_ALLOWLIST``) gets no FHIR fetching at all, and start-up says so.
    """
    if settings.auth == "off":
        return {}
    issuers = trusted_issuers(settings)
    if settings.fhir_server_origins is not None and not settings.fhir_server_origins:
        for issuer in issuers.values():
            if not issuer.fhir_servers:
                log.warning(
                    "trusted issuer %s lists no fhirServers and CDS_FHIR_SERVER_ALLOWLIST is "
                    "empty: its calls get no FHIR fetching (prefetch only)", issuer.iss,
                )
    return {iss: issuer.fhir_servers for iss, issuer in issuers.items() if issuer.fhir_servers}


class ReplayCache:
    """jti values seen, each kept until its token expires; bounded, thread-safe, per process."""

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.time) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._expiry: dict[tuple[str, str], float] = {}
        self._heap: list[tuple[float, tuple[str, str]]] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._expiry)

    def remember(self, key: tuple[str, str], expires_at: float) -> None:
        """Record ``key`` until ``expires_at``; AuthError if it is already live."""
        with self._lock:
            now = self._clock()
            self._purge(now)
            if key in self._expiry:
                raise AuthError("jti was already used (replay)")
            if len(self._expiry) >= self.max_entries:
                # Fail closed: forgetting a live jti would let its token be replayed.
                log.error("replay cache full (%d live tokens); refusing new ones", len(self))
                raise AuthError("replay cache is full")
            self._expiry[key] = expires_at
            heapq.heappush(self._heap, (expires_at, key))

    def _purge(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            expires_at, key = heapq.heappop(self._heap)
            if self._expiry.get(key) == expires_at:
                del self._expiry[key]


def replay_token_key(iss: str, jti: str) -> str:
    """What the shared replay cache keeps of a token: a digest, never the jti or the token."""
    # surrogatepass: a JSON jti may hold a lone surrogate; it must still hash, not raise.
    return hashlib.sha256(f"{iss}\n{jti}".encode("utf-8", "surrogatepass")).hexdigest()


def shared_replay_guard(remember_token: Callable[[str, datetime], bool]) -> ReplayGuard:
    """A ReplayGuard over a shared store's ``remember_token(token_key, expires_at)``."""

    def guard(key: tuple[str, str], expires_at: float) -> bool:
        return remember_token(replay_token_key(*key), datetime.fromtimestamp(expires_at, UTC))

    return guard


def _show(value: Any, limit: int = 80) -> str:
    """A header/claim value for the log: repr, cut short (it is attacker-controlled)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class TokenVerifier:
    def __init__(
        self,
        issuers: Mapping[str, TrustedIssuer],
        jwks: JwksCache,
        replay: ReplayCache,
        leeway: float,
        clock: Callable[[], float] = time.time,
        replay_guard: ReplayGuard | None = None,
    ) -> None:
        self.issuers = dict(issuers)
        self.jwks = jwks
        self.replay = replay
        self.replay_guard = replay_guard
        self.leeway = leeway
        self._clock = clock
        # Shared replay cache outage: since when (monotonic), when to try it next, when the
        # ERROR line was last written, how many tokens were checked per process only.
        self._shared_lock = threading.Lock()
        self._shared_down_since: float | None = None
        self._shared_retry_at = 0.0
        self._shared_logged_at = 0.0
        self._unshared_tokens = 0

    def verify(self, token: str, audience: str | Sequence[str]) -> dict[str, Any]:
        """The token's claims, or AuthError naming the first problem found.

        ``audience``: the URL called, or every form of it the service answers to; ``aud``
        must name one of them.
        """
        if len(token) > MAX_TOKEN_CHARS:
            raise AuthError(f"token longer than {MAX_TOKEN_CHARS} characters")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise AuthError(f"malformed JWT ({type(exc).__name__})") from None
        alg = header.get("alg")
        if alg not in ALLOWED_ALGORITHMS:
            raise AuthError(f"alg {_show(alg)} is not allowed")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.upper() != "JWT"):
            raise AuthError(f"typ {_show(typ)} is not JWT")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthError("no kid in the JWT header")
        iss = unverified.get("iss")
        if not isinstance(iss, str) or (issuer := self.issuers.get(iss)) is None:
            raise AuthError(f"iss {_show(iss)} is not a trusted issuer")
        key = self._key(issuer, header.get("jku"), kid)
        _check_key_fits(key, alg)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key.public_key,
                algorithms=[alg],
                audience=audience,
                issuer=iss,
                leeway=self.leeway,
                options={"require": ["iss", "aud", "exp", "iat", "jti"]},
            )
        except jwt.InvalidSignatureError:
            raise AuthError(f"signature does not verify with key {_show(kid)}") from None
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired (exp)") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token not valid yet (iat or nbf in the future)") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"claim {exc.claim!r} is missing") from None
        except jwt.InvalidAudienceError:
            called = audience if isinstance(audience, str) else " or ".join(audience)
            raise AuthError(f"aud does not name the URL called ({called})") from None
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid JWT ({type(exc).__name__}: {_show(str(exc))})") from None
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti:
            raise AuthError("jti is not a non-empty string")
        exp = float(claims["exp"])
        if exp - self._clock() > MAX_TOKEN_LIFETIME_SECONDS:
            raise AuthError(f"exp is more than {MAX_TOKEN_LIFETIME_SECONDS} s in the future")
        tenant = claims.get("tenant")
        allowed = issuer.tenants
        if allowed is not None and (not isinstance(tenant, str) or tenant not in allowed):
            raise AuthError(f"tenant {_show(tenant)} is not allowed for {iss}")
        # Last, so that a token refused for another reason cannot burn a jti.
        self._check_replay((iss, jti), exp + self.leeway)
        return claims

    def _check_replay(self, key: tuple[str, str], expires_at: float) -> None:
        self.replay.remember(key, expires_at)  # this process first: no database round trip
        if self.replay_guard is None or not self._try_shared_now():
            return
        try:
            first_use = self.replay_guard(key, expires_at)
        except Exception as exc:
            self._shared_unavailable(exc)
            return  # accepted on this process's cache alone: decision support goes on
        self._shared_available()
        if not first_use:
            raise AuthError("jti was already used (replay, seen by another worker or instance)")

    def _try_shared_now(self) -> bool:
        """False while the shared cache is known down and not due for another try (the token
        then counts as checked by this process only)."""
        with self._shared_lock:
            if self._shared_down_since is None:
                return True
            now = time.monotonic()
            if now >= self._shared_retry_at:
                self._shared_retry_at = now + SHARED_REPLAY_RETRY_S  # one call tries; others go on
                return True
            self._unshared_tokens += 1
        REPLAY_SHARED_CACHE_UNAVAILABLE.inc()
        return False

    def _shared_unavailable(self, exc: Exception) -> None:
        now = time.monotonic()
        with self._shared_lock:
            first = self._shared_down_since is None
            if first:
                self._shared_down_since = now
            self._shared_retry_at = now + SHARED_REPLAY_RETRY_S
            self._unshared_tokens += 1
            due = first or now - self._shared_logged_at >= SHARED_REPLAY_LOG_EVERY_S
            if due:
                self._shared_logged_at = now
            unshared = self._unshared_tokens
        REPLAY_SHARED_CACHE_UNAVAILABLE.inc()
        REPLAY_SHARED_CACHE_DEGRADED.set(1)
        if due:
            log.error(
                "shared replay cache unavailable (%s: %s): tokens are checked against this "
                "process's replay cache only (%d so far); a replay to another worker or instance "
                "is not caught until the database is back",
                type(exc).__name__, _show(str(exc)), unshared,
                extra={"event": "replay-cache-degraded"},
            )

    def _shared_available(self) -> None:
        if self._shared_down_since is None:  # the usual case: no lock taken
            return
        with self._shared_lock:
            if self._shared_down_since is None:
                return
            seconds = time.monotonic() - self._shared_down_since
            unshared, self._unshared_tokens = self._unshared_tokens, 0
            self._shared_down_since = None
        REPLAY_SHARED_CACHE_DEGRADED.set(0)
        log.warning(
            "shared replay cache available again after %.1f s; %d tokens were checked by this "
            "process only meanwhile", seconds, unshared, extra={"event": "replay-cache-restored"},
        )

    def _key(self, issuer: TrustedIssuer, jku: Any, kid: str) -> SigningKey:
        if jku is not None and jku not in issuer.jku:
            raise AuthError(f"jku {_show(jku)} is not allowlisted for {issuer.iss}")
        if issuer.keys is not None:
            key = issuer.keys.get(kid)
            if key is None:
                raise AuthError(f"kid {_show(kid)} is not a key configured for {issuer.iss}")
            return key
        if jku is None:
            if len(issuer.jku) != 1:
                raise AuthError(f"no jku in the JWT, and {issuer.iss} has several JWK Sets")
            jku = issuer.jku[0]
        try:
            return self.jwks.key(jku, kid)
        except JwksError as exc:
            raise AuthError(str(exc)) from None


def _check_key_fits(key: SigningKey, alg: str) -> None:
    """The header's alg must match the key: no algorithm confusion, no weak keys."""
    if key.alg is not None and key.alg != alg:
        raise AuthError(f"alg {alg} does not match key {key.kid} (declared {key.alg})")
    if alg.startswith("ES"):
        public_key = key.public_key
        curve = public_key.curve.name if isinstance(public_key, ec.EllipticCurvePublicKey) else None
        if curve != _EC_CURVES[alg]:
            raise AuthError(f"alg {alg} does not fit key {key.kid}")
    elif not isinstance(key.public_key, rsa.RSAPublicKey):
        raise AuthError(f"alg {alg} does not fit key {key.kid}")
    elif key.public_key.key_size < MIN_RSA_BITS:
        raise AuthError(f"RSA key {key.kid} is shorter than {MIN_RSA_BITS} bits")


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})


def audience_base_urls(settings: Settings) -> tuple[str, ...]:
    """The base URLs a JWT's ``aud`` may name (+ the path called); SettingsError if unknowable.

    ``CDS_EXTERNAL_BASE_URL`` when set. Otherwise the addresses the service is bound to: the
    Host header cannot stand in, because the caller chooses it, so a token a trusted issuer
    minted for another CDS service would pass with that service's host name sent. A wildcard
    bind has no such address: the public URL must then be configured.
    """
    if settings.external_base_urls:
        return settings.external_base_urls
    host = settings.host.strip("[]")
    if host in WILDCARD_HOSTS:
        raise SettingsError(
            f"CDS_EXTERNAL_BASE_URL is required when authentication is on and the service binds "
            f"to all interfaces (CDS_HOST={settings.host!r}): set it to the URL(s) the EHRs call, "
            "e.g. https://cds.example.org, so that a JWT's aud can be checked"
        )
    hosts = ["127.0.0.1", "localhost"] if host in LOOPBACK_HOSTS else []
    if host not in hosts:
        hosts.append(host)
    bases = []
    for name in hosts:
        shown = f"[{name}]" if ":" in name else name
        bases.append(f"http://{shown}:{settings.port}")
        if settings.port == 80:  # a client calling the default port leaves it out of the URL
            bases.append(f"http://{shown}")
    return tuple(bases)


def expected_audiences(base_urls: Sequence[str]) -> list[str]:
    """The URL called, as an EHR names it in ``aud``, under each accepted base URL."""
    return [base + request.path for base in base_urls]


def is_protected(path: str) -> bool:
    return path.startswith(PROTECTED_PREFIX)


def unauthorized() -> Response:
    response = jsonify(UNAUTHORIZED_BODY)
    response.status_code = 401
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


def build_verifier(
    settings: Settings,
    jwks: JwksCache | None = None,
    replay_guard: ReplayGuard | None = None,
) -> TokenVerifier:
    issuers = trusted_issuers(settings)
    return TokenVerifier(
        issuers,
        jwks or JwksCache(ttl=settings.jwks_cache_seconds, timeout=settings.jwks_timeout_seconds),
        ReplayCache(settings.jti_cache_max),
        leeway=settings.jwt_leeway_seconds,
        replay_guard=replay_guard,
    )


def install_auth(
    app: Flask,
    settings: Settings,
    *,
    jwks: JwksCache | None = None,
    replay_guard: ReplayGuard | None = None,
) -> None:
    """Guard every ``/cds-services`` request; ``CDS_AUTH=off`` installs nothing, loudly.

    Without ``replay_guard`` a replay is caught only by the process that saw the token first.
    """
    if settings.auth == "off":
        log.warning(
            "AUTHENTICATION IS OFF (CDS_AUTH=off): anyone who can reach this service can call "
            "it. For local demos only; never expose it."
        )
        return
    # First: a service that cannot tell which aud to accept must not start at all.
    base_urls = audience_base_urls(settings)
    log.info(
        "JWT aud must name one of %s + the path called%s",
        ", ".join(base_urls),
        "" if settings.external_base_url else " (set CDS_EXTERNAL_BASE_URL for other URLs)",
    )
    verifier = build_verifier(settings, jwks, replay_guard)
    if not verifier.issuers:
        log.error(
            "authentication is on but no issuer is trusted: every CDS Hooks call will get 401. "
            "Set CDS_TRUSTED_ISSUERS_FILE (or CDS_TRUST_SANDBOX=true for testing)."
        )
    if SANDBOX_ISSUER in verifier.issuers:
        log.warning(
            "trusting the public CDS Hooks sandbox (%s): its private key is public, so anyone "
            "can sign as it. Testing only.", SANDBOX_ISSUER,
        )
    app.extensions[AUTH_EXTENSION] = verifier

    @app.before_request
    def _authenticate() -> Response | None:
        # Preflight carries no credentials by design (CORS answers it).
        if request.method == "OPTIONS" or not is_protected(request.path):
            return None
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return _deny("no Authorization: Bearer header")
        try:
            claims = verifier.verify(token, expected_audiences(base_urls))
        except AuthError as exc:
            return _deny(str(exc))
        except Exception as exc:  # a verifier bug must still answer 401, not 500
            return _deny(f"verification failed unexpectedly ({type(exc).__name__})")
        g.auth_issuer = claims["iss"]
        return None


def _deny(reason: str) -> Response:
    log.warning("authentication failed: %s", reason, extra={"event": "auth-failed"})
    return unauthorized()
