"""Storage: the SQLAlchemy 2 engine and sessions.

SQLite (WAL) is the embedded default, PostgreSQL (psycopg 3) the production database. Every write
that decides a race (redeeming a code, rotating a refresh token, consuming an upstream ``state``) is
a conditional ``UPDATE ... WHERE <still unused>`` whose row count says who won, so correctness never
depends on process memory and several workers or hosts can share one database.

Dropped PostgreSQL connections (a server restart, a fail-over, an idle timeout) are noticed without
a round trip: a pooled connection whose socket has something to read while it sits idle in the pool
has been closed by the server (PostgreSQL sends nothing unasked on an idle connection but its
farewell), and is replaced at checkout (:func:`_configure_postgresql`). A connection that dies
unseen fails its first statement; :func:`first_rows` retries that statement once on a fresh
connection (nothing was written yet). There is no ``pool_pre_ping``: it would cost every request a
round trip.
"""

from __future__ import annotations

import copy
import datetime as dt
import select
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple, cast

import psycopg
from psycopg.rows import tuple_row
from psycopg.types.json import Json
from sqlalchemy import (
    JSON,
    DateTime,
    Insert,
    MetaData,
    Table,
    bindparam,
    create_engine,
    event,
    insert,
    text,
)
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    DisconnectionError,
    InvalidRequestError,
)
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


READ_ONLY = "broker_read_only"


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

    # Sent on the driver's cursor (SQLAlchemy's execution of a statement without parameters or
    # rows cost more CPU than SQLite's own work for it), with the engine's cursor events and
    # SQLAlchemy's errors as for any statement: a lock not obtained is OperationalError.
    begins = {
        False: SQLiteStatement(text("BEGIN IMMEDIATE"), engine),
        True: SQLiteStatement(text("BEGIN"), engine),
    }

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # IMMEDIATE takes the write lock up front: two workers never both read a row as unused
        # and then race to upgrade to a write lock (which SQLite answers with an instant BUSY).
        # Sessions that only read (Database.read) start a deferred transaction instead.
        read_only = bool(connection.get_execution_options().get(READ_ONLY))
        begins[read_only].rows(connection, {}, begin=False)


def first_rows(
    rollback: Callable[[], None],
    statement: DriverStatement,
    params: Mapping[str, Any],
    connection: Callable[[], Connection],
) -> list[DriverRow]:
    """Execute the first statement of a request, a read, on the request's connection
    (``connection()``), in no transaction of its own (``begin=False``: on PostgreSQL the token
    endpoint's connection is outside any transaction block already; on SQLite the read takes no
    write lock, which the request's first write takes): every write that follows is conditional
    on what it claims, not on this read's snapshot. When the pooled connection turns out dead (a
    disconnect, which SQLAlchemy answers by invalidating the pool's older connections), roll
    back (``rollback``) and run it once more on a fresh one. Nothing was written yet, so the
    retry cannot write twice."""
    try:
        return statement.rows(connection(), params, begin=False)
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        rollback()
        return statement.rows(connection(), params, begin=False)


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


class DriverStatement(ABC):
    """A Core statement compiled once for the engine's dialect and run on the driver's cursor
    of a SQLAlchemy connection, for the hot paths (the token endpoint, the end of a sign-in:
    :class:`DriverStatements`): there SQLAlchemy's work per
    execution (the compiled-cache lookup, an execution context, the parameters' and the
    result's processors looked up, the result's metadata) cost more CPU than the statement
    itself. :func:`driver_statement` makes the one for an engine: :class:`PsycopgStatement`
    (PostgreSQL) or :class:`SQLiteStatement`. What SQLAlchemy's types do to parameters and rows
    is done here, worked out once per statement. Parameters are taken by name, each converted
    once however often the statement uses it; a missing one is an error before anything is
    sent, as in SQLAlchemy. A driver error is raised as SQLAlchemy's (``DBAPIError`` and its
    subclasses, parameters hidden), and a lost connection is invalidated first, as SQLAlchemy
    does, so that :func:`first_rows` retries and the app's handler answers 503 as for any
    statement. The engine's ``before_cursor_execute`` and ``after_cursor_execute`` listeners see
    the statement as they see any other. ``json_params`` name the parameters bound as JSON
    whatever their type. Rows come as :class:`DriverRow` (none for a statement without a
    result)."""

    driver_error: type[Exception]
    """The driver's base exception, which becomes SQLAlchemy's."""

    def __init__(
        self, compiled: SQLCompiler, dialect: Dialect, json_params: tuple[str, ...]
    ) -> None:
        if compiled.post_compile_params or compiled.literal_execute_params:
            raise ArgumentError(
                "a statement run on the driver's cursor is compiled once: it cannot have "
                "parameters rendered at execution (an expanding IN, literal_execute)"
            )
        if compiled.insert_prefetch or compiled.update_prefetch:
            raise ArgumentError(
                "a statement run on the driver's cursor does not compute column defaults: "
                "every column with a Python-side default needs a value in the statement"
            )
        self.dialect = dialect
        self.sql: str = compiled.string
        self.names: tuple[str, ...] = tuple(dict.fromkeys(compiled.positiontup or ()))
        unused = sorted(set(json_params) - set(self.names))
        if unused:
            raise ArgumentError(f"json_params not in the statement: {', '.join(unused)}")
        self.json_params = json_params
        self._valued = {
            name: bind
            for name, bind in compiled.binds.items()
            if not bind.required and name in self.names
        }

    @abstractmethod
    def rows(
        self, connection: Connection, params: Mapping[str, Any], *, begin: bool = True
    ) -> list[DriverRow]:
        """Execute the statement with ``params`` (by name; others are ignored) on
        ``connection``'s driver connection; its rows. ``begin=False``: a read that needs no
        transaction of its own (SQLite: :class:`SQLiteStatement`)."""

    def _values(self, params: Mapping[str, Any]) -> list[Any]:
        """The parameters in the order of :attr:`names`."""
        try:
            return [params[name] for name in self.names]
        except KeyError:
            return self._filled(params)

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

    def _error(self, exc: Exception, connection: Connection, proxied: Any) -> BaseException:
        """``exc`` as SQLAlchemy raises it (a driver's error as ``DBAPIError``, any other as
        ``StatementError``), without the parameters; a lost connection invalidated first."""
        lost = isinstance(exc, self.driver_error) and self.dialect.is_disconnect(
            cast(Any, exc), proxied, None
        )
        if lost:
            connection.invalidate(exc)
        raised = DBAPIError.instance(
            self.sql,
            None,
            exc,
            self.driver_error,
            hide_parameters=True,
            connection_invalidated=lost,
            dialect=self.dialect,
        )
        return cast(BaseException, raised)


