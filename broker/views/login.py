"""Pages of the sign-in: consent (with the provider chooser), the one-click confirmation of a
client whose identity cannot be assured, the local login form, the upstream callback."""

from __future__ import annotations

import logging

from flask import Blueprint, redirect, request
from werkzeug.wrappers import Response

from providers.contract import CallbackRequest, LoginResult, PasswordLogin, RedirectLogin
from providers.errors import AccessDenied, LoginFailed, ProviderError, UpstreamUnavailable

from .. import metrics
from ..flow import Denied, FlowError
from ._web import (
    BROWSER_COOKIE,
    SESSION_COOKIE,
    broker,
    browser_hash,
    csrf_ok,
    csrf_token,
    error_page,
    page,
    read_cookie,
    set_cookie,
)
from .oauth import denied_page, provider_error_cause, step_response

log = logging.getLogger(__name__)
bp = Blueprint("login", __name__)


def _csrf_failure() -> Response:
    return error_page(
        400,
        "Form expired",
        "The form could not be verified (missing or invalid CSRF token). Go back and try again.",
    )


@bp.route("/consent", methods=["GET"])
def consent() -> Response:
    """The consent page: who asks, for what, and how to sign in; or the confirmation."""
    b = broker()
    try:
        # Only reads: on SQLite the page does not wait for, or hold, the write lock.
        with b.db.read() as session:
            screen = b.flow.consent_screen(
                session,
                request.args.get("login"),
                browser_hash(),
                read_cookie(SESSION_COOKIE),
                b.providers.names(),
            )
    except FlowError as exc:
        return error_page(exc.status, exc.title, exc.message)
    return page(
        "confirm.html" if screen.view["page"] == "confirm" else "consent.html",
        login_id=screen.login_id,
        csrf=csrf_token("consent", screen.login_id),
        providers=[(name, b.providers[name].display_name) for name in screen.providers],
        **screen.view,
    )


@bp.route("/consent", methods=["POST"])
def consent_submit() -> Response:
    """Approve (then sign in) or deny."""
    b = broker()
    login_id = request.form.get("login", "")
    if not csrf_ok("consent", login_id, request.form.get("csrf")):
        return _csrf_failure()
    try:
        with b.db.session() as session:
            step = b.flow.consent_decision(
                session,
                login_id,
                browser_hash(),
                request.form.get("action"),
                request.form.get("provider", ""),
                read_cookie(SESSION_COOKIE),
                b.providers.names(),
                request.remote_addr,
            )
    except FlowError as exc:
        return error_page(exc.status, exc.title, exc.message)
    # Outside the transaction: building a provider's URL may call the upstream (discovery).
    return step_response(step)


@bp.route("/login/<provider>", methods=["GET", "POST"])
def form_login(provider: str) -> Response:
    """The username and password form of a form-login provider (``local``)."""
    b = broker()
    plugin = b.providers.get(provider)
    if plugin is None or not isinstance(plugin, PasswordLogin):
        return error_page(404, "Not found", "There is no such sign-in method.")
    login_id = request.values.get("login", "")
    try:
        if request.method == "POST":
            return _password_submit(plugin, plugin.display_name, provider, login_id)
        with b.db.read() as session:  # only reads, as the consent page
            b.flow.password_login(session, login_id, browser_hash(), provider)
    except FlowError as exc:
        return error_page(exc.status, exc.title, exc.message)
    return _login_page(plugin.display_name, provider, login_id)


