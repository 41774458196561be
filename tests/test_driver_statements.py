"""The token endpoint's statements on the driver's cursor (``broker.db.DriverStatement``, used
on PostgreSQL): rows as SQLAlchemy's types would give them, errors as SQLAlchemy's, without the
statement's parameters (a token's hash, a sealed successor) in their message."""

from __future__ import annotations

import datetime as dt
import re
import secrets
from collections.abc import Callable
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
    insert,
    literal,
    select,
    table,
    type_coerce,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError, DataError, InvalidRequestError

from broker.db import DriverStatement
from broker.oauth2 import rfc6749
from broker.oauth2.rfc6749 import REDEEM_ONCE
from tests.test_database_reconnect import _signed_in

POSTGRESQL = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


@POSTGRESQL
def test_rows_come_back_in_utc_whatever_the_session_time_zone(
    make_app: Callable[..., Flask],
) -> None:
    from broker.crypto import token_hash

    app = make_app()
    _, _, token = _signed_in(app)
    engine = app.extensions["broker"].db.engine
    read = DriverStatement(rfc6749._REFRESH_READ, engine)
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
    redeem_once = DriverStatement(REDEEM_ONCE, engine, json_params=("event_details",))
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
    too_long = DriverStatement(
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
    driver = DriverStatement(statement, engine)
    assert len(set(driver.names)) == len(driver.names)  # each parameter bound once
    named = re.sub(r"\$(\d+)", lambda m: f"%({driver.names[int(m[1]) - 1]})s", driver.sql)
    assert named == str(statement.compile(dialect=engine.dialect))
    assert engine.dialect.paramstyle == "pyformat"  # the engine's own dialect is untouched
    if name != "_REFRESH_READ" and name != "_CODE_READ":  # "digest" and "now", over again
        assert max(driver.sql.count(f"${i + 1}::") for i in range(len(driver.names))) > 1


@POSTGRESQL
def test_parameters_are_bound_by_name_once_however_often_used(
    make_app: Callable[..., Flask],
) -> None:
    engine = _engine(make_app())
    x, y = bindparam("x", type_=Integer), bindparam("y", type_=Integer)
    statement = select((x * 10 + y).label("v"), (y - x).label("w"), x.label("again"))
    driver = DriverStatement(statement, engine)
    assert sorted(driver.names) == ["param_1", "x", "y"]  # param_1: the 10, bound as given
    with engine.connect() as connection:
        (row,) = driver.rows(connection, {"y": 4, "x": 3, "not_in_it": 9})
        assert row._mapping == {"v": 34, "w": 1, "again": 3}
        (row,) = driver.rows(connection, {"x": 5, "y": -1})
        assert (row.v, row.w, row.again) == (49, -6, 5)


@POSTGRESQL
def test_a_missing_parameter_is_an_error_and_nothing_is_sent(
    make_app: Callable[..., Flask],
) -> None:
    engine = _engine(make_app())
    read = DriverStatement(rfc6749._REFRESH_READ, engine)
    given = DriverStatement(select(literal("given").label("s"), bindparam("t").label("t")), engine)
    seen: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: seen.append(args[2]))
    with engine.connect() as connection:
        with pytest.raises(InvalidRequestError, match="'digest'"):
            read.rows(connection, {"now": None})
        with pytest.raises(InvalidRequestError, match="'t'"):
            given.rows(connection, {})
        assert seen == []
        # A value the statement carries is bound as SQLAlchemy binds it.
        (row,) = given.rows(connection, {"t": "passed"})
        assert row._mapping == {"s": "given", "t": "passed"}


@POSTGRESQL
def test_rows_are_sqlalchemys_rows_by_label_whatever_the_time_zone(
    make_app: Callable[..., Flask],
) -> None:
    from broker.crypto import token_hash

    app = make_app()
    _, _, token = _signed_in(app)
    engine = _engine(app)
    read = DriverStatement(rfc6749._REFRESH_READ, engine)
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


@POSTGRESQL
def test_json_parameters_are_wrapped_for_the_driver(make_app: Callable[..., Flask]) -> None:
    engine = _engine(make_app())
    doc = type_coerce(bindparam("doc"), JSON)
    echo = DriverStatement(
        select(doc.label("doc"), bindparam("n").label("n")), engine, json_params=("doc",)
    )
    with engine.connect() as connection:
        (row,) = echo.rows(connection, {"doc": {"a": [1, "x", None]}, "n": "plain"})
        assert row.doc == {"a": [1, "x", None]} and row.n == "plain"
        (row,) = echo.rows(connection, {"doc": None, "n": None})
        assert row.doc is None and row.n is None  # JSON null, as SQLAlchemy's JSON binds None
    with pytest.raises(ArgumentError, match="docs"):
        DriverStatement(select(doc), engine, json_params=("docs",))


@POSTGRESQL
def test_a_statement_without_rows_returns_none(make_app: Callable[..., Flask]) -> None:
    engine = _engine(make_app())
    add = DriverStatement(insert(table("t_rows", column("v"))).values(v=bindparam("v")), engine)
    with engine.connect() as connection:
        connection.exec_driver_sql("CREATE TEMPORARY TABLE t_rows (v varchar(8))")
        assert add.rows(connection, {"v": "a"}) == []
        assert add.rows(connection, {"v": "b"}) == []
        assert connection.exec_driver_sql("SELECT count(*) FROM t_rows").scalar() == 2


def test_parameters_rendered_at_execution_are_refused() -> None:
    engine = create_engine("postgresql+psycopg://")
    values = table("t", column("v"))
    expanding = select(values.c.v).where(values.c.v.in_(bindparam("vs", expanding=True)))
    with pytest.raises(ArgumentError, match="expanding"):
        DriverStatement(expanding, engine)
