"""Pages of the sign-in: consent (with the provider chooser), the one-click confirmation of a
client whose identity cannot be assured, the local login form, the upstream callback."""

from __future__ import annotations

import logging

from flask import Blueprint, redirect, request
from werkzeug.wrappers import Response

from providers.contract import CallbackRequest, PasswordLogin, RedirectLogin
from providers.errors import AccessDenied, LoginFailed, ProviderError, UpstreamUnavailable

from ..db import utcnow
from ..flow import Denied, FlowError, Step
from ..models import AuditEvent, PendingLogin
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
    login_id = request.args.get("login")
    try:
        with b.db.session() as session:
            pending = b.flow.pending(session, login_id, browser_hash())
            client = b.flow.client(session, pending)
            resource = b.flow.resource(pending)
            allowed = b.flow.allowed_providers(client, resource, b.providers.names())
            browser = b.flow.browser_session(session, read_cookie(SESSION_COOKIE))
            view = b.flow.consent_view(session, pending, allowed, browser)
    except FlowError as exc:
        return error_page(exc.status, exc.title, exc.message)
    if not allowed:
        return error_page(
            403,
            "No sign-in method",
            "No sign-in method is allowed for this "
            "application and resource. Contact your administrator.",
        )
    providers = [(name, b.providers[name].display_name) for name in allowed]
    return page(
        "confirm.html" if view["page"] == "confirm" else "consent.html",
        login_id=pending.id,
        csrf=csrf_token("consent", pending.id),
        providers=providers,
        **view,
    )


@bp.route("/consent", methods=["POST"])
def consent_submit() -> Response:
    """Approve (then sign in) or deny."""
    b = broker()
    login_id = request.form.get("login", "")
    if not csrf_ok("consent", login_id, request.form.get("csrf")):
        return _csrf_failure()
    action = request.form.get("action")
    step: Step
    try:
        with b.db.session() as session:
            pending = b.flow.pending(session, login_id, browser_hash())
            if action == "deny":
                return redirect(b.flow.deny(session, pending, request.remote_addr))
            if action != "approve":
                return error_page(400, "Invalid form", "Choose approve or deny.")
            client = b.flow.client(session, pending)
            resource = b.flow.resource(pending)
            allowed = b.flow.allowed_providers(client, resource, b.providers.names())
            choice = request.form.get("provider", "")
            if choice == "session":  # "Allow" as the signed-in user, or the confirmation
                browser = b.flow.browser_session(session, read_cookie(SESSION_COOKIE))
                identity = b.flow.usable_identity(session, pending, browser, allowed)
                if browser is None or identity is None:
                    return error_page(
                        400, "Session ended", "Your session has ended; sign in again."
                    )
                pending.approved_at = utcnow()
                step = b.flow.finish(
                    session, pending, identity, request.remote_addr, auth_time=browser.created_at
                )
            elif choice not in allowed:
                return error_page(
                    400, "Invalid sign-in method", "That sign-in method is not available here."
                )
            else:
                step = b.flow.sign_in(session, pending, choice)
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
            if not csrf_ok("login", login_id, request.form.get("csrf")):
                return _csrf_failure()
            username = request.form.get("username", "").strip()[:128]
            password = request.form.get("password", "")[:1024]
            actor = f"{provider}:{username.lower()}"
            with b.db.session() as session:
                pending = b.flow.pending(session, login_id, browser_hash())
                _check_approved(pending, provider)
                if b.throttle.blocked(session, actor, request.remote_addr):
                    return _login_page(
                        plugin.display_name,
                        provider,
                        login_id,
                        username,
                        429,
                        "Too many failed attempts. Wait a few minutes and try again.",
                    )
            try:
                result = plugin.authenticate(username, password)
            except LoginFailed:
                b.throttle.record_failure(actor, request.remote_addr)
                with b.db.session() as session:
                    session.add(
                        AuditEvent(
                            type="login",
                            outcome="failure",
                            provider=provider,
                            actor=actor,
                            reason="bad_credentials",
                            address=request.remote_addr,
                        )
                    )
                return _login_page(
                    plugin.display_name,
                    provider,
                    login_id,
                    username,
                    400,
                    "Invalid username or password.",
                )
            except ProviderError as exc:  # a password provider whose backend is down
                log.warning("sign-in through %s failed: %s", provider, provider_error_cause(exc))
                return _login_page(
                    plugin.display_name,
                    provider,
                    login_id,
                    username,
                    503,
                    "Signing in is not possible right now. Try again shortly.",
                )
            with b.db.session() as session:
                pending = b.flow.pending(session, login_id, browser_hash())
                _check_approved(pending, provider)
                outcome, session_value = b.flow.complete_login(
                    session, pending, result, request.remote_addr
                )
            return _outcome_response(outcome, session_value)
        with b.db.session() as session:
            pending = b.flow.pending(session, login_id, browser_hash())
            _check_approved(pending, provider)
    except FlowError as exc:
        return error_page(exc.status, exc.title, exc.message)
    return _login_page(plugin.display_name, provider, login_id)


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


