"""The token endpoint's statements on the driver's cursor (``broker.db.DriverStatement``, used
on PostgreSQL): rows as SQLAlchemy's types would give them, errors as SQLAlchemy's, without the
statement's parameters (a token's hash, a sealed successor) in their message."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable

import pytest
from flask import Flask
from sqlalchemy import bindparam, column, event, insert, table
from sqlalchemy.exc import DataError

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
