"""Thin blueprints; the protocol lives in ``broker.oauth2`` and ``broker.flow``.

App-wide, before any view: dynamic registration switched off answers 404 for ``/register``; the
per-address rate limits of the OAuth endpoints (``rate_limits.<endpoint>.per_address``, one
mechanism: :mod:`broker.ratelimit`); a body larger than allowed is refused with 413 before it is
read. After every request: security headers and CORS.
"""

from __future__ import annotations

import logging

from flask import Flask, request
from sqlalchemy.exc import DataError, OperationalError, SQLAlchemyError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.wrappers import Response

from .. import get_broker
from ..ratelimit import RateLimiter, address_subject
from . import account, health, login, metrics, oauth, well_known
from ._web import (
    RATE_LIMITER,
    BrokerRequest,
    UnreadableBody,
    body_too_large,
    error_page,
    json_error,
    limiter,
    read_body,
    too_many_requests,
)

log = logging.getLogger(__name__)

API_PATHS = (
    "/token",
    "/register",
    "/revoke",
    "/introspect",
    "/.well-known",
    "/jwks.json",
    "/health",
    "/ready",
)
CORS_PATHS = ("/token", "/register", "/revoke", "/.well-known", "/jwks.json")

RATE_LIMITED = {
    # endpoint: (name of its limits in rate_limits, the methods counted); OPTIONS preflights
    # and methods an endpoint refuses with 405 (ChatGPT's GET /register) are not counted.
    "oauth.register": ("register", ("POST",)),
    "oauth.authorize": ("authorize", ("GET",)),
    "oauth.token": ("token", ("POST",)),
    "oauth.revoke": ("revoke", ("POST",)),
    "oauth.introspect": ("introspect", ("POST",)),
}
REGISTRATION_OFF = (
    "Dynamic client registration is turned off on this server: use a pre-registered client "
    "or a client ID metadata document."
)

# Pages: no framing (clickjacking on the consent page), no inline script, no referrer leaks of
# codes or states. form-action is left open: Chromium applies it to the redirect that follows a
# form post, and the consent form legitimately redirects to the upstream provider or the client.
PAGE_CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'none'"
)


# Every response: set unless the view set its own.
SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    ("Content-Security-Policy", PAGE_CSP),
)
# The API paths browsers call from other origins (CORS_PATHS): these replace any of the view's.
CORS_HEADERS = (
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
    ("Access-Control-Allow-Headers", "Authorization, Content-Type, MCP-Protocol-Version"),
    ("Access-Control-Max-Age", "86400"),
    ("Access-Control-Expose-Headers", "Retry-After"),
)
_SECURITY_HEADERS = tuple((key, key.lower(), value) for key, value in SECURITY_HEADERS)
_CORS_HEADERS = tuple((key, key.lower(), value) for key, value in CORS_HEADERS)


def _is_api() -> bool:
    return request.path.startswith(API_PATHS)