def _check_approved(pending: PendingLogin, provider: str) -> None:
    if pending.approved_at is None or pending.provider != provider:
        raise FlowError(
            400,
            "Consent required",
            "Approve the application's request first. Start again from your application.",
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
            pending_id = pending.id
    except FlowError as exc:
        return error_page(exc.status, exc.title, exc.message)
    # Outside any transaction: the upstream token request and identity calls.
    refused: AccessDenied | None = None
    failed: LoginFailed | None = None
    failure: tuple[str, str] | None = None
    try:
        result = plugin.handle_callback(
            CallbackRequest(
                params=params,
                nonce=upstream["nonce"],
                code_verifier=upstream["code_verifier"],
                redirect_uri=f"{b.settings.issuer}/callback/{provider}",
            ),
            b.http,
        )
    except AccessDenied as exc:
        log.info("sign-in through %s refused: %s", provider, provider_error_cause(exc))
        if exc.reason == "upstream_denied":
            # The user (or the upstream) said no at the upstream: back to the client, as the
            # consent page's own deny button does.
            failure = ("access_denied", exc.reason)
        else:
            refused = exc
    except LoginFailed as exc:
        log.warning("sign-in through %s failed: %s", provider, provider_error_cause(exc))
        failed = exc
    except UpstreamUnavailable as exc:
        log.warning("sign-in through %s: provider unavailable: %s", provider, exc)
        failure = ("temporarily_unavailable", "upstream_unavailable")
    except ProviderError as exc:
        log.warning("sign-in through %s: provider error: %s", provider, provider_error_cause(exc))
        failure = ("access_denied", "provider_error")
    session_value = None
    address = request.remote_addr
    try:
        with b.db.session() as session:
            row = session.get(PendingLogin, pending_id)
            assert row is not None
            outcome: str | Denied
            if refused is not None:
                message = refused.message or (
                    f"Your {plugin.display_name} account is not allowed to sign in here."
                )
                outcome = b.flow.provider_refused(session, row, refused.reason, message, address)
            elif failed is not None:
                message = failed.message or (
                    f"The sign-in with {plugin.display_name} could not be completed: its "
                    "answer could not be verified. Try again; if it keeps failing, tell your "
                    "administrator."
                )
                outcome = b.flow.provider_refused(
                    session, row, failed.reason, message, address, failed=True
                )
            elif failure is not None:
                outcome = b.flow.upstream_failed(session, row, failure[0], failure[1], address)
            else:
                outcome, session_value = b.flow.complete_login(session, row, result, address)
    except FlowError as exc:  # rolled back: nothing half-written
        return error_page(exc.status, exc.title, exc.message)
    return _outcome_response(outcome, session_value)


def _outcome_response(outcome: str | Denied, session_value: str | None) -> Response:
    """The end of a sign-in: the redirect to the client, or the page that explains a refusal;
    with the new broker session cookie when one was started."""
    response = denied_page(outcome) if isinstance(outcome, Denied) else redirect(outcome)
    if session_value is not None:
        set_cookie(response, SESSION_COOKIE, session_value)
    return response


__all__ = ["BROWSER_COOKIE", "bp"]
