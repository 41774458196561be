"""The account page: the signed-in user's connected clients, and disconnecting them."""

from __future__ import annotations

from flask import Blueprint, redirect, request, url_for
from werkzeug.wrappers import Response

from .. import account as accounts
from ..crypto import new_token
from ._web import (
    BROWSER_COOKIE,
    SESSION_COOKIE,
    broker,
    csrf_ok,
    csrf_token,
    error_page,
    page,
    read_cookie,
    set_cookie,
)

bp = Blueprint("account", __name__)


@bp.route("/account", methods=["GET"])
def account() -> Response:
    """The connections of the signed-in user, or how to sign in."""
    b = broker()
    with b.db.read() as session:
        browser = b.flow.browser_session(session, read_cookie(SESSION_COOKIE))
        if browser is None:
            return page("account.html", account=None)
        view = accounts.overview(session, b.settings, browser)
        session_id = browser.id_hash
    if read_cookie(BROWSER_COOKIE) is None:
        # The forms' CSRF token is bound to this browser's cookie: set it, then come back.
        response = redirect(url_for("account.account"), code=303)
        set_cookie(response, BROWSER_COOKIE, new_token(32))
        return response
    done = request.args.get("disconnected", "")
    return page(
        "account.html",
        account=view,
        csrf=csrf_token("account", session_id),
        disconnected=int(done) if done.isascii() and done.isdigit() and len(done) < 6 else None,
    )


@bp.route("/account/disconnect", methods=["POST"])
def disconnect() -> Response:
    """Disconnect one client (the form's ``grant``)."""
    return _disconnect(request.form.get("grant", ""))


@bp.route("/account/disconnect-all", methods=["POST"])
def disconnect_all() -> Response:
    """Disconnect every client."""
    return _disconnect(None)


def _disconnect(grant_id: str | None) -> Response:
    b = broker()
    with b.db.session() as session:
        browser = b.flow.browser_session(session, read_cookie(SESSION_COOKIE))
        if browser is None:
            return error_page(403, "Not signed in", "Your session has ended; sign in again.")
        if not csrf_ok("account", browser.id_hash, request.form.get("csrf")):
            return error_page(
                400,
                "Form expired",
                "The form could not be verified (missing or invalid CSRF token). "
                "Go back and try again.",
            )
        try:
            revoked = accounts.disconnect(session, browser.user_id, grant_id)
        except accounts.InvalidConnection:
            return error_page(400, "Invalid request", "The form did not name a connection.")
        except accounts.UnknownConnection:
            return error_page(
                404, "Not found", "There is no such connection (it may be disconnected already)."
            )
    return redirect(url_for("account.account", disconnected=len(revoked)), code=303)
