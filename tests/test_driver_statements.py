"""The token endpoint's statements on the driver's cursor (``broker.db.DriverStatement``: psycopg's
on PostgreSQL, sqlite3's on SQLite): rows as SQLAlchemy's types would give them and values stored
as SQLAlchemy stores them, errors as SQLAlchemy's, without the statement's parameters (a token's
hash, a sealed successor) in their message; on SQLite the token endpoint's read in no
transaction and its writes in one, begun with ``BEGIN IMMEDIATE``; the consent page, which only
reads, without the write lock."""

from __future__ import annotations

import datetime as dt
import re
import secrets
import sqlite3
from collections.abc import Callable, Mapping
from typing import Any

import psycopg
import pytest
from flask import Flask
from sqlalchemy import (
    JSON,
    Integer,
    bindparam,
    column,
    create_engine,
    event,
    func,
    insert,
    inspect,
    literal,
    select,
    table,
    type_coerce,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import (
    ArgumentError,
    DataError,
    IntegrityError,
    InvalidRequestError,
    StatementError,
)

from broker import audit
from broker.crypto import token_hash
from broker.db import DriverStatements, UTCDateTime, driver_statement, insert_every_column
from broker.models import AuditEvent, AuthorizationCode, RefreshToken
from broker.oauth2 import rfc6749
from broker.oauth2.rfc6749 import REDEEM_ONCE
from tests.support import authorize_params, form_value, pkce, query, redeem, sign_in_local
from tests.test_database_reconnect import _refresh, _signed_in

POSTGRESQL = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


@POSTGRESQL
def test_rows_come_back_in_utc_whatever_the_session_time_zone(
    make_app: Callable[..., Flask],
) -> None:
    app = make_app()
    _, _, token = _signed_in(app)
    engine = app.extensions["broker"].db.engine
    read = driver_statement(rfc6749._REFRESH_READ, engine)
    seen: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: seen.append(args[2]))
    with engine.connect() as connection:
        connection.exec_driver_sql("SET TIME ZONE 'Asia/Tokyo'")
        (row,) = read.rows(connection, {"digest": token_hash(token)})
    assert row.token_hash == token_hash(token) and row._mapping["token_hash"] == row.token_hash
    assert row.expires_at.utcoffset() == dt.timedelta(0)
    assert row.expires_at.tzinfo == dt.UTC and row.auth_time.tzinfo == dt.UTC
    assert isinstance(row.snapshot, dict)  # json, decoded as SQLAlchemy's JSON type does
    assert seen[-1] == read.sql  # the engine's listeners saw it
    with pytest.raises(AttributeError):
        row.no_such_column  # noqa: B018


@POSTGRESQL
def test_errors_are_sqlalchemys_without_the_parameters(make_app: Callable[..., Flask]) -> None:
    app = make_app()
    engine = app.extensions["broker"].db.engine
    secret = secrets.token_hex(32)
    now = dt.datetime.now(dt.UTC)
    redeem_once = driver_statement(REDEEM_ONCE, engine, json_params=("event_details",))
    params = {
        "digest": secret,
        "now": now,
        "successor": secret,
        "new_grant": "no-such-grant",
        "new_scope": "",
        "new_expires": now,
        "new_idle": now,
        "event_at": now,
        "event_type": "issue",
        "event_outcome": "success",
        "event_user_id": None,
        "event_client_id": None,
        "event_resource": None,
        "event_address": None,
        "event_details": {"secret": secret},
    }
    too_long = driver_statement(
        insert(table("t_driver", column("v"))).values(v=bindparam("v")), engine
    )
    with engine.connect() as connection:
        # No such code: nothing claimed, nothing written, no row.
        assert redeem_once.rows(connection, params) == []
        connection.exec_driver_sql("CREATE TEMPORARY TABLE t_driver (v varchar(4) NOT NULL)")
        with pytest.raises(DataError) as raised:
            too_long.rows(connection, {"v": secret})
        assert secret not in str(raised.value)
        assert raised.value.connection_invalidated is False
        connection.rollback()
        assert connection.exec_driver_sql("SELECT 1").scalar() == 1  # still usable


