"""RFC 7009 revocation and RFC 7662 introspection of the broker's own tokens."""

from __future__ import annotations

from typing import Any

import pytest
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


# -- RFC 7009 section 2.1: token_type_hint is only a hint ---------------------------------------


def _refresh(client: FlaskClient, registered: dict[str, Any], refresh_token: str) -> Any:
    return client.post(
        "/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": registered["client_id"],
        },
    )


@pytest.mark.parametrize(
    "hint",
    ["unknown_type", "urn:ietf:params:oauth:token-type:jwt", "", "REFRESH_TOKEN", "access_token"],
)
def test_an_unknown_or_wrong_hint_is_ignored(
    client: FlaskClient, registered: dict[str, Any], hint: str
) -> None:
    """A hint the broker does not know, or that names the wrong type, never gives
    unsupported_token_type: every type is searched and the token is revoked."""
    tokens = _tokens(client, registered)
    response = client.post(
        "/revoke",
        data={
            "token": tokens["refresh_token"],
            "token_type_hint": hint,
            "client_id": registered["client_id"],
        },
    )
    assert response.status_code == 200, response.json
    refused = _refresh(client, registered, tokens["refresh_token"])
    assert refused.status_code == 400 and refused.json["error"] == "invalid_grant"


def test_an_unknown_hint_with_an_unknown_token_answers_200(
    client: FlaskClient, registered: dict[str, Any]
) -> None:
    response = client.post(
        "/revoke",
        data={
            "token": "nonsense",
            "token_type_hint": "id_token",
            "client_id": registered["client_id"],
        },
    )
    assert response.status_code == 200


def test_an_access_token_is_found_with_the_refresh_hint(
    client: FlaskClient, registered: dict[str, Any]
) -> None:
    confidential = _confidential(client)
    auth = (confidential["client_id"], confidential["client_secret"])
    tokens = _tokens(client, confidential, client_secret=confidential["client_secret"])
    revoked = client.post(
        "/revoke",
        data={"token": tokens["access_token"], "token_type_hint": "refresh_token"},
        auth=auth,  # type: ignore[arg-type]
    )
    assert revoked.status_code == 200
    inactive = client.post("/introspect", data={"token": tokens["access_token"]}, auth=auth)  # type: ignore[arg-type]
    assert inactive.json == {"active": False}


# -- RFC 6749 section 6: the scope of a refresh (kept here with the other corner cases of
# -- issue 6; they belong with tests/oauth2/test_rfc6749_code_flow.py) -----------------------


def _scoped_tokens(client: FlaskClient, registered: dict[str, Any], scope: str) -> dict[str, Any]:
    verifier, challenge = pkce()
    params = authorize_params(registered["client_id"], challenge, scope=scope)
    code = query(sign_in_local(client, params).headers["Location"])["code"]
    response = redeem(client, registered["client_id"], code, verifier)
    assert response.status_code == 200, response.json
    return dict(response.json)


@pytest.mark.parametrize(
    "scope",
    [
        "demo:read demo:write",  # a scope of the resource the grant does not hold
        "demo:write",
        "other:read",  # a scope of another resource
        "admin",  # a scope nobody has
        "offline_access",  # accepted and ignored at /authorize, so not part of the grant
        'demo:read "x"',
    ],
)
def test_a_refresh_asking_for_more_than_the_grant_gets_invalid_scope(
    app: Any, client: FlaskClient, registered: dict[str, Any], scope: str
) -> None:
    tokens = _scoped_tokens(client, registered, "demo:read")
    response = client.post(
        "/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
            "client_id": registered["client_id"],
            "scope": scope,
        },
    )
    assert response.status_code == 400 and response.json["error"] == "invalid_scope"
    # Nothing changed: the refresh token was not used up.
    assert _refresh(client, registered, tokens["refresh_token"]).status_code == 200


@pytest.mark.parametrize(
    ("scope", "granted"),
    [
        ("", "demo:read demo:write"),  # omitted: the scope originally granted
        ("   ", "demo:read demo:write"),  # only spaces: omitted too, never an empty scope
        ("demo:write", "demo:write"),  # narrowed
        ("demo:write  demo:write demo:read", "demo:write demo:read"),  # written once each
    ],
)
def test_a_refresh_within_the_grant(
    client: FlaskClient, registered: dict[str, Any], scope: str, granted: str
) -> None:
    import jwt

    tokens = _scoped_tokens(client, registered, "demo:read demo:write")
    response = client.post(
        "/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
            "client_id": registered["client_id"],
            "scope": scope,
        },
    )
    assert response.status_code == 200, response.json
    words = response.json["scope"].split(" ")  # single spaces, each scope once
    assert len(words) == len(set(words)) and set(words) == set(granted.split())
    claims = jwt.decode(response.json["access_token"], options={"verify_signature": False})
    assert claims["scope"] == response.json["scope"]


def test_a_parallel_refresh_asking_for_more_gets_invalid_scope(
    client: FlaskClient, registered: dict[str, Any]
) -> None:
    """Within the grace window the same successor is handed out again, but only for the
    grant's scope."""
    tokens = _scoped_tokens(client, registered, "demo:read")
    first = _refresh(client, registered, tokens["refresh_token"])
    assert first.status_code == 200
    wider = client.post(
        "/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
            "client_id": registered["client_id"],
            "scope": "demo:read demo:write",
        },
    )
    assert wider.status_code == 400 and wider.json["error"] == "invalid_scope"
    again = _refresh(client, registered, tokens["refresh_token"])
    assert again.status_code == 200
    assert again.json["refresh_token"] == first.json["refresh_token"]


@pytest.mark.parametrize("hint", ["id_token", "refresh_token", "x" * 300])
def test_introspection_ignores_a_hint_it_does_not_know(client: FlaskClient, hint: str) -> None:
    """RFC 7662 section 2.1: the hint only speeds the search; an unknown or wrong hint never
    makes a token of another type unknown (nor answers unsupported_token_type)."""
    confidential = _confidential(client)
    auth = (confidential["client_id"], confidential["client_secret"])
    tokens = _tokens(client, confidential, client_secret=confidential["client_secret"])
    answer = client.post(
        "/introspect",
        data={"token": tokens["access_token"], "token_type_hint": hint},
        auth=auth,  # type: ignore[arg-type]
    )
    assert answer.status_code == 200 and answer.json["active"] is True
