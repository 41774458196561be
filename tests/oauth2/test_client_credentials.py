"""RFC 6749 section 4.4, the client credentials grant for headless agents: an audience-bound
RFC 9068 token with the client as subject, no refresh token, and every refusal with its error.

Static clients are rows an operator's migration writes (``broker clients add``); here they are
written through the ORM by :func:`add_static_client`.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

import jwt
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from broker.crypto import hash_password
from broker.models import AuditEvent, Client, RefreshToken
from broker.oauth2.rfc8414 import server_metadata
from tests.support import OTHER_RESOURCE, RESOURCE

ISSUER = "http://127.0.0.1:8000"
SECRET = "agent-secret-" + "s" * 32


def add_static_client(
    app: Flask,
    *,
    client_id: str | None = None,
    secret: str | None = SECRET,
    auth_method: str = "client_secret_basic",
    grant_types: Iterable[str] = ("client_credentials",),
    allowed_resources: Iterable[str] | None = (RESOURCE,),
    scope: str | None = "demo:read demo:write",
    redirect_uris: Iterable[str] = (),
    trusted: bool = False,
    name: str = "Nightly agent",
) -> str:
    """Write a static client row as an operator's migration would; returns its client id."""
    client_id = client_id or "agent-" + secrets.token_hex(6)
    with app.extensions["broker"].db.session() as session:
        session.add(
            Client(
                client_id=client_id,
                kind="static",
                name=name,
                redirect_uris=list(redirect_uris),
                grant_types=list(grant_types),
                response_types=["code"] if redirect_uris else [],
                token_endpoint_auth_method=auth_method,
                application_type="web",
                scope=scope,
                secret_hash=hash_password(secret) if secret else None,
                allowed_resources=list(allowed_resources)
                if allowed_resources is not None
                else None,
                trusted=trusted,
            )
        )
    return client_id


def basic(client_id: str, secret: str) -> dict[str, str]:
    """RFC 6749 section 2.3.1: form-urlencoded id and secret in HTTP Basic."""
    raw = f"{quote(client_id, safe='')}:{quote(secret, safe='')}".encode()
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


def request_token(
    client: FlaskClient,
    client_id: str,
    secret: str | None = SECRET,
    *,
    post: bool = False,
    **form: str | None,
) -> Any:
    """A client credentials request, valid unless the arguments change one thing."""
    data: dict[str, str | None] = {"grant_type": "client_credentials", "resource": RESOURCE}
    data.update(form)
    headers = {}
    if post:
        data.update(client_id=client_id, client_secret=secret)
    elif secret is not None:
        headers = basic(client_id, secret)
    else:
        data["client_id"] = client_id
    body = {k: v for k, v in data.items() if v is not None}
    return client.post("/token", data=body, headers=headers)


def issued(app: Flask) -> list[AuditEvent]:
    with app.extensions["broker"].db.session() as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.type == "issue")).all()
        session.expunge_all()
        return list(events)


# -- the grant -------------------------------------------------------------------------------


def test_an_agent_gets_a_token_bound_to_its_resource_with_itself_as_subject(
    app: Flask, client: FlaskClient
) -> None:
    agent = add_static_client(app)
    response = request_token(client, agent)
    assert response.status_code == 200, response.json
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600
    # No scope asked: every scope the client is allowed for this resource.
    assert body["scope"] == "demo:read demo:write"
    assert "refresh_token" not in body  # RFC 6749 section 4.4.3

    header = jwt.get_unverified_header(body["access_token"])
    assert header["typ"] == "at+jwt"
    key = jwt.PyJWKSet.from_dict(client.get("/jwks.json").json)[header["kid"]]
    claims = jwt.decode(
        body["access_token"], key.key, algorithms=[header["alg"]], audience=RESOURCE, issuer=ISSUER
    )
    assert claims["sub"] == agent and claims["client_id"] == agent  # RFC 9068 section 2.2
    assert claims["aud"] == RESOURCE and claims["scope"] == "demo:read demo:write"
    assert {"iat", "exp", "jti"} <= set(claims)

    [event] = issued(app)
    assert (event.client_id, event.resource, event.user_id) == (agent, RESOURCE, None)
    assert event.details == {"grant_type": "client_credentials", "scope": "demo:read demo:write"}
    with app.extensions["broker"].db.session() as session:
        assert session.scalars(select(RefreshToken)).first() is None
        row = session.get(Client, agent)
        assert row is not None and row.last_used_at is not None


def test_requested_scopes_are_granted_with_the_required_ones(
    app: Flask, client: FlaskClient
) -> None:
    agent = add_static_client(app)
    assert request_token(client, agent, scope="demo:read").json["scope"] == "demo:read"
    # The resource requires demo:read: it comes with any token for it.
    assert request_token(client, agent, scope="demo:write").json["scope"] == "demo:write demo:read"


def test_client_secret_post(app: Flask, client: FlaskClient) -> None:
    agent = add_static_client(app, auth_method="client_secret_post")
    response = request_token(client, agent, post=True)
    assert response.status_code == 200, response.json
    # A client with a secret may present it either way (RFC 6749 section 2.3.1), whichever
    # it registered: Basic works too; a wrong secret does not, either way.
    assert request_token(client, agent).status_code == 200
    public = add_static_client(app, auth_method="none", client_id="public-agent")
    refused = request_token(client, public, post=True)
    assert refused.status_code == 401 and refused.json["error"] == "invalid_client"