HOT = {
    "_REFRESH_READ": rfc6749._REFRESH_READ,
    "_CODE_READ": rfc6749._CODE_READ,
    "ROTATE_ONCE": rfc6749.ROTATE_ONCE,
    "REDEEM_ONCE": rfc6749.REDEEM_ONCE,
    "REDEEM_ONCE_WITHOUT_REFRESH": rfc6749.REDEEM_ONCE_WITHOUT_REFRESH,
}


def _engine(app: Flask) -> Engine:
    engine: Engine = app.extensions["broker"].db.engine
    return engine


@POSTGRESQL
@pytest.mark.parametrize("name", list(HOT))
def test_the_hot_statements_are_the_engines_sql_with_numbered_placeholders(
    make_app: Callable[..., Flask], name: str
) -> None:
    engine = _engine(make_app())
    statement = HOT[name]
    driver = driver_statement(statement, engine)
    assert len(set(driver.names)) == len(driver.names)  # each parameter bound once
    named = re.sub(r"\$(\d+)", lambda m: f"%({driver.names[int(m[1]) - 1]})s", driver.sql)
    assert named == str(statement.compile(dialect=engine.dialect))
    assert engine.dialect.paramstyle == "pyformat"  # the engine's own dialect is untouched
    if name != "_REFRESH_READ" and name != "_CODE_READ":  # "digest" and "now", over again
        assert max(driver.sql.count(f"${i + 1}::") for i in range(len(driver.names))) > 1


def test_parameters_are_bound_by_name_once_however_often_used(
    make_app: Callable[..., Flask],
) -> None:
    engine = _engine(make_app())
    x, y = bindparam("x", type_=Integer), bindparam("y", type_=Integer)
    statement = select((x * 10 + y).label("v"), (y - x).label("w"), x.label("again"))
    driver = driver_statement(statement, engine)
    assert sorted(driver.names) == ["param_1", "x", "y"]  # param_1: the 10, bound as given
    with engine.connect() as connection:
        (row,) = driver.rows(connection, {"y": 4, "x": 3, "not_in_it": 9})
        assert row._mapping == {"v": 34, "w": 1, "again": 3}
        (row,) = driver.rows(connection, {"x": 5, "y": -1})
        assert (row.v, row.w, row.again) == (49, -6, 5)


def test_a_missing_parameter_is_an_error_and_nothing_is_sent(
    make_app: Callable[..., Flask],
) -> None:
    engine = _engine(make_app())
    read = driver_statement(rfc6749._REFRESH_READ, engine)
    given = driver_statement(select(literal("given").label("s"), bindparam("t").label("t")), engine)
    seen: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: seen.append(args[2]))
    with engine.connect() as connection:
        with pytest.raises(InvalidRequestError, match="'digest'"):
            read.rows(connection, {"now": None})
        with pytest.raises(InvalidRequestError, match="'t'"):
            given.rows(connection, {})
        assert seen == [] and not connection.in_transaction()  # not even a BEGIN
        # A value the statement carries is bound as SQLAlchemy binds it.
        (row,) = given.rows(connection, {"t": "passed"})
        assert row._mapping == {"s": "given", "t": "passed"}


@POSTGRESQL
def test_rows_are_sqlalchemys_rows_by_label_whatever_the_time_zone(
    make_app: Callable[..., Flask],
) -> None:
    app = make_app()
    _, _, token = _signed_in(app)
    engine = _engine(app)
    read = driver_statement(rfc6749._REFRESH_READ, engine)
    params = {"digest": token_hash(token)}
    cursors: list[Any] = []
    event.listen(engine, "before_cursor_execute", lambda *args: cursors.append(args[1]))
    with engine.connect() as connection:
        expected = dict(connection.execute(rfc6749._REFRESH_READ, params).mappings().one())
        assert any(isinstance(value, dt.datetime) for value in expected.values())
        for zone in ("Asia/Tokyo", "America/Los_Angeles", "UTC"):
            # The same connection's cursor, its loaders made under the first time zone.
            connection.exec_driver_sql(f"SET TIME ZONE '{zone}'")
            (row,) = read.rows(connection, params)
            assert row._mapping == expected
            assert list(row._mapping) == list(expected)  # the labels, in the statement's order
            for value in row._mapping.values():
                if isinstance(value, dt.datetime):
                    assert value.tzinfo is dt.UTC
        driver_cursors = [cursor for cursor in cursors if isinstance(cursor, psycopg.RawCursor)]
        assert len(driver_cursors) == 3 and len({id(c) for c in driver_cursors}) == 1
        # Prepared on its first execution on the connection.
        prepared = connection.exec_driver_sql(
            "SELECT count(*) FROM pg_prepared_statements WHERE statement = %(sql)s",
            {"sql": read.sql},
        ).scalar()
        assert prepared == 1


