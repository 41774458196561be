"""Who may skip the consent page, and who must confirm every time.

- A trusted (first-party) static client skips consent; the user still signs in, and the consent
  is recorded.
- RFC 8252 section 8.6: a public client whose identity cannot be assured (DCR or a metadata
  document, with a loopback or private-use redirect URI) gets a one-click confirmation on every
  request, even after the user approved it; ``prompt=none`` gets ``consent_required``. A static
  public client, and a client sent to an https redirect URI, do not.
- Malformed HTTP Basic client credentials are ``invalid_client`` (401) at every endpoint.
- The metadata-document error page says nothing about why, and the "access denied" page links
  only to a redirect URI the client still has registered.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import logging
import re
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from broker.db import utcnow
from broker.models import AuditEvent, Client, Consent, PendingLogin
from tests.conftest import PASSWORDS
from tests.oauth2.test_client_credentials import SECRET, add_static_client, basic
from tests.support import (
    OTHER_RESOURCE,
    RESOURCE,
    authorize_params,
    form_value,
    pkce,
    query,
    redeem,
    sign_in_local,
)

ISSUER = "http://127.0.0.1:8000"
LOOPBACK = "http://127.0.0.1:5555/callback"
HTTPS_REDIRECT = "https://app.example.com/cb"


# -- steps -----------------------------------------------------------------------------------


def fill_login_form(client: FlaskClient, location: str, username: str = "alice") -> Any:
    """GET the local login form at ``location`` and submit ``username``'s password."""
    form = client.get(location)
    assert form.status_code == 200, form.text
    return client.post(
        location.split("?")[0],
        data={
            "login": form_value(form.text, "login"),
            "csrf": form_value(form.text, "csrf"),
            "username": username,
            "password": PASSWORDS[username],
        },
    )


def code_of(response: Any, params: dict[str, str]) -> str:
    """The code of a redirect back to the client, checking ``state`` and ``iss``."""
    assert response.status_code == 302, response.text
    assert response.headers["Location"].startswith(params["redirect_uri"] + "?")
    result = query(response.headers["Location"])
    assert result["state"] == params["state"] and result["iss"] == ISSUER, result
    assert "code" in result, result
    return result["code"]


def first_sign_in(client: FlaskClient, client_id: str, **extra: str) -> str:
    """Consent and sign in once (the browser then has a broker session that approved)."""
    _, challenge = pkce()
    params = authorize_params(client_id, challenge, **extra)
    return code_of(sign_in_local(client, params), params)


def register(client: FlaskClient, *redirect_uris: str) -> str:
    response = client.post("/register", json={"redirect_uris": list(redirect_uris)})
    assert response.status_code == 201, response.json
    return str(response.json["client_id"])


def confirm(client: FlaskClient, page: Any, *, csrf: str | None = None) -> Any:
    """Click "Continue" on the confirmation page."""
    return client.post(
        "/consent",
        data={
            "login": form_value(page.text, "login"),
            "csrf": csrf if csrf is not None else form_value(page.text, "csrf"),
            "action": "approve",
            "provider": "session",
        },
    )


def open_page(client: FlaskClient, params: dict[str, str]) -> Any:
    """/authorize, expecting the consent (or confirmation) page; returns that page."""
    response = client.get("/authorize", query_string=params)
    assert response.status_code == 302, response.text
    assert response.headers["Location"].startswith("/consent?login="), response.headers
    page = client.get(response.headers["Location"])
    assert page.status_code == 200, page.text
    return page


def consents(app: Flask, client_id: str) -> list[Consent]:
    with app.extensions["broker"].db.session() as session:
        rows = session.scalars(select(Consent).where(Consent.client_id == client_id)).all()
        session.expunge_all()
        return list(rows)


def set_client(app: Flask, client_id: str, **values: Any) -> None:
    with app.extensions["broker"].db.session() as session:
        row = session.get(Client, client_id)
        assert row is not None
        for key, value in values.items():
            setattr(row, key, value)


def static_client(app: Flask, *, trusted: bool = False, **extra: Any) -> str:
    """An operator's public client for the code flow (as ``broker clients add`` writes it)."""
    values: dict[str, Any] = {
        "secret": None,
        "auth_method": "none",
        "grant_types": ["authorization_code", "refresh_token"],
        # A trusted public client is https-only (``broker clients add`` refuses the rest).
        "redirect_uris": [HTTPS_REDIRECT] if trusted else ["http://127.0.0.1/callback"],
        "allowed_resources": None,
        "scope": None,
        "trusted": trusted,
        "name": "Company assistant",
    }
    values.update(extra)
    return add_static_client(app, **values)


