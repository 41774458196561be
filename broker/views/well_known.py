"""Metadata (RFC 8414, also under OpenID discovery's name) and the JWKS."""

from __future__ import annotations

import json

from flask import Blueprint, Flask
from werkzeug.wrappers import Response

from ..keys import JWKS_MAX_AGE
from ..oauth2.rfc8414 import server_metadata, well_known_paths
from ._web import broker

bp = Blueprint("well_known", __name__)


def _json(body: object, max_age: int) -> Response:
    return Response(
        json.dumps(body),
        mimetype="application/json",
        headers={"Cache-Control": f"public, max-age={max_age}"},
    )


def metadata() -> Response:
    """Authorization server metadata."""
    b = broker()
    return _json(server_metadata(b.settings, b.server.grant_types_supported()), 3600)


@bp.record_once
def _register_metadata_routes(state: object) -> None:
    app: Flask = state.app  # type: ignore[attr-defined]
    settings = app.extensions["broker"].settings
    for i, path in enumerate(well_known_paths(settings.issuer)):
        app.add_url_rule(path, f"well_known.metadata_{i}", metadata, methods=["GET"])


@bp.get("/jwks.json")
def jwks() -> Response:
    """The public signing keys (next, active and recently retired)."""
    b = broker()
    with b.db.read() as session:
        body = b.keys.jwks(session)
    # Short enough that a rotation's next key is seen well before it signs anything.
    return _json(body, JWKS_MAX_AGE)