def test_json_parameters_are_bound_as_json(make_app: Callable[..., Flask]) -> None:
    engine = _engine(make_app())
    doc = type_coerce(bindparam("doc"), JSON)
    echo = driver_statement(
        select(doc.label("doc"), bindparam("n").label("n")), engine, json_params=("doc",)
    )
    with engine.connect() as connection:
        (row,) = echo.rows(connection, {"doc": {"a": [1, "x", None]}, "n": "plain"})
        assert row.doc == {"a": [1, "x", None]} and row.n == "plain"
        (row,) = echo.rows(connection, {"doc": None, "n": None})
        assert row.doc is None and row.n is None  # JSON null, as SQLAlchemy's JSON binds None
    with pytest.raises(ArgumentError, match="docs"):
        driver_statement(select(doc), engine, json_params=("docs",))


def test_a_statement_without_rows_returns_none(make_app: Callable[..., Flask]) -> None:
    engine = _engine(make_app())
    add = driver_statement(insert(table("t_rows", column("v"))).values(v=bindparam("v")), engine)
    with engine.connect() as connection:
        connection.exec_driver_sql("CREATE TEMPORARY TABLE t_rows (v varchar(8))")
        assert add.rows(connection, {"v": "a"}) == []
        assert add.rows(connection, {"v": "b"}) == []
        assert connection.exec_driver_sql("SELECT count(*) FROM t_rows").scalar() == 2


@pytest.mark.parametrize("url", ["postgresql+psycopg://", "sqlite://"])
def test_what_sqlalchemy_completes_at_execution_is_refused(url: str) -> None:
    engine = create_engine(url)
    values = table("t", column("v"))
    expanding = select(values.c.v).where(values.c.v.in_(bindparam("vs", expanding=True)))
    with pytest.raises(ArgumentError, match="expanding"):
        driver_statement(expanding, engine)
    # audit_events.details has a Python-side default, which SQLAlchemy computes per execution.
    defaulted = insert(AuditEvent.__table__).values(
        at=bindparam("at"), type=bindparam("type"), outcome=bindparam("outcome")
    )
    with pytest.raises(ArgumentError, match="defaults"):
        driver_statement(defaulted, engine)


def test_statements_are_compiled_once_and_a_new_one_at_an_old_address_anew(
    make_app: Callable[..., Flask],
) -> None:
    """``DriverStatements`` (the end of a sign-in's statements): each statement is compiled
    on its first run and kept; one that happens to sit where a collected one sat is not taken
    for it. ``insert_every_column`` gives a row's every column (no default computed)."""
    engine = _engine(make_app())
    statements = DriverStatements(engine)
    marks = table("t_marks", column("v"), column("n", Integer))
    add = insert(marks).values(v=bindparam("v"), n=bindparam("n"))
    count = select(func.count()).select_from(marks)
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TEMPORARY TABLE t_marks (v varchar(8), n integer)")
        assert statements.rows(connection, add, {"v": "a", "n": 1}) == []
        compiled = statements._compiled[id(add)][1]
        assert statements.rows(connection, add, {"v": "b", "n": 2}) == []
        assert statements._compiled[id(add)][1] is compiled
        # Another statement registered under this one's id, as after a collection: compiled anew.
        statements._compiled[id(count)] = (add, compiled)
        assert statements.rows(connection, count, {})[0]._mapping == {"count_1": 2}
        assert statements._compiled[id(count)][0] is count
    every = insert_every_column(inspect(AuditEvent).local_table)
    assert set(every.compile().params) == {c.key for c in AuditEvent.__table__.columns}
    driver_statement(every, engine)  # no column default left to compute: accepted


SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def _code(client: Any, client_id: str) -> tuple[str, str]:
    """A code not redeemed yet, and its verifier."""
    verifier, challenge = pkce()
    response = sign_in_local(client, authorize_params(client_id, challenge))
    return query(response.headers["Location"])["code"], verifier


