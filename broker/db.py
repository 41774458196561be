"""Storage: the SQLAlchemy 2 engine and sessions.

SQLite (WAL) is the embedded default, PostgreSQL (psycopg 3) the production database. Every write
that decides a race (redeeming a code, rotating a refresh token, consuming an upstream ``state``) is
a conditional ``UPDATE ... WHERE <still unused>`` whose row count says who won, so correctness never
depends on process memory and several workers or hosts can share one database.

Dropped PostgreSQL connections (a server restart, a fail-over, an idle timeout) are noticed without
a round trip: a pooled connection whose socket has something to read while it sits idle in the pool
has been closed by the server (PostgreSQL sends nothing unasked on an idle connection but its
farewell), and is replaced at checkout (:func:`_configure_postgresql`). A connection that dies
unseen fails its first statement; :func:`first_read` retries that statement once on a fresh
connection (nothing was written yet). There is no ``pool_pre_ping``: it would cost every request a
round trip.
"""

from __future__ import annotations

import datetime as dt
import select
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Json
from sqlalchemy import DateTime, MetaData, create_engine, event
from sqlalchemy.engine import Connection, CursorResult, Engine
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


READ_ONLY = "broker_read_only"
_T = TypeVar("_T")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite returns naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Database:
    """The engine and the session factory of one application."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        self.engine = make_engine(url, echo=echo)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        # The token endpoint's sessions: on PostgreSQL outside any transaction block (each
        # statement commits by itself, so no BEGIN and COMMIT round trips), for requests whose
        # every write that must be atomic is one statement (oauth2/rfc6749.py); on SQLite the
        # same as ``sessions``.
        self.statement_sessions = (
            self.sessions
            if self.is_sqlite
            else sessionmaker(
                self.engine.execution_options(isolation_level="AUTOCOMMIT"),
                expire_on_commit=False,
            )
        )

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session whose transaction commits on success and rolls back on any error."""
        with self.sessions() as session, session.begin():
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reads only: on SQLite it does not take the write lock, so reading the
        JWKS never waits behind token requests."""
        with self.sessions() as session:
            session.connection(execution_options={READ_ONLY: True})
            try:
                yield session
            finally:
                session.rollback()

    def dispose(self) -> None:
        self.engine.dispose()


def make_engine(url: str, *, echo: bool = False) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, echo=echo, connect_args={"timeout": 30})
        _configure_sqlite(engine)
        return engine
    engine = create_engine(url, echo=echo, pool_size=5, max_overflow=10)
    if engine.dialect.name == "postgresql":
        _configure_postgresql(engine)
    return engine


def _configure_postgresql(engine: Engine) -> None:
    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        # An idle connection has nothing to read unless the server closed it (or said why it is
        # about to): the pool then discards it and checks out another (DisconnectionError).
        if dbapi_connection.closed or dbapi_connection.broken or _readable(dbapi_connection):
            raise DisconnectionError("the server closed this pooled connection")


def _readable(dbapi_connection: Any) -> bool:
    try:
        fd = dbapi_connection.pgconn.socket
    except psycopg.Error:  # the connection is lost: no socket any more
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let us issue BEGIN ourselves (pysqlite's own transaction handling defers it).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # IMMEDIATE takes the write lock up front: two workers never both read a row as unused
        # and then race to upgrade to a write lock (which SQLite answers with an instant BUSY).
        # Sessions that only read (Database.read) start a deferred transaction instead.
        if connection.get_execution_options().get(READ_ONLY):
            connection.exec_driver_sql("BEGIN")
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")


def first_read(
    session: Session,
    statement: Any,
    params: Mapping[str, Any],
    connection: Callable[[], Connection] | None = None,
) -> CursorResult[Any]:
    """Execute the first statement of ``session``'s transaction, a read, with Core on the
    session's connection (``connection()``, when the caller keeps it); when the pooled
    connection turns out dead (a disconnect, which SQLAlchemy answers by invalidating the
    pool's older connections), run it once more on a fresh one. Nothing was written yet, so
    the retry cannot write twice."""
    connect = connection or session.connection
    return _retried(session, lambda: connect().execute(statement, params))


def first_rows(
    session: Session,
    statement: DriverStatement,
    params: Mapping[str, Any],
    connection: Callable[[], Connection] | None = None,
) -> list[DriverRow]:
    """:func:`first_read` of a :class:`DriverStatement`."""
    connect = connection or session.connection
    return _retried(session, lambda: statement.rows(connect(), params))


def _retried(session: Session, run: Callable[[], _T]) -> _T:
    try:
        return run()
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        session.rollback()
        return run()


class DriverRow:
    """A result row of :class:`DriverStatement`: its columns by label, as attributes and in
    ``_mapping`` (as a SQLAlchemy ``Row`` offers them)."""

    __slots__ = ("_mapping",)

    def __init__(self, mapping: dict[str, Any]) -> None:
        self._mapping = mapping

    def __getattr__(self, name: str) -> Any:
        try:
            return self._mapping[name]
        except KeyError:
            raise AttributeError(name) from None


class DriverStatement:
    """A Core statement compiled once for PostgreSQL and run on the psycopg cursor of a
    SQLAlchemy connection, for the token endpoint's hot path: there SQLAlchemy's work per
    execution (the compiled-cache lookup, an execution context, the result's metadata and
    processors) cost more CPU than the statement's own round trip. What SQLAlchemy's types would
    do is done here: ``json`` parameters are wrapped for the driver, datetimes come back in UTC.
    A driver error is raised as SQLAlchemy's (``DBAPIError`` and its subclasses, parameters
    hidden), and a lost connection is invalidated first, as SQLAlchemy does, so that
    :func:`first_rows` retries and the app's handler answers 503 as for any statement. The
    engine's ``before_cursor_execute`` and ``after_cursor_execute`` listeners see the
    statement as they see any other."""

    def __init__(
        self, statement: Any, engine: Engine, *, json_params: tuple[str, ...] = ()
    ) -> None:
        self.dialect = engine.dialect
        self.sql = str(statement.compile(dialect=self.dialect))
        self.json_params = json_params

    def rows(self, connection: Connection, params: Mapping[str, Any]) -> list[DriverRow]:
        values = dict(params)
        for name in self.json_params:
            values[name] = Json(values[name])
        proxied = connection.connection
        driver = proxied.driver_connection
        assert driver is not None
        try:
            with driver.cursor(row_factory=dict_row) as cursor:
                # SQLAlchemy's cursor events, for whatever observes the engine's statements.
                dispatch = connection.dispatch
                dispatch.before_cursor_execute(connection, cursor, self.sql, values, None, False)
                cursor.execute(self.sql, values)
                found = cursor.fetchall() if cursor.description is not None else []
                dispatch.after_cursor_execute(connection, cursor, self.sql, values, None, False)
        except psycopg.Error as exc:
            lost = self.dialect.is_disconnect(cast(Any, exc), proxied, None)
            if lost:
                connection.invalidate(exc)
            raise DBAPIError.instance(
                self.sql,
                None,
                exc,
                psycopg.Error,
                hide_parameters=True,
                connection_invalidated=lost,
                dialect=self.dialect,
            ) from exc
        return [DriverRow({k: _utc(v) for k, v in row.items()}) for row in found]


def _utc(value: Any) -> Any:
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        return value.astimezone(dt.UTC)
    return value


def rows_affected(session: Session, statement: Any) -> int:
    """Execute an UPDATE/DELETE and return how many rows it changed (who won a race)."""
    result = session.execute(statement)
    return int(getattr(result, "rowcount", 0))
