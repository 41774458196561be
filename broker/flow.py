"""The authorization request path (DESIGN.md, "The request path"), independent of Flask.

1. ``/authorize`` validates the client and redirect URI first, then PKCE, resource and scope, and
   stores a :class:`PendingLogin` (any worker can finish it).
2. Unless this browser's broker session already approved the client, the consent page comes first;
   the browser is never sent upstream for a client it has not approved (MCP security practices,
   confused deputy). A first-party client the operator marked ``trusted`` needs no consent: the
   operator's registration stands for it, and the user only signs in. A public client whose
   identity cannot be assured (self-registered, with a loopback or private-use redirect URI) is
   confirmed by the user on every request, approved before or not (RFC 8252 section 8.6).
3. The upstream ``state`` is created only after approval, single use, bound to the pending login
   and to this browser.
4. After sign-in: link the identity to a user, seal upstream tokens, start a broker session,
   record the consent, apply policy, issue a grant and a single-use code.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import secrets
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal, NoReturn, cast
from urllib.parse import parse_qs, urlsplit

from authlib.common.urls import add_params_to_uri
from authlib.oauth2 import OAuth2Error
from authlib.oauth2.rfc6749.errors import InvalidRequestError
from sqlalchemy import Connection, Table, bindparam, func, select, update
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, make_transient_to_detached
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.util import identity_key
from werkzeug.wrappers import Request, Response

from providers.contract import Identity as UpstreamIdentity
from providers.contract import LoginResult
from providers.errors import AccessDenied, LoginFailed, ProviderError, UpstreamUnavailable

from . import audit, policy
from .config import ResourceSettings, Settings
from .crypto import Sealer, SealError, new_token, token_hash
from .db import DriverRow, UTCDateTime, insert_every_column, utcnow
from .models import (
    BrowserSession,
    Client,
    Consent,
    Grant,
    Identity,
    PendingLogin,
    UpstreamToken,
    User,
)
from .oauth2.clients import is_loopback_redirect, redirect_digest
from .oauth2.errors import InvalidTargetError
from .oauth2.rfc6749 import GrantRow, GrantUser
from .oauth2.server import BrokerAuthorizationServer

log = logging.getLogger(__name__)

SESSION_TTL = dt.timedelta(hours=12)
LOGIN_ID = re.compile(r"[A-Za-z0-9_-]+")
MAX_STATE = 2048
MAX_SCOPE = 2048
IGNORED_SCOPES = policy.IGNORED_SCOPES
USER_DISABLED = "Your account is disabled on this server. Ask your administrator."


def _table(model: Any) -> Table:
    table: Table = model.__table__
    return table


# A sign-in's finish writes with Core statements built once: as ORM instances the same rows
# cost a unit of work, autoflushes and instrumented attributes, most of a sign-in's CPU.
_users = _table(User)
_identities = _table(Identity)
_upstream_tokens = _table(UpstreamToken)
_browser_sessions = _table(BrowserSession)
_pending_logins = _table(PendingLogin)
_consents = _table(Consent)
_grants = _table(Grant)
_clients = _table(Client)


def _every_attribute(model: Any) -> Any:
    """``SELECT`` of ``model``'s every column, labelled with its attribute's name (the
    client's ``metadata`` column is ``client_metadata``)."""
    return select(
        *(attribute.columns[0].label(attribute.key) for attribute in sa_inspect(model).column_attrs)
    )


# A client for a read-only copy of its row (AuthorizationFlow.client); a pending login by its
# id or by the upstream state bound to it, for an instance in the session (_attached).
_CLIENT_READ = _every_attribute(Client).where(_clients.c.client_id == bindparam("client"))
_PENDING_READ = _every_attribute(PendingLogin).where(_pending_logins.c.id == bindparam("pending"))
_PENDING_BY_STATE = _every_attribute(PendingLogin).where(
    _pending_logins.c.upstream_state_hash == bindparam("digest")
)
_IDENTITY_READ = (
    select(
        _identities.c.id,
        _identities.c.user_id,
        _identities.c.provider,
        _identities.c.snapshot,
        _users.c.disabled_at,
    )
    .select_from(_identities.join(_users, _users.c.id == _identities.c.user_id))
    .where(
        _identities.c.provider == bindparam("provider"),
        _identities.c.subject == bindparam("subject"),
    )
)
_IDENTITY_SEEN = (
    update(_identities)
    .where(_identities.c.id == bindparam("identity"))
    .values(snapshot=bindparam("seen"), last_login_at=bindparam("at", type_=UTCDateTime()))
)
_IDENTITY_FACTS = (
    update(_identities)
    .where(_identities.c.id == bindparam("identity"))
    .values(snapshot=bindparam("seen"))
)
_NEW_USER = insert_every_column(_users)
_NEW_SESSION = insert_every_column(_browser_sessions)
_NEW_GRANT = insert_every_column(_grants)
_CONSENT_READ = select(
    _consents.c.id, _consents.c.scopes, _consents.c.redirect_digest, _consents.c.revoked_at
).where(
    _consents.c.user_id == bindparam("user"),
    _consents.c.client_id == bindparam("client"),
    _consents.c.resource == bindparam("resource"),
)
_CONSENT_UPDATE = (
    update(_consents)
    .where(_consents.c.id == bindparam("consent"))
    .values(
        scopes=bindparam("approved", type_=_consents.c.scopes.type),
        redirect_digest=bindparam("digest"),
        granted_at=bindparam("at", type_=UTCDateTime()),
        revoked_at=None,
    )
)
# The claim of a pending login by the request that finishes it (single use), and who signed in.
_CLAIM = (
    update(_pending_logins)
    .where(_pending_logins.c.id == bindparam("pending"), _pending_logins.c.completed_at.is_(None))
    .values(completed_at=bindparam("at", type_=UTCDateTime()))
    .returning(_pending_logins.c.id)  # a row: this request won the claim
)
_FINISH_CLAIM = _CLAIM.values(user_id=bindparam("user"), identity_id=bindparam("linked"))
_SIGNED_IN = (
    update(_pending_logins)
    .where(_pending_logins.c.id == bindparam("pending"))
    .values(user_id=bindparam("user"), identity_id=bindparam("linked"))
)
# The upstream's answer consumes the pending login it is bound to (single use), and the
# upstream secrets it no longer needs go.
_CONSUME = _CLAIM.where(_pending_logins.c.expires_at > bindparam("at", type_=UTCDateTime())).values(
    upstream_secrets_sealed=None
)


def _upserts(insert_of: Any) -> dict[str, Any]:
    """The sign-in's ``INSERT ... ON CONFLICT`` statements, with ``insert_of`` (the dialect's
    ``insert``), built once: the identity (linked to the user of a parallel first sign-in that
    stored it first, its facts this sign-in's), the upstream tokens (a sign-in without a new
    refresh token keeps the stored one) and the consent (another sign-in's, committed since
    this one read it, becomes this one's). Parameters are named after no column."""
    at = bindparam("at", type_=UTCDateTime())
    identity = insert_of(_identities).values(
        user_id=bindparam("user"),
        provider=bindparam("provider"),
        subject=bindparam("subject"),
        snapshot=bindparam("seen", type_=_identities.c.snapshot.type),
        created_at=at,
        last_login_at=at,
    )
    tokens = insert_of(_upstream_tokens).values(
        identity_id=bindparam("identity"),
        provider=bindparam("provider"),
        access_token_sealed=bindparam("access"),
        refresh_token_sealed=bindparam("refresh"),
        expires_at=bindparam("until", type_=UTCDateTime()),
        scope=bindparam("granted"),
        context=bindparam("facts", type_=_upstream_tokens.c.context.type),
        key_version=1,
        updated_at=at,
    )
    identity = identity.returning(_identities.c.id, _identities.c.user_id)
    consent = insert_of(_consents).values(
        user_id=bindparam("user"),
        client_id=bindparam("client"),
        resource=bindparam("resource"),
        scopes=bindparam("approved", type_=_consents.c.scopes.type),
        redirect_digest=bindparam("digest"),
        granted_at=at,
        revoked_at=None,
    )
    return {
        "identity": identity.returning(
            _identities.c.id, _identities.c.user_id
        ).on_conflict_do_update(
            index_elements=[_identities.c.provider, _identities.c.subject],
            set_={
                "snapshot": identity.excluded.snapshot,
                "last_login_at": identity.excluded.last_login_at,
            },
        ),
        "tokens": tokens.on_conflict_do_update(
            index_elements=[_upstream_tokens.c.identity_id],
            set_={
                "access_token_sealed": tokens.excluded.access_token_sealed,
                "refresh_token_sealed": func.coalesce(
                    tokens.excluded.refresh_token_sealed, _upstream_tokens.c.refresh_token_sealed
                ),
                "expires_at": tokens.excluded.expires_at,
                "scope": tokens.excluded.scope,
                "context": tokens.excluded.context,
                "updated_at": tokens.excluded.updated_at,
            },
        ),
        "consent": consent.on_conflict_do_update(
            index_elements=[_consents.c.user_id, _consents.c.client_id, _consents.c.resource],
            set_={
                "scopes": consent.excluded.scopes,
                "redirect_digest": consent.excluded.redirect_digest,
                "granted_at": consent.excluded.granted_at,
                "revoked_at": None,
            },
        ),
    }


_UPSERTS = {"postgresql": _upserts(postgresql.insert), "sqlite": _upserts(sqlite.insert)}


def _upsert(connection: Connection, name: str) -> Any:
    """The upsert ``name`` of :func:`_upserts` for the connection's database."""
    return _UPSERTS[connection.dialect.name][name]


# The parameters of the sign-in's statements that are bound as JSON (AuthorizationFlow._run).
_JSON_PARAMS: dict[int, tuple[str, ...]] = {
    id(_IDENTITY_SEEN): ("seen",),
    id(_CONSENT_UPDATE): ("approved",),
    **{
        id(upserts[name]): (param,)
        for upserts in _UPSERTS.values()
        for name, param in (("identity", "seen"), ("tokens", "facts"), ("consent", "approved"))
    },
}


def _kept(session: Session, login_id: str) -> PendingLogin | None:
    """The pending login ``login_id`` if ``session`` holds it already (``/authorize`` has just
    added it), as ``Session.get`` would find it."""
    kept: PendingLogin | None = session.identity_map.get(identity_key(PendingLogin, login_id))
    return kept


def _attached(session: Session, row: DriverRow) -> PendingLogin:
    """The pending login of ``row`` (every column, :func:`_every_attribute`) as an instance in
    ``session``, as if the session had loaded it (changes to it are flushed as an ``UPDATE``),
    without the ORM's loading of a row: an instrumented attribute set per column instead.
    The one the session holds already, when it does."""
    values = row._mapping
    kept = _kept(session, values["id"])
    if kept is not None:
        return kept
    pending = PendingLogin(**values)
    make_transient_to_detached(pending)  # every attribute as loaded, no history
    session.add(pending)
    return pending


@dataclass(frozen=True)
class LinkedIdentity:
    """An identity as a sign-in reads and links it (Core rows, no ORM instance): what
    :meth:`AuthorizationFlow.finish` needs of it."""

    id: int
    user_id: str
    provider: str
    snapshot: dict[str, Any]
    disabled: bool = False


class FlowError(Exception):
    """An error shown as a page (never a redirect): the request cannot be tied to a validated
    redirect URI, or the browser is not the one that started it."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(title)
        self.status = status
        self.title = title
        self.message = message


@dataclass
class Denied:
    """Policy said no: a page that explains, with a link back to the client carrying
    ``access_denied``; no link (``None``) when the redirect URI is no longer the client's."""

    reason: str
    redirect_to: str | None
    client_name: str


@dataclass(frozen=True)
class SignIn:
    """Send the browser to ``provider``'s sign-in: the request is approved and its upstream
    ``state`` (with the nonce and PKCE verifier) has just been created."""

    provider: str
    login_id: str
    state: str
    nonce: str
    code_verifier: str


@dataclass(frozen=True)
class AskUser:
    """Show the pending login's page (:meth:`AuthorizationFlow.consent_view` says which)."""

    login_id: str


Step = str | Denied | SignIn | AskUser
"""What comes after a valid authorization request: a redirect to the client (a code or an
error), a refusal page, a provider's sign-in, or the consent (or confirmation) page."""

ConsentPage = Literal["consent", "confirm", "sign_in"]


@dataclass(frozen=True)
class ConsentScreen:
    """What the consent page shows: ``view`` (:meth:`AuthorizationFlow.consent_view`) and the
    sign-in methods allowed here (never empty)."""

    login_id: str
    providers: list[str]
    view: dict[str, Any]


def error_redirect(
    settings: Settings, redirect_uri: str, error: str, description: str | None, state: str | None
) -> str:
    """An authorization error response (RFC 6749 section 4.1.2.1) with ``iss`` (RFC 9207),
    only ever to an already validated redirect URI."""
    params = [("error", error)]
    if description:
        params.append(("error_description", description))
    if state is not None:
        params.append(("state", state))
    params.append(("iss", settings.issuer))
    return str(add_params_to_uri(redirect_uri, params))


def requested_scopes(scope: str) -> list[str]:
    return [s for s in dict.fromkeys(scope.split()) if s]


def host_of(uri: str) -> str:
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    return parts.netloc or f"{parts.scheme}:"


def _check_browser(pending: PendingLogin, browser_hash: str | None) -> None:
    """A sign-in finishes only in the browser that started it (login CSRF)."""
    if not browser_hash or not secrets.compare_digest(pending.browser_hash, browser_hash):
        raise FlowError(
            400,
            "Sign-in request from another browser",
            "This sign-in request was started in another browser. "
            "Start again from your application.",
        )


class AuthorizationFlow:
    def __init__(
        self, settings: Settings, server: BrokerAuthorizationServer, sealer: Sealer
    ) -> None:
        self.settings = settings
        self.server = server
        self.sealer = sealer

    # -- statements ------------------------------------------------------------------------

    def _run(
        self, connection: Connection, statement: Any, params: dict[str, Any]
    ) -> list[DriverRow]:
        """One of the sign-in's statements, on the driver's cursor of ``connection`` (in the
        session's transaction): SQLAlchemy's and the driver's work for each execution was
        more CPU than the statement itself, and a sign-in sends a dozen."""
        return self.server.sql.rows(
            connection, statement, params, json_params=_JSON_PARAMS.get(id(statement), ())
        )

    def _event(self, session: Session, connection: Connection, entry: dict[str, Any]) -> None:
        """The audit event ``entry`` (:func:`broker.audit.values`), on the driver's cursor."""
        audit.write_values(session, entry, self.server.sql, connection)

    # -- /authorize ------------------------------------------------------------------------

    def start(self, session: Session, request: Request, browser_hash: str) -> PendingLogin:
        """Validate the request and store a pending login; raises :class:`OAuth2Error` (its
        ``redirect_uri`` is set only once the redirect URI is validated)."""
        oauth_request = self.server.create_oauth2_request(request)
        grant = self.server.get_consent_grant(oauth_request)
        req = grant.request
        resource: ResourceSettings = req.resource
        client = req.client
        data = req.payload.data
        allowed = client.row.allowed_resources
        if allowed is not None and resource.uri.rstrip("/") not in {u.rstrip("/") for u in allowed}:
            # RFC 8707 section 2: a resource this (static) client may not have tokens for.
            raise InvalidTargetError(
                "The client is not allowed tokens for this resource.",
                redirect_uri=req.validated_redirect_uri,
                state=data.get("state"),
            )
        prompt = set((data.get("prompt") or "").split())
        problem = None
        if "none" in prompt and len(prompt) > 1:
            problem = "prompt=none cannot be combined with other values."
        elif len(data.get("state") or "") > MAX_STATE:
            problem = "The state parameter is too long."
        elif len(data.get("scope") or "") > MAX_SCOPE:
            problem = "The scope parameter is too long."
        if problem:
            raise InvalidRequestError(
                problem, redirect_uri=req.validated_redirect_uri, state=data.get("state")
            )
        now = utcnow()
        pending = PendingLogin(
            id=new_token(24),
            browser_hash=browser_hash,
            client_id=client.get_client_id(),
            redirect_uri=req.validated_redirect_uri,
            scope=" ".join(requested_scopes(data.get("scope") or "")),
            resource=resource.uri,
            state=data.get("state"),
            code_challenge=data["code_challenge"],
            code_challenge_method=data.get("code_challenge_method", "S256"),
            request_params={k: v for k, v in req.payload.datalist.items()},
            created_at=now,
            expires_at=now + dt.timedelta(seconds=self.settings.tokens.login_ttl),
        )
        session.add(pending)
        return pending

    def next_step(
        self,
        session: Session,
        pending: PendingLogin,
        browser: BrowserSession | None,
        provider_names: list[str],
        address: str | None,
    ) -> Step:
        """After :meth:`start`, in the consent-first order (MCP security practices): a code
        straight away only for a browser whose broker session already approved the client (and,
        for a client whose identity cannot be assured, never without the user's click, RFC 8252
        section 8.6), or for a trusted client; otherwise the consent page, or for a trusted
        client the sign-in (the only allowed provider's, or the chooser). ``prompt=none``
        (OIDC Core 3.1.2.1) gets ``login_required`` or ``consent_required`` instead of a page."""
        client = self.client(session, pending)
        resource = self.resource(pending)
        prompt = self.prompts(pending)
        identity = self.usable_identity(session, pending, browser, provider_names)
        if self.trusted(client, pending.redirect_uri):
            # The operator's registration stands for the user's consent, prompt=consent
            # included; the user still signs in (prompt=login: again).
            if identity is not None and browser is not None:
                return self.finish(
                    session, pending, identity, address, auth_time=browser.created_at
                )
            if "none" in prompt:
                return self._no_interaction(pending, "login_required")
            if len(provider_names) == 1:
                return self.sign_in(session, pending, provider_names[0])
            return AskUser(pending.id)
        if (
            browser is not None
            and identity is not None
            and self.approved_before(session, pending, identity, client, resource)
            and not self.needs_confirmation(client, pending.redirect_uri)
        ):
            return self.finish(session, pending, identity, address, auth_time=browser.created_at)
        if "none" in prompt:
            return self._no_interaction(
                pending, "consent_required" if browser is not None else "login_required"
            )
        return AskUser(pending.id)

    def _no_interaction(self, pending: PendingLogin, error: str) -> NoReturn:
        # Raised as the authorization error it is: the request's transaction is rolled back and
        # its pending login not stored (a refused request changes nothing; issue 11).
        raise OAuth2Error(error=error, redirect_uri=pending.redirect_uri, state=pending.state)

    def sign_in(self, session: Session, pending: PendingLogin, provider: str) -> SignIn:
        """The request is approved: sign in with ``provider`` (its upstream state starts now)."""
        state, nonce, verifier = self.approve(session, pending, provider)
        return SignIn(provider, pending.id, state, nonce, verifier)

    # -- who may skip what -----------------------------------------------------------------

    @staticmethod
    def _local_public(client: Client, redirect_uri: str) -> bool:
        """RFC 8252 section 8.6: a public client sent to a loopback or private-use redirect URI
        can be impersonated by any local program (its client id, its own PKCE); a client secret
        or an https redirect URI cannot."""
        if client.token_endpoint_auth_method != "none":
            return False
        try:
            return urlsplit(redirect_uri).scheme.lower() != "https"
        except ValueError:
            return True

    @classmethod
    def trusted(cls, client: Client, redirect_uri: str) -> bool:
        """A first-party client: the operator registered it (static) and marked it trusted.
        As ``broker clients add`` refuses, a public client's trust never extends to a loopback
        or private-use redirect URI (RFC 8252 section 8.6): there it gets the consent page."""
        return (
            client.kind == "static"
            and bool(client.trusted)
            and not cls._local_public(client, redirect_uri)
        )

    @classmethod
    def needs_confirmation(cls, client: Client, redirect_uri: str) -> bool:
        """RFC 8252 section 8.6: without assurance of the client's identity the server SHOULD
        NOT process a request automatically, even one the user approved before. A public client
        that registered itself (DCR) or is a metadata document gets no such assurance at a
        loopback or private-use redirect URI; an operator's (static) registration gives it."""
        return client.kind != "static" and cls._local_public(client, redirect_uri)

    @staticmethod
    def prompts(pending: PendingLogin) -> set[str]:
        """The request's ``prompt`` values (OIDC Core 3.1.2.1)."""
        return set(" ".join(pending.request_params.get("prompt", [])).split())

    def usable_identity(
        self,
        session: Session,
        pending: PendingLogin,
        browser: BrowserSession | None,
        provider_names: list[str],
    ) -> Identity | None:
        """The identity of this browser's broker session when this request may use it: the
        session is live (:meth:`browser_session`), its provider is allowed here, and the request
        does not ask to sign in again (``prompt=login``). One rule for /authorize, the consent
        page and its form."""
        if browser is None or self.forces_login(pending):
            return None
        identity = session.get(Identity, browser.identity_id)
        if identity is None or identity.provider not in provider_names:
            return None
        resource = self.settings.resource(pending.resource)
        if (
            resource is not None
            and identity.provider in resource.upstream_tokens
            and session.get(UpstreamToken, identity.id) is None
        ):
            # The resource's MCP server needs this user's upstream token and there is none
            # (never stored, or dropped when the upstream refused its refresh): only the
            # upstream sign-in can give a new one.
            return None
        return identity

    def approved_before(
        self,
        session: Session,
        pending: PendingLogin,
        identity: Identity,
        client: Client,
        resource: ResourceSettings,
    ) -> bool:
        """The user approved this client for these scopes before, and the request does not ask
        for the consent page again (``prompt=consent``)."""
        if "consent" in self.prompts(pending):
            return False
        scopes = [s for s, _ in self.display_scopes(pending, resource)]
        return self.consent_covers(session, identity.user_id, client, resource.uri, scopes)

    # -- lookups ---------------------------------------------------------------------------

    def pending(
        self, session: Session, login_id: str | None, browser_hash: str | None
    ) -> PendingLogin:
        if not login_id or len(login_id) > 64 or not LOGIN_ID.fullmatch(login_id):
            raise FlowError(
                400,
                "Sign-in request not found",
                "This sign-in request is missing. Start again from your application.",
            )
        pending = _kept(session, login_id)
        if pending is None:
            found = self._run(session.connection(), _PENDING_READ, {"pending": login_id})
            pending = _attached(session, found[0]) if found else None
        if pending is None or pending.expires_at <= utcnow():
            raise FlowError(
                400,
                "Sign-in request expired",
                "This sign-in request has expired. Start again from your application.",
            )
        _check_browser(pending, browser_hash)
        if pending.completed_at is not None:
            raise FlowError(
                400,
                "Sign-in request already used",
                "This sign-in request was already completed. Start again from your application.",
            )
        return pending

    def client(self, session: Session, pending: PendingLogin) -> Client:
        """The pending login's client: the one this request's authorization server state
        already holds (``/authorize`` validated it), else a read-only copy of its row, read on
        the driver's cursor (a model instance cost as much as the rest of a sign-in's finish:
        its loading, instrumented attributes and the driver's description of 20 columns)."""
        state = self.server.current_state()
        kept = state.clients.get(pending.client_id) if state is not None else None
        if kept is not None:
            return kept.row
        rows = self._run(session.connection(), _CLIENT_READ, {"client": pending.client_id})
        if not rows:
            raise FlowError(400, "Unknown application", "The application is no longer registered.")
        return cast(Client, SimpleNamespace(**rows[0]._mapping))

    def resource(self, pending: PendingLogin) -> ResourceSettings:
        resource = self.settings.resource(pending.resource)
        if resource is None:
            raise FlowError(400, "Unknown resource", "The resource is no longer configured.")
        return resource

    def allowed_providers(
        self, client: Client, resource: ResourceSettings, configured: list[str]
    ) -> list[str]:
        names = [n for n in configured if resource.providers is None or n in resource.providers]
        if client.allowed_providers is not None:
            names = [n for n in names if n in client.allowed_providers]
        return names

    def browser_session(self, session: Session, cookie_value: str | None) -> BrowserSession | None:
        if not cookie_value:
            return None
        row = session.get(BrowserSession, token_hash(cookie_value))
        if row is None or row.revoked_at is not None or row.expires_at <= utcnow():
            return None
        user = session.get(User, row.user_id)
        if user is None or user.disabled_at is not None:
            return None
        return row

    def consent_covers(
        self, session: Session, user_id: str, client: Client, resource: str, scopes: list[str]
    ) -> bool:
        consent = session.scalars(
            select(Consent).where(
                Consent.user_id == user_id,
                Consent.client_id == client.client_id,
                Consent.resource == resource,
                Consent.revoked_at.is_(None),
            )
        ).first()
        if consent is None:
            return False
        if consent.redirect_digest != redirect_digest(client.redirect_uris):
            return False
        return set(scopes) <= set(consent.scopes)

    def display_scopes(
        self, pending: PendingLogin, resource: ResourceSettings
    ) -> list[tuple[str, str]]:
        asked = [s for s in requested_scopes(pending.scope) if s in resource.scopes]
        if not asked:
            asked = list(resource.scopes)
        for s in resource.required_scopes:
            if s not in asked:
                asked.append(s)
        return [(s, resource.scopes[s]) for s in asked]

    def consent_view(
        self,
        session: Session,
        pending: PendingLogin,
        provider_names: list[str],
        browser: BrowserSession | None,
    ) -> dict[str, Any]:
        """What the page shows. ``page`` is ``consent`` (approve, and sign in), ``sign_in`` (a
        trusted client: only how to sign in), or ``confirm``: the one-click confirmation of a
        request from a client the user approved before whose identity cannot be assured
        (:meth:`needs_confirmation`)."""
        client = self.client(session, pending)
        resource = self.resource(pending)
        signed_in = None
        trusted = self.trusted(client, pending.redirect_uri)
        page: ConsentPage = "sign_in" if trusted else "consent"
        identity = self.usable_identity(session, pending, browser, provider_names)
        if identity is not None:
            snap = identity.snapshot
            signed_in = {
                "provider": identity.provider,
                "who": snap.get("email") or snap.get("username") or snap.get("subject"),
            }
            if (
                page == "consent"
                and self.needs_confirmation(client, pending.redirect_uri)
                and self.approved_before(session, pending, identity, client, resource)
            ):
                page = "confirm"
        return {
            "page": page,
            "client_name": client.name,
            "client_kind": client.kind,
            "client_id": client.client_id,
            "client_host": host_of(client.client_id) if client.kind == "cimd" else None,
            "redirect_host": host_of(pending.redirect_uri),
            "all_localhost": all(is_loopback_redirect(u) for u in client.redirect_uris),
            "resource_name": resource.name,
            "resource_uri": resource.uri,
            "scopes": self.display_scopes(pending, resource),
            "signed_in": signed_in,
        }

    @staticmethod
    def forces_login(pending: PendingLogin) -> bool:
        """``prompt=login`` (OIDC Core 3.1.2.1): sign in again, even with a broker session."""
        return "login" in AuthorizationFlow.prompts(pending)

    # -- the sign-in pages: one call per request of broker/views/login.py -----------------

    def consent_screen(
        self,
        session: Session,
        login_id: str | None,
        browser_hash: str | None,
        session_cookie: str | None,
        provider_names: list[str],
    ) -> ConsentScreen:
        """The consent page (or the confirmation) of a pending login; a 403 page when no
        sign-in method is allowed for its client and resource."""
        pending = self.pending(session, login_id, browser_hash)
        client = self.client(session, pending)
        resource = self.resource(pending)
        allowed = self.allowed_providers(client, resource, provider_names)
        browser = self.browser_session(session, session_cookie)
        view = self.consent_view(session, pending, allowed, browser)
        if not allowed:
            raise FlowError(
                403,
                "No sign-in method",
                "No sign-in method is allowed for this "
                "application and resource. Contact your administrator.",
            )
        return ConsentScreen(pending.id, allowed, view)

    def consent_decision(
        self,
        session: Session,
        login_id: str,
        browser_hash: str | None,
        action: str | None,
        choice: str,
        session_cookie: str | None,
        provider_names: list[str],
        address: str | None,
    ) -> Step:
        """The consent form: ``deny`` (back to the client with ``access_denied``), or
        ``approve`` as the signed-in user (``choice`` is ``session``: "Allow", or the
        confirmation) or with the sign-in method ``choice``."""
        pending = self.pending(session, login_id, browser_hash)
        if action == "deny":
            return self.deny(session, pending, address)
        if action != "approve":
            raise FlowError(400, "Invalid form", "Choose approve or deny.")
        client = self.client(session, pending)
        resource = self.resource(pending)
        allowed = self.allowed_providers(client, resource, provider_names)
        if choice == "session":
            browser = self.browser_session(session, session_cookie)
            identity = self.usable_identity(session, pending, browser, allowed)
            if browser is None or identity is None:
                raise FlowError(400, "Session ended", "Your session has ended; sign in again.")
            pending.approved_at = utcnow()
            return self.finish(session, pending, identity, address, auth_time=browser.created_at)
        if choice not in allowed:
            raise FlowError(
                400, "Invalid sign-in method", "That sign-in method is not available here."
            )
        return self.sign_in(session, pending, choice)

    def password_login(
        self, session: Session, login_id: str, browser_hash: str | None, provider: str
    ) -> PendingLogin:
        """The pending login a form-login provider's page belongs to: approved, and for
        ``provider`` (the form never replaces the consent page)."""
        pending = self.pending(session, login_id, browser_hash)
        if pending.approved_at is None or pending.provider != provider:
            raise FlowError(
                400,
                "Consent required",
                "Approve the application's request first. Start again from your application.",
            )
        return pending

    def password_failed(
        self, session: Session, provider: str, actor: str, address: str | None
    ) -> None:
        """A wrong username or password: the failure event, in a transaction of its own (it
        stays, whatever the request does next)."""
        audit.record(
            session,
            "login",
            "failure",
            provider=provider,
            actor=actor,
            reason="bad_credentials",
            address=address,
        )

    def complete_password_login(
        self,
        session: Session,
        login_id: str,
        browser_hash: str | None,
        provider: str,
        result: LoginResult,
        address: str | None,
    ) -> tuple[str | Denied, str | None]:
        """The form-login provider said who the user is: :meth:`complete_login`."""
        pending = self.password_login(session, login_id, browser_hash, provider)
        return self.complete_login(session, pending, result, address)

    def finish_upstream(
        self,
        session: Session,
        consumed: PendingLogin,
        display_name: str,
        answer: LoginResult | ProviderError,
        address: str | None,
    ) -> tuple[str | Denied, str | None]:
        """The upstream's answer to the login :meth:`consume_upstream_state` consumed (the
        row it read, in its own committed transaction): who the user is
        (:meth:`complete_login`), or why not. The provider's own refusal, or an answer that
        could not be verified, gets a page (:meth:`provider_refused`); the user saying no at
        the upstream, an unavailable or failing provider go back to the client
        (:meth:`upstream_failed`). Returns the outcome and the new session cookie value."""
        # Not read again: once consumed, nothing changes a pending login but who signed in.
        pending = session.merge(consumed, load=False)
        if isinstance(answer, LoginResult):
            return self.complete_login(session, pending, answer, address)
        if isinstance(answer, AccessDenied) and answer.reason == "upstream_denied":
            # As the consent page's own deny button does.
            return self.upstream_failed(
                session, pending, "access_denied", answer.reason, address
            ), None
        if isinstance(answer, AccessDenied):
            message = answer.message or (
                f"Your {display_name} account is not allowed to sign in here."
            )
            return self.provider_refused(session, pending, answer.reason, message, address), None
        if isinstance(answer, LoginFailed):
            message = answer.message or (
                f"The sign-in with {display_name} could not be completed: its "
                "answer could not be verified. Try again; if it keeps failing, tell your "
                "administrator."
            )
            return self.provider_refused(
                session, pending, answer.reason, message, address, failed=True
            ), None
        if isinstance(answer, UpstreamUnavailable):
            return self.upstream_failed(
                session, pending, "temporarily_unavailable", "upstream_unavailable", address
            ), None
        return self.upstream_failed(
            session, pending, "access_denied", "provider_error", address
        ), None

    # -- after approval --------------------------------------------------------------------

    def approve(
        self, session: Session, pending: PendingLogin, provider: str
    ) -> tuple[str, str, str]:
        """Record approval and create the upstream ``state`` (only now, after approval).
        Returns (state, nonce, code_verifier)."""
        state, nonce, verifier = new_token(32), new_token(24), new_token(48)
        pending.approved_at = utcnow()
        pending.provider = provider
        pending.upstream_state_hash = token_hash(state)
        pending.upstream_secrets_sealed = self.sealer.seal_text(
            json.dumps({"nonce": nonce, "code_verifier": verifier}),
            f"pending_logins:{pending.id}:upstream",
        )
        return state, nonce, verifier

    def deny(self, session: Session, pending: PendingLogin, address: str | None) -> str:
        pending.completed_at = utcnow()
        audit.record(
            session,
            "consent",
            "denied",
            client_id=pending.client_id,
            resource=pending.resource,
            address=address,
            reason="user_denied",
        )
        return self._client_redirect(
            session, pending, "access_denied", "The user denied the request."
        )

    def redirect_target(self, session: Session, pending: PendingLogin) -> str | None:
        """The pending login's redirect URI while it is still one the client has registered:
        /authorize validated it, but the registration may have changed or gone since (a new
        metadata document, a removed client). ``None`` otherwise: nothing may send the browser
        there any more."""
        with self.server.request_state(session):
            client = self.server.query_client(pending.client_id)
        if client is None or not client.check_redirect_uri(pending.redirect_uri):
            log.info(
                "redirect URI of sign-in %s is no longer registered for client %s",
                pending.id,
                pending.client_id,
            )
            return None
        return pending.redirect_uri

    def _client_redirect(
        self, session: Session, pending: PendingLogin, error: str, description: str | None
    ) -> str:
        """An error response to the client, only to a redirect URI it still has registered."""
        target = self.redirect_target(session, pending)
        if target is None:
            raise FlowError(
                400,
                "Request no longer valid",
                "The application's registration changed. Start again from your application.",
            )
        return error_redirect(self.settings, target, error, description, pending.state)

    def _denied(
        self, session: Session, pending: PendingLogin, reason: str, description: str
    ) -> Denied:
        """The refusal page; its link back to the client (``access_denied``) only ever goes to a
        redirect URI the client still has registered."""
        client = self.client(session, pending)
        target = self.redirect_target(session, pending)
        link = (
            error_redirect(self.settings, target, "access_denied", description, pending.state)
            if target is not None
            else None
        )
        return Denied(reason, link, client.name)

    def consume_upstream_state(
        self, session: Session, provider: str, state: str | None, browser_hash: str | None
    ) -> tuple[PendingLogin, dict[str, str]]:
        """Find and consume the pending login the upstream ``state`` is bound to (single use)."""
        if not state or len(state) > 512:
            raise FlowError(400, "Invalid sign-in response", "The sign-in response has no state.")
        digest = token_hash(state)
        found = self._run(session.connection(), _PENDING_BY_STATE, {"digest": digest})
        pending = _attached(session, found[0]) if found else None
        if pending is None or pending.provider != provider:
            raise FlowError(
                400,
                "Invalid sign-in response",
                "This sign-in response does not match any request in progress.",
            )
        _check_browser(pending, browser_hash)
        sealed = pending.upstream_secrets_sealed
        now = utcnow()
        # Consumed and its upstream secrets dropped in one statement (the ORM's update of the
        # loaded row would be a second one).
        won = self._run(session.connection(), _CONSUME, {"pending": pending.id, "at": now})
        if not won:
            raise FlowError(
                400,
                "Sign-in response already used",
                "This sign-in response was already used or has expired. Start again "
                "from your application.",
            )
        set_committed_value(pending, "completed_at", now)
        set_committed_value(pending, "upstream_secrets_sealed", None)
        assert sealed is not None
        try:
            opened = self.sealer.open_text(sealed, f"pending_logins:{pending.id}:upstream")
        except SealError:
            # Sealed under a root secret this host no longer has (secret_key changed without
            # previous_secret_keys), or tampered with: this sign-in cannot finish; a new one can.
            log.warning("pending login %s: its upstream secrets do not open", pending.id)
            raise FlowError(
                400,
                "Sign-in could not be completed",
                "This sign-in was started before the server's keys changed. Start again "
                "from your application.",
            ) from None
        return pending, json.loads(opened)

    def upstream_failed(
        self, session: Session, pending: PendingLogin, error: str, reason: str, address: str | None
    ) -> str:
        audit.record(
            session,
            "login",
            "failure",
            client_id=pending.client_id,
            resource=pending.resource,
            provider=pending.provider,
            reason=reason,
            address=address,
        )
        descriptions = {
            "access_denied": "The sign-in was not completed.",
            "temporarily_unavailable": "The identity provider is unavailable; try again later.",
        }
        return self._client_redirect(session, pending, error, descriptions.get(error))

    # -- finishing -------------------------------------------------------------------------

    @staticmethod
    def _disabled(session: Session, user_id: str) -> bool:
        user = session.get(User, user_id)
        return user is None or user.disabled_at is not None

    def _identity_row(self, session: Session, upstream: UpstreamIdentity) -> LinkedIdentity | None:
        """The stored identity of ``upstream`` with its user's standing, in one read."""
        found = self._run(
            session.connection(),
            _IDENTITY_READ,
            {"provider": upstream.provider, "subject": upstream.subject},
        )
        if not found:
            return None
        row = found[0]
        return LinkedIdentity(
            row.id, row.user_id, row.provider, row.snapshot, row.disabled_at is not None
        )

    def link_identity(self, session: Session, result: LoginResult) -> LinkedIdentity:
        """The identity row for this upstream identity, creating the user on first sign-in;
        its facts are the ones just seen."""
        return self._link(session, result, self._identity_row(session, result.identity))

    def _link(
        self, session: Session, result: LoginResult, row: LinkedIdentity | None
    ) -> LinkedIdentity:
        """:meth:`link_identity`, given what the caller read of the identity (``None``: it is
        not stored yet)."""
        upstream: UpstreamIdentity = result.identity
        now = utcnow()
        connection = session.connection()
        snapshot = upstream.snapshot()
        if row is not None:
            self._run(connection, _IDENTITY_SEEN, {"identity": row.id, "seen": snapshot, "at": now})
            linked = LinkedIdentity(row.id, row.user_id, row.provider, snapshot, row.disabled)
        else:
            linked = self._new_identity(connection, upstream, snapshot, now)
        if result.tokens is not None:
            self._store_upstream_tokens(connection, linked, result)
        return linked

    def _new_identity(
        self,
        connection: Connection,
        upstream: UpstreamIdentity,
        snapshot: dict[str, Any],
        now: Any,
    ) -> LinkedIdentity:
        """A first sign-in: a new user and its identity. The same identity signing in on
        another worker at the same moment inserts it first: then that one is linked (its user
        is the identity's), and the user made here for nothing is removed again."""
        user_id = "usr_" + secrets.token_urlsafe(18)
        self._run(connection, _NEW_USER, {"id": user_id, "created_at": now, "disabled_at": None})
        (row,) = self._run(
            connection,
            _upsert(connection, "identity"),
            {
                "user": user_id,
                "provider": upstream.provider,
                "subject": upstream.subject,
                "seen": snapshot,
                "at": now,
            },
        )
        if row.user_id != user_id:
            connection.execute(_users.delete().where(_users.c.id == user_id))
            disabled = connection.execute(
                select(_users.c.disabled_at).where(_users.c.id == row.user_id)
            ).scalar()
            return LinkedIdentity(
                row.id, row.user_id, upstream.provider, snapshot, disabled is not None
            )
        return LinkedIdentity(row.id, user_id, upstream.provider, snapshot)

    def _store_upstream_tokens(
        self, connection: Connection, identity: LinkedIdentity, result: LoginResult
    ) -> None:
        """The upstream's tokens, sealed to this identity's row: one upsert (a sign-in whose
        upstream gave no new refresh token keeps the stored one)."""
        tokens = result.tokens
        assert tokens is not None
        aad = f"upstream_tokens:{identity.id}"
        refresh = (
            self.sealer.seal_text(tokens.refresh_token, aad + ":refresh")
            if tokens.refresh_token
            else None
        )
        self._run(
            connection,
            _upsert(connection, "tokens"),
            {
                "identity": identity.id,
                "provider": identity.provider,
                "access": self.sealer.seal_text(tokens.access_token, aad + ":access"),
                "refresh": refresh,
                "until": (
                    dt.datetime.fromtimestamp(tokens.expires_at, dt.UTC)
                    if tokens.expires_at
                    else None
                ),
                "granted": tokens.scope,
                "facts": dict(tokens.context),
                "at": utcnow(),
            },
        )

    def new_browser_session(self, session: Session, identity: Identity | LinkedIdentity) -> str:
        value = new_token(32)
        now = utcnow()
        self._run(
            session.connection(),
            _NEW_SESSION,
            {
                "id_hash": token_hash(value),
                "user_id": identity.user_id,
                "identity_id": identity.id,
                "created_at": now,
                "expires_at": now + SESSION_TTL,
                "revoked_at": None,
            },
        )
        return value

    def complete_login(
        self, session: Session, pending: PendingLogin, result: LoginResult, address: str | None
    ) -> tuple[str | Denied, str | None]:
        """After the upstream (or the form) said who the user is. Policy first: a refused
        identity gets no user, broker session or stored upstream token (a known one gets its
        facts refreshed, so later decisions read the current ones). Otherwise link the identity,
        start a broker session and :meth:`finish`. Returns the outcome and the new session
        cookie value (``None`` when refused)."""
        upstream = result.identity
        known = self._identity_row(session, upstream)
        if known is not None and known.disabled:
            # An operator disabled this user: the upstream saying who they are changes nothing,
            # and nothing of this sign-in (session, upstream token) is kept.
            self._claim(session, pending)
            return self._deny(
                session,
                pending,
                USER_DISABLED,
                provider=upstream.provider,
                user_id=known.user_id,
                address=address,
            ), None
        _, reason = self.entitlement(pending, self.resource(pending), upstream)
        if reason is not None:
            self._claim(session, pending)
            if known is not None:
                session.connection().execute(
                    _IDENTITY_FACTS, {"identity": known.id, "seen": upstream.snapshot()}
                )
            return self._deny(
                session,
                pending,
                reason,
                provider=upstream.provider,
                user_id=known.user_id if known else None,
                address=address,
            ), None
        identity = self._link(session, result, known)
        session_value = self.new_browser_session(session, identity)
        return self.finish(session, pending, identity, address), session_value

    def entitlement(
        self, pending: PendingLogin, resource: ResourceSettings, identity: UpstreamIdentity
    ) -> tuple[list[str], str | None]:
        """The scopes to grant for this request, or the reason to refuse it (the rule is
        :func:`broker.policy.entitle`, which ``broker explain`` prints too)."""
        result = policy.entitle(self.settings, resource, identity, requested_scopes(pending.scope))
        return list(result.granted), result.refused

    def _claim(
        self,
        session: Session,
        pending: PendingLogin,
        identity: Identity | LinkedIdentity | None = None,
    ) -> None:
        """Single use: of two parallel submissions for one sign-in, exactly one finishes.
        ``identity``: who signed in, stored with the claim (a pending login the upstream's
        answer consumed is claimed already, :meth:`consume_upstream_state`)."""
        session.flush()  # a pending login /authorize has just added: stored first
        connection = session.connection()
        now = utcnow()
        linked = {} if identity is None else {"user": identity.user_id, "linked": identity.id}
        if pending.completed_at is None:
            statement = _FINISH_CLAIM if identity is not None else _CLAIM
            claimed = self._run(connection, statement, {"pending": pending.id, "at": now, **linked})
            if not claimed:
                raise FlowError(
                    400,
                    "Sign-in request already used",
                    "This sign-in request was already completed. Start again from your "
                    "application.",
                )
            set_committed_value(pending, "completed_at", now)
        elif identity is not None:
            self._run(connection, _SIGNED_IN, {"pending": pending.id, **linked})
        if identity is not None:
            set_committed_value(pending, "user_id", identity.user_id)
            set_committed_value(pending, "identity_id", identity.id)

    def _deny(
        self,
        session: Session,
        pending: PendingLogin,
        reason: str,
        *,
        provider: str | None,
        user_id: str | None,
        address: str | None,
    ) -> Denied:
        client = self.client(session, pending)
        audit.record(
            session,
            "deny",
            "denied",
            user_id=user_id,
            client_id=client.client_id,
            resource=pending.resource,
            provider=provider,
            reason=reason,
            address=address,
        )
        return self._denied(session, pending, reason, "Access denied by policy.")

    def provider_refused(
        self,
        session: Session,
        pending: PendingLogin,
        reason: str,
        message: str,
        address: str | None,
        *,
        failed: bool = False,
    ) -> Denied:
        """The provider's own restrictions refused the identity (organisation, domain, site),
        or (``failed``) its answer could not be verified (a bad signature, an identity URL on
        another host, a malformed answer): a page that says so, and ``access_denied`` for the
        client; nothing stored."""
        audit.record(
            session,
            "login",
            "failure" if failed else "denied",
            client_id=pending.client_id,
            resource=pending.resource,
            provider=pending.provider,
            reason=reason,
            address=address,
        )
        description = (
            "The sign-in with the identity provider failed."
            if failed
            else "The identity provider account is not allowed."
        )
        return self._denied(session, pending, message, description)

    def finish(
        self,
        session: Session,
        pending: PendingLogin,
        identity: Identity | LinkedIdentity,
        address: str | None,
        *,
        auth_time: dt.datetime | None = None,
    ) -> str | Denied:
        """Apply policy, record consent, issue a grant and a code; the redirect to the client."""
        now = utcnow()
        connection = session.connection()
        self._claim(session, pending, identity)
        client = self.client(session, pending)
        resource = self.resource(pending)
        granted, reason = self.entitlement(
            pending, resource, UpstreamIdentity.from_snapshot(identity.snapshot)
        )
        disabled = (
            identity.disabled
            if isinstance(identity, LinkedIdentity)  # read with the identity
            else self._disabled(session, identity.user_id)
        )
        if disabled:
            reason = USER_DISABLED
        if reason is not None:
            return self._deny(
                session,
                pending,
                reason,
                provider=identity.provider,
                user_id=identity.user_id,
                address=address,
            )
        self._record_consent(
            session,
            identity.user_id,
            client,
            resource.uri,
            [s for s, _ in self.display_scopes(pending, resource)],
        )
        grant = GrantRow(
            id="gr_" + secrets.token_urlsafe(18),
            user_id=identity.user_id,
            client_id=client.client_id,
            resource=resource.uri,
            scope=" ".join(granted),
            auth_time=auth_time or now,
            revoked_at=None,
            user_disabled_at=None,
            identity=None,
        )
        self._run(
            connection,
            _NEW_GRANT,
            {
                "id": grant.id,
                "user_id": grant.user_id,
                "client_id": grant.client_id,
                "resource": grant.resource,
                "scope": grant.scope,
                "identity_id": identity.id,
                "auth_time": grant.auth_time,
                "created_at": now,
                "revoked_at": None,
                "revoke_reason": None,
            },
        )
        self._event(
            session,
            connection,
            audit.values(
                "login",
                "success",
                at=now,
                user_id=identity.user_id,
                client_id=client.client_id,
                resource=resource.uri,
                provider=identity.provider,
                address=address,
                details={"grant": grant.id, "scope": grant.scope},
            ),
        )
        oauth_request = self.server.stored_authorization_request(pending.request_params)
        with self.server.request_state(session, address):
            # The client as read above; its grant, inserted above, is live.
            self.server.keep_client(client.client_id, client, live_grant=True)
            authlib_grant = self.server.get_authorization_grant(oauth_request)
            response: Response = self.server.create_authorization_response(
                request=oauth_request, grant_user=GrantUser(grant), grant=authlib_grant
            )
        location = response.headers.get("Location")
        if (
            response.status_code != 302
            or not location
            or "code" not in parse_qs(urlsplit(location).query)
        ):
            # The stored request no longer validates (client removed or changed): roll back.
            raise FlowError(
                400,
                "Request no longer valid",
                "The application's request is no longer valid. Start again.",
            )
        return str(location)

    def _record_consent(
        self, session: Session, user_id: str, client: Client, resource: str, scopes: list[str]
    ) -> None:
        connection = session.connection()
        where = {"user": user_id, "client": client.client_id, "resource": resource}
        found = self._run(connection, _CONSENT_READ, where)
        consent = found[0] if found else None
        digest = redirect_digest(client.redirect_uris)
        now = utcnow()
        if consent is None:
            approved = sorted(set(scopes))
            # Another sign-in of this user for this client and resource that committed since
            # the read: its consent is this one's.
            self._run(
                connection,
                _upsert(connection, "consent"),
                {
                    "user": user_id,
                    "client": client.client_id,
                    "resource": resource,
                    "approved": approved,
                    "digest": digest,
                    "at": now,
                },
            )
        else:
            if consent.revoked_at is None and consent.redirect_digest == digest:
                scopes = [*scopes, *consent.scopes]
            approved = sorted(set(scopes))
            self._run(
                connection,
                _CONSENT_UPDATE,
                {"consent": consent.id, "approved": approved, "digest": digest, "at": now},
            )
        self._event(
            session,
            connection,
            audit.values(
                "consent",
                "success",
                at=now,
                user_id=user_id,
                client_id=client.client_id,
                resource=resource,
                details={"scopes": approved},
            ),
        )
