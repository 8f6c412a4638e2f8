"""CORS: browsers (the public sandbox) preflight discovery, service and feedback calls."""

from __future__ import annotations

from typing import Any

import pytest
from auth_support import JwtIssuer

PATHS = (
    "/cds-services",
    "/cds-services/magnesium-order-select",
    "/cds-services/magnesium-order-select/feedback",
)
PREFLIGHT = {
    "Origin": "https://sandbox.cds-hooks.org",
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}


@pytest.mark.parametrize("path", PATHS)
def test_preflight_is_answered_without_authentication(auth_app_factory: Any, path: str) -> None:
    client = auth_app_factory().test_client()  # auth ON, and no token sent
    response = client.options(path, headers=PREFLIGHT)
    assert response.status_code in {200, 204}
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    methods = {m.strip() for m in response.headers["Access-Control-Allow-Methods"].split(",")}
    assert methods == {"GET", "POST", "OPTIONS"}
    allowed = response.headers["Access-Control-Allow-Headers"]
    headers = {h.strip().lower() for h in allowed.split(",")}
    assert {"content-type", "authorization"} <= headers


def test_actual_answers_carry_the_origin_header_401_included(
    auth_app_factory: Any, jwt_issuer: JwtIssuer
) -> None:
    client = auth_app_factory().test_client()
    origin = {"Origin": "https://sandbox.cds-hooks.org"}
    refused = client.get("/cds-services", headers=origin)
    assert refused.status_code == 401
    assert refused.headers["Access-Control-Allow-Origin"] == "*"  # so the page can read the 401
    ok = client.get(
        "/cds-services", headers={**origin, **jwt_issuer.auth("http://localhost/cds-services")}
    )
    assert ok.status_code == 200
    assert ok.headers["Access-Control-Allow-Origin"] == "*"


def test_allowed_origin_is_configurable(auth_app_factory: Any) -> None:
    client = auth_app_factory(
        cors_allow_origin="https://ehr.example.org, https://sandbox.cds-hooks.org"
    ).test_client()
    listed = client.options("/cds-services", headers=PREFLIGHT)
    assert listed.headers["Access-Control-Allow-Origin"] == "https://sandbox.cds-hooks.org"
    assert "Origin" in listed.headers["Vary"]
    other = client.options("/cds-services", headers={**PREFLIGHT, "Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
    single = auth_app_factory(cors_allow_origin="https://ehr.example.org").test_client()
    answer = single.get("/cds-services", headers={"Origin": "https://ehr.example.org"})
    assert answer.headers["Access-Control-Allow-Origin"] == "https://ehr.example.org"


def test_health_endpoints_get_no_cors_headers(auth_app_factory: Any) -> None:
    client = auth_app_factory().test_client()
    response = client.get("/healthz", headers={"Origin": "https://x.example"})
    assert "Access-Control-Allow-Origin" not in response.headers
