"""CDS Hooks JWT authentication: every way a token can be wrong gets 401, a right one passes.

Tokens are signed with keys generated here (EC P-384, RSA 2048 and the other allowed
algorithms); JWK Sets are served over real HTTP on 127.0.0.1 (``jwks_server``) and can be
swapped mid-test for rotation. The sandbox's published test key signs tokens exactly as the
public sandbox does.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
from auth_support import (
    SANDBOX_KID,
    SANDBOX_PRIVATE_KEY,
    SHARED_REFERENCE,
    JwksServer,
    JwtIssuer,
    fresh_private_key,
    private_key,
    public_jwk,
)
from cryptography.hazmat.primitives import serialization
from flask import Flask
from flask.testing import FlaskClient

from cds_service.protocol import auth
from cds_service.protocol.auth import (
    AUTH_EXTENSION,
    SANDBOX_ISSUER,
    SANDBOX_JKU,
    AuthError,
    ReplayCache,
    TokenVerifier,
    TrustedIssuersError,
    load_trusted_issuers,
)
from cds_service.protocol.jwks import JwksCache, JwksError
from cds_service.settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parent.parent
DISCOVERY = "http://localhost/cds-services"
SERVICE = "http://localhost/cds-services/magnesium-patient-view"
FEEDBACK = "http://localhost/cds-services/magnesium-patient-view/feedback"
UNAUTHORIZED = {"error": "unauthorized", "message": "authentication failed"}


@pytest.fixture
def app(auth_app_factory: Any) -> Flask:
    return auth_app_factory()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def discover(client: FlaskClient, token: str | None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return client.get("/cds-services", headers=headers)


def assert_refused(response: Any) -> None:
    assert response.status_code == 401
    assert response.get_json() == UNAUTHORIZED
    assert response.headers["WWW-Authenticate"] == "Bearer"


def refusal_reasons(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("authentication failed")
    ]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --- what passes ---------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ES256", "ES384", "ES512", "RS256", "RS384", "RS512"])
def test_each_allowed_algorithm_passes(
    auth_app_factory: Any, jwt_issuer: JwtIssuer, alg: str
) -> None:
    kid = f"key-{alg}"
    jwt_issuer.add_key(kid, alg, private_key(alg))
    jwt_issuer.publish(kid)
    client = auth_app_factory().test_client()
    response = discover(client, jwt_issuer.token_for(DISCOVERY, kid=kid))
    assert response.status_code == 200, response.data
    assert response.get_json()["services"]


def test_rsa_key_without_declared_alg_verifies_rs384(
    auth_app_factory: Any, jwt_issuer: JwtIssuer
) -> None:
    # PyJWK would assume RS256 for such a key; the header's (allowlisted) alg must be used.
    jwt_issuer.server.set(jwt_issuer.path, jwt_issuer.jwks("ec", "rsa", declare_alg=False))
    client = auth_app_factory().test_client()
    assert discover(client, jwt_issuer.token_for(DISCOVERY, kid="rsa")).status_code == 200


def test_service_and_feedback_calls_pass_authentication(
    client: FlaskClient, jwt_issuer: JwtIssuer
) -> None:
    # An empty body gets past authentication and fails on content (not 401).
    service = client.post("/cds-services/magnesium-patient-view", headers=jwt_issuer.auth(SERVICE))
    assert service.status_code in {400, 415}, service.data
    feedback = client.post(
        "/cds-services/magnesium-patient-view/feedback", headers=jwt_issuer.auth(FEEDBACK)
    )
    assert feedback.status_code in {400, 415}, feedback.data


def test_aud_may_be_an_array_and_the_query_string_is_not_part_of_it(
    client: FlaskClient, jwt_issuer: JwtIssuer
) -> None:
    token = jwt_issuer.token_for(DISCOVERY, aud=["https://elsewhere.example.org", DISCOVERY])
    assert discover(client, token).status_code == 200
    token = jwt_issuer.token_for(DISCOVERY)
    response = client.get("/cds-services?x=1", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200


def test_external_base_url_is_the_audience_behind_a_proxy(
    auth_app_factory: Any, jwt_issuer: JwtIssuer
) -> None:
    client = auth_app_factory(external_base_url="https://cds.example.org/").test_client()
    assert (
        discover(client, jwt_issuer.token_for("https://cds.example.org/cds-services")).status_code
        == 200
    )
    assert_refused(discover(client, jwt_issuer.token_for(DISCOVERY)))


# --- aud: the URL called, never taken from the caller's Host header ----------------------------

OTHER_CDS = "https://other-cds.example.net/cds-services"


@pytest.mark.parametrize("external_base_url", ["", "http://localhost"])
def test_a_token_for_another_cds_service_is_refused_whatever_host_is_sent(
    auth_app_factory: Any, jwt_issuer: JwtIssuer, external_base_url: str
) -> None:
    # The trusted EHR minted this token for another CDS service; an attacker who holds it sends
    # that service's host name as Host. aud must be checked against our own URL, not theirs.
    client = auth_app_factory(external_base_url=external_base_url).test_client()
    for host in ("other-cds.example.net", "other-cds.example.net:443"):
        response = client.get(
            "/cds-services",
            headers={"Host": host, **jwt_issuer.auth(OTHER_CDS)},
            base_url="https://other-cds.example.net",
        )
        assert_refused(response)


def test_without_external_base_url_aud_is_the_loopback_bind_address(
    auth_app_factory: Any, jwt_issuer: JwtIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    client = auth_app_factory(external_base_url="", port=8080).test_client()
    for base in ("http://127.0.0.1:8080", "http://localhost:8080"):
        assert discover(client, jwt_issuer.token_for(base + "/cds-services")).status_code == 200
    for aud in (DISCOVERY, "http://127.0.0.1:8081/cds-services", "https://localhost:8080/cds-services"):
        assert_refused(discover(client, jwt_issuer.token_for(aud)))
    # The Host header the client sends changes nothing.
    token = jwt_issuer.token_for("http://localhost:8080/cds-services")
    assert (
        client.get(
            "/cds-services", headers={"Host": "evil.example", "Authorization": f"Bearer {token}"}
        ).status_code
        == 200
    )
    messages = [r.getMessage() for r in caplog.records]
    started = [m for m in messages if "JWT aud must name one of" in m]
    assert started and "http://127.0.0.1:8080, http://localhost:8080" in started[-1]


def test_several_external_base_urls_are_accepted(
    auth_app_factory: Any, jwt_issuer: JwtIssuer
) -> None:
    client = auth_app_factory(
        external_base_url="https://cds.example.org, https://cds.internal.example.org/mg/"
    ).test_client()
    for aud in (
        "https://cds.example.org/cds-services",
        "https://cds.internal.example.org/mg/cds-services",
    ):
        assert discover(client, jwt_issuer.token_for(aud)).status_code == 200
    for aud in (DISCOVERY, "https://cds.internal.example.org/cds-services", OTHER_CDS):
        assert_refused(discover(client, jwt_issuer.token_for(aud)))


@pytest.mark.parametrize(
    "value",
    [
        "cds.example.org",
        "ftp://cds.example.org",
        "https://cds.example.org/?x=1",
        "https://cds.example.org/#top",
        "https://user@cds.example.org",
        "https://cds.example.org:99999",
        "https://cds.example.org, /relative",
    ],
)
def test_a_malformed_external_base_url_is_refused_naming_the_variable(value: str) -> None:
    with pytest.raises(SettingsError, match="CDS_EXTERNAL_BASE_URL"):
        Settings.from_env({"CDS_EXTERNAL_BASE_URL": value})


def test_external_base_urls_are_split_and_trimmed() -> None:
    settings = Settings(external_base_url=" https://a.example.org/ ,https://b.example.org/x,, ")
    assert settings.external_base_urls == ("https://a.example.org", "https://b.example.org/x")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]"])
def test_a_wildcard_bind_with_auth_on_needs_an_external_base_url(
    auth_app_factory: Any, host: str
) -> None:
    # Bound to every interface, the service cannot know which URL the EHRs call.
    with pytest.raises(SettingsError, match="CDS_EXTERNAL_BASE_URL"):
        auth_app_factory(host=host, external_base_url="")
    assert auth_app_factory(host=host, external_base_url="https://cds.example.org")
    assert auth_app_factory(host=host, external_base_url="", auth="off")


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("127.0.0.1", 8080, ("http://127.0.0.1:8080", "http://localhost:8080")),
        ("localhost", 9000, ("http://127.0.0.1:9000", "http://localhost:9000")),
        ("::1", 8080, ("http://127.0.0.1:8080", "http://localhost:8080", "http://[::1]:8080")),
        ("10.1.2.3", 8080, ("http://10.1.2.3:8080",)),
        (
            "127.0.0.1",
            80,
            ("http://127.0.0.1:80", "http://127.0.0.1", "http://localhost:80", "http://localhost"),
        ),
    ],
)
def test_default_audience_base_urls(host: str, port: int, expected: tuple[str, ...]) -> None:
    assert auth.audience_base_urls(Settings(host=host, port=port)) == expected


def test_serve_on_all_interfaces_with_auth_on_refuses_to_start_without_external_base_url(
    tmp_path: Path,
) -> None:
    import os
    import subprocess

    from processes import CDS, free_port

    result = subprocess.run(
        [CDS, "serve", "--host", "0.0.0.0", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={
            **os.environ,
            "CDS_AUTH": "on",
            "CDS_EXTERNAL_BASE_URL": "",
            "CDS_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        },
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "CDS_EXTERNAL_BASE_URL" in result.stderr
    assert "Traceback" not in result.stderr


def test_small_clock_skew_is_tolerated(client: FlaskClient, jwt_issuer: JwtIssuer) -> None:
    now = int(time.time())
    # The sandbox rounds iat, so it can lie in the future; exp just past is within leeway.
    assert discover(client, jwt_issuer.token_for(DISCOVERY, iat=now + 2)).status_code == 200
    assert discover(client, jwt_issuer.token_for(DISCOVERY, exp=now - 2)).status_code == 200


def test_tenant_allowlist(
    auth_app_factory: Any, jwt_issuer: JwtIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    client = auth_app_factory(issuers=[jwt_issuer.issuer_entry(tenants=["ward-a"])]).test_client()
    assert discover(client, jwt_issuer.token_for(DISCOVERY, tenant="ward-a")).status_code == 200
    assert_refused(discover(client, jwt_issuer.token_for(DISCOVERY, tenant="ward-b")))
    assert_refused(discover(client, jwt_issuer.token_for(DISCOVERY, tenant=["ward-a"])))
    assert_refused(discover(client, jwt_issuer.token_for(DISCOVERY)))
    assert any("tenant" in reason for reason in refusal_reasons(caplog))
    # Without a tenant list, a tenant claim is neither needed nor checked.
    open_client = auth_app_factory().test_client()
    assert discover(open_client, jwt_issuer.token_for(DISCOVERY, tenant="any")).status_code == 200


def test_health_endpoints_stay_open(client: FlaskClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200  # open: no 401, and ready


# --- every rejection reason ----------------------------------------------------------------


def test_missing_or_non_bearer_authorization_is_refused(
    client: FlaskClient, jwt_issuer: JwtIssuer
) -> None:
    assert_refused(client.get("/cds-services"))
    assert_refused(client.get("/cds-services", headers={"Authorization": "Basic dXNlcjpwYXNz"}))
    assert_refused(client.get("/cds-services", headers={"Authorization": "Bearer "}))
    assert_refused(client.post("/cds-services/magnesium-patient-view", json={}))
    assert_refused(client.post("/cds-services/magnesium-patient-view/feedback", json={}))
    assert_refused(client.post("/cds-services/no-such-service", json={}))
    # The scheme is case-insensitive (RFC 7235).
    token = jwt_issuer.token_for(DISCOVERY)
    assert (
        client.get("/cds-services", headers={"Authorization": f"bearer {token}"}).status_code == 200
    )


@pytest.mark.parametrize("garbage", ["not-a-jwt", "a.b.c", "e30.e30.", "x" * 20_000])
def test_garbage_tokens_are_refused(client: FlaskClient, garbage: str) -> None:
    assert_refused(discover(client, garbage))


def test_alg_none_is_refused(client: FlaskClient, jwt_issuer: JwtIssuer) -> None:
    claims = jwt_issuer.claims_for(DISCOVERY)
    header = {"alg": "none", "typ": "JWT", "kid": "ec", "jku": jwt_issuer.jku}
    token = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}."
    assert_refused(discover(client, token))


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_hmac_is_refused_even_keyed_with_the_public_key(
    client: FlaskClient, jwt_issuer: JwtIssuer, alg: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The classic confusion attack: HMAC with the issuer's public key as the secret.
    public_pem = (
        private_key("RS384")
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    header = {"alg": alg, "typ": "JWT", "kid": "rsa", "jku": jwt_issuer.jku}
    payload = json.dumps(jwt_issuer.claims_for(DISCOVERY)).encode()
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(payload)}"
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    signature = hmac.new(public_pem, signing_input.encode(), digest).digest()
    assert_refused(discover(client, f"{signing_input}.{b64(signature)}"))
    assert any("alg" in reason and "not allowed" in reason for reason in refusal_reasons(caplog))


def test_forged_signature_is_refused(client: FlaskClient, jwt_issuer: JwtIssuer) -> None:
    # Same kid, a key the issuer never published.
    forged = jwt_issuer.token_for(DISCOVERY, kid="ec", key=fresh_private_key("ES384"))
    assert_refused(discover(client, forged))
    # A valid token with its payload swapped for another's keeps a non-matching signature.
    good = jwt_issuer.token_for(DISCOVERY).split(".")
    other = jwt_issuer.token_for(DISCOVERY, tenant="x").split(".")
    assert_refused(discover(client, f"{good[0]}.{other[1]}.{good[2]}"))


def test_untrusted_issuer_is_refused(client: FlaskClient, jwt_issuer: JwtIssuer) -> None:
    assert_refused(
        discover(client, jwt_issuer.token_for(DISCOVERY, iss="https://evil.example.org"))
    )


def test_jku_outside_the_allowlist_is_refused_without_fetching(
    client: FlaskClient, jwt_issuer: JwtIssuer, jwks_server: JwksServer
) -> None:
    # The attacker publishes their own key and points jku at it: never fetched, never trusted.
    attacker_key = fresh_private_key("ES384")
    jwks_server.set("/attacker/jwks.json", {"keys": [public_jwk(attacker_key, "evil", "ES384")]})
    token = jwt_issuer.token_for(
        DISCOVERY,
        kid="evil",
        key=attacker_key,
        alg="ES384",
        header={"jku": jwks_server.url("/attacker/jwks.json")},
    )
    assert_refused(discover(client, token))
    assert jwks_server.hits.get("/attacker/jwks.json", 0) == 0


def test_token_without_jku_uses_the_issuers_only_jwks(
    client: FlaskClient, jwt_issuer: JwtIssuer
) -> None:
    assert (
        discover(client, jwt_issuer.token_for(DISCOVERY, header={"jku": None})).status_code == 200
    )


def test_wrong_audience_is_refused(client: FlaskClient, jwt_issuer: JwtIssuer) -> None:
    for aud in (
        SERVICE,
        "http://localhost/cds-services/",
        "https://localhost/cds-services",
        "http://localhost/cds-services?x=1",
        ["https://other.example.org"],
    ):
        assert_refused(discover(client, jwt_issuer.token_for(DISCOVERY, aud=aud)))


def test_expired_and_future_tokens_are_refused(client: FlaskClient, jwt_issuer: JwtIssuer) -> None:
    now = int(time.time())
    assert_refused(discover(client, jwt_issuer.token_for(DISCOVERY, iat=now - 400, exp=now - 60)))
    assert_refused(discover(client, jwt_issuer.token_for(DISCOVERY, iat=now + 60, exp=now + 360)))
    assert_refused(discover(client, jwt_issuer.token_for(DISCOVERY, nbf=now + 60)))
    # A token valid for days would pin a replay-cache entry for days.
    assert_refused(discover(client, jwt_issuer.token_for(DISCOVERY, exp=now + 86_400 * 30)))


def test_leeway_is_configurable(auth_app_factory: Any, jwt_issuer: JwtIssuer) -> None:
    client = auth_app_factory(jwt_leeway_seconds=0).test_client()
    assert_refused(discover(client, jwt_issuer.token_for(DISCOVERY, exp=int(time.time()) - 2)))


@pytest.mark.parametrize("claim", ["iss", "aud", "exp", "iat", "jti"])
def test_each_required_claim_is_required(
    client: FlaskClient, jwt_issuer: JwtIssuer, claim: str
) -> None:
    assert_refused(discover(client, jwt_issuer.token_for(DISCOVERY, **{claim: None})))


@pytest.mark.parametrize("jti", ["", 42, ["a"]])
def test_jti_must_be_a_string(client: FlaskClient, jwt_issuer: JwtIssuer, jti: Any) -> None:
    assert_refused(discover(client, jwt_issuer.token_for(DISCOVERY, jti=jti)))


def test_header_must_name_a_known_kid_and_type_jwt(
    client: FlaskClient, jwt_issuer: JwtIssuer
) -> None:
    assert_refused(discover(client, jwt_issuer.token_for(DISCOVERY, header={"kid": None})))
    assert_refused(discover(client, jwt_issuer.token_for(DISCOVERY, header={"typ": "at+jwt"})))
    jwt_issuer.add_key("unpublished", "ES384")
    assert_refused(discover(client, jwt_issuer.token_for(DISCOVERY, kid="unpublished")))


@pytest.mark.parametrize("declare_alg", [True, False])
def test_alg_must_fit_the_key(
    auth_app_factory: Any,
    jwt_issuer: JwtIssuer,
    caplog: pytest.LogCaptureFixture,
    declare_alg: bool,
) -> None:
    # The EC P-384 key cannot verify ES256 or RS384 tokens, whatever the header claims: by
    # its declared alg, or (undeclared) by its curve and type.
    jwt_issuer.server.set(jwt_issuer.path, jwt_issuer.jwks("ec", "rsa", declare_alg=declare_alg))
    client = auth_app_factory().test_client()
    for alg in ("ES256", "RS384"):
        token = jwt_issuer.token_for(DISCOVERY, kid="ec", alg=alg, key=private_key(alg))
        assert_refused(discover(client, token))
    expected = "does not match key" if declare_alg else "does not fit key"
    assert sum(expected in reason for reason in refusal_reasons(caplog)) == 2


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_short_rsa_keys_are_refused(auth_app_factory: Any, jwt_issuer: JwtIssuer) -> None:
    jwt_issuer.add_key("weak", "RS256", fresh_private_key("RS256", size=1024))
    jwt_issuer.publish("weak")
    client = auth_app_factory().test_client()
    assert_refused(discover(client, jwt_issuer.token_for(DISCOVERY, kid="weak")))


# --- replay --------------------------------------------------------------------------------


def test_a_replayed_token_is_refused(
    client: FlaskClient, jwt_issuer: JwtIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    token = jwt_issuer.token_for(DISCOVERY)
    assert discover(client, token).status_code == 200
    assert_refused(discover(client, token))
    assert any("replay" in reason for reason in refusal_reasons(caplog))
    # A fresh jti passes again; a refused token does not burn its jti.
    jti = str(uuid.uuid4())
    assert_refused(discover(client, jwt_issuer.token_for(DISCOVERY, jti=jti, aud=SERVICE)))
    assert discover(client, jwt_issuer.token_for(DISCOVERY, jti=jti)).status_code == 200


def test_replay_cache_forgets_a_jti_once_its_token_expired() -> None:
    now = [1000.0]
    cache = ReplayCache(max_entries=10, clock=lambda: now[0])
    cache.remember(("iss", "a"), expires_at=1300.0)
    with pytest.raises(AuthError, match="replay"):
        cache.remember(("iss", "a"), expires_at=1300.0)
    cache.remember(("other-iss", "a"), expires_at=1300.0)  # jti is per issuer
    now[0] = 1300.5
    cache.remember(("iss", "a"), expires_at=1600.0)  # expired: the token itself is refused now
    assert len(cache) == 1


def test_replay_cache_is_bounded_and_fails_closed() -> None:
    now = [0.0]
    cache = ReplayCache(max_entries=3, clock=lambda: now[0])
    for jti in "abc":
        cache.remember(("iss", jti), expires_at=100.0)
    with pytest.raises(AuthError, match="full"):
        cache.remember(("iss", "d"), expires_at=100.0)
    now[0] = 101.0
    cache.remember(("iss", "d"), expires_at=200.0)
    assert len(cache) == 1


def test_jti_cache_max_setting_reaches_the_cache(
    auth_app_factory: Any, jwt_issuer: JwtIssuer
) -> None:
    app = auth_app_factory(jti_cache_max=2)
    client = app.test_client()
    assert discover(client, jwt_issuer.token_for(DISCOVERY)).status_code == 200
    assert discover(client, jwt_issuer.token_for(DISCOVERY)).status_code == 200
    assert_refused(discover(client, jwt_issuer.token_for(DISCOVERY)))


# --- JWKS: cache, rotation, failure --------------------------------------------------------


def test_jwks_is_cached_between_calls(client: FlaskClient, jwt_issuer: JwtIssuer) -> None:
    for _ in range(5):
        assert discover(client, jwt_issuer.token_for(DISCOVERY)).status_code == 200
    assert jwt_issuer.fetches == 1


def test_key_rotation_refetches_once(app: Flask, jwt_issuer: JwtIssuer) -> None:
    client = app.test_client()
    assert discover(client, jwt_issuer.token_for(DISCOVERY, kid="ec")).status_code == 200
    assert jwt_issuer.fetches == 1
    app.extensions[AUTH_EXTENSION].jwks.min_refetch_seconds = 0  # rotate "at once" in the test
    jwt_issuer.add_key("ec-2", "ES384")
    jwt_issuer.publish("ec-2")  # the old keys are withdrawn
    assert discover(client, jwt_issuer.token_for(DISCOVERY, kid="ec-2")).status_code == 200
    assert jwt_issuer.fetches == 2
    assert discover(client, jwt_issuer.token_for(DISCOVERY, kid="ec-2")).status_code == 200
    assert jwt_issuer.fetches == 2
    # The withdrawn key is refused after one more refetch that does not find it.
    assert_refused(discover(client, jwt_issuer.token_for(DISCOVERY, kid="ec")))
    assert jwt_issuer.fetches == 3


def test_unknown_kids_cannot_make_the_service_hammer_the_issuer(
    client: FlaskClient, jwt_issuer: JwtIssuer
) -> None:
    assert discover(client, jwt_issuer.token_for(DISCOVERY)).status_code == 200
    for n in range(20):
        jwt_issuer.add_key(f"random-{n}", "ES384", private_key("ES384"))
        assert_refused(discover(client, jwt_issuer.token_for(DISCOVERY, kid=f"random-{n}")))
    assert jwt_issuer.fetches <= 2


def test_jwks_cache_expires_after_its_ttl(jwt_issuer: JwtIssuer) -> None:
    now = [0.0]
    cache = JwksCache(ttl=300, timeout=2, clock=lambda: now[0])
    cache.key(jwt_issuer.jku, "ec")
    now[0] = 299.0
    cache.key(jwt_issuer.jku, "rsa")
    assert jwt_issuer.fetches == 1
    now[0] = 301.0
    cache.key(jwt_issuer.jku, "ec")
    assert jwt_issuer.fetches == 2


def test_jwks_cache_seconds_setting_reaches_the_cache(
    auth_app_factory: Any, jwt_issuer: JwtIssuer
) -> None:
    app = auth_app_factory(jwks_cache_seconds=0, jwks_timeout_seconds=1.5)
    jwks = app.extensions[AUTH_EXTENSION].jwks
    assert (jwks.ttl, jwks.timeout) == (0, 1.5)
    client = app.test_client()
    for _ in range(3):
        assert discover(client, jwt_issuer.token_for(DISCOVERY)).status_code == 200
    assert jwt_issuer.fetches == 3


@pytest.mark.parametrize(
    "breakage",
    ["status-500", "not-json", "not-a-jwks", "no-usable-keys", "too-large", "private-keys"],
)
def test_a_broken_jwks_gives_401(
    auth_app_factory: Any,
    jwt_issuer: JwtIssuer,
    jwks_server: JwksServer,
    breakage: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = jwt_issuer.path
    if breakage == "status-500":
        jwks_server.status[path] = 500
    elif breakage == "not-json":
        jwks_server.raw[path] = b"<html>oops</html>"
    elif breakage == "not-a-jwks":
        jwks_server.set(path, ["keys"])
    elif breakage == "no-usable-keys":
        jwks_server.set(path, {"keys": [{"kty": "oct", "kid": "ec", "k": "c2VjcmV0"}]})
    elif breakage == "too-large":
        jwks_server.raw[path] = b'{"keys": [], "pad": "' + b"x" * 1_000_000 + b'"}'
    elif breakage == "private-keys":
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private_key("ES384")))
        jwks_server.set(path, {"keys": [{**jwk, "kid": "ec"}]})
    client = auth_app_factory().test_client()
    assert_refused(discover(client, jwt_issuer.token_for(DISCOVERY)))
    if breakage == "private-keys":
        # Skipped outright: a JWK Set that publishes private material is not a trust anchor.
        assert any("private key material" in r.getMessage() for r in caplog.records)


def test_an_unreachable_jwks_gives_401_quickly(
    auth_app_factory: Any, jwt_issuer: JwtIssuer
) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/jwks.json"
    client = auth_app_factory(issuers=[{"iss": jwt_issuer.iss, "jku": [dead]}]).test_client()
    started = time.monotonic()
    assert_refused(discover(client, jwt_issuer.token_for(DISCOVERY, header={"jku": dead})))
    assert time.monotonic() - started < 2


def test_a_slow_jwks_gives_401_after_the_timeout_not_a_hang(
    auth_app_factory: Any, jwt_issuer: JwtIssuer, jwks_server: JwksServer
) -> None:
    jwks_server.delay[jwt_issuer.path] = 5
    client = auth_app_factory(jwks_timeout_seconds=0.5).test_client()
    started = time.monotonic()
    assert_refused(discover(client, jwt_issuer.token_for(DISCOVERY)))
    first = time.monotonic() - started
    assert first < 2.5
    # Right after a failure the set is not refetched: the next call fails fast.
    started = time.monotonic()
    assert_refused(discover(client, jwt_issuer.token_for(DISCOVERY)))
    assert time.monotonic() - started < 0.3
    jwks_server.delay[jwt_issuer.path] = 0


def test_a_dripping_jwks_is_cut_off_at_the_timeout(jwks_server: JwksServer) -> None:
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def drip() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10000\r\n\r\n"
        )
        try:
            for _ in range(60):
                conn.sendall(b" ")
                time.sleep(0.1)
        except OSError:
            pass
        conn.close()

    threading.Thread(target=drip, daemon=True).start()
    cache = JwksCache(ttl=300, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(JwksError):
        cache.key(f"http://127.0.0.1:{listener.getsockname()[1]}/jwks.json", "any")
    assert time.monotonic() - started < 1.5
    listener.close()


# --- keys configured out of band, and the sandbox --------------------------------------------


def test_inline_and_file_keys_need_no_fetch(
    auth_app_factory: Any, jwt_issuer: JwtIssuer, tmp_path: Path
) -> None:
    (tmp_path / "ehr-keys.json").write_text(json.dumps(jwt_issuer.jwks("rsa")))
    inline = {"iss": jwt_issuer.iss, "jwks": jwt_issuer.jwks("ec")}
    client = auth_app_factory(issuers=[inline]).test_client()
    assert (
        discover(client, jwt_issuer.token_for(DISCOVERY, header={"jku": None})).status_code == 200
    )
    # A token that names a jku the entry does not list is refused even with inline keys.
    assert_refused(discover(client, jwt_issuer.token_for(DISCOVERY)))
    from_file = {"iss": jwt_issuer.iss, "jwksFile": "ehr-keys.json", "jku": [jwt_issuer.jku]}
    client = auth_app_factory(issuers=[from_file]).test_client()
    assert discover(client, jwt_issuer.token_for(DISCOVERY, kid="rsa")).status_code == 200
    assert_refused(discover(client, jwt_issuer.token_for(DISCOVERY, kid="ec")))
    assert jwt_issuer.fetches == 0


def sandbox_token(url: str, *, iat_offset: float = 0.5) -> str:
    """A JWT exactly as the public CDS Hooks sandbox signs it (ES384, kid, jku, exp=iat+300)."""
    key = serialization.load_pem_private_key(SANDBOX_PRIVATE_KEY.read_bytes(), password=None)
    iat = round(time.time() + iat_offset)  # the sandbox rounds: up to 0.5 s in the future
    claims = {
        "iss": SANDBOX_ISSUER,
        "aud": url,
        "exp": iat + 300,
        "iat": iat,
        "jti": str(uuid.uuid4()),
    }
    return jwt.encode(
        claims,
        key,
        algorithm="ES384",
        headers={"kid": SANDBOX_KID, "jku": SANDBOX_JKU, "typ": "JWT"},
    )


needs_sandbox_key = pytest.mark.skipif(
    not SANDBOX_PRIVATE_KEY.exists(),
    reason="../shared/reference/sandbox-test-private-key.pem absent",
)


@needs_sandbox_key
def test_trust_sandbox_accepts_sandbox_tokens_without_network(
    auth_app_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the sandbox JWKS must not be fetched")

    monkeypatch.setattr(JwksCache, "_fetch", no_network)
    client = auth_app_factory(issuers=[], trust_sandbox=True).test_client()
    assert discover(client, sandbox_token(DISCOVERY)).status_code == 200
    assert discover(client, sandbox_token(DISCOVERY, iat_offset=0.9)).status_code == 200


@needs_sandbox_key
def test_sandbox_tokens_are_refused_by_default(auth_app_factory: Any) -> None:
    assert Settings().trust_sandbox is False
    client = auth_app_factory().test_client()
    assert_refused(discover(client, sandbox_token(DISCOVERY)))


@needs_sandbox_key
def test_demo_with_auth_on_accepts_the_sandbox_calling_loopback_and_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`CDS_AUTH=on CDS_TRUST_SANDBOX=true cds-service demo`, as the README's Security says."""
    import requests
    from processes import free_port, run_cds

    port, fhir_port = free_port(), free_port()
    env = {
        "CDS_AUTH": "on",
        "CDS_TRUST_SANDBOX": "true",
        "CDS_TRUSTED_ISSUERS_FILE": "",
        "CDS_HOST": "127.0.0.1",
        "CDS_PORT": str(port),
        "CDS_FIXTURE_SERVER_PORT": str(fhir_port),
        "CDS_DATABASE_URL": f"sqlite:///{tmp_path / 'demo.sqlite3'}",
        "CDS_WORKERS": "1",
    }
    monkeypatch.delenv("CDS_EXTERNAL_BASE_URL", raising=False)
    with run_cds(["demo"], env, tmp_path / "demo.log", port=port) as served:

        def status(aud: str, **headers: str) -> int:
            token = sandbox_token(aud)
            response = requests.get(
                f"{served.url}/cds-services",
                headers={"Authorization": f"Bearer {token}", **headers},
                timeout=10,
            )
            return response.status_code

        assert status(f"http://127.0.0.1:{port}/cds-services") == 200
        assert status(f"http://localhost:{port}/cds-services") == 200
        assert status(OTHER_CDS, Host="other-cds.example.net") == 401
        evil = f"evil.example:{port}"
        assert status(f"http://{evil}/cds-services", Host=evil) == 401
        assert any("JWT aud must name one of" in line for line in served.log_lines())