# -- 1. trusted (first-party) static clients skip consent -----------------------------------


def test_a_trusted_client_goes_straight_to_the_only_sign_in_and_records_consent(
    app: Flask, client: FlaskClient
) -> None:
    trusted = static_client(app, trusted=True)
    verifier, challenge = pkce()
    params = authorize_params(trusted, challenge, redirect_uri=HTTPS_REDIRECT)
    response = client.get("/authorize", query_string=params)
    # No consent page: the only allowed provider's sign-in (the local form), approved already.
    assert response.status_code == 302
    location = response.headers["Location"]
    assert location.startswith("/login/local?login="), location
    with app.extensions["broker"].db.session() as session:
        pending = session.get(PendingLogin, query(location)["login"])
        assert pending is not None and pending.approved_at is not None
        assert pending.provider == "local" and pending.upstream_state_hash is not None
    code = code_of(fill_login_form(client, location), params)
    assert redeem(client, trusted, code, verifier, redirect_uri=HTTPS_REDIRECT).status_code == 200
    [consent] = consents(app, trusted)  # recorded, for the account page
    assert consent.resource == RESOURCE and "demo:read" in consent.scopes


def test_a_trusted_client_with_a_broker_session_gets_a_code_at_once(
    app: Flask, client: FlaskClient
) -> None:
    first_sign_in(client, register(client, "http://127.0.0.1/callback"))  # a broker session
    trusted = static_client(app, trusted=True)
    for extra in ({}, {"prompt": "consent"}, {"prompt": "none"}):
        verifier, challenge = pkce()
        params = authorize_params(trusted, challenge, redirect_uri=HTTPS_REDIRECT, **extra)
        code = code_of(client.get("/authorize", query_string=params), params)
        assert (
            redeem(client, trusted, code, verifier, redirect_uri=HTTPS_REDIRECT).status_code == 200
        )
    assert len(consents(app, trusted)) == 1


def test_a_trusted_client_still_signs_in_again_on_prompt_login(
    app: Flask, client: FlaskClient
) -> None:
    first_sign_in(client, register(client, "http://127.0.0.1/callback"))
    trusted = static_client(app, trusted=True)
    _, challenge = pkce()
    params = authorize_params(trusted, challenge, redirect_uri=HTTPS_REDIRECT, prompt="login")
    response = client.get("/authorize", query_string=params)
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/login/local?login=")
    code_of(fill_login_form(client, response.headers["Location"]), params)


def test_a_trusted_client_without_a_session_and_prompt_none_is_login_required(
    app: Flask, client: FlaskClient
) -> None:
    trusted = static_client(app, trusted=True)
    _, challenge = pkce()
    params = authorize_params(trusted, challenge, redirect_uri=HTTPS_REDIRECT, prompt="none")
    response = client.get("/authorize", query_string=params)
    assert response.status_code == 302
    result = query(response.headers["Location"])
    assert result["error"] == "login_required" and result["iss"] == ISSUER
    assert result["state"] == params["state"]


def test_a_trusted_client_with_several_providers_shows_only_the_chooser(
    make_app: Any, users_file: Path
) -> None:
    app = make_app(
        providers={
            "local": {"users_file": str(users_file)},
            "staff": {"type": "local", "users_file": str(users_file), "display_name": "Staff"},
        }
    )
    client = app.test_client()
    trusted = static_client(app, trusted=True)
    _, challenge = pkce()
    params = authorize_params(trusted, challenge, redirect_uri=HTTPS_REDIRECT)
    page = open_page(client, params)
    assert "Sign in to continue to" in page.text and "Company assistant" in page.text
    assert 'id="scopes"' not in page.text and "wants to access" not in page.text
    assert 'id="approve-local"' in page.text and 'id="approve-staff"' in page.text
    login_id = form_value(page.text, "login")
    with app.extensions["broker"].db.session() as session:
        pending = session.get(PendingLogin, login_id)
        assert pending is not None and pending.upstream_state_hash is None  # not yet
    response = client.post(
        "/consent",
        data={
            "login": login_id,
            "csrf": form_value(page.text, "csrf"),
            "action": "approve",
            "provider": "staff",
        },
    )
    assert response.headers["Location"].startswith("/login/staff?login=")
    code_of(fill_login_form(client, response.headers["Location"]), params)


