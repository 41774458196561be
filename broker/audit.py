"""The audit trail: one helper writes every event, to the database and to a log an operator ships.

:func:`record` adds an ``audit_events`` row to the caller's transaction; once that transaction
commits, the same event is written as one JSON line on the ``broker.audit`` logger (a refused,
rolled-back request leaves neither). :func:`write_values` is the same for the end of a sign-in:
one ``INSERT`` on the driver's cursor at once instead of an ORM row flushed with the unit of
work; the token endpoint inserts its events itself (:data:`INSERT_RETURNING` on SQLite; on
PostgreSQL in the same statement as what it records, :func:`insert_when`) and hands them to
:func:`written` or :func:`log_written`. Events never carry tokens, codes or
secrets: only ids, outcomes, reasons and the details the caller names.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

from sqlalchemy import (
    JSON,
    Connection,
    Insert,
    String,
    Table,
    bindparam,
    event,
    insert,
    inspect,
    select,
)
from sqlalchemy.orm import Session

from .db import DriverStatements, UTCDateTime, utcnow
from .models import AuditEvent

AUDIT_LOGGER = "broker.audit"
log = logging.getLogger(AUDIT_LOGGER)
_PENDING = "broker_audit_pending"
_EVENTS: Table = AuditEvent.__table__  # type: ignore[assignment]

EVENT_TYPES = frozenset(
    {
        "login",
        "consent",
        "issue",
        "refresh",
        "revoke",
        "deny",
        "register",
        "exchange",
        "admin",
        "recheck",
    }
)


def record(
    session: Session,
    type: str,
    outcome: str,
    *,
    user_id: str | None = None,
    client_id: str | None = None,
    resource: str | None = None,
    provider: str | None = None,
    actor: str | None = None,
    reason: str | None = None,
    address: str | None = None,
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    """Add one audit event to ``session``'s transaction (logged once it commits)."""
    row = AuditEvent(
        at=utcnow(),
        type=type,
        outcome=outcome,
        user_id=user_id,
        client_id=client_id,
        resource=resource,
        provider=provider,
        actor=actor,
        reason=reason[:255] if reason else None,
        address=address,
        details=details or {},
    )
    session.add(row)
    session.info.setdefault(_PENDING, []).append(row)
    return row