def test_trust_sandbox_env_variable() -> None:
    assert Settings.from_env({"CDS_TRUST_SANDBOX": "true"}).trust_sandbox is True
    assert Settings.from_env({}).trust_sandbox is False


def test_bundled_sandbox_jwks_is_the_published_one() -> None:
    shared = SHARED_REFERENCE / "sandbox-jwks.json"
    if not shared.exists():
        pytest.skip("../shared/reference/sandbox-jwks.json absent")
    bundled = json.loads(auth.SANDBOX_JWKS_FILE.read_text())
    assert bundled == json.loads(shared.read_text())
    assert [key["kid"] for key in bundled["keys"]] == [SANDBOX_KID]


# --- configuration -------------------------------------------------------------------------


def test_auth_setting_accepts_only_on_or_off() -> None:
    with pytest.raises(SettingsError, match="CDS_AUTH"):
        Settings.from_env({"CDS_AUTH": "disabled"})
    assert Settings.from_env({"CDS_AUTH": "off"}).auth == "off"
    assert Settings().auth == "on"


def test_auth_off_is_explicit_and_loud(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from cds_service.app import create_app

    caplog.set_level(logging.WARNING)
    app = create_app(Settings(auth="off", database_url=f"sqlite:///{tmp_path / 'db.sqlite3'}"))
    assert app.test_client().get("/cds-services").status_code == 200
    loud = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and "AUTHENTICATION IS OFF" in r.getMessage()
    ]
    assert loud


