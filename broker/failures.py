"""Expected failures, said in one line an operator can act on.

A broker that cannot start, or a command that cannot run, because of something outside the code
(a bad config, a database that does not answer, a Redis that refuses, a port already taken)
explains what failed, where and why, without a traceback: ``database
postgresql://broker:***@db/broker unreachable: connection refused``. :func:`describe` turns such
an exception into that line, or answers ``None`` for anything else (a bug, which keeps its
traceback). Passwords in URLs are masked; SQL statements and their parameters are left out (they
may hold a secret's hash).
"""

from __future__ import annotations

import errno
import re

from redis.exceptions import RedisError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from .config import ConfigError

# libpq: 'connection to server at "db" (10.0.0.5), port 5432 failed: Connection refused'
_FAILED_AT = re.compile(r'.*(?:port \d+|socket "[^"]*") failed: (?P<cause>[^\n]+)$')


def safe_url(url: str) -> str:
    """``url`` with its password masked (``***``)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(unparseable URL)"


def describe(
    exc: BaseException, *, database_url: str | None = None, redis_url: str | None = None
) -> str | None:
    """The one-line explanation of an expected failure, or ``None`` (not an expected one)."""
    if isinstance(exc, ConfigError):
        return "invalid configuration: " + "; ".join(exc.problems)
    if isinstance(exc, DBAPIError):
        where = f"database {safe_url(database_url)}" if database_url else "the database"
        cause = database_cause(exc)
        if exc.connection_invalidated or _is_connect_failure(exc):
            return f"{where} unreachable: {cause}"
        return f"{where} refused a statement: {cause}"
    if isinstance(exc, NoSuchModuleError | ArgumentError):
        where = f"database_url {safe_url(database_url)}" if database_url else "database_url"
        return f"{where}: {exc}"
    if isinstance(exc, RedisError):
        where = f"redis {safe_url(redis_url)}" if redis_url else "redis"
        return f"{where} unreachable: {_first_line(exc) or type(exc).__name__}"
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return f"cannot listen: {exc.strerror or 'address already in use'}"
    return None


def database_cause(exc: DBAPIError) -> str:
    """The driver's reason, in one line: ``connection refused``, ``no such table: clients``."""
    text = _first_line(exc.orig) or type(exc.orig).__name__
    found = _FAILED_AT.search(text)  # libpq: 'connection to server at "h", port p failed: X'
    if found:
        text = found.group("cause")
    text = text.strip().rstrip(".")
    return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text


def _is_connect_failure(exc: DBAPIError) -> bool:
    text = str(exc.orig).lower()
    return any(
        marker in text
        for marker in (
            "connection failed",
            "could not connect",
            "connection refused",
            "unable to open database file",
            "could not translate host name",
            "name or service not known",
            "timeout expired",
            "server closed the connection",
        )
    )


def _first_line(value: object) -> str:
    for line in str(value).splitlines():
        if line.strip():
            return " ".join(line.split())
    return ""
