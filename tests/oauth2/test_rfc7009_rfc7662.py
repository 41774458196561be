"""RFC 7009 revocation and RFC 7662 introspection of the broker's own tokens."""

from __future__ import annotations

from typing import Any

from flask.testing import FlaskClient

from tests.support import authorize_params, pkce, query, redeem, sign_in_local


def _tokens(client: FlaskClient, registered: dict[str, Any], **auth: str) -> dict[str, Any]:
    verifier, challenge = pkce()
    response = sign_in_local(client, authorize_params(registered["client_id"], challenge))
    code = query(response.headers["Location"])["code"]
    body = redeem(client, registered["client_id"], code, verifier, **auth)
    assert body.status_code == 200, body.json
    return dict(body.json)


def _confidential(client: FlaskClient) -> dict[str, Any]:
    return dict(
        client.post(
            "/register",
            json={
                "redirect_uris": ["http://127.0.0.1/callback"],
                "token_endpoint_auth_method": "client_secret_post",
            },
        ).json
    )


def test_revoking_a_refresh_token_revokes_the_grant(
    client: FlaskClient, registered: dict[str, Any]
) -> None:
    tokens = _tokens(client, registered)
    response = client.post(
        "/revoke", data={"token": tokens["refresh_token"], "client_id": registered["client_id"]}
    )
    assert response.status_code == 200
    refresh = client.post(
        "/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
            "client_id": registered["client_id"],
        },
    )
    assert refresh.status_code == 400 and refresh.json["error"] == "invalid_grant"


def test_unknown_and_foreign_tokens_answer_200_and_change_nothing(
    client: FlaskClient, registered: dict[str, Any]
) -> None:
    tokens = _tokens(client, registered)
    other = client.post("/register", json={"redirect_uris": ["http://127.0.0.1/callback"]}).json
    assert (
        client.post(
            "/revoke", data={"token": "nonsense", "client_id": registered["client_id"]}
        ).status_code
        == 200
    )
    foreign = client.post(
        "/revoke", data={"token": tokens["refresh_token"], "client_id": other["client_id"]}
    )
    assert foreign.status_code == 200
    still = client.post(
        "/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
            "client_id": registered["client_id"],
        },
    )
    assert still.status_code == 200
    missing = client.post("/revoke", data={"client_id": registered["client_id"]})
    assert missing.status_code == 400 and missing.json["error"] == "invalid_request"


def test_introspection_for_confidential_clients(client: FlaskClient) -> None:
    confidential = _confidential(client)
    auth = (confidential["client_id"], confidential["client_secret"])
    tokens = _tokens(client, confidential, client_secret=confidential["client_secret"])
    active = client.post("/introspect", data={"token": tokens["access_token"]}, auth=auth)  # type: ignore[arg-type]
    assert active.status_code == 200 and active.json["active"] is True
    assert active.json["client_id"] == confidential["client_id"]
    assert active.json["aud"] == "http://127.0.0.1:8001/mcp"
    refresh = client.post("/introspect", data={"token": tokens["refresh_token"]}, auth=auth)  # type: ignore[arg-type]
    assert refresh.json["active"] is True and refresh.json["token_type"] == "refresh_token"
    # Revoke the access token: introspection now says inactive, and nothing else.
    assert (
        client.post("/revoke", data={"token": tokens["access_token"]}, auth=auth).status_code == 200
    )  # type: ignore[arg-type]
    inactive = client.post("/introspect", data={"token": tokens["access_token"]}, auth=auth)  # type: ignore[arg-type]
    assert inactive.json == {"active": False}
    assert client.post("/introspect", data={"token": "junk"}, auth=auth).json == {"active": False}  # type: ignore[arg-type]


def test_introspection_refuses_public_and_unauthenticated_clients(
    client: FlaskClient, registered: dict[str, Any]
) -> None:
    tokens = _tokens(client, registered)
    public = client.post(
        "/introspect", data={"token": tokens["access_token"], "client_id": registered["client_id"]}
    )
    assert public.status_code in (400, 401) and public.json["error"] == "invalid_client"
    anonymous = client.post("/introspect", data={"token": tokens["access_token"]})
    assert anonymous.status_code in (400, 401) and anonymous.json["error"] == "invalid_client"
