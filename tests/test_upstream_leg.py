"""The upstream leg through a real OpenID provider: single-use state bound to the browser,
upstream errors turned into standard errors at the client's validated redirect URI."""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urljoin

import httpx
import pytest
from flask import Flask
from sqlalchemy import func, select

from broker.models import AuditEvent, AuthorizationCode, Grant, PendingLogin
from tests.support import (
    approve,
    authorize_params,
    form_value,
    free_port,
    open_consent,
    pkce,
    query,
    serve_wsgi,
)

SECRET = "broker-secret-0123456789"
REDIRECT = "http://127.0.0.1:5555/callback"


class Upstream:
    def __init__(self, app: Flask, base: str, idp: Any) -> None:
        self.app, self.base, self.idp = app, base, idp

    def count(self, model: Any) -> int:
        with self.app.extensions["broker"].db.session() as session:
            return int(session.execute(select(func.count()).select_from(model)).scalar_one())


@pytest.fixture
def upstream(make_app: Callable[..., Flask]) -> Iterator[Callable[..., Upstream]]:
    from tests.idp_server import idp_or_skip

    stack: list[Any] = []

    def start(**provider: Any) -> Upstream:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        clients = [
            {
                "client_id": "broker",
                "client_secret": SECRET,
                "redirect_uris": [f"{base}/callback/corp"],
            }
        ]
        idp_ctx = idp_or_skip(clients)
        idp = idp_ctx.__enter__()
        stack.append(idp_ctx)
        conf = {
            "type": "oidc",
            "issuer": idp.issuer,
            "client_id": "broker",
            "client_secret": SECRET,
            **provider,
        }
        app = make_app(issuer=base, providers={"corp": conf})
        server = serve_wsgi(app, port)
        server.__enter__()
        stack.append(server)
        return Upstream(app, base, idp)

    yield start
    for ctx in reversed(stack):
        ctx.__exit__(None, None, None)


def _start_login(http: httpx.Client, up: Upstream) -> tuple[dict[str, str], httpx.Response]:
    """Register, authorize, approve consent; returns the params and the redirect upstream."""
    client = http.post(
        f"{up.base}/register",
        json={"redirect_uris": ["http://127.0.0.1/callback"], "token_endpoint_auth_method": "none"},
    ).json()
    _, challenge = pkce()
    params = authorize_params(client["client_id"], challenge)
    response = http.get(f"{up.base}/authorize", params=params)
    consent = http.get(urljoin(up.base, response.headers["location"]))
    approved = http.post(
        f"{up.base}/consent",
        data={
            "login": form_value(consent.text, "login"),
            "csrf": form_value(consent.text, "csrf"),
            "action": "approve",
            "provider": "corp",
        },
    )
    assert approved.status_code == 302
    assert approved.headers["location"].startswith(up.idp.issuer)
    return params, approved


def _follow_until_callback(http: httpx.Client, up: Upstream, url: str) -> str:
    for _ in range(20):
        if url.startswith(f"{up.base}/callback/"):
            return url
        response = http.get(url)
        assert response.is_redirect, (url, response.status_code, response.text[:300])
        url = urljoin(url, response.headers["location"])
    raise AssertionError("no callback")


def test_reused_upstream_state_is_refused(upstream: Callable[..., Upstream]) -> None:
    up = upstream()
    with httpx.Client(follow_redirects=False) as http:
        _, approved = _start_login(http, up)
        callback = _follow_until_callback(http, up, approved.headers["location"])
        first = http.get(callback)
        assert first.status_code == 302 and first.headers["location"].startswith(REDIRECT)
        assert "code" in query(first.headers["location"])
        codes = up.count(AuthorizationCode)
        again = http.get(callback)
        assert again.status_code == 400
        assert "location" not in again.headers
        assert "already used" in again.text
        assert up.count(AuthorizationCode) == codes  # nothing new was issued


def test_a_sign_in_whose_upstream_secrets_do_not_open_is_a_page(
    upstream: Callable[..., Upstream], caplog: pytest.LogCaptureFixture
) -> None:
    """Its nonce and PKCE verifier sealed under a root secret this host does not have (or the
    row tampered with): the sign-in cannot finish, and says so; never a 500."""
    from sqlalchemy import update

    from broker.crypto import Sealer

    up = upstream()
    with httpx.Client(follow_redirects=False) as http:
        _, approved = _start_login(http, up)
        callback = _follow_until_callback(http, up, approved.headers["location"])
        with up.app.extensions["broker"].db.session() as session:
            pending = session.scalars(select(PendingLogin)).one()
            other = Sealer("another-root-secret-" + "y" * 30)
            session.execute(
                update(PendingLogin)
                .where(PendingLogin.id == pending.id)
                .values(
                    upstream_secrets_sealed=other.seal_text(
                        "{}", f"pending_logins:{pending.id}:upstream"
                    )
                )
            )
        response = http.get(callback)
    assert response.status_code == 400, response.text
    assert "Sign-in could not be completed" in response.text
    assert "Traceback" not in caplog.text and up.count(AuthorizationCode) == 0
    assert "its upstream secrets do not open" in caplog.text


