"""The audit trail has one writer (:func:`broker.audit.record`): the row in the caller's
transaction, and the same event as a JSON line on ``broker.audit`` once it commits."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from broker import audit
from broker.models import AuditEvent
from tests.support import authorize_params, pkce, query, sign_in_local

BROKER = Path(__file__).resolve().parent.parent / "broker"


def _constructs_audit_event(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and (
            (isinstance(node.func, ast.Name) and node.func.id == "AuditEvent")
            or (isinstance(node.func, ast.Attribute) and node.func.attr == "AuditEvent")
        )
    ]


def test_only_the_audit_module_constructs_audit_events() -> None:
    offenders = [
        f"{path.relative_to(BROKER.parent)}:{line}"
        for path in sorted(BROKER.rglob("*.py"))
        if path != BROKER / "audit.py"
        for line in _constructs_audit_event(path)
    ]
    assert not offenders, f"audit rows built by hand (use broker.audit.record): {offenders}"


def _lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == audit.AUDIT_LOGGER]


def _rows(app: Flask) -> list[AuditEvent]:
    with app.extensions["broker"].db.session() as session:
        return list(session.scalars(select(AuditEvent).order_by(AuditEvent.id)))


def test_sign_in_and_consent_are_logged_as_committed(
    app: Flask,
    client: FlaskClient,
    registered: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, challenge = pkce()
    params = authorize_params(registered["client_id"], challenge)
    caplog.set_level(logging.INFO, logger=audit.AUDIT_LOGGER)
    caplog.clear()
    response = sign_in_local(client, params)
    assert response.status_code == 302 and "code" in query(response.headers["Location"])
    lines = _lines(caplog)
    assert [(e["type"], e["outcome"]) for e in lines] == [
        ("consent", "success"),
        ("login", "success"),
    ]
    consent, login = lines
    assert consent["client_id"] == login["client_id"] == registered["client_id"]
    assert login["provider"] == "local" and login["user_id"] == consent["user_id"]
    assert consent["details"]["scopes"] == ["demo:read"]
    # The lines are the committed rows, ids included.
    by_id = {row.id: audit.as_dict(row) for row in _rows(app)}
    assert all(json.loads(json.dumps(by_id[e["id"]], default=str)) == e for e in lines)


def test_refusals_are_logged(
    app: Flask,
    client: FlaskClient,
    registered: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=audit.AUDIT_LOGGER)
    caplog.clear()
    _, challenge = pkce()
    response = sign_in_local(
        client, authorize_params(registered["client_id"], challenge), approve=False
    )
    assert response.status_code == 302
    assert query(response.headers["Location"])["error"] == "access_denied"
    _, challenge = pkce()
    response = sign_in_local(
        client, authorize_params(registered["client_id"], challenge), password="wrong"
    )
    assert response.status_code == 400
    events = [(e["type"], e["outcome"], e["reason"]) for e in _lines(caplog)]
    assert events == [("consent", "denied", "user_denied"), ("login", "failure", "bad_credentials")]
    assert [(r.type, r.outcome) for r in _rows(app)][-2:] == [
        ("consent", "denied"),
        ("login", "failure"),
    ]


def test_only_committed_events_are_logged(app: Flask, caplog: pytest.LogCaptureFixture) -> None:
    """A rolled-back transaction logs nothing; a savepoint neither logs its events before the
    outer commit nor, when rolled back, takes the outer transaction's events with it."""
    caplog.set_level(logging.INFO, logger=audit.AUDIT_LOGGER)
    db = app.extensions["broker"].db
    with pytest.raises(RuntimeError), db.session() as session:
        audit.record(session, "admin", "undone")
        with session.begin_nested():
            audit.record(session, "admin", "undone-too")
        raise RuntimeError
    with db.session() as session:
        audit.record(session, "admin", "before")
        with pytest.raises(RuntimeError), session.begin_nested():
            audit.record(session, "admin", "savepoint-undone")
            session.flush()
            raise RuntimeError
        with session.begin_nested():
            audit.record(session, "admin", "savepoint")
        assert not _lines(caplog)  # nothing before the outer commit
        audit.record(session, "admin", "after")
    assert [e["outcome"] for e in _lines(caplog)] == ["before", "savepoint", "after"]
    assert [r.outcome for r in _rows(app) if r.type == "admin"] == [
        "before",
        "savepoint",
        "after",
    ]