def driver_statement(
    statement: Any, engine: Engine, *, json_params: tuple[str, ...] = ()
) -> DriverStatement:
    """``statement`` compiled for ``engine``'s driver (:class:`DriverStatement`)."""
    name = engine.dialect.name
    if name == "postgresql":
        return PsycopgStatement(statement, engine, json_params=json_params)
    if name == "sqlite":
        return SQLiteStatement(statement, engine, json_params=json_params)
    raise ArgumentError(f"no driver statements for {name}")


class DriverStatements:
    """Statements built once (module constants, told apart by identity) run on the driver's
    cursor of ``engine``'s connections, each compiled (:func:`driver_statement`) on its first
    run: for a request path that sends several statements, such as the end of a sign-in, where
    SQLAlchemy's and the driver's work per execution is most of each statement's cost. Two
    threads compiling the same statement at once both get the same result."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._compiled: dict[int, tuple[Any, DriverStatement]] = {}

    def rows(
        self,
        connection: Connection,
        statement: Any,
        params: Mapping[str, Any],
        *,
        json_params: tuple[str, ...] = (),
    ) -> list[DriverRow]:
        """Run ``statement`` with ``params`` on ``connection`` (in its transaction, which is
        begun when none is in progress); its rows. ``json_params``: the parameters bound as
        JSON (:class:`DriverStatement`), the same at every call."""
        entry = self._compiled.get(id(statement))
        if entry is None or entry[0] is not statement:
            entry = (
                statement,
                driver_statement(statement, self.engine, json_params=json_params),
            )
            self._compiled[id(statement)] = entry
        compiled = entry[1]
        assert compiled.json_params == json_params, "one statement, one set of JSON parameters"
        return compiled.rows(connection, params)


def insert_every_column(table: Table) -> Insert:
    """An ``INSERT`` of one row of ``table`` with a value for every column, each parameter
    named as its column: what a driver statement can run (it computes no column default)."""
    return insert(table).values(
        {column.key: bindparam(column.key, type_=column.type) for column in table.columns}
    )


class PsycopgStatement(DriverStatement):
    """A :class:`DriverStatement` on psycopg's cursor. Of SQLAlchemy's types only what matters
    here is done: ``json_params`` are wrapped for the driver, ``timestamptz`` columns come back
    in UTC (psycopg loads the rest as SQLAlchemy's types would leave it, JSON decoded).

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

    driver_error = psycopg.Error

    def __init__(
        self, statement: Any, engine: Engine, *, json_params: tuple[str, ...] = ()
    ) -> None:
        compiled = statement.compile(dialect=_numbered(engine.dialect))
        super().__init__(compiled, engine.dialect, json_params)
        # Encoded once; and the same object every time, which psycopg's cursor needs to keep
        # its adapters from one execution to the next.
        self._query: str | bytes = self.sql.encode() if self.sql.isascii() else self.sql
        self._json = tuple(i for i, name in enumerate(self.names) if name in json_params)
        self._shape: _Shape | None = None

    def rows(
        self, connection: Connection, params: Mapping[str, Any], *, begin: bool = True
    ) -> list[DriverRow]:
        values = self._values(params)
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
            raise self._error(exc, connection, proxied) from exc
        return shape.rows(found)

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
                (i, key, _in_utc)
                for key, i in last.items()
                if description[i].type_code == _TIMESTAMPTZ
            )
            shape = _Shape(keys, utc)
        self._shape = shape
        return shape


