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

import copy
import datetime as dt
import select
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple, TypeVar, cast

import psycopg
from psycopg.rows import tuple_row
from psycopg.types.json import Json
from sqlalchemy import DateTime, MetaData, create_engine, event
from sqlalchemy.engine import Connection, CursorResult, Dialect, Engine
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    DisconnectionError,
    InvalidRequestError,
)
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
        # The token endpoint's connections: on PostgreSQL outside any transaction block (each
        # statement commits by itself, so no BEGIN and COMMIT round trips), for requests whose
        # every write that must be atomic is one statement (oauth2/rfc6749.py).
        self._statements = (
            self.engine
            if self.is_sqlite
            else self.engine.execution_options(isolation_level="AUTOCOMMIT")
        )

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    def statement_connection(self) -> Connection:
        """A connection for the token endpoint (no ORM session: see
        ``broker.oauth2.server.RequestState``); on PostgreSQL outside any transaction block."""
        return self._statements.connect()

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
    rollback: Callable[[], None],
    statement: Any,
    params: Mapping[str, Any],
    connection: Callable[[], Connection],
) -> CursorResult[Any]:
    """Execute the first statement of a request's transaction, a read, with Core on the
    request's connection (``connection()``); when the pooled connection turns out dead (a
    disconnect, which SQLAlchemy answers by invalidating the pool's older connections), roll
    back (``rollback``) and run it once more on a fresh one. Nothing was written yet, so the
    retry cannot write twice."""
    return _retried(rollback, lambda: connection().execute(statement, params))


def first_rows(
    rollback: Callable[[], None],
    statement: DriverStatement,
    params: Mapping[str, Any],
    connection: Callable[[], Connection],
) -> list[DriverRow]:
    """:func:`first_read` of a :class:`DriverStatement`."""
    return _retried(rollback, lambda: statement.rows(connection(), params))