@pytest.mark.parametrize(
    ("auth_method", "skips_consent"),
    [("none", False), ("client_secret_basic", True)],
)
def test_a_public_client_is_not_trusted_at_a_loopback_redirect(
    app: Flask, client: FlaskClient, auth_method: str, skips_consent: bool
) -> None:
    """RFC 8252 section 8.6: any local program can use a public client's id with a loopback
    redirect, so its trust (which ``broker clients add`` refuses anyway) does not count there;
    a confidential client's does."""
    trusted = static_client(
        app,
        trusted=True,
        auth_method=auth_method,
        secret=SECRET if auth_method != "none" else None,
        redirect_uris=["http://127.0.0.1/callback"],
    )
    _, challenge = pkce()
    response = client.get("/authorize", query_string=authorize_params(trusted, challenge))
    assert response.status_code == 302
    target = "/login/local?login=" if skips_consent else "/consent?login="
    assert response.headers["Location"].startswith(target), response.headers["Location"]
    if not skips_consent:
        page = client.get(response.headers["Location"])
        assert "wants to access" in page.text and 'id="scopes"' in page.text


def test_the_trusted_flag_counts_only_on_a_static_client(app: Flask, client: FlaskClient) -> None:
    registered = register(client, "https://app.example.com/cb")
    set_client(app, registered, trusted=True)
    _, challenge = pkce()
    page = open_page(client, authorize_params(registered, challenge, redirect_uri=HTTPS_REDIRECT))
    assert "wants to access" in page.text and 'id="scopes"' in page.text


def test_a_static_client_gets_codes_only_for_its_allowed_resources(
    app: Flask, client: FlaskClient
) -> None:
    """RFC 8707 section 2: ``invalid_target`` (an error redirect with ``iss``) for a resource
    outside the client's ``allowed_resources``; nothing is asked of the user."""
    static = static_client(app, allowed_resources=[RESOURCE])
    _, challenge = pkce()
    assert open_page(client, authorize_params(static, challenge)).status_code == 200
    params = authorize_params(static, challenge, resource=OTHER_RESOURCE, scope="other:read")
    response = client.get("/authorize", query_string=params)
    assert response.status_code == 302
    assert response.headers["Location"].startswith(LOOPBACK + "?")
    result = query(response.headers["Location"])
    assert result["error"] == "invalid_target" and result["iss"] == ISSUER
    assert result["state"] == params["state"]


# -- 2. RFC 8252 section 8.6: confirmation for clients whose identity cannot be assured -------


def test_a_loopback_dcr_client_is_confirmed_every_time_even_after_approval(
    app: Flask, client: FlaskClient, registered: dict[str, Any]
) -> None:
    client_id = registered["client_id"]
    first_sign_in(client, client_id)
    for _ in range(2):
        verifier, challenge = pkce()
        params = authorize_params(client_id, challenge)
        page = open_page(client, params)
        assert 'id="confirm"' in page.text, page.text  # the confirmation, not the consent page
        assert 'id="scopes"' not in page.text
        for shown in ("Test client", "127.0.0.1:5555", "Demo tools", RESOURCE, "alice@example"):
            assert shown in page.text, shown
        code = code_of(confirm(client, page), params)
        assert redeem(client, client_id, code, verifier).status_code == 200


def test_the_confirmation_is_csrf_protected_and_can_be_cancelled(
    app: Flask, client: FlaskClient, registered: dict[str, Any]
) -> None:
    client_id = registered["client_id"]
    first_sign_in(client, client_id)
    _, challenge = pkce()
    params = authorize_params(client_id, challenge)
    page = open_page(client, params)
    forged = confirm(client, page, csrf="0" * 64)
    assert forged.status_code == 400 and "Location" not in forged.headers
    cancelled = client.post(
        "/consent",
        data={
            "login": form_value(page.text, "login"),
            "csrf": form_value(page.text, "csrf"),
            "action": "deny",
        },
    )
    result = query(cancelled.headers["Location"])
    assert result["error"] == "access_denied" and result["state"] == params["state"]
    assert cancelled.headers["Location"].startswith(LOOPBACK + "?")


def test_a_private_use_scheme_client_is_confirmed(app: Flask, client: FlaskClient) -> None:
    redirect = "com.example.app:/oauth/callback"
    client_id = register(client, redirect)
    first_sign_in(client, client_id, redirect_uri=redirect)
    _, challenge = pkce()
    params = authorize_params(client_id, challenge, redirect_uri=redirect)
    page = open_page(client, params)
    assert 'id="confirm"' in page.text
    code_of(confirm(client, page), params)