def _password_submit(
    plugin: PasswordLogin, display_name: str, provider: str, login_id: str
) -> Response:
    """The form's submission: throttled, checked by the provider outside any transaction."""
    b = broker()
    if not csrf_ok("login", login_id, request.form.get("csrf")):
        return _csrf_failure()
    username = request.form.get("username", "").strip()[:128]
    password = request.form.get("password", "")[:1024]
    actor = f"{provider}:{username.lower()}"
    address = request.remote_addr
    with b.db.read() as session:  # only reads: the pending login, the failures counted
        b.flow.password_login(session, login_id, browser_hash(), provider)
        blocked = b.throttle.blocked(session, actor, address)
    if blocked:
        metrics.sign_in(provider, "throttled")
        return _login_page(
            display_name,
            provider,
            login_id,
            username,
            429,
            "Too many failed attempts. Wait a few minutes and try again.",
        )
    try:
        result = plugin.authenticate(username, password)
    except LoginFailed:
        metrics.sign_in(provider, "failed")
        b.throttle.record_failure(actor, address)
        with b.db.session() as session:
            b.flow.password_failed(session, provider, actor, address)
        return _login_page(
            display_name, provider, login_id, username, 400, "Invalid username or password."
        )
    except ProviderError as exc:  # a password provider whose backend is down
        metrics.sign_in(provider, "unavailable")
        log.warning("sign-in through %s failed: %s", provider, provider_error_cause(exc))
        return _login_page(
            display_name,
            provider,
            login_id,
            username,
            503,
            "Signing in is not possible right now. Try again shortly.",
        )
    with b.db.session() as session:
        outcome, session_value = b.flow.complete_password_login(
            session, login_id, browser_hash(), provider, result, address
        )
    metrics.sign_in_finished(provider, result, outcome)
    return _outcome_response(outcome, session_value)


def _login_page(
    display_name: str,
    provider: str,
    login_id: str,
    username: str = "",
    status: int = 200,
    error: str | None = None,
) -> Response:
    return page(
        "login.html",
        status=status,
        login_id=login_id,
        provider=provider,
        display_name=display_name,
        username=username,
        csrf=csrf_token("login", login_id),
        error=error,
    )


@bp.route("/callback/<provider>", methods=["GET"])
def callback(provider: str) -> Response:
    """The upstream provider sends the browser back here."""
    b = broker()
    plugin = b.providers.get(provider)
    if plugin is None or not isinstance(plugin, RedirectLogin):
        return error_page(404, "Not found", "There is no such sign-in method.")
    params = {k: v for k, v in request.args.items()}
    try:
        with b.db.session() as session:
            pending, upstream = b.flow.consume_upstream_state(
                session, provider, params.get("state"), browser_hash()
            )
    except FlowError as exc:
        return error_page(exc.status, exc.title, exc.message)
    # Outside any transaction: the upstream token request and identity calls.
    answer: LoginResult | ProviderError
    try:
        answer = plugin.handle_callback(
            CallbackRequest(
                params=params,
                nonce=upstream["nonce"],
                code_verifier=upstream["code_verifier"],
                redirect_uri=f"{b.settings.issuer}/callback/{provider}",
            ),
            b.http,
        )
    except ProviderError as exc:
        _log_provider_error(provider, exc)
        answer = exc
    try:
        with b.db.session() as session:
            outcome, session_value = b.flow.finish_upstream(
                session, pending, plugin.display_name, answer, request.remote_addr
            )
    except FlowError as exc:  # rolled back: nothing half-written
        return error_page(exc.status, exc.title, exc.message)
    metrics.sign_in_finished(provider, answer, outcome)
    return _outcome_response(outcome, session_value)


def _log_provider_error(provider: str, exc: ProviderError) -> None:
    """The operator's log line of a sign-in the provider did not complete (the audit event
    is :meth:`AuthorizationFlow.finish_upstream`'s)."""
    if isinstance(exc, AccessDenied):
        log.info("sign-in through %s refused: %s", provider, provider_error_cause(exc))
    elif isinstance(exc, LoginFailed):
        log.warning("sign-in through %s failed: %s", provider, provider_error_cause(exc))
    elif isinstance(exc, UpstreamUnavailable):
        log.warning("sign-in through %s: provider unavailable: %s", provider, exc)
    else:
        log.warning("sign-in through %s: provider error: %s", provider, provider_error_cause(exc))


def _outcome_response(outcome: str | Denied, session_value: str | None) -> Response:
    """The end of a sign-in: the redirect to the client, or the page that explains a refusal;
    with the new broker session cookie when one was started."""
    response = denied_page(outcome) if isinstance(outcome, Denied) else redirect(outcome)
    if session_value is not None:
        set_cookie(response, SESSION_COOKIE, session_value)
    return response


__all__ = ["BROWSER_COOKIE", "bp"]
