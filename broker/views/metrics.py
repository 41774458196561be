"""``/metrics`` (docs/metrics.md), and what every request adds to it: its latency by endpoint,
the OAuth error it answered with, the outcome of a registration.

The latency is measured from Flask's ``request_started`` to its ``request_finished`` signal, so
it covers every ``before_request`` and ``after_request`` function, whichever module registered
them first, and the answers they give themselves (a rate limit, a body too large).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import time
from urllib.parse import parse_qs, urlsplit

from flask import Blueprint, Flask, abort, g, request, request_finished, request_started
from werkzeug.wrappers import Response

from .. import get_broker, metrics
from ._web import NO_STORE, broker

log = logging.getLogger(__name__)
bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def scrape() -> Response:
    """The Prometheus scrape, when ``metrics`` serves it on this port; 404 otherwise."""
    settings = broker().settings.metrics
    if not settings.on_main_port:
        abort(404)  # off, or served by its own listener (metrics.bind)
    if settings.bearer_token is not None:
        refused = _check_bearer(settings.bearer_token)
        if refused is not None:
            return refused
    return Response(
        metrics.exposition(), headers={"Content-Type": metrics.CONTENT_TYPE_LATEST, **NO_STORE}
    )


def _check_bearer(expected: str) -> Response | None:
    """RFC 6750 section 2.1: ``Authorization: Bearer <token>``, compared in constant time; 401
    with a challenge (section 3: with ``invalid_token`` only when a token was presented)."""
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    presented = presented.strip()
    if scheme.lower() == "bearer" and presented:
        # Header values are Latin-1 text (WSGI): their bytes compare without an encoding error.
        if hmac.compare_digest(
            presented.encode("latin-1", "replace"), expected.encode("latin-1", "replace")
        ):
            return None
        challenge = 'Bearer realm="metrics", error="invalid_token"'
    else:
        challenge = 'Bearer realm="metrics"'
    return Response(
        "A bearer token is required.\n",
        status=401,
        mimetype="text/plain",
        headers={"WWW-Authenticate": challenge, **NO_STORE},
    )


def oauth_error_of(response: Response) -> str | None:
    """The OAuth ``error`` a response carries: a JSON error body (RFC 6749 section 5.2), or an
    error redirect to the client (section 4.1.2.1); ``None`` for anything else."""
    status = response.status_code
    if 300 <= status < 400:
        query = parse_qs(urlsplit(response.headers.get("Location", "")).query)
        if "error" in query and "code" not in query:
            return query["error"][-1]  # after any the registered redirect URI itself carries
        return None
    if status < 400 or response.mimetype != "application/json" or response.is_streamed:
        return None
    try:
        body = json.loads(response.get_data())
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, str) else None


def _started(sender: Flask, **extra: object) -> None:
    g.metrics_started = time.perf_counter()


def _finished(sender: Flask, response: Response, **extra: object) -> None:
    endpoint = request.endpoint
    error = oauth_error_of(response)
    if error is not None:
        metrics.oauth_error(endpoint, error)
    if endpoint == "oauth.register" and request.method == "POST":
        metrics.registration("success" if response.status_code == 201 else error)
    started = g.pop("metrics_started", None)
    if started is not None:
        metrics.request_finished(endpoint, time.perf_counter() - started)


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
    if get_broker(app).settings.metrics.mode == "off":
        return  # nothing reads them: the requests are not timed (the token path is hot)
    request_started.connect(_started, app)
    request_finished.connect(_finished, app)
    if get_broker(app).settings.metrics.mode == "bind" and not os.environ.get(
        metrics.MULTIPROC_ENV
    ):
        log.warning(
            "metrics.bind is served by the gunicorn master of broker.gunicorn_conf: "
            "this process serves no metrics"
        )