def test_a_metadata_document_client_with_a_loopback_redirect_is_confirmed(
    app: Flask, client: FlaskClient
) -> None:
    """A CIMD client (its cached row still fresh, so no fetch) is confirmed like a DCR one."""
    url = "https://tools.example.com/client.json"
    with app.extensions["broker"].db.session() as session:
        session.add(
            Client(
                client_id=url,
                kind="cimd",
                name="Document client",
                redirect_uris=["http://127.0.0.1/callback"],
                grant_types=["authorization_code", "refresh_token"],
                response_types=["code"],
                token_endpoint_auth_method="none",
                client_metadata={},
                expires_at=utcnow() + dt.timedelta(hours=1),
            )
        )
    first_sign_in(client, url)
    _, challenge = pkce()
    params = authorize_params(url, challenge)
    page = open_page(client, params)
    assert 'id="confirm"' in page.text and "tools.example.com" in page.text
    code_of(confirm(client, page), params)


def test_prompt_none_for_a_client_that_needs_confirmation_is_consent_required(
    app: Flask, client: FlaskClient, registered: dict[str, Any]
) -> None:
    client_id = registered["client_id"]
    first_sign_in(client, client_id)
    _, challenge = pkce()
    params = authorize_params(client_id, challenge, prompt="none")
    response = client.get("/authorize", query_string=params)
    assert response.status_code == 302
    assert response.headers["Location"].startswith(LOOPBACK + "?")
    result = query(response.headers["Location"])
    assert result == {"error": "consent_required", "state": params["state"], "iss": ISSUER}


def test_a_static_public_client_is_not_confirmed(app: Flask, client: FlaskClient) -> None:
    """The operator's registration assures the client: approved once, it goes straight through."""
    static = static_client(app)
    first_sign_in(client, static)
    _, challenge = pkce()
    params = authorize_params(static, challenge)
    code_of(client.get("/authorize", query_string=params), params)


def test_an_https_redirect_client_is_not_confirmed(
    app: Flask, client: FlaskClient, registered: dict[str, Any]
) -> None:
    client_id = registered["client_id"]
    first_sign_in(client, client_id, redirect_uri=HTTPS_REDIRECT)
    _, challenge = pkce()
    params = authorize_params(client_id, challenge, redirect_uri=HTTPS_REDIRECT)
    code_of(client.get("/authorize", query_string=params), params)


def test_a_confidential_dcr_client_is_not_confirmed(app: Flask, client: FlaskClient) -> None:
    """A client secret assures the client: a local program with its id cannot redeem a code."""
    registration = client.post(
        "/register",
        json={
            "redirect_uris": ["http://127.0.0.1/callback"],
            "token_endpoint_auth_method": "client_secret_post",
        },
    ).json
    client_id = registration["client_id"]
    first_sign_in(client, client_id)
    _, challenge = pkce()
    params = authorize_params(client_id, challenge)
    code_of(client.get("/authorize", query_string=params), params)


# -- 3. malformed HTTP Basic client credentials ----------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


MALFORMED_BASIC = {
    "not UTF-8": "Basic /w==",
    "not base64": "Basic !!!not-base64!!!",
    "no colon": "Basic " + _b64(b"agent-without-secret"),
    "not UTF-8, with a colon": "Basic " + _b64(b"\xffagent:\xfesecret"),
    "bad percent-encoding": "Basic " + _b64(b"%ff%fe:secret"),
    "empty client id": "Basic " + _b64(b":secret"),
    "empty secret": "Basic " + _b64(b"agent:"),
    "no credentials": "Basic",
}
ENDPOINTS = {
    "/token": {"grant_type": "client_credentials", "resource": RESOURCE},
    "/revoke": {"token": "some-token"},
    "/introspect": {"token": "some-token"},
}


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_valid_basic_credentials_are_accepted(
    app: Flask, client: FlaskClient, endpoint: str
) -> None:
    agent = add_static_client(app)
    response = client.post(endpoint, data=ENDPOINTS[endpoint], headers=basic(agent, SECRET))
    assert response.status_code == 200, response.json


@pytest.mark.parametrize("header", list(MALFORMED_BASIC.values()), ids=list(MALFORMED_BASIC))
@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_malformed_basic_credentials_are_invalid_client(
    app: Flask, client: FlaskClient, endpoint: str, header: str
) -> None:
    add_static_client(app)
    response = client.post(endpoint, data=ENDPOINTS[endpoint], headers={"Authorization": header})
    assert response.status_code == 401, response.text
    assert response.mimetype == "application/json"
    assert response.json["error"] == "invalid_client"
    assert response.headers["WWW-Authenticate"].startswith("Basic ")


