"""Liveness and readiness."""

from __future__ import annotations

import json

from flask import Blueprint
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.wrappers import Response

from ._web import broker

bp = Blueprint("health", __name__)


@bp.get("/health")
def health() -> Response:
    """The process answers."""
    return Response(json.dumps({"status": "ok"}), mimetype="application/json")


@bp.get("/ready")
def ready() -> Response:
    """The database answers and this process's secrets open the keys that sign."""
    b = broker()
    try:
        with b.db.read() as session:
            session.execute(text("SELECT 1"))
            # Start-up checked it; a host with another secret_key may have created one since.
            _, unopened = b.keys.unopened(session)
    except SQLAlchemyError:
        return _unavailable({"database": "down"})
    if unopened:
        return _unavailable({"signing_keys": "unreadable"})
    return Response(json.dumps({"status": "ok"}), mimetype="application/json")


def _unavailable(why: dict[str, str]) -> Response:
    return Response(
        json.dumps({"status": "unavailable", **why}), status=503, mimetype="application/json"
    )