def values(
    type: str,
    outcome: str,
    *,
    at: dt.datetime | None = None,
    user_id: str | None = None,
    client_id: str | None = None,
    resource: str | None = None,
    provider: str | None = None,
    actor: str | None = None,
    reason: str | None = None,
    address: str | None = None,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One event's columns, for :func:`write_values` and for :func:`insert_when`'s
    parameters (which set no ``provider``, ``actor`` or ``reason``)."""
    return {
        "at": at or utcnow(),
        "type": type,
        "outcome": outcome,
        "user_id": user_id,
        "client_id": client_id,
        "resource": resource,
        "provider": provider,
        "actor": actor,
        "reason": reason[:255] if reason else None,
        "address": address,
        "details": details or {},
    }


def write_values(
    session: Session,
    entry: dict[str, Any],
    statements: DriverStatements,
    connection: Connection,
) -> None:
    """:func:`record` for the end of a sign-in: the event's :func:`values` in one ``INSERT``
    (:data:`INSERT_RETURNING`) on the driver's cursor of ``connection``, ``session``'s, in its
    transaction (``statements``: the server's), executed now, logged once the transaction
    commits. Not inside a savepoint: its rollback would not take the line back."""
    assert not session.in_nested_transaction()
    (row,) = statements.rows(connection, INSERT_RETURNING, entry, json_params=("details",))
    written(session, entry, int(row.id))


INSERT_RETURNING = (
    insert(_EVENTS)
    .values(
        {
            name: bindparam(name)
            for name in (
                "at",
                "type",
                "outcome",
                "user_id",
                "client_id",
                "resource",
                "provider",
                "actor",
                "reason",
                "address",
                "details",
            )
        }
    )
    .returning(_EVENTS.c.id)
)
"""One event's ``INSERT``, its parameters the :func:`values` of the event, returning its id:
for a caller that runs it on the driver's cursor (the token endpoint on SQLite) and logs the
event once its transaction commits."""

# The columns an event inserted by a larger statement sets (the others stay NULL).
_WHEN_COLUMNS = ("at", "type", "outcome", "user_id", "client_id", "resource", "address", "details")


def insert_when(condition: Any, *, prefix: str = "event_") -> Insert:
    """An ``INSERT ... SELECT`` of one event, made only when ``condition`` holds: part of a
    PostgreSQL statement that writes the event together with what it records (a
    data-modifying ``WITH``), so both are written or neither. Its parameters are the
    :func:`values` of the event, named with ``prefix``; it returns the new event's ``id``."""
    kinds: dict[str, Any] = {"at": UTCDateTime(), "details": JSON()}
    selected: list[Any] = [
        bindparam(prefix + name, type_=kinds.get(name, String())) for name in _WHEN_COLUMNS
    ]
    return (
        insert(_EVENTS)
        .from_select(list(_WHEN_COLUMNS), select(*selected).where(condition))
        .returning(_EVENTS.c.id)
    )


def when_params(entry: dict[str, Any], prefix: str = "event_") -> dict[str, Any]:
    """The parameters of :func:`insert_when` for ``entry`` (from :func:`values`)."""
    dropped = [name for name in ("provider", "actor", "reason") if entry.get(name)]
    assert not dropped, f"insert_when does not write {dropped}"
    return {prefix + name: entry[name] for name in _WHEN_COLUMNS}


def written(session: Session, entry: dict[str, Any], event_id: int) -> None:
    """``entry`` (from :func:`values`) was inserted as ``event_id`` in ``session``'s
    transaction: it is logged once that commits."""
    entry["id"] = event_id
    session.info.setdefault(_PENDING, []).append(entry)


def as_dict(row: AuditEvent) -> dict[str, Any]:
    """An event as the JSON lines and ``broker audit --json`` show it."""
    return {
        "id": row.id,
        "at": row.at.isoformat() if row.at else None,
        "type": row.type,
        "outcome": row.outcome,
        "user_id": row.user_id,
        "client_id": row.client_id,
        "resource": row.resource,
        "provider": row.provider,
        "actor": row.actor,
        "reason": row.reason,
        "address": row.address,
        "details": row.details or {},
    }


@event.listens_for(Session, "after_commit")
def _log_committed(session: Session) -> None:
    # A savepoint's release fires this event too: its events wait for the outer commit.
    if session.in_nested_transaction():
        return
    pending = session.info.pop(_PENDING, None)
    if not pending or not log.isEnabledFor(logging.INFO):
        return
    for row in pending:
        if isinstance(row, dict):  # written by write_values(): inserted already
            log.info(json.dumps(_line(row), sort_keys=True, default=str))
        # An event added inside a savepoint that was rolled back never reached the database.
        elif inspect(row).persistent:
            log.info(json.dumps(as_dict(row), sort_keys=True, default=str))


def log_written(entries: list[dict[str, Any]]) -> None:
    """Log events inserted with Core (:func:`values` with their ``id``) whose transaction has
    committed, where no session tracks them (the token endpoint's connection)."""
    if not entries or not log.isEnabledFor(logging.INFO):
        return
    for entry in entries:
        log.info(json.dumps(_line(entry), sort_keys=True, default=str))


def _line(values: dict[str, Any]) -> dict[str, Any]:
    """:func:`as_dict` of an event :func:`write_values` or :func:`insert_when` inserted."""
    return {**values, "at": values["at"].isoformat()}


@event.listens_for(Session, "after_rollback")
def _drop_rolled_back(session: Session) -> None:
    # A savepoint's rollback keeps the outer transaction's events (its own are expunged, and
    # skipped at the commit); the outer rollback drops them all.
    if not session.in_nested_transaction():
        session.info.pop(_PENDING, None)