@pytest.mark.parametrize("name", ["_REFRESH_READ", "_CODE_READ"])
def test_rows_read_are_the_rows_sqlalchemy_reads(make_app: Callable[..., Flask], name: str) -> None:
    app = make_app()
    client, client_id, token = _signed_in(app)
    code, _ = _code(client, client_id)
    engine = _engine(app)
    statement = HOT[name]
    read = driver_statement(statement, engine)
    params = {"digest": token_hash(token if name == "_REFRESH_READ" else code)}
    ours: list[Any] = []  # the cursors of the read's executions (no context; not SQLite's BEGIN)
    event.listen(
        engine,
        "before_cursor_execute",
        lambda _c, cursor, sql, _p, context, _m: (
            ours.append(cursor) if context is None and sql == read.sql else None
        ),
    )
    with engine.connect() as connection:
        expected = dict(connection.execute(statement, params).mappings().one())
        for _ in range(2):
            (row,) = read.rows(connection, params)
            assert row._mapping == expected
            assert list(row._mapping) == list(expected)  # the labels, in the statement's order
            assert _kinds(row._mapping) == _kinds(expected)
    assert len(ours) == 2 and ours[0] is ours[1]  # the cursor kept with the connection
    assert isinstance(expected["snapshot"], dict)  # JSON, decoded
    assert isinstance(expected["client_grant_types"], list)
    times = [value for value in expected.values() if isinstance(value, dt.datetime)]
    assert len(times) >= 3 and all(value.tzinfo is dt.UTC for value in times)
    if name == "_REFRESH_READ":
        assert expected["successor_unused"] is False  # a boolean, not SQLite's 0


def test_values_written_read_back_as_sqlalchemy_wrote_them(make_app: Callable[..., Flask]) -> None:
    app = make_app()
    _, _, token = _signed_in(app)
    engine = _engine(app)
    db = app.extensions["broker"].db
    with db.read() as session:
        grant_id = session.get(RefreshToken, token_hash(token)).grant_id
    now = dt.datetime(2031, 2, 3, 4, 5, 6, 789012, tzinfo=dt.timezone(dt.timedelta(hours=5.5)))

    def successor(digest: str) -> dict[str, Any]:
        return {
            "digest": token_hash(token),
            "successor": digest,
            "new_grant": grant_id,
            "new_scope": "demo:read",
            "now": now,
            "new_expires": now + dt.timedelta(days=1),
            "new_idle": now + dt.timedelta(hours=1),
        }

    entry = audit.values(
        "refresh", "success", at=now, address="127.0.0.1", details={"n": [1, None, "é"]}
    )
    json = ("details",) if engine.dialect.name == "postgresql" else ()  # psycopg: no processors
    add_token = driver_statement(rfc6749._SUCCESSOR_INSERT, engine)
    add_event = driver_statement(audit.INSERT_RETURNING, engine, json_params=json)
    with engine.connect() as connection:
        assert add_token.rows(connection, successor("ours")) == []
        connection.execute(rfc6749._SUCCESSOR_INSERT, successor("sqlalchemy's"))
        (row,) = add_event.rows(connection, entry)
        ours, theirs = row.id, connection.execute(audit.INSERT_RETURNING, entry).scalar_one()
        connection.commit()
    with db.read() as session:
        tokens = [_columns(session.get(RefreshToken, h)) for h in ("ours", "sqlalchemy's")]
        events = [_columns(session.get(AuditEvent, i)) for i in (ours, theirs)]
    for written in (tokens, events):
        assert written[0] == written[1] and _kinds(written[0]) == _kinds(written[1])
    assert tokens[0]["issued_at"] == now and tokens[0]["issued_at"].tzinfo is dt.UTC
    assert tokens[0]["parent_hash"] == token_hash(token)
    assert events[0]["at"] == now and events[0]["details"] == {"n": [1, None, "é"]}
    # As stored, read past SQLAlchemy's types: on SQLite the same text (UTC, SQLAlchemy's format).
    with engine.connect() as connection:
        stored_tokens = connection.exec_driver_sql(
            "SELECT issued_at, expires_at, idle_expires_at FROM refresh_tokens"
            " WHERE token_hash IN ('ours', 'sqlalchemy''s')"
        ).all()
        stored_events = connection.exec_driver_sql(
            f"SELECT at, details FROM audit_events WHERE id IN ({ours}, {theirs})"
        ).all()
    for stored in (stored_tokens, stored_events):
        assert len(stored) == 2 and stored[0] == stored[1]
    if engine.dialect.name == "sqlite":
        assert stored_tokens[0][0] == "2031-02-02 22:35:06.789012"