def test_auth_on_without_trusted_issuers_refuses_everything_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, jwt_issuer: JwtIssuer
) -> None:
    from cds_service.app import create_app

    app = create_app(Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite3'}"))
    assert any("no issuer is trusted" in r.getMessage() for r in caplog.records)
    assert_refused(discover(app.test_client(), jwt_issuer.token_for(DISCOVERY)))


def write(tmp_path: Path, document: Any) -> Path:
    path = tmp_path / "issuers.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return path


@pytest.mark.parametrize(
    ("document", "named"),
    [
        ("{not json", "not JSON"),
        ({"issuer": []}, "issuers"),
        (
            {
                "issuers": [
                    {"iss": "https://a.example.org", "jku": ["https://a.example.org/k"]},
                    {"iss": "https://b.example.org"},
                ]
            },
            r"\$\.issuers\[1\]",
        ),
        (
            {"issuers": [{"iss": "https://a.example.org", "jku": ["ftp://a.example.org/k"]}]},
            r"\$\.issuers\[0\]\.jku\[0\]",
        ),
        (
            {
                "issuers": [
                    {"iss": "https://a.example.org", "jku": ["https://a/k"], "tenant": ["x"]}
                ]
            },
            r"tenant",
        ),
        (
            {
                "issuers": [
                    {
                        "iss": "https://a.example.org",
                        "jwks": {"keys": [{"kty": "oct", "kid": "h", "k": "c2VjcmV0"}]},
                    }
                ]
            },
            r"issuers\[0\]\.jwks",
        ),
        (
            {"issuers": [{"iss": "https://a.example.org", "jwksFile": "missing.json"}]},
            r"issuers\[0\] \(https://a\.example\.org\).*missing\.json",
        ),
        (
            {
                "issuers": [
                    {"iss": "https://a.example.org", "jku": ["https://a.example.org/k"]},
                    {"iss": "https://a.example.org", "jku": ["https://a.example.org/j"]},
                ]
            },
            r"issuers\[1\].*twice",
        ),
    ],
)
def test_a_bad_trusted_issuers_file_stops_start_up_naming_file_and_entry(
    tmp_path: Path, document: Any, named: str
) -> None:
    path = write(tmp_path, document)
    with pytest.raises(TrustedIssuersError, match=named) as caught:
        load_trusted_issuers(path)
    assert str(path) in str(caught.value)


def test_private_key_material_in_a_configured_jwks_is_refused(tmp_path: Path) -> None:
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private_key("ES384")))
    path = write(
        tmp_path,
        {"issuers": [{"iss": "https://a.example.org", "jwks": {"keys": [{**jwk, "kid": "x"}]}}]},
    )
    with pytest.raises(TrustedIssuersError, match=r"issuers\[0\]"):
        load_trusted_issuers(path)


