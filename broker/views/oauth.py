"""OAuth endpoints: authorize, token, register, revoke, introspect."""

from __future__ import annotations

import logging
from collections.abc import Callable

from authlib.oauth2 import OAuth2Error
from flask import Blueprint, redirect, request, url_for
from werkzeug.wrappers import Request, Response

from ..crypto import new_token, token_hash
from ..db import utcnow
from ..flow import Denied, FlowError, error_redirect
from ..models import Client, Identity
from ..oauth2.cimd import CIMDError, is_client_id_url
from ._web import (
    BROWSER_COOKIE,
    SESSION_COOKIE,
    broker,
    error_page,
    json_error,
    oauth_state,
    page,
    read_cookie,
    set_cookie,
)

log = logging.getLogger(__name__)
bp = Blueprint("oauth", __name__)

MAX_REGISTRATION_BODY = 16 * 1024


def denied_page(denied: Denied) -> Response:
    return page(
        "denied.html",
        status=403,
        reason=denied.reason,
        client_name=denied.client_name,
        redirect_to=denied.redirect_to,
    )


@bp.route("/authorize", methods=["GET"])
def authorize() -> Response:
    """RFC 6749 section 4.1.1, with PKCE, resource indicators and the consent-first order."""
    b = broker()
    settings = b.settings
    client_id = request.args.get("client_id")
    if is_client_id_url(client_id):
        # A Client ID Metadata Document: fetched here, outside any database transaction. A
        # failure means an unknown client: a page, never a redirect.
        try:
            b.cimd.ensure_fresh(client_id, request.remote_addr)
        except CIMDError as exc:
            return error_page(
                400,
                "Invalid request",
                f"The application's client metadata document could not be used ({exc.reason}).",
            )
    browser_value = read_cookie(BROWSER_COOKIE)
    new_browser = browser_value is None
    browser_value = browser_value or new_token(32)
    result: str | Denied
    try:
        with b.db.session() as session, oauth_state(session):
            prompt, pending = b.flow.start(session, request, token_hash(browser_value))
            browser = b.flow.browser_session(session, read_cookie(SESSION_COOKIE))
            client = session.get(Client, pending.client_id)
            assert client is not None
            resource = b.flow.resource(pending)
            allowed = b.flow.allowed_providers(client, resource, b.providers.names())
            identity = session.get(Identity, browser.identity_id) if browser else None
            scopes = [s for s, _ in b.flow.display_scopes(pending, resource)]
            straight = (
                identity is not None
                and "consent" not in prompt
                and "login" not in prompt
                and identity.provider in allowed
                and b.flow.consent_covers(session, identity.user_id, client, resource.uri, scopes)
            )
            if straight:
                assert identity is not None and browser is not None
                result = b.flow.finish(
                    session, pending, identity, request.remote_addr, auth_time=browser.created_at
                )
            elif "none" in prompt:
                pending.completed_at = utcnow()
                error = "consent_required" if browser is not None else "login_required"
                result = error_redirect(settings, pending.redirect_uri, error, None, pending.state)
            else:
                result = url_for("login.consent", login=pending.id)
    except OAuth2Error as exc:
        state = getattr(exc, "state", None) or request.args.get("state")
        if exc.redirect_uri:
            return redirect(
                error_redirect(settings, exc.redirect_uri, exc.error, exc.description, state)
            )
        # Unknown client or unregistered redirect URI: a page, never a redirect (RFC 6749
        # section 4.1.2.1); some clients read this 400 as "register again".
        log.info("authorization request refused: %s", exc.error)
        return error_page(400, "Invalid request", _describe(exc))
    except FlowError as exc:
        return error_page(exc.status, exc.title, exc.message)
    response = denied_page(result) if isinstance(result, Denied) else redirect(result)
    if new_browser:
        set_cookie(response, BROWSER_COOKIE, browser_value)
    return response


def _describe(exc: OAuth2Error) -> str:
    if exc.error == "invalid_client":
        return "The application is not registered with this server (unknown client_id)."
    if exc.description and "redirect" in exc.description.lower():
        return "The redirect URI is not registered for this application."
    return "The authorization request is invalid."


@bp.route("/token", methods=["POST", "OPTIONS"])
def token() -> Response:
    """RFC 6749 section 3.2: the token endpoint (authorization_code, refresh_token)."""
    if request.method == "OPTIONS":
        return Response(status=204)
    b = broker()
    response = _run(lambda: b.server.create_token_response(_current()), ok=200)
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    return response


@bp.route("/register", methods=["POST", "OPTIONS"])
def register() -> Response:
    """RFC 7591 section 3: dynamic client registration."""
    if request.method == "OPTIONS":
        return Response(status=204)
    if (request.content_length or 0) > MAX_REGISTRATION_BODY:
        return json_error(400, "invalid_client_metadata", "The registration request is too large.")
    if not request.is_json or not isinstance(request.get_json(silent=True), dict):
        return json_error(
            400, "invalid_client_metadata", "The registration request must be a JSON object."
        )
    return _endpoint("client_registration", success=201)


@bp.route("/revoke", methods=["POST", "OPTIONS"])
def revoke() -> Response:
    """RFC 7009: token revocation."""
    if request.method == "OPTIONS":
        return Response(status=204)
    return _endpoint("revocation", success=200)


@bp.route("/introspect", methods=["POST"])
def introspect() -> Response:
    """RFC 7662: token introspection, for confidential clients."""
    return _endpoint("introspection", success=200)


def _current() -> Request:
    return request._get_current_object()  # type: ignore[attr-defined,no-any-return]


def _endpoint(name: str, *, success: int) -> Response:
    b = broker()
    response = _run(lambda: b.server.create_endpoint_response(name, _current()), ok=success)
    response.headers["Cache-Control"] = "no-store"
    return response


def _run(call: Callable[[], Response], *, ok: int) -> Response:
    """Run an Authlib endpoint in one transaction: committed when it succeeds, rolled back
    otherwise (nothing half-written); then any revocation the failure asked for."""
    b = broker()
    session = b.db.sessions()
    try:
        with oauth_state(session) as state:
            response = call()
        if response.status_code == ok:
            session.commit()
        else:
            session.rollback()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
    b.server.apply_revocations(state)
    return response
