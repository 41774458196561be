"""The end of a sign-in, written with Core statements (broker/flow.py): who signed in is linked
once, a parallel first sign-in of the same identity links to one user, the upstream tokens are
upserted, and the request that finishes a sign-in sends a fixed list of statements (counts are
deterministic, unlike time; docs/benchmarks.md gives them before and after)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, inspect, select

from broker.models import Client, Identity, PendingLogin, UpstreamToken, User
from providers.contract import Identity as UpstreamIdentity
from providers.contract import LoginResult, UpstreamTokens
from tests.conftest import PASSWORDS
from tests.fakes.github import FakeGitHub
from tests.support import authorize_params, form_value, free_port, pkce, query
from tests.test_provider_signins import (  # noqa: F401 (fixtures)
    LiveBroker,
    github,
    live_broker,
)
from tests.test_statement_counts import statements

# The local provider's form, posted: the pending login (the form's check, then the finish),
# the per-user and per-address limits of failed sign-ins, then the finish itself: who signed
# in, linked, then what every finish writes.
LINKED = ["SELECT identities", "INSERT users", "INSERT identities"]
FINISHED = [
    "INSERT browser_sessions",
    "UPDATE pending_logins",
    "SELECT clients",
    "SELECT consents",
    "INSERT consents",
    "INSERT audit_events",
    "INSERT grants",
    "INSERT audit_events",
    "INSERT authorization_codes",
]
FIRST_SIGN_IN = [
    "SELECT pending_logins",
    "SELECT rate_limit_counters",
    "SELECT rate_limit_counters",
    "SELECT pending_logins",
    *LINKED,
    *FINISHED,
]
# A known identity: its facts updated instead of a user and an identity inserted; the
# consent given before updated.
AGAIN = [
    *FIRST_SIGN_IN[:5],
    "UPDATE identities",
    *FINISHED[:4],
    "UPDATE consents",
    *FINISHED[5:],
]


def _sign_in(client: FlaskClient, client_id: str, engine: Any) -> tuple[list[str], Any]:
    """Authorize, approve and post the local login form; the statements of the form's post."""
    _, challenge = pkce()
    response = client.get("/authorize", query_string=authorize_params(client_id, challenge))
    consent = client.get(response.headers["Location"])
    login_id = form_value(consent.text, "login")
    approved = client.post(
        "/consent",
        data={
            "login": login_id,
            "csrf": form_value(consent.text, "csrf"),
            "action": "approve",
            "provider": "local",
        },
    )
    form = client.get(approved.headers["Location"])
    with statements(engine) as seen:
        done = client.post(
            approved.headers["Location"].split("?")[0],
            data={
                "login": login_id,
                "csrf": form_value(form.text, "csrf"),
                "username": "alice",
                "password": PASSWORDS["alice"],
            },
        )
    return seen, done


def test_a_sign_in_finishes_in_a_fixed_list_of_statements(
    app: Flask, registered: dict[str, Any]
) -> None:
    engine = app.extensions["broker"].db.engine
    first, done = _sign_in(app.test_client(), registered["client_id"], engine)
    assert done.status_code == 302 and "code" in query(done.headers["Location"])
    assert [s.removesuffix(" (in a transaction)") for s in first] == FIRST_SIGN_IN
    again, done = _sign_in(app.test_client(), registered["client_id"], engine)  # a new browser
    assert done.status_code == 302 and "code" in query(done.headers["Location"])
    assert [s.removesuffix(" (in a transaction)") for s in again] == AGAIN


def _users(app: Flask) -> int:
    with app.extensions["broker"].db.session() as session:
        return int(session.scalar(select(func.count()).select_from(User)) or 0)


def test_a_first_sign_in_another_worker_stored_first_links_to_its_user(app: Flask) -> None:
    """Both read "not stored yet"; the one that inserts second gets the first one's identity
    and user (the identity's facts its own), and leaves no user of its own behind."""
    broker = app.extensions["broker"]
    with broker.db.session() as session:
        theirs = broker.flow.link_identity(
            session, LoginResult(UpstreamIdentity(provider="local", subject="dora"))
        )
    users = _users(app)
    seen_now = UpstreamIdentity(provider="local", subject="dora", email="dora@example.com")
    with broker.db.session() as session:
        ours = broker.flow._link(session, LoginResult(seen_now), None)  # read before theirs
    assert (ours.id, ours.user_id) == (theirs.id, theirs.user_id)
    assert not ours.disabled
    assert _users(app) == users
    with broker.db.session() as session:
        row = session.get(Identity, theirs.id)
        assert row is not None and row.snapshot["email"] == "dora@example.com"