def _columns(row: Any) -> dict[str, Any]:
    """A model row's columns but its primary key."""
    keys = [column.key for column in inspect(type(row)).columns if not column.primary_key]
    return {key: getattr(row, key) for key in keys}


def _kinds(values: Mapping[str, Any]) -> dict[str, type]:
    return {key: type(value) for key, value in values.items()}


def test_driver_errors_are_sqlalchemys_without_the_parameters(
    make_app: Callable[..., Flask],
) -> None:
    engine = _engine(make_app())
    secret = secrets.token_hex(32)
    rows = table("t_unique", column("k"), column("v"))
    add = driver_statement(insert(rows).values(k=bindparam("k"), v=bindparam("v")), engine)
    with engine.connect() as connection:
        connection.exec_driver_sql("CREATE TEMPORARY TABLE t_unique (k int PRIMARY KEY, v text)")
        add.rows(connection, {"k": 1, "v": secret})
        with pytest.raises(IntegrityError) as raised:
            add.rows(connection, {"k": 1, "v": secret})
        assert secret not in str(raised.value) and "INSERT INTO t_unique" in str(raised.value)
        assert raised.value.connection_invalidated is False
        connection.rollback()
        assert connection.exec_driver_sql("SELECT 1").scalar() == 1  # still usable


@SQLITE
def test_a_value_the_type_refuses_is_refused_as_sqlalchemy_refuses_it(
    make_app: Callable[..., Flask],
) -> None:
    engine = _engine(make_app())
    statement = select(bindparam("at", type_=UTCDateTime()).label("at"))
    echo = driver_statement(statement, engine)
    with engine.connect() as connection:
        naive = {"at": dt.datetime(2030, 1, 1)}
        with pytest.raises(StatementError) as theirs:
            connection.execute(statement, naive)
        with pytest.raises(StatementError) as ours:
            echo.rows(connection, naive)
        assert type(ours.value) is type(theirs.value) and isinstance(ours.value.orig, ValueError)
        at = dt.datetime(2030, 1, 1, 9, tzinfo=dt.timezone(dt.timedelta(hours=9)))
        (row,) = echo.rows(connection, {"at": at})
        assert row.at == at and row.at.tzinfo is dt.UTC and row.at.hour == 0


