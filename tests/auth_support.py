"""Test issuers of CDS Hooks JWTs: real keys, real signatures, a JWKS served over real HTTP.

Used through the fixtures in ``conftest.py`` (``jwks_server``, ``jwt_issuer``,
``auth_app_factory``); import from here only for types and the sandbox constants.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

SHARED_REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
SANDBOX_PRIVATE_KEY = SHARED_REFERENCE / "sandbox-test-private-key.pem"
SANDBOX_KID = "44823f3d-0b01-4a6c-a80e-b9d3e8a7226f"

_CURVES = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}


@cache
def private_key(alg: str, size: int = 2048) -> Any:
    """One key per algorithm family and size for the session (RSA generation is slow)."""
    if alg.startswith("ES"):
        return ec.generate_private_key(_CURVES[alg]())
    return rsa.generate_private_key(public_exponent=65537, key_size=size)


def fresh_private_key(alg: str, size: int = 2048) -> Any:
    """A key nobody else in the session uses (for rotation and forged-signature tests)."""
    if alg.startswith("ES"):
        return ec.generate_private_key(_CURVES[alg]())
    return rsa.generate_private_key(public_exponent=65537, key_size=size)


def public_jwk(key: Any, kid: str, alg: str | None) -> dict[str, Any]:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    else:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": kid, "use": "sig"})
    if alg:
        jwk["alg"] = alg
    return jwk


class JwksServer:
    """A tiny HTTP server holding JWK Sets by path; documents can be swapped mid-test.

    ``set(path, document)`` publishes; ``status``/``delay`` per path simulate a broken or
    slow issuer; ``hits[path]`` counts fetches.
    """

    def __init__(self) -> None:
        self.documents: dict[str, Any] = {}
        self.status: dict[str, int] = {}
        self.delay: dict[str, float] = {}
        self.raw: dict[str, bytes] = {}
        self.hits: dict[str, int] = {}
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                with server._lock:
                    server.hits[path] = server.hits.get(path, 0) + 1
                    document = server.documents.get(path)
                    status = server.status.get(path, 200 if document is not None else 404)
                    delay = server.delay.get(path, 0.0)
                    raw = server.raw.get(path)
                if delay:
                    time.sleep(delay)
                body = raw if raw is not None else json.dumps(document or {}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up (timeout tests)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return self.base_url + path

    def set(self, path: str, document: Any) -> None:
        with self._lock:
            self.documents[path] = document

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@dataclass
class JwtIssuer:
    """A trusted EHR for tests: signs CDS Hooks JWTs and publishes its JWKS on ``server``.

    Starts with two published keys, ``"ec"`` (P-384, ES384) and ``"rsa"`` (2048 bit,
    RS384). ``token_for(url)`` signs a valid token for a call to ``url``; keyword claims
    override (``None`` removes a claim); ``header=`` overrides header fields likewise.
    """

    server: JwksServer
    iss: str = field(default_factory=lambda: f"https://ehr-{uuid.uuid4().hex[:8]}.example.org")
    path: str = field(default_factory=lambda: f"/{uuid.uuid4().hex}/jwks.json")
    keys: dict[str, tuple[Any, str]] = field(default_factory=dict)  # kid -> (private key, alg)
    published: list[str] = field(default_factory=list)
    default_kid: str = "ec"

    def __post_init__(self) -> None:
        if not self.keys:
            self.keys = {
                "ec": (private_key("ES384"), "ES384"),
                "rsa": (private_key("RS384"), "RS384"),
            }
        if not self.published:
            self.publish(*self.keys)

    @property
    def jku(self) -> str:
        return self.server.url(self.path)

    @property
    def fetches(self) -> int:
        return self.server.hits.get(self.path, 0)

    def add_key(self, kid: str, alg: str, key: Any | None = None) -> str:
        self.keys[kid] = (key if key is not None else fresh_private_key(alg), alg)
        return kid

    def jwks(self, *kids: str, declare_alg: bool = True) -> dict[str, Any]:
        return {
            "keys": [
                public_jwk(self.keys[kid][0], kid, self.keys[kid][1] if declare_alg else None)
                for kid in kids
            ]
        }

    def publish(self, *kids: str) -> None:
        """Serve exactly these keys from now on (a rotation drops the others)."""
        self.published = list(kids)
        self.server.set(self.path, self.jwks(*kids))

    def claims_for(self, url: str, **claims: Any) -> dict[str, Any]:
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": self.iss,
            "aud": url,
            "exp": now + 300,
            "iat": now,
            "jti": str(uuid.uuid4()),
        }
        payload.update(claims)
        return {k: v for k, v in payload.items() if v is not None}

    def token_for(
        self,
        url: str,
        *,
        kid: str | None = None,
        alg: str | None = None,
        header: Mapping[str, Any] | None = None,
        key: Any | None = None,
        **claims: Any,
    ) -> str:
        kid = kid or self.default_kid
        signing_key, key_alg = self.keys.get(kid, (None, "ES384"))
        alg = alg or key_alg
        headers: dict[str, Any] = {"typ": "JWT", "kid": kid, "jku": self.jku}
        headers.update(header or {})
        headers = {k: v for k, v in headers.items() if v is not None}
        return jwt.encode(
            self.claims_for(url, **claims),
            key if key is not None else signing_key,
            algorithm=alg,
            headers=headers,
        )

    def auth(self, url: str, **kwargs: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token_for(url, **kwargs)}"}

    def issuer_entry(self, **extra: Any) -> dict[str, Any]:
        """This issuer's entry for a trusted-issuers file (jku allowlist)."""
        return {"iss": self.iss, "jku": [self.jku], **extra}


def write_trusted_issuers(path: Path, *entries: Mapping[str, Any]) -> Path:
    path.write_text(json.dumps({"issuers": list(entries)}), encoding="utf-8")
    return path


def serve_jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    try:
        yield server
    finally:
        server.close()


def auth_on_serve_env(trusted_issuers: Path, database_url: str) -> dict[str, str]:
    """The environment of a `cds-service serve` with authentication on, trusting only the
    issuers in ``trusted_issuers``: two workers of four threads, so a token may reach either."""
    return {
        "CDS_AUTH": "on",
        "CDS_TRUSTED_ISSUERS_FILE": str(trusted_issuers),
        "CDS_TRUST_SANDBOX": "false",
        "CDS_EXTERNAL_BASE_URL": "",
        "CDS_WORKERS": "2",
        "CDS_THREADS": "4",
        "CDS_LOG_LEVEL": "INFO",
        "CDS_DATABASE_URL": database_url,
    }