def _retried(rollback: Callable[[], None], run: Callable[[], _T]) -> _T:
    try:
        return run()
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        rollback()
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
    statement as they see any other.

    psycopg's own work per execution is cut down too. The statement is compiled with
    PostgreSQL's numbered placeholders (``$1``: each parameter once, however often the statement
    uses it) for a raw cursor, which sends the query as it is: no parsing of placeholders, no
    mapping of names, per execution. The cursor is kept with the pooled connection (in the
    pool's ``info`` of it, dropped when the connection is replaced), so its adapters are looked
    up once rather than for every new cursor; it holds at most its last result. The statement
    is prepared on its first execution on a connection rather than on its sixth (psycopg's
    threshold), so a connection whose prepared statements a ``ROLLBACK`` discarded is not
    planned anew five times over. Rows are plain tuples, their labels and which of them are
    ``timestamptz`` read from the first execution's result description."""

    def __init__(
        self, statement: Any, engine: Engine, *, json_params: tuple[str, ...] = ()
    ) -> None:
        self.dialect = engine.dialect
        compiled = statement.compile(dialect=_numbered(self.dialect))
        if compiled.post_compile_params or compiled.literal_execute_params:
            raise ArgumentError(
                "a statement run on the driver's cursor is compiled once: it cannot have "
                "parameters rendered at execution (an expanding IN, literal_execute)"
            )
        self.sql: str = compiled.string
        # Encoded once; and the same object every time, which psycopg's cursor needs to keep
        # its adapters from one execution to the next.
        self._query: str | bytes = self.sql.encode() if self.sql.isascii() else self.sql
        self.names: tuple[str, ...] = tuple(compiled.positiontup or ())
        unused = sorted(set(json_params) - set(self.names))
        if unused:
            raise ArgumentError(f"json_params not in the statement: {', '.join(unused)}")
        self.json_params = json_params
        self._json = tuple(i for i, name in enumerate(self.names) if name in json_params)
        self._valued = {
            name: bind
            for name, bind in compiled.binds.items()
            if not bind.required and name in self.names
        }
        self._shape: _Shape | None = None

    def rows(self, connection: Connection, params: Mapping[str, Any]) -> list[DriverRow]:
        try:
            values = [params[name] for name in self.names]
        except KeyError:
            values = self._filled(params)
        for i in self._json:
            values[i] = Json(values[i])
        proxied = connection.connection
        driver = proxied.driver_connection
        assert driver is not None
        try:
            cursor = proxied.info.get(self)
            if cursor is None or cursor.closed or cursor.connection is not driver:
                cursor = proxied.info[self] = psycopg.RawCursor(driver, row_factory=tuple_row)
            # SQLAlchemy's cursor events, for whatever observes the engine's statements.
            dispatch = connection.dispatch
            dispatch.before_cursor_execute(connection, cursor, self.sql, values, None, False)
            cursor.execute(self._query, values, prepare=True)
            shape = self._shape or self._described(cursor)
            found = cursor.fetchall() if shape.keys is not None else []
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
        return shape.rows(found)

    def _filled(self, params: Mapping[str, Any]) -> list[Any]:
        """The parameters when ``params`` lacks some: those the statement carries a value for
        (``literal()``, ``values(v=...)``) take it, as SQLAlchemy gives it; any other is an
        error, as in SQLAlchemy (bound as NULL it would match nothing, silently)."""
        missing = sorted({name for name in self.names if name not in params} - set(self._valued))
        if missing:
            raise InvalidRequestError(
                f"A value is required for bind parameter {', '.join(map(repr, missing))}"
            )
        return [
            params[name] if name in params else self._valued[name].effective_value
            for name in self.names
        ]

    def _described(self, cursor: psycopg.RawCursor[tuple[Any, ...]]) -> _Shape:
        """The result's shape, the same at every execution of the same SQL. Only
        ``timestamptz`` columns (a domain over it is described as it) load as aware
        datetimes: those are the ones to put in UTC."""
        description = cursor.description
        if description is None:
            shape = _Shape(None, ())
        else:
            keys = tuple(column.name for column in description)
            last = {key: i for i, key in enumerate(keys)}  # a repeated label keeps its last
            utc = tuple(
                (i, key) for key, i in last.items() if description[i].type_code == _TIMESTAMPTZ
            )
            shape = _Shape(keys, utc)
        self._shape = shape
        return shape


_TIMESTAMPTZ = psycopg.postgres.types["timestamptz"].oid


class _Shape(NamedTuple):
    """The labels of a :class:`DriverStatement`'s result (``None``: it returns no rows), and
    the positions and labels of its ``timestamptz`` columns."""

    keys: tuple[str, ...] | None
    utc: tuple[tuple[int, str], ...]

    def rows(self, found: list[tuple[Any, ...]]) -> list[DriverRow]:
        keys, utc = self
        if keys is None:
            return []
        rows = []
        for row in found:
            mapping = dict(zip(keys, row, strict=True))
            for i, key in utc:
                value = row[i]
                if value is not None:
                    mapping[key] = value.astimezone(dt.UTC)
            rows.append(DriverRow(mapping))
        return rows


def _numbered(dialect: Dialect) -> Dialect:
    """``dialect`` compiling to PostgreSQL's numbered placeholders (SQLAlchemy's
    ``numeric_dollar`` paramstyle, as for asyncpg), everything else the same: a copy, the
    engine's own dialect keeps psycopg's paramstyle. Its identifier preparer is its own, as it
    doubles ``%`` only for psycopg's paramstyles."""
    numbered = copy.copy(dialect)
    numbered.paramstyle = "numeric_dollar"
    numbered.positional = True
    numbered.identifier_preparer = numbered.preparer(numbered)
    return numbered


def rows_affected(session: Session, statement: Any) -> int:
    """Execute an UPDATE/DELETE and return how many rows it changed (who won a race)."""
    result = session.execute(statement)
    return int(getattr(result, "rowcount", 0))
