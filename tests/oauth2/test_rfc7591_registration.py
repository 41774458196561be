"""RFC 7591 dynamic client registration, as the real MCP clients register."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select

from broker.crypto import verify_password
from broker.models import AuditEvent, Client

REAL_CLIENTS: dict[str, dict[str, Any]] = {
    "vscode": {
        "client_name": "Visual Studio Code",
        "redirect_uris": [
            "http://127.0.0.1/",
            "http://127.0.0.1:33418/",
            "https://vscode.dev/redirect",
            "https://insiders.vscode.dev/redirect",
        ],
        "grant_types": [
            "authorization_code",
            "refresh_token",
            "urn:ietf:params:oauth:grant-type:device_code",
        ],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
        "application_type": "native",
    },
    "cursor": {
        "client_name": "Cursor",
        "redirect_uris": [
            "http://127.0.0.1:5555/callback",
            "cursor://anysphere.cursor-mcp/oauth/callback",
            "https://cursor.com/oauth/callback",
        ],
        "token_endpoint_auth_method": "none",
    },
    "claude": {
        "client_name": "Claude",
        "redirect_uris": ["https://claude.ai/api/mcp/auth_callback"],
        "grant_types": ["authorization_code", "refresh_token"],
        "token_endpoint_auth_method": "client_secret_post",
        "scope": "demo:read demo:write",
    },
    "mcp-remote": {
        "client_name": "MCP CLI Proxy",
        "client_uri": "https://github.com/geelen/mcp-remote",
        "software_id": "2e6dc280-f3c3-4e01-99a7-8181dbd1d23d",
        "software_version": "0.1.18",
        "redirect_uris": ["http://localhost:12334/oauth/callback"],
        "token_endpoint_auth_method": "none",
        "grant_types": [
            "authorization_code",
            "refresh_token",
            "urn:ietf:params:oauth:grant-type:jwt-bearer",
        ],
    },
}


@pytest.mark.parametrize("name", sorted(REAL_CLIENTS))
def test_real_clients_register(app: Any, client: FlaskClient, name: str) -> None:
    response = client.post("/register", json=REAL_CLIENTS[name])
    assert response.status_code == 201, response.json
    body = response.json
    assert not body["client_id"].startswith("https://")
    assert body["grant_types"] == ["authorization_code", "refresh_token"]  # unsupported dropped
    assert body["redirect_uris"] == REAL_CLIENTS[name]["redirect_uris"]
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    with app.extensions["broker"].db.session() as session:
        row = session.get(Client, body["client_id"])
        assert row is not None and row.kind == "dcr" and row.expires_at is not None
        if body["token_endpoint_auth_method"] == "none":
            assert "client_secret" not in body and row.secret_hash is None
        else:
            # Stored as a slow hash only; the plaintext is in the response once.
            assert row.secret_hash and body["client_secret"] not in row.secret_hash
            assert verify_password(row.secret_hash, body["client_secret"])
        assert session.scalars(select(AuditEvent).where(AuditEvent.type == "register")).first()


def test_confidential_client_authenticates_at_the_token_endpoint(client: FlaskClient) -> None:
    body = client.post("/register", json=REAL_CLIENTS["claude"]).json
    wrong = client.post(
        "/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": "x",
            "client_id": body["client_id"],
            "client_secret": "nope",
        },
    )
    assert wrong.status_code in (400, 401) and wrong.json["error"] == "invalid_client"
    right = client.post(
        "/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": "x",
            "client_id": body["client_id"],
            "client_secret": body["client_secret"],
        },
    )
    assert right.status_code == 400 and right.json["error"] == "invalid_grant"


@pytest.mark.parametrize(
    "redirect_uri",
    [
        "javascript:alert(1)",
        "data:text/html,hi",
        "http://evil.example.com/cb",
        "https://app.example.com/cb#frag",
        "file:///etc/passwd",
        "not a uri",
        "",
        "https://user:pw@app.example.com/cb",
    ],
)
def test_bad_redirect_uris_are_refused(app: Any, client: FlaskClient, redirect_uri: str) -> None:
    response = client.post("/register", json={"redirect_uris": [redirect_uri]})
    assert response.status_code == 400
    assert response.json["error"] == "invalid_redirect_uri"
    with app.extensions["broker"].db.session() as session:
        assert session.scalars(select(Client)).first() is None  # nothing half-written


def test_private_use_scheme_only_for_native(client: FlaskClient) -> None:
    web = client.post(
        "/register", json={"redirect_uris": ["cursor://cb"], "application_type": "web"}
    )
    assert web.status_code == 400 and web.json["error"] == "invalid_redirect_uri"
    native = client.post("/register", json={"redirect_uris": ["cursor://cb"]})
    assert native.status_code == 201


@pytest.mark.parametrize(
    "body,error",
    [
        ({}, "invalid_client_metadata"),
        ({"redirect_uris": "http://127.0.0.1/cb"}, "invalid_redirect_uri"),
        (
            {
                "redirect_uris": ["http://127.0.0.1/cb"],
                "token_endpoint_auth_method": "private_key_jwt",
            },
            "invalid_client_metadata",
        ),
        (
            {"redirect_uris": ["http://127.0.0.1/cb"], "grant_types": ["client_credentials"]},
            "invalid_client_metadata",
        ),
        (
            {"redirect_uris": ["http://127.0.0.1/cb"], "response_types": ["token"]},
            "invalid_client_metadata",
        ),
        (
            {"redirect_uris": ["http://127.0.0.1/cb"], "client_name": "x" * 500},
            "invalid_client_metadata",
        ),
    ],
)
def test_bad_metadata(client: FlaskClient, body: dict[str, Any], error: str) -> None:
    response = client.post("/register", json=body)
    assert response.status_code == 400 and response.json["error"] == error


def test_non_json_oversized_and_wrong_methods(client: FlaskClient) -> None:
    form = client.post("/register", data={"redirect_uris": "http://127.0.0.1/cb"})
    assert form.status_code == 400 and form.json["error"] == "invalid_client_metadata"
    big = client.post(
        "/register",
        json={"redirect_uris": ["http://127.0.0.1/cb"], "client_name": "x", "extra": "y" * 20000},
    )
    assert big.status_code == 413 and big.headers["Connection"] == "close"
    huge = client.post("/register", data="x" * 100_000, content_type="application/json")
    assert huge.status_code == 413 and huge.json["error"] == "invalid_request"
    for method in ("get", "head", "put", "delete"):
        response = getattr(client, method)("/register")
        assert response.status_code == 405, method
        assert "POST" in response.headers["Allow"]
    preflight = client.options(
        "/register",
        headers={"Origin": "http://localhost:6274", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "*"


def test_an_expired_registration_with_a_live_grant_keeps_working(
    app: Any, client: FlaskClient
) -> None:
    import datetime as dt

    from sqlalchemy import update

    from tests.support import authorize_params, pkce, query, redeem, sign_in_local

    registered = client.post("/register", json={"redirect_uris": ["http://127.0.0.1/cb"]}).json
    unused = client.post("/register", json={"redirect_uris": ["http://127.0.0.1/cb"]}).json
    verifier, challenge = pkce()
    params = authorize_params(
        registered["client_id"], challenge, redirect_uri="http://127.0.0.1:5555/cb"
    )
    code = query(sign_in_local(client, params).headers["Location"])["code"]
    tokens = redeem(
        client, registered["client_id"], code, verifier, redirect_uri="http://127.0.0.1:5555/cb"
    ).json
    with app.extensions["broker"].db.session() as session:
        session.execute(
            update(Client).values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
        )
    refreshed = client.post(
        "/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
            "client_id": registered["client_id"],
        },
    )
    assert refreshed.status_code == 200
    _, challenge = pkce()
    gone = client.get(
        "/authorize",
        query_string=authorize_params(
            unused["client_id"], challenge, redirect_uri="http://127.0.0.1:5555/cb"
        ),
    )
    assert gone.status_code == 400  # unused and expired: unknown