def init_app(app: Flask) -> None:
    app.request_class = BrokerRequest
    for module in (well_known, oauth, login, account, health):
        app.register_blueprint(module.bp)
    metrics.init_app(app)  # /metrics, and each request's latency and OAuth error
    _init_rate_limits(app)

    @app.before_request
    def registration_switch() -> Response | None:
        # RFC 7591 has no error for "no registration here"; the endpoint does not exist, and
        # the metadata does not advertise it (RFC 8414 section 2: registration_endpoint).
        if request.path == "/register" and not get_broker(app).settings.registration_enabled:
            return json_error(404, "not_found", REGISTRATION_OFF)
        return None

    @app.before_request
    def per_address_limits() -> Response | None:
        name, methods = RATE_LIMITED.get(request.endpoint or "", ("", ()))
        if request.method not in methods:
            return None
        rates = limiter()
        rate = rates.limit(name, "per_address")
        if rate is None:
            return None
        verdict = rates.hit(name, "per_address", address_subject(request.remote_addr), rate)
        if verdict.allowed:
            return None
        if verdict.count == rate.count + 1:  # once per window and address, never the address
            log.warning("rate limit %s.per_address (%s) reached", name, rate)
        return too_many_requests(verdict, api=_is_api())

    @app.before_request
    def body_size() -> None:
        # Refused before any view reads it. A chunked body has no Content-Length, and Werkzeug
        # silently cuts it off at the limit: read one byte more than allowed (kept for the
        # view) to know.
        length, limit = request.content_length, request.max_content_length
        if limit is None:
            return
        if length is not None and length > limit:
            raise body_too_large(limit)
        if length is None and "chunked" in request.headers.get("Transfer-Encoding", "").lower():
            request.max_content_length = limit + 1
            if len(read_body()) > limit:
                raise body_too_large(limit)
            request.max_content_length = limit

    @app.after_request
    def security_headers(response: Response) -> Response:
        # The response's header names read once: Werkzeug's setdefault and set each scan
        # (and lower-case) every header, nine times a response.
        headers = response.headers
        present = {key.lower() for key, _ in headers}
        for key, folded, value in _SECURITY_HEADERS:
            if folded not in present:
                headers.add(key, value)
        if request.path.startswith(CORS_PATHS):
            for key, folded, value in _CORS_HEADERS:
                if folded in present:
                    headers[key] = value
                else:
                    headers.add(key, value)
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        description = exc.description or ""
        if status == 413 and description == RequestEntityTooLarge.description:
            description = body_too_large().description or ""  # raised by Werkzeug itself
        if _is_api():
            error = {404: "not_found"}.get(status, "invalid_request")
            response = json_error(status, error, description if status != 500 else None)
        else:
            response = error_page(status, exc.name, description)
        if status == 405 and hasattr(exc, "valid_methods") and exc.valid_methods:
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        if status == 413 or isinstance(exc, UnreadableBody):
            # The rest of the body was never read: on a kept-alive connection the server would
            # parse it as the next request. (gunicorn drops this header and drains or closes by
            # itself; the development server and other WSGI servers close on it.)
            response.headers["Connection"] = "close"
        return response

    @app.errorhandler(OperationalError)
    def database_unavailable(exc: OperationalError) -> Response:
        log.error("database unavailable: %s", type(exc.orig).__name__ if exc.orig else exc)
        if _is_api():
            return json_error(
                503, "temporarily_unavailable", "Try again shortly.", {"Retry-After": "5"}
            )
        return error_page(503, "Temporarily unavailable", "Please try again in a moment.")

    @app.errorhandler(DataError)
    def bad_data(exc: DataError) -> Response:
        # Input the database cannot store (a NUL byte in PostgreSQL text): the client's fault.
        log.info("refused input the database cannot store: %s", type(exc.orig).__name__)
        if _is_api():
            return json_error(400, "invalid_request", "The request contains invalid characters.")
        return error_page(400, "Invalid request", "The request contains invalid characters.")

    @app.errorhandler(SQLAlchemyError)
    def database_error(exc: SQLAlchemyError) -> Response:
        log.exception("database error")
        if _is_api():
            return json_error(503, "temporarily_unavailable", "Try again shortly.")
        return error_page(503, "Temporarily unavailable", "Please try again in a moment.")

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.path)
        if _is_api():
            return json_error(500, "server_error")
        return error_page(500, "Something went wrong", "The error was logged. Please try again.")


def _init_rate_limits(app: Flask) -> None:
    """One :class:`RateLimiter` per app, shared by the endpoint limits, the metadata-document
    fetch limit and the login throttle (and with the throttle's Redis client)."""
    b = get_broker(app)
    rates = RateLimiter.for_settings(b.settings, b.db, redis=b.throttle.redis)
    app.extensions[RATE_LIMITER] = rates
    b.throttle.attach(rates)
    b.cimd.limiter = rates
    b.server.limiter = rates  # the per-client limits, counted once the client is authenticated
