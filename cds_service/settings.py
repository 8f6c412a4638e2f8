"""Configuration: one frozen dataclass, read from ``CDS_*`` environment variables.

Every field has a safe, documented default so that ``cds-service serve`` works with no
configuration at all. ``SETTINGS_DOC`` is the single source for the settings table in
docs/settings.md (``tests/test_settings.py`` checks that it lists every setting).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from cds_service.context.fhir_origin import Origin

ENV_PREFIX = "CDS_"


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    # "on" (default): every CDS Hooks call needs a JWT from a trusted issuer. "off" only on
    # purpose, for local demos; logged loudly at start-up.
    auth: str = "on"
    # JSON file listing the trusted JWT issuers (schemas/trusted-issuers.schema.json).
    trusted_issuers_file: str = ""
    # Trust the public CDS Hooks sandbox with its bundled JWKS. Its private key is public:
    # testing only, never in production.
    trust_sandbox: bool = False
    # Clock skew tolerated on exp/iat: the sandbox's iat can lie 0.5 s in the future.
    jwt_leeway_seconds: int = 5
    jwks_cache_seconds: int = 300
    jwks_timeout_seconds: float = 3.0
    # Bound on remembered jti values (replay cache); when full of live tokens, new ones get 401.
    jti_cache_max: int = 100_000
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 2
    threads: int = 4
    # Gunicorn's own timeout for a worker that does not answer (seconds).
    worker_timeout: int = 30
    log_level: str = "INFO"
    # Comma-separated public base URL(s) the EHRs call, e.g. behind a proxy: a JWT's `aud` must
    # be one of them + the path. Empty = the local bind addresses (never the Host header, which
    # the caller chooses).
    external_base_url: str = ""
    knowledge_dir: str = ""
    database_url: str = "sqlite:///magnesium-cds.sqlite3"
    fhir_connect_timeout: float = 3.05
    fhir_read_timeout: float = 10.0
    fhir_max_pages: int = 5
    fhir_max_workers: int = 8
    # Upper bound on what one FHIR fetch may read (bytes) before it is abandoned.
    fhir_max_response_bytes: int = 20_000_000
    max_request_bytes: int = 10_000_000
    fixture_server_host: str = "127.0.0.1"
    fixture_server_port: int = 8090
    fixture_server_delay_ms: int = 0
    cors_allow_origin: str = "*"
    # Origins (comma-separated, `*` for any) whose fhirServer the service may fetch from, on
    # top of each trusted issuer's own list. Empty: none (an SSRF guard; demo sets its own).
    fhir_server_allowlist: str = ""
    # Every hook call ends within this many seconds whatever the FHIR server does.
    call_deadline_seconds: float = 5.0
    # Optional RxNav-compatible REST base (e.g. https://rxnav.nlm.nih.gov/REST) asked for the
    # ingredients of RxNorm codes the knowledge files do not hold; empty = never asked.
    rxnav_url: str = ""
    rxnav_budget_ms: int = 150
    rxnav_cache_size: int = 10_000
    rxnav_cache_seconds: int = 86_400
    # `serve`: how long a client may take to send one whole request (head and body); a slow
    # client meanwhile holds a socket in the worker's event loop, never a thread.
    request_read_timeout_seconds: float = 30.0

    def __post_init__(self) -> None:
        # Reject values that would silently weaken or break authentication.
        if self.auth not in {"on", "off"}:
            raise SettingsError(f"{ENV_PREFIX}AUTH={self.auth!r} must be 'on' or 'off'")
        for name, minimum in (
            ("jwt_leeway_seconds", 0),
            ("jwks_cache_seconds", 0),
            ("jwks_timeout_seconds", 0.001),
            ("jti_cache_max", 1),
            ("rxnav_budget_ms", 1),
            ("rxnav_cache_size", 1),
            ("rxnav_cache_seconds", 0),
        ):
            if getattr(self, name) < minimum:
                value = getattr(self, name)
                raise SettingsError(f"{ENV_PREFIX}{name.upper()}={value!r} must be >= {minimum}")
        _ = self.external_base_urls  # a malformed URL stops start-up, not the first call
        _ = self.fhir_server_origins
        if not 0 < self.call_deadline_seconds <= 300:
            raise SettingsError(
                f"{ENV_PREFIX}CALL_DEADLINE_SECONDS={self.call_deadline_seconds!r} must be "
                "> 0 and <= 300"
            )
        if self.rxnav_url and urlsplit(self.rxnav_url).scheme not in {"http", "https"}:
            raise SettingsError(f"{ENV_PREFIX}RXNAV_URL={self.rxnav_url!r} must be an http(s) URL")

    @property
    def external_base_urls(self) -> tuple[str, ...]:
        """``CDS_EXTERNAL_BASE_URL`` split on commas, without trailing slashes."""
        return parse_base_urls(self.external_base_url, f"{ENV_PREFIX}EXTERNAL_BASE_URL")

    @property
    def fhir_server_origins(self) -> frozenset[Origin] | None:
        """``CDS_FHIR_SERVER_ALLOWLIST`` as origins; None = any."""
        from cds_service.context.fhir_origin import parse_origins

        try:
            return parse_origins(self.fhir_server_allowlist, f"{ENV_PREFIX}FHIR_SERVER_ALLOWLIST")
        except ValueError as exc:
            raise SettingsError(str(exc)) from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``CDS_<FIELD>`` variables; explicit overrides win."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _convert(f.name, f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> Settings:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def knowledge_path(self) -> Path | None:
        return Path(self.knowledge_dir) if self.knowledge_dir else None


def parse_base_urls(raw: str, env_name: str) -> tuple[str, ...]:
    """Absolute http(s) base URLs, comma-separated; SettingsError naming ``env_name`` if not.

    ``aud`` is compared exactly, so a query, fragment or user part could never match: such a
    value is a mistake, said at start-up rather than as 401s later.
    """
    urls: list[str] = []
    for part in raw.split(","):
        url = part.strip().rstrip("/")
        if not url:
            continue
        try:
            parts = urlsplit(url)
            _ = parts.port  # raises ValueError on a bad port
        except ValueError:
            raise SettingsError(f"{env_name}: {part.strip()!r} is not a URL") from None
        if (
            parts.scheme not in {"http", "https"}
            or not parts.hostname
            or parts.query
            or parts.fragment
            or "@" in parts.netloc
            or url.endswith("?")
            or url.endswith("#")
        ):
            raise SettingsError(
                f"{env_name}: {part.strip()!r} must be an http(s) base URL like "
                "https://cds.example.org (no query, fragment or user)"
            )
        if url not in urls:
            urls.append(url)
    return tuple(urls)


# How every boolean CDS_* variable is read.
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def _convert(name: str, type_name: Any, raw: str) -> Any:
    env_name = ENV_PREFIX + name.upper()
    type_name = str(type_name)
    try:
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            return float(raw)
        if type_name == "bool":
            lowered = raw.strip().lower()
            if lowered in TRUE_WORDS:
                return True
            if lowered in FALSE_WORDS:
                return False
            raise ValueError(raw)
    except ValueError as exc:
        raise SettingsError(f"{env_name}={raw!r} is not a valid {type_name}") from exc
    return raw


SETTINGS_DOC: dict[str, str] = {
    "auth": "`on`: every CDS Hooks call needs a JWT from a trusted issuer; "
    "`off`: none (local demos only).",
    "trusted_issuers_file": "JSON file of trusted JWT issuers (see Security); empty = none.",
    "trust_sandbox": "`true`: trust the public CDS Hooks sandbox with its bundled JWKS "
    "(testing only: its private key is public).",
    "jwt_leeway_seconds": "Clock skew (s) tolerated on a JWT's `exp` and `iat`.",
    "jwks_cache_seconds": "How long (s) a fetched JWK Set is cached.",
    "jwks_timeout_seconds": "Timeout (s) for fetching a JWK Set; on failure the call gets 401.",
    "jti_cache_max": "Most JWT ids remembered against replay (per process).",
    "host": "Interface `cds-service serve` binds to.",
    "port": "Port `cds-service serve` listens on.",
    "workers": "Gunicorn worker processes.",
    "threads": "Threads per gunicorn worker.",
    "worker_timeout": "Seconds before gunicorn restarts a silent worker.",
    "log_level": "Python log level (DEBUG, INFO, WARNING, ERROR).",
    "external_base_url": "Public base URL(s) the EHRs call, comma-separated, e.g. "
    "`https://cds.example.org`: a JWT's `aud` must be one of them + the path. Empty: "
    "`http://127.0.0.1:<port>` and `http://localhost:<port>` (auth on with a `0.0.0.0` "
    "bind refuses to start).",
    "knowledge_dir": "Directory with knowledge files; empty = the bundled knowledge.",
    "database_url": "SQLAlchemy URL of the feedback store.",
    "fhir_connect_timeout": "Connect timeout (s) for FHIR fallback fetches.",
    "fhir_read_timeout": "Time budget (s) of one prefetch key's FHIR fetch, all its pages and "
    "redirects included (never past the call's deadline).",
    "fhir_max_pages": "Most `link[next]` pages followed per prefetch key.",
    "fhir_max_workers": "Concurrent FHIR fetches per request.",
    "fhir_max_response_bytes": "Most bytes read from the FHIR server for one prefetch key.",
    "max_request_bytes": "Largest accepted request body (bytes); larger gets 413.",
    "fixture_server_host": "Interface of `cds-service fixture-server`.",
    "fixture_server_port": "Port of `cds-service fixture-server`.",
    "fixture_server_delay_ms": "Artificial delay per fixture-server request (benchmarks).",
    "cors_allow_origin": "`Access-Control-Allow-Origin` for browser clients.",
    "fhir_server_allowlist": "Origins the service may fetch a call's `fhirServer` from, "
    "comma-separated (e.g. `https://fhir.example.org`), `*` for any; a trusted issuer's "
    "`fhirServers` add to it for its calls. Empty: none (`demo` allows its fixture server).",
    "call_deadline_seconds": "Every hook call ends within this many seconds whatever the FHIR "
    "server does; what could not be fetched by then is reported (412 or data issues).",
    "rxnav_url": "RxNav-compatible REST base URL (e.g. `https://rxnav.nlm.nih.gov/REST`) asked "
    "for the ingredients of RxNorm codes the knowledge files do not hold; empty = never asked.",
    "rxnav_budget_ms": "Most time (ms) one hook call waits for RxNav; past it the code is "
    "reported as a data issue.",
    "rxnav_cache_size": "Most RxNav answers cached per process.",
    "rxnav_cache_seconds": "How long (s) an RxNav answer is cached (failures: at most 60 s).",
    "request_read_timeout_seconds": "Seconds a client may take to send one whole request "
    "to `serve` (head and body); then 408 and the connection is closed.",
}


def setting_defaults() -> dict[str, Any]:
    return {f.name: f.default for f in fields(Settings)}


def settings_table_markdown() -> str:
    """The table of docs/settings.md (kept in sync by tests/test_settings.py)."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    defaults = setting_defaults()
    for name, meaning in SETTINGS_DOC.items():
        default = defaults[name]
        shown = f"`{default}`" if default != "" else "(empty)"
        rows.append(f"| `{ENV_PREFIX}{name.upper()}` | {shown} | {meaning} |")
    return "\n".join(rows)
