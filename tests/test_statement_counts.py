"""The token endpoint's statements, counted (counts are deterministic, unlike time): a refresh and
an authorization-code redemption each read once and then write, with the upstream re-check on
too; nothing else reaches the database (no pre-ping, no separate client lookup). On SQLite the
read runs in no transaction and the writes are three statements in one (begun by the first:
tests/test_driver_statements.py checks where the write lock is held); on PostgreSQL they are
one statement (WITH queries) outside any transaction block, so there is no BEGIN or COMMIT
either: two round trips.
docs/benchmarks.md gives the counts before and after."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import event, inspect
from sqlalchemy.engine import Engine

from broker.models import Client
from broker.oauth2 import rfc6749
from broker.oauth2.server import RequestState
from tests.fakes.github import FakeGitHub
from tests.support import RESOURCE, authorize_params, free_port, pkce, query, redeem, sign_in_local
from tests.test_provider_signins import (  # noqa: F401 (fixtures)
    RULES_ON_TEAMS,
    LiveBroker,
    github,
    live_broker,
)

# What a refresh and a redemption send, in order (BEGIN and COMMIT aside), on SQLite...
REFRESH = [
    "SELECT refresh_tokens",
    "UPDATE refresh_tokens",
    "INSERT refresh_tokens",
    "INSERT audit_events",
]
REDEMPTION = [
    "SELECT authorization_codes",
    "UPDATE authorization_codes",
    "INSERT refresh_tokens",
    "INSERT audit_events",
]
# ... and on PostgreSQL, where every statement is sent outside a transaction block.
REFRESH_PG = ["SELECT refresh_tokens", "WITH claimed"]
REDEMPTION_PG = ["SELECT authorization_codes", "WITH claimed"]


def expected(app: Flask, sqlite: list[str], postgresql: list[str]) -> list[str]:
    return sqlite if _engine(app).dialect.name == "sqlite" else postgresql


@contextmanager
def statements(engine: Engine) -> Iterator[list[str]]:
    """The statements ``engine`` executes meanwhile, as "<verb> <first table>" (the SQLite
    ``BEGIN IMMEDIATE`` the engine sends itself left out)."""
    seen: list[str] = []

    def record(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        words = statement.split()
        verb = words[0].upper()
        if verb == "BEGIN":
            return
        table = {"SELECT": "FROM", "UPDATE": "UPDATE", "INSERT": "INTO", "DELETE": "FROM"}
        after = table.get(verb, "WITH")
        name = words[words.index(after) + 1] if after in words else "?"
        # psycopg sends BEGIN by itself (no cursor), before the first statement outside
        # autocommit: such a statement is marked.
        dbapi = conn.connection.dbapi_connection
        inside = conn.dialect.name == "postgresql" and not dbapi.autocommit
        seen.append(f"{verb} {name}" + (" (in a transaction)" if inside else ""))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def _engine(app: Flask) -> Engine:
    engine: Engine = app.extensions["broker"].db.engine
    return engine


def _refresh(client: Any, client_id: str, token: str) -> Any:
    return client.post(
        "/token",
        data={"grant_type": "refresh_token", "refresh_token": token, "client_id": client_id},
    )


def _code(client: FlaskClient, client_id: str) -> tuple[str, str]:
    verifier, challenge = pkce()
    done = sign_in_local(client, authorize_params(client_id, challenge))
    return query(done.headers["Location"])["code"], verifier


def test_a_refresh_and_a_redemption_read_once_then_write(
    app: Flask, client: FlaskClient, registered: dict[str, Any]
) -> None:
    # The first token of a worker reads the signing key (then kept 30 s), and the first of a
    # client records its use (then at most hourly): not counted.
    assert redeem(client, registered["client_id"], *_code(client, registered["client_id"]))
    code, verifier = _code(client, registered["client_id"])
    with statements(_engine(app)) as seen:
        tokens = redeem(client, registered["client_id"], code, verifier)
    assert tokens.status_code == 200, tokens.json
    assert seen == expected(app, REDEMPTION, REDEMPTION_PG)
    token = tokens.json["refresh_token"]
    for rotation in range(3):  # the first rotation has no parent; later ones do: same count
        with statements(_engine(app)) as seen:
            answer = _refresh(client, registered["client_id"], token)
        assert answer.status_code == 200, answer.json
        assert seen == expected(app, REFRESH, REFRESH_PG), rotation
        token = answer.json["refresh_token"]


def test_a_refresh_and_a_redemption_make_no_orm_session(
    app: Flask, client: FlaskClient, registered: dict[str, Any], monkeypatch: Any
) -> None:
    """The code and refresh grants run on the request's connection alone: the ORM session
    (its transaction, commit and close cost more CPU than the statements) is never made."""
    client_id = registered["client_id"]
    assert redeem(client, client_id, *_code(client, client_id))  # the signing key, read once
    code, verifier = _code(client, client_id)
    made: list[RequestState] = []
    session = RequestState.session

    def recorded(state: RequestState) -> Any:
        made.append(state)
        return session.fget(state)  # type: ignore[attr-defined]

    monkeypatch.setattr(RequestState, "session", property(recorded))
    tokens = redeem(client, client_id, code, verifier)
    assert tokens.status_code == 200, tokens.json
    answer = _refresh(client, client_id, tokens.json["refresh_token"])
    assert answer.status_code == 200, answer.json
    assert made == []
    probe = RequestState(connect=app.extensions["broker"].db.statement_connection)
    assert probe.session is not None and made == [probe]  # what asks for one is seen
    probe.close()


def test_a_parallel_refresh_in_the_grace_window_only_reads(
    app: Flask, client: FlaskClient, registered: dict[str, Any]
) -> None:
    first = redeem(client, registered["client_id"], *_code(client, registered["client_id"])).json
    rotated = _refresh(client, registered["client_id"], first["refresh_token"]).json
    with statements(_engine(app)) as seen:
        again = _refresh(client, registered["client_id"], first["refresh_token"])
    assert again.json["refresh_token"] == rotated["refresh_token"]
    assert seen == ["SELECT refresh_tokens"]


def test_with_the_upstream_recheck_on_a_refresh_sends_nothing_more(
    live_broker: Callable[..., LiveBroker],  # noqa: F811 (the fixture imported above)
    github: FakeGitHub,  # noqa: F811
) -> None:
    """The re-check's question (is this identity due?) is answered by the grant's own read."""
    config = github.provider_config(recheck_interval=3600)
    broker = live_broker(free_port(), providers={"github": config}, rules=RULES_ON_TEAMS)
    assert broker.app.extensions["broker"].recheck.enabled
    response = broker.sign_in("github", scope="demo:read")
    tokens = httpx.post(
        f"{broker.base}/token",
        data={
            "grant_type": "authorization_code",
            "code": query(response.headers["location"])["code"],
            "client_id": broker.client_id,
            "redirect_uri": "http://127.0.0.1:5555/callback",
            "code_verifier": broker.verifier,
            "resource": RESOURCE,
        },
    )
    assert tokens.status_code == 200, tokens.text
    with httpx.Client(base_url=broker.base) as http, statements(_engine(broker.app)) as seen:
        answer = _refresh(http, broker.client_id, tokens.json()["refresh_token"])
    assert answer.status_code == 200, answer.text
    assert seen == expected(broker.app, REFRESH, REFRESH_PG)


def test_the_token_endpoint_copy_of_a_client_names_every_attribute() -> None:
    """The client read with a code or refresh token holds the columns the token endpoint reads;
    every other attribute of the model must be given a value that allows nothing."""
    attributes = {attribute.key for attribute in inspect(Client).column_attrs}
    assert set(rfc6749._TOKEN_CLIENT) | set(rfc6749._CLIENT_CLOSED) == attributes


def test_no_parameter_of_the_token_writes_is_named_after_a_column() -> None:
    """SQLAlchemy puts a parameter named after a column of an UPDATE's table into its SET
    clause: a rotation given a "scope" would have set every claimed row's scope. The writes'
    parameters (the successor's, the claim's, the audit event's) name no column of the tables
    the claims update."""
    import datetime as dt
    from types import SimpleNamespace

    from broker import audit
    from broker.models import AuthorizationCode, RefreshToken

    tokens = SimpleNamespace(refresh_ttl=60, refresh_idle_ttl=30)
    grant = SimpleNamespace(id="g", scope="s")
    now = dt.datetime.now(dt.UTC)
    new = rfc6749._new_token(
        SimpleNamespace(tokens=tokens), digest="d", grant=grant, now=now, family_expires=None
    )
    params = {*new, "digest", "parent", "sealed", "now"}
    params |= set(audit.when_params(audit.values("refresh", "success")))
    for model in (RefreshToken, AuthorizationCode):
        columns = {column.key for column in inspect(model).columns}
        assert not params & columns, (model.__tablename__, params & columns)
