"""Thin blueprints; the protocol lives in ``broker.oauth2`` and ``broker.flow``."""

from __future__ import annotations

import logging

from flask import Flask, request
from sqlalchemy.exc import DataError, OperationalError, SQLAlchemyError
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from . import health, login, oauth, well_known
from ._web import error_page, json_error

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

# Pages: no framing (clickjacking on the consent page), no inline script, no referrer leaks of
# codes or states. form-action is left open: Chromium applies it to the redirect that follows a
# form post, and the consent form legitimately redirects to the upstream provider or the client.
PAGE_CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'none'"
)


def _is_api() -> bool:
    return request.path.startswith(API_PATHS)


def init_app(app: Flask) -> None:
    for module in (well_known, oauth, login, health):
        app.register_blueprint(module.bp)

    @app.after_request
    def security_headers(response: Response) -> Response:
        headers = response.headers
        headers.setdefault("X-Content-Type-Options", "nosniff")
        headers.setdefault("Referrer-Policy", "no-referrer")
        headers.setdefault("X-Frame-Options", "DENY")
        headers.setdefault("Content-Security-Policy", PAGE_CSP)
        if request.path.startswith(CORS_PATHS):
            headers["Access-Control-Allow-Origin"] = "*"
            headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            headers["Access-Control-Allow-Headers"] = (
                "Authorization, Content-Type, MCP-Protocol-Version"
            )
            headers["Access-Control-Max-Age"] = "86400"
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        if _is_api():
            error = {
                404: "not_found",
                405: "invalid_request",
                413: "invalid_request",
                400: "invalid_request",
            }.get(status, "invalid_request")
            response = json_error(status, error, exc.description if status != 500 else None)
        else:
            response = error_page(status, exc.name, exc.description or "")
        if status == 405 and hasattr(exc, "valid_methods") and exc.valid_methods:
            response.headers["Allow"] = ", ".join(exc.valid_methods)
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
