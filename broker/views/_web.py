"""Helpers the thin views share: cookies, CSRF, pages, JSON errors, the OAuth request context."""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl

from flask import Request, current_app, render_template, request
from itsdangerous import BadSignature, Signer
from sqlalchemy.orm import Session
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import BadRequest, HTTPException, RequestEntityTooLarge
from werkzeug.utils import cached_property
from werkzeug.wrappers import Response

from .. import Broker, get_broker
from ..crypto import constant_time_equals, derive_key, token_hash
from ..oauth2.server import RequestState
from ..ratelimit import TOO_MANY_REQUESTS, RateLimiter, Verdict

log = logging.getLogger(__name__)

BROWSER_COOKIE = "broker_browser"
SESSION_COOKIE = "broker_session"
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def broker() -> Broker:
    return get_broker(current_app)


_RAW_NON_ASCII = re.compile(rb"[\x80-\xff]")


class BrokerRequest(Request):
    """Flask's request, with raw non-ASCII bytes in the query string read as a browser sends
    them, percent-encoded (RFC 3986 section 2.1). Werkzeug decodes the raw query string as strict
    UTF-8, so bytes that are not UTF-8 (``/authorize?state=\\xff``) were a 500 on every endpoint;
    now they end as Werkzeug leaves percent-encoded bytes that are not UTF-8: still encoded."""

    @cached_property
    def args(self) -> MultiDict[str, str]:
        raw = _RAW_NON_ASCII.sub(lambda m: b"%%%02X" % m.group()[0], self.query_string)
        return self.parameter_storage_class(
            parse_qsl(raw.decode("ascii"), keep_blank_values=True, errors="werkzeug.url_quote")
        )


RATE_LIMITER = "broker.ratelimit"


def limiter() -> RateLimiter:
    """The app's one :class:`RateLimiter` (set up by :func:`broker.views.init_app`)."""
    found: RateLimiter = current_app.extensions[RATE_LIMITER]
    return found


def cookie_name(base: str) -> str:
    # __Host- requires Secure, which plain-http development on loopback cannot have.
    return f"__Host-{base}" if broker().settings.secure_cookies else base


@functools.lru_cache(maxsize=4)
def _keys(secret_key: str) -> tuple[Signer, bytes]:
    """The cookie signer and the CSRF key of ``secret_key`` (derived once, not per request)."""
    signer = Signer(derive_key(secret_key, "cookies"), salt="broker-cookie")
    return signer, derive_key(secret_key, "csrf")


def _signer() -> Signer:
    return _keys(broker().settings.secret_key)[0]


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
    key = _keys(broker().settings.secret_key)[1]
    message = f"{purpose}\x00{login_id}\x00{browser}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def csrf_ok(purpose: str, login_id: str, presented: str | None) -> bool:
    if not presented or not read_cookie(BROWSER_COOKIE):
        return False
    # As bytes: hmac.compare_digest refuses str with non-ASCII characters (a TypeError, which
    # made a form with csrf=%C2%80 a 500).
    return constant_time_equals(csrf_token(purpose, login_id), presented)


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


class UnreadableBody(BadRequest):
    """400 for a body the WSGI server could not read: broken chunked framing (gunicorn raises
    ``InvalidChunkSize``, ``ChunkMissingTerminator``...), a connection cut mid-body. Answered
    with ``Connection: close``: where the next request starts on that connection is unknown."""

    description = "The request body could not be read."


def read_body() -> bytes:
    """The request body, read whole and kept for the view; :class:`UnreadableBody` when the
    server cannot read it (before this, its exception was a 500 with a traceback)."""
    try:
        return request.get_data(cache=True)
    except HTTPException:
        raise
    except Exception as exc:  # the WSGI server's own exception types, whichever server it is
        log.info("refused a request body that could not be read: %s", type(exc).__name__)
        raise UnreadableBody() from None


def body_too_large(limit: int | None = None) -> RequestEntityTooLarge:
    """413 for a body over ``limit`` bytes (default: the request's limit); answered with
    ``Connection: close`` by the app's error handler."""
    limit = limit if limit is not None else request.max_content_length
    return RequestEntityTooLarge(f"The request body is larger than {limit} bytes.")
