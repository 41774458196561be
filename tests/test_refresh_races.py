"""Parallel refreshes of one refresh token across database connections (as across workers and
hosts sharing one PostgreSQL): every one of them reads the token unused, then they race for the
conditional update that claims it. Exactly one rotates; the others wait for it to commit, lose,
read its successor again and hand out that one (the grace window), and the family lives on.

The race is made certain, not likely: another connection holds the token's row lock while the
refreshes read it, and lets go once all of them wait for it."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import psycopg
import pytest
from flask import Flask
from sqlalchemy import event, select

from broker import metrics
from broker.models import Grant
from tests.support import (
    RESOURCE,
    authorize_params,
    free_port,
    pkce,
    query,
    redeem,
    redemption,
    serve_wsgi,
    sign_in_local,
)

PARALLEL = 4


def _connect(database_url: str, *, autocommit: bool = False) -> psycopg.Connection[Any]:
    """A connection of our own to the test's database and schema (its search_path kept)."""
    parts = urlsplit(database_url.replace("+psycopg", ""))
    options = parse_qs(parts.query).get("options", [""])[0]
    return psycopg.connect(
        parts._replace(query="").geturl(), options=options, autocommit=autocommit
    )


def _waiting_behind(watcher: psycopg.Connection[Any], holder: int) -> int:
    """How many backends wait, directly or in the queue behind another waiter, for ``holder``'s
    locks (the first waiter for a row waits for its holder, the next ones for the first)."""
    rows = watcher.execute(
        "SELECT pid, pg_blocking_pids(pid) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
    ).fetchall()
    blocked_by = {pid: set(blockers) for pid, blockers in rows}
    behind = {holder}
    while True:
        more = {pid for pid, blockers in blocked_by.items() if blockers & behind} - behind
        if not more:
            return len(behind) - 1
        behind |= more


def _signed_in(app: Flask) -> tuple[Any, str, str, str]:
    """A test client, a registered client's id, and an authorization code with its verifier."""
    client = app.test_client()
    client_id = client.post(
        "/register", json={"redirect_uris": ["http://127.0.0.1/callback"]}
    ).json["client_id"]
    verifier, challenge = pkce()
    done = sign_in_local(client, authorize_params(client_id, challenge))
    return client, client_id, query(done.headers["Location"])["code"], verifier


def _race(
    app: Flask, database_url: str, lock: str, digest: str, data: dict[str, str]
) -> list[httpx.Response]:
    """``PARALLEL`` token requests with ``data``, all of them let go at once: another
    connection holds the row lock that ``lock`` (a ``SELECT ... FOR UPDATE`` of the row whose
    hash is ``digest``) takes until every request has read the row and waits to write it."""
    with (
        serve_wsgi(app, free_port()) as base,
        _connect(database_url) as locker,
        _connect(database_url, autocommit=True) as watcher,
        ThreadPoolExecutor(PARALLEL) as pool,
    ):
        locker.execute(lock, (digest,))
        answers = [
            pool.submit(httpx.post, f"{base}/token", data=data, timeout=30) for _ in range(PARALLEL)
        ]
        deadline = time.monotonic() + 20
        while True:  # every request has read the row and waits to claim it
            waiting = _waiting_behind(watcher, locker.info.backend_pid)
            if waiting == PARALLEL:
                break
            assert time.monotonic() < deadline, f"{waiting} requests wait for the lock"
            time.sleep(0.05)
        locker.rollback()
        return [answer.result() for answer in answers]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_refreshes_that_all_read_the_token_unused_get_one_successor(
    database_url: str, make_app: Callable[..., Flask]
) -> None:
    app = make_app()
    client, client_id, code, verifier = _signed_in(app)
    first = redeem(client, client_id, code, verifier).json
    token = first["refresh_token"]
    digest = hashlib.sha256(token.encode()).hexdigest()

    rereads: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        # The loser's second look: the token and its successor, without the grant.
        looks = statement.startswith("SELECT") and "successor_unused" in statement
        if looks and "JOIN grants" not in statement:
            rereads.append(statement)

    engine = app.extensions["broker"].db.engine
    event.listen(engine, "before_cursor_execute", count)
    data = {
        "grant_type": "refresh_token",
        "refresh_token": token,
        "client_id": client_id,
    }
    lock = "SELECT 1 FROM refresh_tokens WHERE token_hash = %s FOR UPDATE"
    responses = _race(app, database_url, lock, digest, data)
    event.remove(engine, "before_cursor_execute", count)

    assert [r.status_code for r in responses] == [200] * PARALLEL, [r.text for r in responses]
    successors = {r.json()["refresh_token"] for r in responses}
    assert len(successors) == 1 and token not in successors
    assert len(rereads) == PARALLEL - 1  # every loser read the winner's successor
    # The family lives on: the successor rotates, and nothing was revoked.
    after = client.post("/token", data={**data, "refresh_token": successors.pop()})
    assert after.status_code == 200, after.json
    with app.extensions["broker"].db.session() as session:
        assert session.scalars(select(Grant.revoked_at)).all() == [None]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_redemptions_that_all_read_the_code_unused_give_tokens_once(
    database_url: str, make_app: Callable[..., Flask]
) -> None:
    """The code's claim is the redemption's one write (with its refresh token and audit event):
    of redemptions that all read the code unused, exactly one gets tokens; the others are
    refused, and, a code used twice, the grant it produced is revoked (RFC 6749 section
    4.1.2), its refresh token with it."""
    app = make_app()
    client, client_id, code, verifier = _signed_in(app)
    digest = hashlib.sha256(code.encode()).hexdigest()
    data = redemption(client_id, code, verifier)
    lock = "SELECT 1 FROM authorization_codes WHERE code_hash = %s FOR UPDATE"
    issued = metrics.TOKENS_ISSUED.labels("authorization_code", RESOURCE)
    before = issued._value.get()
    responses = _race(app, database_url, lock, digest, data)

    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [400] * (PARALLEL - 1), [r.text for r in responses]
    assert issued._value.get() - before == 1  # the losers' tokens were never handed out
    assert {r.json()["error"] for r in responses if r.status_code == 400} == {"invalid_grant"}
    won = next(r.json() for r in responses if r.status_code == 200)
    after = client.post(
        "/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": won["refresh_token"],
            "client_id": client_id,
        },
    )
    assert after.status_code == 400 and after.json["error"] == "invalid_grant"
    with app.extensions["broker"].db.session() as session:
        assert session.scalars(select(Grant.revoke_reason)).all() == ["code_replay"]