def test_callback_from_another_browser_is_refused(upstream: Callable[..., Upstream]) -> None:
    up = upstream()
    with (
        httpx.Client(follow_redirects=False) as victim,
        httpx.Client(follow_redirects=False) as attacker,
    ):
        _, approved = _start_login(attacker, up)
        callback = _follow_until_callback(attacker, up, approved.headers["location"])
        # Login CSRF: the attacker's callback URL opened in the victim's browser does nothing.
        response = victim.get(callback)
        assert response.status_code == 400 and "another browser" in response.text
        # And the state was not consumed by that attempt: the attacker's own browser can finish.
        assert attacker.get(callback).status_code == 302


def test_upstream_error_reaches_the_client_as_access_denied(
    upstream: Callable[..., Upstream],
) -> None:
    up = upstream(extra_authorize_params={"login_hint": "deny"})
    with httpx.Client(follow_redirects=False) as http:
        params, approved = _start_login(http, up)
        callback = _follow_until_callback(http, up, approved.headers["location"])
        assert "error=access_denied" in callback
        response = http.get(callback)
        assert response.status_code == 302
        location = response.headers["location"]
        assert location.startswith(params["redirect_uri"])
        result = query(location)
        assert result["error"] == "access_denied"
        assert result["state"] == params["state"] and result["iss"] == up.base
        assert "error_description" in result and "deny" not in result["error_description"]
    assert up.count(Grant) == 0 and up.count(AuthorizationCode) == 0
    with up.app.extensions["broker"].db.session() as session:
        event = session.scalars(select(AuditEvent).where(AuditEvent.type == "login")).one()
        assert event.outcome == "failure"


def test_upstream_server_error_is_temporarily_unavailable(
    upstream: Callable[..., Upstream],
) -> None:
    """RFC 6749 section 4.1.2.1: server_error is the upstream's own, temporary trouble; the
    client gets temporarily_unavailable (never a code that makes it drop its credentials)."""
    up = upstream(extra_authorize_params={"login_hint": "error:server_error"})
    with httpx.Client(follow_redirects=False) as http:
        _params, approved = _start_login(http, up)
        callback = _follow_until_callback(http, up, approved.headers["location"])
        result = query(http.get(callback).headers["location"])
        assert result["error"] == "temporarily_unavailable" and result["iss"] == up.base


def test_upstream_error_is_a_page_with_access_denied(upstream: Callable[..., Upstream]) -> None:
    """Any other upstream error: a page that says the sign-in failed, with a link that returns
    access_denied to the client; nothing stored."""
    up = upstream(extra_authorize_params={"login_hint": "error:invalid_scope"})
    with httpx.Client(follow_redirects=False) as http:
        _params, approved = _start_login(http, up)
        callback = _follow_until_callback(http, up, approved.headers["location"])
        page = http.get(callback)
        assert page.status_code == 403 and "location" not in page.headers
        assert "could not be completed" in page.text
        link = re.search(r'id="return" href="([^"]*)"', page.text)
        assert link is not None
        result = query(html.unescape(link.group(1)))
        assert result["error"] == "access_denied" and result["iss"] == up.base
        assert up.count(Grant) == 0


def test_unreachable_upstream_is_a_503_page(make_app: Callable[..., Flask]) -> None:
    closed = free_port()
    app = make_app(
        providers={
            "corp": {
                "type": "oidc",
                "issuer": f"http://127.0.0.1:{closed}",
                "client_id": "b",
                "client_secret": "s",
            }
        }
    )
    client = app.test_client()
    approved = approve(client, open_consent(client), "corp")
    assert approved.status_code == 503
    assert "Location" not in approved.headers


def test_callback_without_or_with_unknown_state(upstream: Callable[..., Upstream]) -> None:
    up = upstream()
    with httpx.Client(follow_redirects=False) as http:
        assert http.get(f"{up.base}/callback/corp").status_code == 400
        assert (
            http.get(
                f"{up.base}/callback/corp", params={"state": "x" * 40, "code": "y"}
            ).status_code
            == 400
        )
        assert http.get(f"{up.base}/callback/nope", params={"state": "x"}).status_code == 404
    assert up.count(PendingLogin) == 0


def test_chooser_lists_the_allowed_providers_and_state_only_after_approval(
    make_app: Callable[..., Flask], users_file: Any
) -> None:
    closed = free_port()
    corp = {
        "type": "oidc",
        "issuer": f"http://127.0.0.1:{closed}",
        "client_id": "b",
        "client_secret": "s",
        "display_name": "Corporate SSO",
    }
    app = make_app(providers={"local": {"users_file": str(users_file)}, "corp": corp})
    client = app.test_client()
    consent = open_consent(client)
    assert 'value="local"' in consent.text and 'value="corp"' in consent.text
    assert "Corporate SSO" in consent.text
    with app.extensions["broker"].db.session() as session:
        pending = session.scalars(select(PendingLogin)).one()
        # No upstream state exists before the user approved the client.
        assert pending.upstream_state_hash is None and pending.approved_at is None
    forged = approve(client, consent, "github")
    assert forged.status_code == 400


def test_resource_restricts_providers(make_app: Callable[..., Flask], users_file: Any) -> None:
    corp = {"type": "oidc", "issuer": "http://127.0.0.1:1", "client_id": "b", "client_secret": "s"}
    resources = [
        {"uri": "http://127.0.0.1:8001/mcp", "scopes": {"demo:read": "Read"}, "providers": ["corp"]}
    ]
    app = make_app(
        providers={"local": {"users_file": str(users_file)}, "corp": corp}, resources=resources
    )
    client = app.test_client()
    consent = open_consent(client)
    assert 'value="corp"' in consent.text and 'value="local"' not in consent.text
    assert approve(client, consent, "local").status_code == 400
