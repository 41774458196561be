"""RFC 8414 metadata, the JWKS, CORS, and the issuer string everywhere."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient

ISSUER = "http://127.0.0.1:8000"


def test_metadata_lists_what_mcp_clients_need(client: FlaskClient) -> None:
    for path in ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"):
        response = client.get(path, headers={"Origin": "http://localhost:6274"})
        assert response.status_code == 200
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        meta = response.json
        assert meta["issuer"] == ISSUER
        assert meta["code_challenge_methods_supported"] == ["S256"]
        assert meta["response_types_supported"] == ["code"]
        assert "none" in meta["token_endpoint_auth_methods_supported"]
        assert meta["client_id_metadata_document_supported"] is True
        assert meta["authorization_response_iss_parameter_supported"] is True
        for key in (
            "authorization_endpoint",
            "token_endpoint",
            "registration_endpoint",
            "revocation_endpoint",
            "introspection_endpoint",
            "jwks_uri",
        ):
            assert meta[key].startswith(ISSUER + "/"), key
        # Scope minimisation: no resource's scopes are advertised here.
        assert "demo:read" not in meta.get("scopes_supported", [])
        assert {"authorization_code", "refresh_token"} <= set(meta["grant_types_supported"])
    assert "urn:ietf:params:oauth:grant-type:token-exchange" in meta["grant_types_supported"]


def test_issuer_with_a_path_serves_path_inserted_metadata(make_app: Any) -> None:
    app = make_app(issuer="http://127.0.0.1:8000/sso")
    client = app.test_client()
    for path in (
        "/.well-known/oauth-authorization-server/sso",
        "/.well-known/openid-configuration/sso",
        "/sso/.well-known/openid-configuration",
    ):
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.json["issuer"] == "http://127.0.0.1:8000/sso"


def test_jwks_has_kids_and_cache_headers(client: FlaskClient) -> None:
    response = client.get("/jwks.json")
    assert response.status_code == 200
    assert "max-age" in response.headers["Cache-Control"]
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    keys = response.json["keys"]
    assert len(keys) == 2  # the active key, and the next one published before it signs
    assert len({key["kid"] for key in keys}) == 2
    for key in keys:
        assert key["kty"] == "EC" and key["alg"] == "ES256" and key["use"] == "sig" and key["kid"]
        assert "d" not in key  # never the private part


@pytest.mark.parametrize("alg,kty", [("RS256", "RSA"), ("EdDSA", "OKP")])
def test_other_signing_algorithms(make_app: Any, alg: str, kty: str) -> None:
    app = make_app(tokens={"signing_alg": alg})
    key = app.test_client().get("/jwks.json").json["keys"][0]
    assert key["kty"] == kty and key["alg"] == alg
    assert "d" not in key and "p" not in key


def test_cors_never_on_authorize_or_pages(client: FlaskClient) -> None:
    response = client.get("/authorize", headers={"Origin": "https://evil.example.com"})
    assert "Access-Control-Allow-Origin" not in response.headers
    assert response.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]


def test_health_and_unknown_paths(client: FlaskClient) -> None:
    assert client.get("/health").json == {"status": "ok"}
    assert client.get("/ready").json == {"status": "ok"}
    page = client.get("/nowhere")
    assert page.status_code == 404 and page.mimetype == "text/html"
    api = client.get("/.well-known/nowhere")
    assert api.status_code == 404 and api.json["error"] == "not_found"


def test_cimd_support_follows_the_setting(make_app: Any) -> None:
    app = make_app(client_metadata_documents={"enabled": False})
    meta = app.test_client().get("/.well-known/oauth-authorization-server").json
    assert meta["client_id_metadata_document_supported"] is False