def test_malformed_basic_beside_a_public_client_id_is_still_invalid_client(
    client: FlaskClient, registered: dict[str, Any]
) -> None:
    """One authentication method per request (RFC 6749 section 2.3): a broken header is not
    ignored because the form also names a public client."""
    data = {"token": "some-token", "client_id": registered["client_id"]}
    assert client.post("/revoke", data=data).status_code == 200
    response = client.post("/revoke", data=data, headers={"Authorization": "Basic /w=="})
    assert response.status_code == 401 and response.json["error"] == "invalid_client"


# -- 4. the metadata-document error page ----------------------------------------------------


def test_the_metadata_document_error_page_says_nothing_about_why(
    client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A page must not let anyone probe internal names and ports: the reason goes to the log."""
    url = "https://localhost:8443/internal/client.json"
    _, challenge = pkce()
    with caplog.at_level(logging.INFO, logger="broker"):
        response = client.get("/authorize", query_string=authorize_params(url, challenge))
    assert response.status_code == 400 and "Location" not in response.headers
    text = html.unescape(response.text)
    assert "The application could not be verified." in text
    for secret in ("forbidden_address", "localhost", "8443", "127.0.0.1", "internal", "resolv"):
        assert secret not in text, secret
    assert any(
        url in r.getMessage() and "forbidden_address" in r.getMessage() for r in caplog.records
    ), [r.getMessage() for r in caplog.records]


# -- 5. the "access denied" page links only to a validated redirect URI ----------------------

DENY_CONTRACTORS = {
    "rules": [{"deny": "Contractors have no access.", "when": {"groups": ["contractors"]}}]
}


def _return_link(page: str) -> str | None:
    match = re.search(r'id="return" href="([^"]*)"', page)
    return html.unescape(match.group(1)) if match else None


def test_the_denied_page_links_to_the_validated_redirect_uri(make_app: Any) -> None:
    app = make_app(**DENY_CONTRACTORS)
    client = app.test_client()
    client_id = register(client, "http://127.0.0.1/callback")
    _, challenge = pkce()
    params = authorize_params(client_id, challenge)
    page = sign_in_local(client, params, username="carol")
    assert page.status_code == 403 and "Contractors have no access." in page.text
    link = _return_link(page.text)
    assert link is not None and link.startswith(LOOPBACK + "?"), link
    assert query(link) == {
        "error": "access_denied",
        "error_description": "Access denied by policy.",
        "state": params["state"],
        "iss": ISSUER,
    }


def test_no_link_when_the_redirect_uri_is_no_longer_registered(make_app: Any) -> None:
    """The registration changed between /authorize and the refusal (a new metadata document,
    an operator's edit): the page offers no way back to the old redirect URI."""
    app = make_app(**DENY_CONTRACTORS)
    client = app.test_client()
    client_id = register(client, "http://127.0.0.1/callback")
    _, challenge = pkce()
    params = authorize_params(client_id, challenge)
    response = sign_in_local(client, params, username="carol", password="wrong")
    assert response.status_code == 400  # at the login form, the request still pending
    set_client(app, client_id, redirect_uris=["https://elsewhere.example.com/cb"])
    login_id = form_value(response.text, "login")
    page = client.post(
        "/login/local",
        data={
            "login": login_id,
            "csrf": form_value(response.text, "csrf"),
            "username": "carol",
            "password": PASSWORDS["carol"],
        },
    )
    assert page.status_code == 403 and "Contractors have no access." in page.text
    assert _return_link(page.text) is None and 'id="no-return"' in page.text
    assert "127.0.0.1:5555" not in page.text


def test_deny_after_the_redirect_uri_was_removed_is_a_page_not_a_redirect(
    app: Flask, client: FlaskClient
) -> None:
    client_id = register(client, "http://127.0.0.1/callback")
    _, challenge = pkce()
    page = open_page(client, authorize_params(client_id, challenge))
    set_client(app, client_id, redirect_uris=["https://elsewhere.example.com/cb"])
    response = client.post(
        "/consent",
        data={
            "login": form_value(page.text, "login"),
            "csrf": form_value(page.text, "csrf"),
            "action": "deny",
        },
    )
    assert response.status_code == 400 and "Location" not in response.headers
    with app.extensions["broker"].db.session() as session:
        denied = session.scalars(select(AuditEvent).where(AuditEvent.outcome == "denied")).all()
        assert denied == []  # rolled back: nothing half-written