def _write_locked(engine: Engine) -> bool:
    """Whether another connection to the SQLite file is refused the write lock right now."""
    other = sqlite3.connect(engine.url.database or "", timeout=0, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
        return False
    except sqlite3.OperationalError:
        return True
    finally:
        other.close()


@SQLITE
def test_a_token_request_on_sqlite_reads_unlocked_then_writes_in_one_immediate_transaction(
    make_app: Callable[..., Flask],
) -> None:
    """The read runs in no transaction: it holds no lock once it has its row, so another
    connection can take the write lock while the request validates and signs. The first write
    begins the request's transaction with BEGIN IMMEDIATE, through SQLAlchemy's connection
    (whose commit or rollback then ends it): the claim and the inserts run in it, holding the
    write lock that another connection cannot take."""
    app = make_app()
    client, client_id, token = _signed_in(app)
    code, verifier = _code(client, client_id)
    engine = _engine(app)
    seen: list[tuple[str, bool, bool]] = []

    def record(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        words = " ".join(statement.split()[:2])
        seen.append((words, conn.connection.dbapi_connection.in_transaction, _write_locked(engine)))

    def after(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith("SELECT"):  # its row read: no lock left behind
            seen.append(
                (
                    "read done",
                    conn.connection.dbapi_connection.in_transaction,
                    _write_locked(engine),
                )
            )

    inserts = [("INSERT INTO", True, True)] * 2  # the refresh token, the audit event
    event.listen(engine, "before_cursor_execute", record)
    event.listen(engine, "after_cursor_execute", after)
    try:
        assert _refresh(client, client_id, token).status_code == 200
        refreshed, seen[:] = list(seen), []
        assert redeem(client, client_id, code, verifier).status_code == 200
        redeemed = list(seen)
    finally:
        event.remove(engine, "before_cursor_execute", record)
        event.remove(engine, "after_cursor_execute", after)
    done = ("read done", False, False)
    begun = ("BEGIN IMMEDIATE", False, False)
    read = ("SELECT refresh_tokens.token_hash,", False, False)
    claim = ("UPDATE refresh_tokens", True, True)
    assert refreshed == [read, done, begun, claim, *inserts]
    read = ("SELECT authorization_codes.code_hash,", False, False)
    claim = ("UPDATE authorization_codes", True, True)
    assert redeemed == [read, done, begun, claim, *inserts]


@SQLITE
def test_the_consent_page_and_login_form_read_without_the_write_lock_on_sqlite(
    make_app: Callable[..., Flask],
) -> None:
    """The consent page and the login form only read (the pending login, its client, the
    browser's session): their statements run in a deferred transaction, while another
    connection can take the write lock that every sign-in step and token request waits for."""
    app = make_app()
    client, client_id, _ = _signed_in(app)  # a browser with a session, and a client it approved
    _, challenge = pkce()
    location = client.get("/authorize", query_string=authorize_params(client_id, challenge))
    assert location.status_code == 302 and "/consent?" in location.headers["Location"]
    engine = _engine(app)
    seen: list[tuple[str, bool]] = []

    def record(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append((" ".join(statement.split()[:2]), _write_locked(engine)))

    def read_unlocked(path: str) -> str:
        seen[:] = []
        event.listen(engine, "before_cursor_execute", record)
        try:
            page = client.get(path)
        finally:
            event.remove(engine, "before_cursor_execute", record)
        assert page.status_code == 200, path
        assert seen[0] == ("BEGIN", False) and len(seen) > 1, (path, seen)
        assert all(verb.split()[0] in ("BEGIN", "SELECT") for verb, _ in seen), (path, seen)
        assert not any(locked for _, locked in seen), (path, seen)
        return page.get_data(as_text=True)

    consent = read_unlocked(location.headers["Location"])
    approved = client.post(
        "/consent",
        data={
            "login": form_value(consent, "login"),
            "csrf": form_value(consent, "csrf"),
            "action": "approve",
            "provider": "local",
        },
    )
    assert approved.status_code == 302 and "/login/local" in approved.headers["Location"]
    read_unlocked(approved.headers["Location"])


@SQLITE
@pytest.mark.parametrize("failing", ["INSERT INTO refresh_tokens", "INSERT INTO audit_events"])
def test_a_failure_after_the_claim_undoes_the_claim(
    make_app: Callable[..., Flask], failing: str
) -> None:
    """The claim, the new refresh token and the audit event are written together or not at
    all: a failure after the claim (here the database answering "locked", which reaches the
    app's handler as SQLAlchemy's OperationalError: 503) leaves the token or code unused."""
    app = make_app()
    client, client_id, token = _signed_in(app)
    code, verifier = _code(client, client_id)
    engine = _engine(app)

    def fail(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith(failing):
            raise sqlite3.OperationalError("database is locked")

    event.listen(engine, "before_cursor_execute", fail)
    try:
        refused = [
            _refresh(client, client_id, token),
            redeem(client, client_id, code, verifier),
        ]
    finally:
        event.remove(engine, "before_cursor_execute", fail)
    for answer in refused:
        assert answer.status_code == 503 and answer.json["error"] == "temporarily_unavailable"
    with app.extensions["broker"].db.read() as session:
        assert session.get(RefreshToken, token_hash(token)).used_at is None
        assert session.get(AuthorizationCode, token_hash(code)).used_at is None
        assert session.scalar(select(func.count()).select_from(RefreshToken)) == 1
        issued = select(AuditEvent.type).where(AuditEvent.type.in_(["issue", "refresh"]))
        assert list(session.scalars(issued)) == ["issue"]  # the first redemption's
    assert _refresh(client, client_id, token).status_code == 200
    assert redeem(client, client_id, code, verifier).status_code == 200