def test_a_sign_in_without_a_new_upstream_refresh_token_keeps_the_stored_one(app: Flask) -> None:
    broker = app.extensions["broker"]
    who = UpstreamIdentity(provider="local", subject="erin")
    first = UpstreamTokens(access_token="at-1", refresh_token="rt-1", scope="a", context={"k": 1})
    with broker.db.session() as session:
        linked = broker.flow.link_identity(session, LoginResult(who, first))
    with broker.db.session() as session:
        again = broker.flow.link_identity(
            session, LoginResult(who, UpstreamTokens(access_token="at-2", scope="b"))
        )
    assert again.id == linked.id
    aad = f"upstream_tokens:{linked.id}"
    with broker.db.session() as session:
        row = session.get(UpstreamToken, linked.id)
        assert row is not None
        assert broker.sealer.open_text(row.access_token_sealed, aad + ":access") == "at-2"
        assert row.refresh_token_sealed is not None
        assert broker.sealer.open_text(row.refresh_token_sealed, aad + ":refresh") == "rt-1"
        assert (row.scope, row.context, row.provider) == ("b", {}, "local")
    with broker.db.session() as session:
        broker.flow.link_identity(
            session, LoginResult(who, UpstreamTokens(access_token="at-3", refresh_token="rt-3"))
        )
    with broker.db.session() as session:
        row = session.get(UpstreamToken, linked.id)
        assert row is not None and row.refresh_token_sealed is not None
        assert broker.sealer.open_text(row.refresh_token_sealed, aad + ":refresh") == "rt-3"


# The upstream's answer at /callback: the pending login it is bound to, consumed; then, after
# the upstream calls and outside that transaction, the finish (the pending login not read
# again), with the upstream tokens upserted.
CALLBACK = [
    "SELECT pending_logins",
    "UPDATE pending_logins",
    *LINKED,
    "INSERT upstream_tokens",
    *FINISHED,
]


def test_an_upstream_sign_in_finishes_in_a_fixed_list_of_statements(
    live_broker: Callable[..., LiveBroker],  # noqa: F811 (the fixture imported above)
    github: FakeGitHub,  # noqa: F811
) -> None:
    broker = live_broker(free_port(), providers={"github": github.provider_config()})
    with statements(broker.app.extensions["broker"].db.engine) as seen:
        response = broker.sign_in("github", scope="demo:read")
    assert response.status_code == 302 and "code" in query(response.headers["location"])
    assert [s.removesuffix(" (in a transaction)") for s in seen[-len(CALLBACK) :]] == CALLBACK


def test_a_pending_login_read_is_the_sessions_and_its_client_a_copy_of_the_row(
    app: Flask, client: FlaskClient, registered: dict[str, Any]
) -> None:
    """The sign-in reads its pending login and client on the driver's cursor: the pending login
    is an instance of the session as if loaded (the same one when read again, a change flushed
    as an UPDATE), the client a read-only copy whose values are the row's."""
    broker = app.extensions["broker"]
    _, challenge = pkce()
    response = client.get(
        "/authorize", query_string=authorize_params(registered["client_id"], challenge)
    )
    login_id = form_value(client.get(response.headers["Location"]).text, "login")
    with broker.db.session() as session:
        stored = session.get(PendingLogin, login_id)
        assert stored is not None
        browser, expected = (
            stored.browser_hash,
            {
                attribute.key: getattr(stored, attribute.key)
                for attribute in inspect(PendingLogin).column_attrs
            },
        )
        row = session.get(Client, registered["client_id"])
        assert row is not None
        client_values = {
            attribute.key: getattr(row, attribute.key) for attribute in inspect(Client).column_attrs
        }
    with broker.db.session() as session:
        pending = broker.flow.pending(session, login_id, browser)
        assert pending in session and not session.dirty
        assert {key: getattr(pending, key) for key in expected} == expected
        assert broker.flow.pending(session, login_id, browser) is pending
        copy = broker.flow.client(session, pending)
        assert {key: getattr(copy, key) for key in client_values} == client_values
        pending.provider = "local"
    with broker.db.session() as session:
        again = session.get(PendingLogin, login_id)
        assert again is not None and again.provider == "local"