_TIMESTAMPTZ = psycopg.postgres.types["timestamptz"].oid


def _in_utc(value: dt.datetime | None) -> dt.datetime | None:
    return None if value is None else value.astimezone(dt.UTC)


class SQLiteStatement(DriverStatement):
    """A :class:`DriverStatement` on the sqlite3 cursor. SQLAlchemy's types are applied as
    SQLAlchemy applies them, their processors taken once from the compiled statement: a
    parameter's bind processor (``UTCDateTime``: an aware datetime in UTC, stored as text in
    SQLAlchemy's format; JSON serialised), a column's result processor (that text parsed back
    into an aware UTC datetime, JSON decoded, booleans from integers). The result's labels and
    types are the compiled statement's, as SQLAlchemy's rows have them.

    The statements run in the SQLAlchemy connection's transaction, which this begins when none
    is in progress (as SQLAlchemy's autobegin would: the engine's ``begin`` listener sends
    ``BEGIN IMMEDIATE``): the sqlite3 connection is in autocommit mode (``_configure_sqlite``),
    so a statement sent on its cursor outside a transaction would commit by itself. A read
    asked to (``begin=False``: the token endpoint's first statement) runs in no transaction when
    none is in progress: its own implicit one, which holds the shared lock for that statement
    only, so the write lock a request's first write takes is not held while the request does
    everything else (validating, signing) between its read and its writes. The cursor
    is kept with the pooled connection, as psycopg's is (:class:`PsycopgStatement`); sqlite3
    keeps the prepared statement, by its SQL, in the connection's cache."""

    driver_error = sqlite3.Error

    def __init__(
        self, statement: Any, engine: Engine, *, json_params: tuple[str, ...] = ()
    ) -> None:
        dialect = engine.dialect
        compiled = statement.compile(dialect=dialect)
        super().__init__(compiled, dialect, json_params)
        placeholders = tuple(compiled.positiontup or ())
        index = {name: i for i, name in enumerate(self.names)}
        # qmark placeholders: a parameter the statement uses again is sent again.
        self._order: tuple[int, ...] | None = (
            None if placeholders == self.names else tuple(index[name] for name in placeholders)
        )
        processors: dict[str, Any] = dict(compiled._bind_processors)
        json_processor = JSON()._cached_bind_processor(dialect)
        processors.update(dict.fromkeys(json_params, json_processor))
        if not all(callable(process) for process in processors.values()):
            raise ArgumentError("a statement run on the driver's cursor has no tuple parameters")
        self._processors = tuple(
            (i, processors[name]) for i, name in enumerate(self.names) if name in processors
        )
        columns = compiled._result_columns
        keys = tuple(column.keyname for column in columns)
        last = {key: i for i, key in enumerate(keys)}  # a repeated label keeps its last
        processed = tuple(
            (i, key, process)
            for key, i in last.items()
            if (process := columns[i].type._cached_result_processor(dialect, None)) is not None
        )
        self._shape = _Shape(keys or None, processed)

    def rows(
        self, connection: Connection, params: Mapping[str, Any], *, begin: bool = True
    ) -> list[DriverRow]:
        values = self._values(params)
        try:
            for i, process in self._processors:
                values[i] = process(values[i])
        except Exception as exc:  # as SQLAlchemy raises a processor's error: StatementError
            raise self._error(exc, connection, None) from exc
        if self._order is not None:
            values = [values[i] for i in self._order]
        if begin and not connection.in_transaction():
            connection.begin()
        proxied = connection.connection
        driver = proxied.driver_connection
        try:
            cursor = proxied.info.get(self)
            if cursor is None or cursor.connection is not driver:
                cursor = proxied.info[self] = cast(sqlite3.Connection, driver).cursor()
            # SQLAlchemy's cursor events, for whatever observes the engine's statements.
            dispatch = connection.dispatch
            dispatch.before_cursor_execute(connection, cursor, self.sql, values, None, False)
            cursor.execute(self.sql, values)
            found = cursor.fetchall() if self._shape.keys is not None else []
            dispatch.after_cursor_execute(connection, cursor, self.sql, values, None, False)
        except sqlite3.Error as exc:
            raise self._error(exc, connection, proxied) from exc
        return self._shape.rows(found)


class _Shape(NamedTuple):
    """The labels of a :class:`DriverStatement`'s result (``None``: it returns no rows), and
    the positions and labels of its columns to process, with their processors."""

    keys: tuple[str, ...] | None
    processed: tuple[tuple[int, str, Callable[[Any], Any]], ...]

    def rows(self, found: list[tuple[Any, ...]]) -> list[DriverRow]:
        keys, processed = self
        if keys is None:
            return []
        rows = []
        for row in found:
            mapping = dict(zip(keys, row, strict=True))
            for i, key, process in processed:
                mapping[key] = process(row[i])
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
