"""Every bad input gets a standard error (JSON or a page), never a 500 and never a redirect to an
unvalidated URI."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient

from tests.support import authorize_params, pkce

AUTHORIZE_CASES: list[dict[str, str]] = [
    {},
    {"client_id": "x" * 5000},
    {"client_id": "\x00\xff"},
    {"response_type": "token"},
    {"client_id": "https://evil.example.com/client.json"},
    {"redirect_uri": "javascript:alert(1)"},
    {"redirect_uri": "http://127.0.0.1:99999/callback"},
]


@pytest.mark.parametrize("params", AUTHORIZE_CASES)
def test_authorize_garbage(client: FlaskClient, params: dict[str, str]) -> None:
    response = client.get("/authorize", query_string=params)
    assert response.status_code == 400, response.text
    assert "Location" not in response.headers


def test_authorize_errors_after_redirect_validation_redirect_with_iss(
    client: FlaskClient, registered: dict[str, Any]
) -> None:
    _, challenge = pkce()
    cases = [
        {"response_type": "token"},
        {"code_challenge_method": "S512"},
        {"code_challenge": "short"},
        {"resource": "not a uri"},
        {"prompt": "none"},
    ]
    for extra in cases:
        params = authorize_params(registered["client_id"], challenge, **extra)
        response = client.get("/authorize", query_string=params)
        assert response.status_code == 302, (extra, response.text)
        location = response.headers["Location"]
        assert location.startswith("http://127.0.0.1:5555/callback?"), extra
        assert "error=" in location and "iss=" in location, extra


def test_duplicate_parameters(client: FlaskClient, registered: dict[str, Any]) -> None:
    _, challenge = pkce()
    params = list(authorize_params(registered["client_id"], challenge).items())
    response = client.get("/authorize", query_string=[*params, ("state", "again")])
    assert response.status_code in (302, 400)
    if response.status_code == 302:
        assert "error=invalid_request" in response.headers["Location"]
    two_resources = [*params, ("resource", "http://127.0.0.1:8002/mcp")]
    response = client.get("/authorize", query_string=two_resources)
    assert response.status_code == 302 and "error=invalid_target" in response.headers["Location"]


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"grant_type": "authorization_code"},
        {"grant_type": "authorization_code", "client_id": "x", "code": "\x00" * 10},
        {"grant_type": "refresh_token", "client_id": "x"},
        {"grant_type": "urn:ietf:params:oauth:grant-type:device_code", "client_id": "x"},
        {"grant_type": "client_credentials", "client_id": "x", "client_secret": "y"},
    ],
)
def test_token_garbage(client: FlaskClient, data: dict[str, str]) -> None:
    response = client.post("/token", data=data)
    assert 400 <= response.status_code < 500
    assert response.is_json and "error" in response.json
    assert response.headers["Cache-Control"] == "no-store"


def test_token_with_json_body_and_huge_body(client: FlaskClient) -> None:
    response = client.post("/token", json={"grant_type": "authorization_code"})
    assert response.status_code == 400 and response.json["error"] in (
        "invalid_request",
        "unsupported_grant_type",
    )
    huge = client.post("/token", data={"grant_type": "x" * 200_000})
    assert huge.status_code == 413 and huge.json["error"] == "invalid_request"


@pytest.mark.parametrize("path", ["/consent", "/login/local"])
def test_pages_without_a_sign_in_in_progress(client: FlaskClient, path: str) -> None:
    for query in ({}, {"login": "nope"}, {"login": "x" * 500}, {"state": "s"}):
        response = client.get(path, query_string=query)
        assert response.status_code == 400, (path, query)
        assert "Location" not in response.headers
        assert response.mimetype == "text/html"
    posted = client.post(path, data={"login": "nope", "csrf": "x"})
    assert posted.status_code in (400, 405)


def test_unknown_provider_pages(client: FlaskClient) -> None:
    assert client.get("/login/nope").status_code == 404
    assert client.get("/callback/nope").status_code == 404
    # A password-login provider has no upstream, so no callback (no placeholder either).
    assert client.get("/callback/local", query_string={"state": "s"}).status_code == 404


def test_control_characters_never_reach_the_database(client: FlaskClient) -> None:
    response = client.post(
        "/register",
        json={"redirect_uris": ["http://127.0.0.1/cb"], "client_name": "evil\u0000name"},
    )
    assert response.status_code == 400 and response.json["error"] == "invalid_client_metadata"
    response = client.post("/register", json={"redirect_uris": ["http://127.0.0.1/c\u0000b"]})
    assert response.status_code == 400
    for path in ("/consent", "/login/local"):
        assert client.get(path, query_string={"login": "a\u0000b"}).status_code == 400
    token = client.post(
        "/token",
        data={"grant_type": "refresh_token", "client_id": "a\u0000", "refresh_token": "b\u0000"},
    )
    assert token.status_code in (400, 401) and token.json["error"] == "invalid_client"


def test_oversized_state_and_scope_and_combined_prompt(
    client: FlaskClient, registered: dict[str, Any]
) -> None:
    _, challenge = pkce()
    for extra in ({"state": "s" * 3000}, {"scope": "a " * 1500}, {"prompt": "none consent"}):
        params = authorize_params(registered["client_id"], challenge, **extra)
        response = client.get("/authorize", query_string=params)
        assert response.status_code == 302, extra
        assert "error=invalid_request" in response.headers["Location"], extra


@pytest.mark.parametrize("value", ["tokén", "code id_token\\", "x\x01", "token"])
def test_an_unsupported_response_type_never_echoes_the_value(
    client: FlaskClient, registered: dict[str, Any], value: str
) -> None:
    """Issue 11: Authlib put the response_type into error_description, and a value outside
    printable ASCII was a 500. RFC 6749 section 4.1.2.1: the error goes back by redirect (the
    redirect URI is registered) with a fixed description and iss."""
    from tests.support import authorize_params, pkce, query

    _, challenge = pkce()
    params = authorize_params(registered["client_id"], challenge, response_type=value)
    response = client.get("/authorize", query_string=params)
    assert response.status_code == 302, response.text
    answer = query(response.headers["Location"])
    assert answer["error"] == "unsupported_response_type"
    assert answer["error_description"] == "Only response_type=code is supported."
    assert answer["state"] == params["state"] and "iss" in answer
    # An unregistered redirect URI: a page, never a redirect.
    params["redirect_uri"] = "https://evil.example/cb"
    page = client.get("/authorize", query_string=params)
    assert page.status_code == 400 and "Location" not in page.headers