def test_a_single_configured_resource_needs_no_resource_parameter(make_app: Any) -> None:
    app = make_app(resources=[{"uri": RESOURCE, "scopes": {"demo:read": "Read"}}])
    agent = add_static_client(app)
    response = request_token(app.test_client(), agent, resource=None)
    assert response.status_code == 200, response.json
    claims = jwt.decode(response.json["access_token"], options={"verify_signature": False})
    assert claims["aud"] == RESOURCE and claims["scope"] == "demo:read"


def test_the_client_introspects_and_revokes_its_token(app: Flask, client: FlaskClient) -> None:
    agent = add_static_client(app)
    token = request_token(client, agent).json["access_token"]
    info = client.post("/introspect", data={"token": token}, headers=basic(agent, SECRET)).json
    assert info["active"] is True and info["sub"] == agent and info["aud"] == RESOURCE
    revoked = client.post("/revoke", data={"token": token}, headers=basic(agent, SECRET))
    assert revoked.status_code == 200
    info = client.post("/introspect", data={"token": token}, headers=basic(agent, SECRET)).json
    assert info == {"active": False}


def test_metadata_advertises_the_grant_it_registers(app: Flask, client: FlaskClient) -> None:
    """RFC 8414 section 2: ``grant_types_supported`` is what the running server registered."""
    meta = client.get("/.well-known/oauth-authorization-server").json
    server = app.extensions["broker"].server
    assert meta["grant_types_supported"] == server.grant_types_supported()
    assert {"authorization_code", "refresh_token", "client_credentials"} <= set(
        meta["grant_types_supported"]
    )
    # A server without the grant would not list it.
    without = [g for g in server.grant_types_supported() if g != "client_credentials"]
    listed = server_metadata(server.settings, without)["grant_types_supported"]
    assert "client_credentials" not in listed


# -- refusals: each changes one thing from the valid request above ---------------------------


def _refused(app: Flask, response: Any, status: int, error: str) -> None:
    assert response.status_code == status, response.json
    assert response.json["error"] == error, response.json
    assert "access_token" not in response.json
    assert issued(app) == []  # nothing written


def test_a_wrong_secret_is_invalid_client(app: Flask, client: FlaskClient) -> None:
    agent = add_static_client(app)
    _refused(app, request_token(client, agent, "not-the-secret"), 401, "invalid_client")


def test_a_public_client_cannot_use_the_grant(app: Flask, client: FlaskClient) -> None:
    """RFC 6749 section 4.4: confidential clients only; a public one cannot authenticate
    (section 4.4.2), which section 5.2 calls invalid_client."""
    agent = add_static_client(app, secret=None, auth_method="none")
    _refused(app, request_token(client, agent, None), 401, "invalid_client")


def test_a_client_without_the_grant_type_is_unauthorized(app: Flask, client: FlaskClient) -> None:
    agent = add_static_client(app, grant_types=["authorization_code", "refresh_token"])
    _refused(app, request_token(client, agent), 400, "unauthorized_client")


def test_a_dynamically_registered_client_is_unauthorized(app: Flask, client: FlaskClient) -> None:
    """DCR never grants client_credentials; even a confidential registration cannot use it."""
    registered = client.post(
        "/register",
        json={
            "redirect_uris": ["https://agent.example.com/cb"],
            "token_endpoint_auth_method": "client_secret_post",
            "grant_types": ["client_credentials", "authorization_code"],
        },
    ).json
    assert "client_credentials" not in registered["grant_types"]
    response = request_token(
        client, registered["client_id"], registered["client_secret"], post=True
    )
    _refused(app, response, 400, "unauthorized_client")


def test_a_dcr_row_with_the_grant_type_is_still_unauthorized(
    app: Flask, client: FlaskClient
) -> None:
    """Defence in depth: only an operator's (static) registration can grant it."""
    agent = add_static_client(app)
    with app.extensions["broker"].db.session() as session:
        row = session.get(Client, agent)
        assert row is not None
        row.kind = "dcr"
    _refused(app, request_token(client, agent), 400, "unauthorized_client")


@pytest.mark.parametrize(
    ("resource", "allowed"),
    [
        (OTHER_RESOURCE, (RESOURCE,)),  # configured, not allowed to this client
        ("https://unknown.example.com/mcp", (RESOURCE,)),  # not configured
        (None, (RESOURCE,)),  # two resources configured: which one?
        (RESOURCE, None),  # the client names no resource at all
    ],
)
def test_a_resource_not_allowed_is_invalid_target(
    app: Flask, client: FlaskClient, resource: str | None, allowed: tuple[str, ...] | None
) -> None:
    agent = add_static_client(app, allowed_resources=allowed)
    _refused(app, request_token(client, agent, resource=resource), 400, "invalid_target")


@pytest.mark.parametrize(
    ("scope", "allowed"),
    [
        ("demo:write", "demo:read"),  # a scope of the resource the client is not allowed
        ("other:read", "demo:read other:read"),  # another resource's scope
        ("admin", "demo:read admin"),  # no resource defines it
        (None, "demo:write"),  # the resource requires demo:read, which the client lacks
        (None, None),  # the client is allowed no scope, and demo:read is required
    ],
)
def test_a_scope_not_allowed_is_invalid_scope(
    app: Flask, client: FlaskClient, scope: str | None, allowed: str | None
) -> None:
    agent = add_static_client(app, scope=allowed)
    _refused(app, request_token(client, agent, scope=scope), 400, "invalid_scope")


def test_a_client_id_like_a_user_subject_is_refused(app: Flask, client: FlaskClient) -> None:
    """RFC 9068 section 5: a client's ``sub`` must not be taken for a user's (``usr_...``)."""
    agent = add_static_client(app, client_id="usr_agent")
    _refused(app, request_token(client, agent), 400, "unauthorized_client")