def test_a_bad_file_stops_create_app(tmp_path: Path) -> None:
    from cds_service.app import create_app

    path = write(tmp_path, {"issuers": [{"iss": "https://a.example.org"}]})
    with pytest.raises(TrustedIssuersError, match="issuers"):
        create_app(
            Settings(
                trusted_issuers_file=str(path), database_url=f"sqlite:///{tmp_path / 'd.sqlite3'}"
            )
        )


def test_the_example_file_is_valid_and_trusts_nothing(tmp_path: Path) -> None:
    example = ROOT / "trusted-issuers.example.json"
    assert load_trusted_issuers(example) == {}
    entries = json.loads(example.read_text())["issuers"]
    sandbox = next(e for e in entries if e["iss"] == SANDBOX_ISSUER)
    assert sandbox["enabled"] is False and sandbox["jku"] == [SANDBOX_JKU]
    # Enabled, every entry loads (the out-of-band key file beside it supplied here).
    copy = tmp_path / "trusted-issuers.json"
    shutil.copy(auth.SANDBOX_JWKS_FILE, tmp_path / "other-ehr-jwks.json")
    copy.write_text(json.dumps({"issuers": [{**e, "enabled": True} for e in entries]}))
    assert set(load_trusted_issuers(copy)) == {e["iss"] for e in entries}


def test_the_docker_image_never_turns_authentication_off() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert not re.search(r"CDS_AUTH\s*=\s*\"?off", dockerfile, re.IGNORECASE)
    assert not re.search(r"CDS_TRUST_SANDBOX\s*=\s*\"?(true|1|yes|on)", dockerfile, re.IGNORECASE)


# --- the log never holds the token ---------------------------------------------------------


def test_refusals_are_logged_with_the_reason_but_never_the_token(
    client: FlaskClient, jwt_issuer: JwtIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    token = jwt_issuer.token_for(DISCOVERY, aud=SERVICE)
    assert_refused(discover(client, token))
    reasons = refusal_reasons(caplog)
    assert reasons and "aud" in reasons[0]
    logged = "\n".join(r.getMessage() + json.dumps(r.__dict__, default=str) for r in caplog.records)
    for part in token.split("."):
        assert part not in logged


def test_verifier_turns_unexpected_errors_into_refusals(
    client: FlaskClient, app: Flask, jwt_issuer: JwtIssuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: TokenVerifier, token: str, audience: str) -> Any:
        raise KeyError("bug")

    monkeypatch.setattr(TokenVerifier, "verify", broken)
    assert_refused(discover(client, jwt_issuer.token_for(DISCOVERY)))
