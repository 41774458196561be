"""Helpers the thin views share: cookies, CSRF, pages, JSON errors, the OAuth request context."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask import current_app, render_template, request
from itsdangerous import BadSignature, Signer
from sqlalchemy.orm import Session
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.wrappers import Response

from .. import Broker, get_broker
from ..crypto import derive_key, token_hash
from ..oauth2.server import RequestState
from ..ratelimit import TOO_MANY_REQUESTS, RateLimiter, Verdict

BROWSER_COOKIE = "broker_browser"
SESSION_COOKIE = "broker_session"
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def broker() -> Broker:
    return get_broker(current_app)


RATE_LIMITER = "broker.ratelimit"


def limiter() -> RateLimiter:
    """The app's one :class:`RateLimiter` (set up by :func:`broker.views.init_app`)."""
    found: RateLimiter = current_app.extensions[RATE_LIMITER]
    return found


def cookie_name(base: str) -> str:
    # __Host- requires Secure, which plain-http development on loopback cannot have.
    return f"__Host-{base}" if broker().settings.secure_cookies else base


def _signer() -> Signer:
    return Signer(derive_key(broker().settings.secret_key, "cookies"), salt="broker-cookie")


def read_cookie(base: str) -> str | None:
    raw = request.cookies.get(cookie_name(base))
    if not raw:
        return None
    try:
        return _signer().unsign(raw).decode("ascii")
    except (BadSignature, UnicodeDecodeError):
        return None


def set_cookie(response: Response, base: str, value: str, max_age: int | None = None) -> None:
    response.set_cookie(
        cookie_name(base),
        _signer().sign(value.encode("ascii")).decode("ascii"),
        max_age=max_age,
        path="/",
        secure=broker().settings.secure_cookies,
        httponly=True,
        samesite="Lax",
    )


def browser_hash() -> str | None:
    value = read_cookie(BROWSER_COOKIE)
    return token_hash(value) if value else None


def csrf_token(purpose: str, login_id: str) -> str:
    """A CSRF token bound to one pending login and to this browser (stateless HMAC)."""
    browser = read_cookie(BROWSER_COOKIE) or ""
    key = derive_key(broker().settings.secret_key, "csrf")
    message = f"{purpose}\x00{login_id}\x00{browser}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def csrf_ok(purpose: str, login_id: str, presented: str | None) -> bool:
    if not presented or not read_cookie(BROWSER_COOKIE):
        return False
    return hmac.compare_digest(csrf_token(purpose, login_id), presented)


def client_address() -> str | None:
    return request.remote_addr


def page(template: str, status: int = 200, **context: Any) -> Response:
    body = render_template(template, **context)
    return Response(body, status=status, mimetype="text/html", headers=NO_STORE)


def error_page(status: int, title: str, message: str) -> Response:
    return page("error.html", status=status, title=title, message=message)


def json_error(
    status: int, error: str, description: str | None = None, headers: dict[str, str] | None = None
) -> Response:
    body: dict[str, str] = {"error": error}
    if description:
        body["error_description"] = description
    return Response(
        json.dumps(body),
        status=status,
        mimetype="application/json",
        headers={**NO_STORE, **(headers or {})},
    )


@contextmanager
def oauth_state(session: Session) -> Iterator[RequestState]:
    with broker().server.request_state(session, client_address()) as state:
        yield state


def too_many_requests(verdict: Verdict, *, api: bool = True) -> Response:
    """RFC 6585 section 4: 429 with ``Retry-After`` (seconds to the end of the window); a JSON
    body on API endpoints (see :data:`broker.ratelimit.TOO_MANY_REQUESTS`), else a page."""
    if api:
        return json_error(429, TOO_MANY_REQUESTS, verdict.description, verdict.headers)
    response = error_page(
        429,
        "Too many requests",
        f"Too many requests from your network. Try again in {verdict.retry_after} seconds.",
    )
    response.headers.update(verdict.headers)
    return response


def body_too_large(limit: int | None = None) -> RequestEntityTooLarge:
    """413 for a body over ``limit`` bytes (default: the request's limit); answered with
    ``Connection: close`` by the app's error handler."""
    limit = limit if limit is not None else request.max_content_length
    return RequestEntityTooLarge(f"The request body is larger than {limit} bytes.")
