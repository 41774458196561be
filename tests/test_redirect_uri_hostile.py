"""Redirect URIs that parsers read differently (RFC 9700 section 4.1.3, RFC 3986 section 3.2.1):
user info and backslashes never match a registered URI, the loopback any-port rule included, and
registration refuses them."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from broker.models import Client, PendingLogin
from broker.oauth2.clients import OAuthClient, redirect_uri_matches, redirect_uri_problem
from tests.support import authorize_params, pkce

REGISTERED = ["http://127.0.0.1/callback", "http://localhost/cb", "https://app.example.com/cb"]

MATCHES = [
    ("https://app.example.com/cb", "https://app.example.com/cb"),
    ("http://127.0.0.1/callback", "http://127.0.0.1:5555/callback"),
    ("http://127.0.0.1/callback", "http://127.0.0.1/callback"),
    ("http://localhost/cb", "http://localhost:61234/cb"),
    ("http://[::1]/cb", "http://[::1]:8080/cb"),
    ("http://127.0.0.1", "http://127.0.0.1:4000/"),  # the MCP SDK's added "/"
    ("com.example.app:/cb", "com.example.app:/cb"),
    ("https://app.example.com/cb?x=a@b", "https://app.example.com/cb?x=a@b"),  # @ in the query
]

HOSTILE = [
    # (registered, requested): user info, in every place a parser may find it
    ("https://app.example.com/cb", "https://user@app.example.com/cb"),
    ("https://app.example.com/cb", "https://app.example.com@evil.example/cb"),
    ("https://app.example.com/cb", "https://user:pw@app.example.com/cb"),
    ("http://127.0.0.1/callback", "http://evil@127.0.0.1:5555/callback"),
    ("http://127.0.0.1/callback", "http://127.0.0.1:5555@evil.example/callback"),
    ("http://localhost/cb", "http://localhost@evil.example:80/cb"),
    ("http://localhost/cb", "http:evil@localhost:5555/cb"),
    ("http://localhost/cb", "http:/evil@localhost:5555/cb"),
    # a backslash: WHATWG parsers (browsers) read it as "/", RFC 3986 parsers as user info
    ("https://app.example.com/cb", "https://evil.example\\@app.example.com/cb"),
    ("http://127.0.0.1/callback", "http://evil.example\\@127.0.0.1:5555/callback"),
    ("http://127.0.0.1/callback", "http://127.0.0.1:5555\\@evil.example/callback"),
    ("http://127.0.0.1/callback", "http://127.0.0.1:5555\\callback"),
    # characters browsers drop or change before parsing
    ("http://127.0.0.1/callback", "http://127.0.0.1:5555/call\tback"),
    ("http://127.0.0.1/callback", "http://127.0.0.1:5555/callback\n"),
    ("http://127.0.0.1/callback", " http://127.0.0.1:5555/callback"),
    ("https://app.example.com/cb", "https://app.example.com/c%0ab"),  # stays exact: no match
    # a registered URI carrying user info (stored before registration refused it) matches
    # nothing, not even itself
    ("https://user@app.example.com/cb", "https://user@app.example.com/cb"),
    ("com.example.app://user@host/cb", "com.example.app://user@host/cb"),
    ("https://evil.example\\@app.example.com/cb", "https://evil.example\\@app.example.com/cb"),
]


@pytest.mark.parametrize(("registered", "requested"), MATCHES)
def test_valid_redirect_uris_match(registered: str, requested: str) -> None:
    assert redirect_uri_matches(registered, requested)


@pytest.mark.parametrize(("registered", "requested"), HOSTILE)
def test_hostile_redirect_uris_never_match(registered: str, requested: str) -> None:
    assert not redirect_uri_matches(registered, requested)


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("https://user@host/cb", "user info"),
        ("https://app.example.com@evil.example/cb", "user info"),
        ("http:evil@127.0.0.1/cb", "user info"),
        ("com.example.app://user@host/cb", "user info"),
        ("https://evil.example\\@app.example.com/cb", "a backslash"),
        ("https://app.example.com/c b", "a character outside printable ASCII"),
        ("https://app.example.com/caf\u00e9", "a character outside printable ASCII"),
        ("https://app.example.com/cb?login=a@b", None),
        ("com.example.app:/cb@2x", None),  # no authority: "@" is in the path
        ("http://127.0.0.1:5555/callback", None),
    ],
)
def test_what_makes_a_uri_ambiguous(uri: str, problem: str | None) -> None:
    assert redirect_uri_problem(uri) == problem


# -- over HTTP ------------------------------------------------------------------------------


def _count(app: Flask, model: Any) -> int:
    with app.extensions["broker"].db.read() as session:
        return int(session.execute(select(func.count()).select_from(model)).scalar_one())


@pytest.fixture
def registered_client(client: FlaskClient) -> str:
    response = client.post("/register", json={"redirect_uris": REGISTERED})
    assert response.status_code == 201, response.json
    return str(response.json["client_id"])


def _authorize_cases() -> list[Any]:
    uris = sorted({requested for registered, requested in HOSTILE if registered in REGISTERED})
    # Those with a backslash or a control character were a 500 (issue 11): Authlib echoed the
    # URI into error_description; the description is a fixed string now.
    return list(uris)


@pytest.mark.parametrize("redirect_uri", _authorize_cases())
def test_authorize_with_a_hostile_redirect_uri_is_a_page_never_a_redirect(
    app: Flask, client: FlaskClient, registered_client: str, redirect_uri: str
) -> None:
    _, challenge = pkce()
    before = _count(app, PendingLogin)
    response = client.get(
        "/authorize",
        query_string=authorize_params(registered_client, challenge, redirect_uri=redirect_uri),
    )
    assert response.status_code == 400
    assert "Location" not in response.headers
    assert response.mimetype == "text/html"
    assert _count(app, PendingLogin) == before


def test_authorize_with_the_registered_uris_still_works(
    client: FlaskClient, registered_client: str
) -> None:
    _, challenge = pkce()
    for redirect_uri in ("http://127.0.0.1:5555/callback", "https://app.example.com/cb"):
        response = client.get(
            "/authorize",
            query_string=authorize_params(registered_client, challenge, redirect_uri=redirect_uri),
        )
        assert response.status_code == 302, (redirect_uri, response.text)
        assert response.headers["Location"].startswith("/consent")


@pytest.mark.parametrize(
    "redirect_uri",
    sorted({requested for _, requested in HOSTILE if redirect_uri_problem(requested)}),
)
def test_registration_refuses_them(app: Flask, client: FlaskClient, redirect_uri: str) -> None:
    before = _count(app, Client)
    response = client.post("/register", json={"redirect_uris": [redirect_uri]})
    assert response.status_code == 400 and response.json["error"] == "invalid_redirect_uri"
    assert _count(app, Client) == before


def test_a_stored_uri_with_user_info_is_never_used(app: Flask, client: FlaskClient) -> None:
    """A row registered before these rules (or written by hand) with user info in its only
    redirect URI: not matched even when asked exactly, and not used as the default when the
    request names none (OAuth 2.1 section 2.3.1)."""
    uri = "https://app.example.com@evil.example/cb"
    with app.extensions["broker"].db.session() as session:
        row = Client(
            client_id="mcp_legacy",
            kind="dcr",
            name="Legacy",
            redirect_uris=[uri],
            grant_types=["authorization_code", "refresh_token"],
            response_types=["code"],
            token_endpoint_auth_method="none",
        )
        session.add(row)
        session.flush()
        wrapped = OAuthClient(row)
        assert not wrapped.check_redirect_uri(uri)
        assert wrapped.get_default_redirect_uri() is None
    _, challenge = pkce()
    for params in (
        authorize_params("mcp_legacy", challenge, redirect_uri=uri),
        {k: v for k, v in authorize_params("mcp_legacy", challenge).items() if k != "redirect_uri"},
    ):
        response = client.get("/authorize", query_string=params)
        assert response.status_code == 400 and "Location" not in response.headers
