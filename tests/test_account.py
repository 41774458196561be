"""``/account``: the signed-in user's connected clients, disconnecting one or all of them.

The Flask test client plays the browser (cookies kept), on SQLite and on PostgreSQL; a
disconnect is proven by the client's next refresh, through ``/token``.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from broker.models import AuditEvent, Consent, Grant
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
from tests.test_lifecycle import WEB, refresh

PAGE_HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def connect(
    client: FlaskClient,
    name: str,
    *,
    username: str = "alice",
    resource: str = RESOURCE,
    scope: str = "demo:read demo:write",
) -> tuple[str, dict[str, Any]]:
    """``username`` connects a newly registered client named ``name`` to ``resource`` in this
    browser; the client id and its token response."""
    registered = client.post(
        "/register",
        json={"client_name": name, "redirect_uris": [WEB], "token_endpoint_auth_method": "none"},
    ).json
    assert registered is not None
    verifier, challenge = pkce()
    params = authorize_params(
        registered["client_id"], challenge, redirect_uri=WEB, resource=resource, scope=scope
    )
    done = sign_in_local(client, params, username=username)
    assert done.status_code == 302, done.text
    tokens = redeem(
        client,
        registered["client_id"],
        query(done.headers["Location"])["code"],
        verifier,
        redirect_uri=WEB,
        resource=resource,
    )
    assert tokens.status_code == 200, tokens.json
    return registered["client_id"], dict(tokens.json)


def grant_ids(html: str) -> list[str]:
    return re.findall(r'name="grant" value="([^"]*)"', html)


def grant_of(app: Flask, client_id: str) -> Grant:
    with app.extensions["broker"].db.session() as session:
        grant: Grant = session.scalars(select(Grant).where(Grant.client_id == client_id)).one()
        return grant


def assert_page(response: Any) -> None:
    assert response.mimetype == "text/html"
    for name, value in PAGE_HEADERS.items():
        assert response.headers.get(name) == value, (name, response.headers)
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    assert "no-store" in response.headers["Cache-Control"]


def refused(client: FlaskClient, client_id: str, tokens: dict[str, Any]) -> bool:
    answer = refresh(client, client_id, tokens["refresh_token"])
    if answer.status_code == 200:
        tokens.update(answer.json)  # rotated: the next refresh uses the new one
        return False
    assert answer.status_code == 400 and answer.json["error"] == "invalid_grant", answer.json
    return True


@pytest.fixture
def alice(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def bob(app: Flask) -> FlaskClient:
    return app.test_client()


def test_without_a_session_the_page_says_to_sign_in_and_disconnects_nothing(
    app: Flask, alice: FlaskClient
) -> None:
    stranger = app.test_client()
    page = stranger.get("/account")
    assert page.status_code == 200
    assert_page(page)
    assert "Not signed in" in page.text and "<form" not in page.text
    client_id, tokens = connect(alice, "Alice's client")
    grant = grant_of(app, client_id)
    for path, data in (
        ("/account/disconnect", {"grant": grant.id}),
        ("/account/disconnect-all", {}),
    ):
        answer = stranger.post(path, data={**data, "csrf": "f" * 64})
        assert answer.status_code == 403 and "Not signed in" in answer.text, path
        assert_page(answer)
    assert not refused(alice, client_id, tokens)


def test_the_page_lists_the_users_live_grants_with_client_resource_scopes_and_last_token(
    app: Flask, alice: FlaskClient, bob: FlaskClient
) -> None:
    jira, _ = connect(alice, "Jira agent")
    other, _ = connect(alice, "Other agent", resource=OTHER_RESOURCE, scope="other:read")
    connect(bob, "Bob's agent", username="bob")
    page = alice.get("/account")
    assert page.status_code == 200, page.text
    assert_page(page)
    assert '<strong id="signed-in-as">alice@example.com</strong>' in page.text
    assert grant_ids(page.text) == [grant_of(app, jira).id, grant_of(app, other).id]
    sections = page.text.split('<section class="connection"')[1:]
    assert 'class="client-name">Jira agent<' in sections[0]
    assert f'class="uri client-ref">{jira}<' in sections[0]  # a DCR client: its client_id
    assert 'class="resource-name">Demo tools<' in sections[0]
    assert f'class="muted resource-uri">{RESOURCE}<' in sections[0]
    assert re.findall(r"<code[^>]*>([^<]+)</code>", sections[0]) == ["demo:read", "demo:write"]
    assert 'title="Read demo data"' in sections[0]
    assert 'class="resource-name">Other tools<' in sections[1]
    assert re.findall(r"<code[^>]*>([^<]+)</code>", sections[1]) == ["other:read"]
    for section in sections:
        # The code redemption issued the first refresh token: that is the last token issued.
        assert re.search(r'class="last-token-at"><time datetime="20', section), section
    assert "Bob's agent" not in page.text
    assert "Last token issued" in page.text


def test_disconnecting_one_stops_the_next_refresh_of_that_grant_only(
    app: Flask, alice: FlaskClient
) -> None:
    first, first_tokens = connect(alice, "First agent")
    second, second_tokens = connect(alice, "Second agent")
    page = alice.get("/account")
    target = grant_of(app, first).id
    answer = alice.post(
        "/account/disconnect", data={"grant": target, "csrf": form_value(page.text, "csrf")}
    )
    assert answer.status_code == 303
    assert answer.headers["Location"] == "/account?disconnected=1"
    after = alice.get(answer.headers["Location"])
    assert "Disconnected 1 application." in after.text
    assert grant_ids(after.text) == [grant_of(app, second).id]

    assert refused(alice, first, first_tokens)
    assert not refused(alice, second, second_tokens)
    assert not refused(alice, second, second_tokens)  # and keeps refreshing
    with app.extensions["broker"].db.session() as session:
        grant = session.get(Grant, target)
        assert grant is not None and grant.revoke_reason == "revoked_by_user"
        events = session.scalars(select(AuditEvent).where(AuditEvent.actor == "user")).all()
        assert [(e.type, e.reason, e.client_id, e.resource) for e in events] == [
            ("revoke", "revoked_by_user", first, RESOURCE),
            ("consent", "consent_withdrawn", first, RESOURCE),
        ]
        assert events[0].details == {"grant": target}
        assert events[0].user_id == grant.user_id
        consents = {c.client_id: c.revoked_at for c in session.scalars(select(Consent))}
        assert consents[first] is not None and consents[second] is None
    # The consent went with it: the next authorization of that client asks the user again.
    _, challenge = pkce()
    again = alice.get(
        "/authorize", query_string=authorize_params(first, challenge, redirect_uri=WEB)
    )
    assert again.status_code == 302 and again.headers["Location"].startswith("/consent?")


def test_disconnect_all_ends_every_grant_of_the_user_and_no_one_elses(
    app: Flask, alice: FlaskClient, bob: FlaskClient
) -> None:
    mine = [connect(alice, "First agent"), connect(alice, "Second agent")]
    bobs = connect(bob, "Bob's agent", username="bob")
    page = alice.get("/account")
    answer = alice.post("/account/disconnect-all", data={"csrf": form_value(page.text, "csrf")})
    assert answer.status_code == 303
    assert answer.headers["Location"] == "/account?disconnected=2"
    after = alice.get(answer.headers["Location"])
    assert "Disconnected 2 applications." in after.text
    assert 'id="no-connections"' in after.text and grant_ids(after.text) == []
    for client_id, tokens in mine:
        assert refused(alice, client_id, tokens)
    assert not refused(bob, *bobs)
    again = alice.post("/account/disconnect-all", data={"csrf": form_value(page.text, "csrf")})
    assert again.headers["Location"] == "/account?disconnected=0"


def test_a_missing_forged_or_other_sessions_csrf_token_is_refused_and_changes_nothing(
    app: Flask, alice: FlaskClient, bob: FlaskClient
) -> None:
    client_id, tokens = connect(alice, "Alice's agent")
    connect(bob, "Bob's agent", username="bob")
    target = grant_of(app, client_id).id
    bobs_csrf = form_value(bob.get("/account").text, "csrf")
    for csrf in (None, "", "f" * 64, bobs_csrf):
        data = {"grant": target} if csrf is None else {"grant": target, "csrf": csrf}
        for path in ("/account/disconnect", "/account/disconnect-all"):
            answer = alice.post(path, data=data)
            assert answer.status_code == 400, (path, csrf)
            assert "Form expired" in answer.text and "CSRF" in answer.text
            assert_page(answer)
    assert not refused(alice, client_id, tokens)
    assert grant_ids(alice.get("/account").text) == [target]


def test_another_users_grant_id_is_not_found_and_stays_connected(
    app: Flask, alice: FlaskClient, bob: FlaskClient
) -> None:
    connect(alice, "Alice's agent")
    bobs_client, bobs_tokens = connect(bob, "Bob's agent", username="bob")
    csrf = form_value(alice.get("/account").text, "csrf")
    answer = alice.post(
        "/account/disconnect", data={"grant": grant_of(app, bobs_client).id, "csrf": csrf}
    )
    assert answer.status_code == 404 and "no such connection" in answer.text
    assert_page(answer)
    assert not refused(bob, bobs_client, bobs_tokens)
    with app.extensions["broker"].db.session() as session:
        assert session.scalars(select(AuditEvent).where(AuditEvent.actor == "user")).all() == []


def test_bad_input_gets_a_page_with_a_4xx_never_a_500(app: Flask, alice: FlaskClient) -> None:
    client_id, tokens = connect(alice, "Alice's agent")
    page = alice.get("/account")
    csrf = form_value(page.text, "csrf")
    target = grant_ids(page.text)[0]
    cases = {
        "no grant": ({"csrf": csrf}, 400),
        "empty grant": ({"csrf": csrf, "grant": ""}, 400),
        "not a grant id": ({"csrf": csrf, "grant": "'; drop table grants; --"}, 400),
        "NUL byte": ({"csrf": csrf, "grant": "gr_\x00"}, 400),
        "too long": ({"csrf": csrf, "grant": "gr_" + "a" * 5000}, 400),
        "unknown id": ({"csrf": csrf, "grant": "gr_" + "a" * 24}, 404),
        "two grants": ({"csrf": csrf, "grant": [target, target + "x"]}, None),
    }
    for name, (data, status) in cases.items():
        answer = alice.post("/account/disconnect", data=data)
        if status is None:  # the first value counts: a valid request
            assert answer.status_code == 303, name
            continue
        assert answer.status_code == status, (name, answer.text)
        assert_page(answer)
    assert refused(alice, client_id, tokens)
    for method, path in (
        ("GET", "/account/disconnect"),
        ("GET", "/account/disconnect-all"),
        ("PUT", "/account"),
        ("DELETE", "/account"),
    ):
        answer = alice.open(path, method=method)
        assert answer.status_code == 405, (method, path)
        assert_page(answer)
        assert "POST" in answer.headers["Allow"] or "GET" in answer.headers["Allow"]
    for done in ("x", "-1", "²", "9" * 50):
        shown = alice.get("/account", query_string={"disconnected": done})
        assert shown.status_code == 200 and 'id="notice"' not in shown.text, done


def test_a_session_without_the_browser_cookie_gets_one_before_the_forms(
    app: Flask, alice: FlaskClient
) -> None:
    """The forms' CSRF token is bound to the browser cookie: a browser that lost it (but kept
    its session) gets a new one and comes back, rather than forms that can never succeed."""
    client_id, tokens = connect(alice, "Alice's agent")
    alice.delete_cookie("broker_browser")
    answer = alice.get("/account")
    assert answer.status_code == 303 and answer.headers["Location"] == "/account"
    assert "broker_browser=" in answer.headers["Set-Cookie"]
    page = alice.get("/account")
    assert page.status_code == 200
    done = alice.post(
        "/account/disconnect",
        data={"grant": grant_ids(page.text)[0], "csrf": form_value(page.text, "csrf")},
    )
    assert done.status_code == 303
    assert refused(alice, client_id, tokens)
