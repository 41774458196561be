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
    """The database answers and the schema is current."""
    b = broker()
    try:
        with b.db.read() as session:
            session.execute(text("SELECT 1"))
    except SQLAlchemyError:
        return Response(
            json.dumps({"status": "unavailable", "database": "down"}),
            status=503,
            mimetype="application/json",
        )
    return Response(json.dumps({"status": "ok"}), mimetype="application/json")
