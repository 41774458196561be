"""OAuth endpoints: authorize, token, register, revoke, introspect."""

from __future__ import annotations

import logging
from collections.abc import Callable

from authlib.oauth2 import OAuth2Error
from flask import Blueprint, redirect, request, url_for
from werkzeug.wrappers import Request, Response

from providers.contract import LoginRequest, PasswordLogin, RedirectLogin
from providers.errors import LoginFailed, ProviderError, UpstreamUnavailable

from ..crypto import new_token, token_hash
from ..flow import AskUser, Denied, FlowError, SignIn, Step, error_redirect
from ..oauth2.cimd import CIMDError, is_client_id_url
from ..oauth2.rfc6749 import RecheckFirst
from ._web import (
    BROWSER_COOKIE,
    SESSION_COOKIE,
    body_too_large,
    broker,
    client_address,
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
    """The refusal page; its link (if any) goes to a redirect URI the flow validated."""
    return page(
        "denied.html",
        status=403,
        reason=denied.reason,
        client_name=denied.client_name,
        redirect_to=denied.redirect_to,
    )


def sign_in_redirect(step: SignIn) -> Response:
    """To the provider's sign-in, once the request is approved: the local form, or the
    upstream's authorization URL (built outside any transaction: it may call the upstream)."""
    b = broker()
    provider = b.providers[step.provider]
    if isinstance(provider, PasswordLogin):
        return redirect(url_for("login.form_login", provider=step.provider, login=step.login_id))
    assert isinstance(provider, RedirectLogin)
    try:
        target = provider.login_url(
            LoginRequest(
                state=step.state,
                nonce=step.nonce,
                code_verifier=step.code_verifier,
                redirect_uri=f"{b.settings.issuer}/callback/{step.provider}",
            ),
            b.http,
        )
    except UpstreamUnavailable as exc:
        log.warning("provider %s unavailable while starting a sign-in: %s", step.provider, exc)
        return error_page(
            503,
            "Sign-in unavailable",
            "The identity provider cannot be reached right now. Try again shortly.",
        )
    except ProviderError as exc:
        log.warning(
            "provider %s could not start a sign-in: %s", step.provider, provider_error_cause(exc)
        )
        return error_page(502, "Sign-in unavailable", "The identity provider is misconfigured.")
    return redirect(target)


def provider_error_cause(exc: ProviderError) -> str:
    """What the operator's log says of a provider error: its reason code and detail."""
    if isinstance(exc, LoginFailed):
        return f"{exc.reason}: {exc.detail}" if exc.detail else exc.reason
    return str(exc) or type(exc).__name__


def step_response(step: Step) -> Response:
    """The browser's next step after an authorization request or a consent decision."""
    if isinstance(step, Denied):
        return denied_page(step)
    if isinstance(step, SignIn):
        return sign_in_redirect(step)
    if isinstance(step, AskUser):
        return redirect(url_for("login.consent", login=step.login_id))
    return redirect(step)


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
            # The reason (a host, a port, a resolver's answer) stays in the log: the page must
            # not let anyone probe internal names and ports through the broker.
            log.warning(
                "client %s could not be verified: %s (%s)", client_id, exc.reason, exc.detail
            )
            return error_page(400, "Invalid request", "The application could not be verified.")
    browser_value = read_cookie(BROWSER_COOKIE)
    new_browser = browser_value is None
    browser_value = browser_value or new_token(32)
    step: Step
    try:
        with b.db.session() as session, oauth_state(session):
            pending = b.flow.start(session, request, token_hash(browser_value))
            browser = b.flow.browser_session(session, read_cookie(SESSION_COOKIE))
            client = b.flow.client(session, pending)
            resource = b.flow.resource(pending)
            allowed = b.flow.allowed_providers(client, resource, b.providers.names())
            step = b.flow.next_step(session, pending, browser, allowed, request.remote_addr)
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
    response = step_response(step)
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
    recheck = b.recheck.due if b.recheck.enabled else None

    def respond() -> Response:
        b.server.state().recheck = recheck
        response: Response = b.server.create_token_response(_current())
        return response

    try:
        response = _run(respond, ok=200, statements=True)
    except RecheckFirst as first:
        # The refresh grant's identity is due upstream: asked outside any transaction (the
        # upstream call holds no lock), then the refresh is decided on what it said.
        b.recheck.run(
            first.due, client_id=request.form.get("client_id"), address=request.remote_addr
        )
        recheck = None
        response = _run(respond, ok=200, statements=True)
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    return response


@bp.route("/register", methods=["POST", "OPTIONS"])
def register() -> Response:
    """RFC 7591 section 3: dynamic client registration (413 for a body over 16 KiB)."""
    if request.method == "OPTIONS":
        return Response(status=204)
    request.max_content_length = MAX_REGISTRATION_BODY + 1  # a chunked body: one byte over
    if (request.content_length or 0) > MAX_REGISTRATION_BODY or (
        len(request.get_data(cache=True)) > MAX_REGISTRATION_BODY
    ):
        raise body_too_large(MAX_REGISTRATION_BODY)
    try:
        body = request.get_json(silent=True) if request.is_json else None
    except RecursionError:  # JSON nested deeper than the parser goes
        body = None
    if not isinstance(body, dict):
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


def _run(call: Callable[[], Response], *, ok: int, statements: bool = False) -> Response:
    """Run an Authlib endpoint in one transaction: committed when it succeeds, rolled back
    otherwise (nothing half-written); then any revocation the failure asked for.
    ``statements``: the token endpoint, whose grants write Core statements on a connection of
    their own (no ORM session unless a grant asks for one, ``RequestState``), on PostgreSQL
    outside a transaction block (each grant writes what must be atomic in one statement;
    nothing a failed request would need undone is written before its last statement)."""
    b = broker()
    session = None if statements else b.db.sessions()
    connect = b.db.statement_connection if statements else None
    with b.server.request_state(session, client_address(), connect=connect) as state:
        try:
            response = call()
            if response.status_code == ok:
                state.commit()
            else:
                state.rollback()
        except BaseException:
            state.rollback()
            raise
        finally:
            state.close()
            if session is not None:
                session.close()
    b.server.apply_revocations(state)
    return response
