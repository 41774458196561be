"""The authorization server: Authlib's framework-neutral server with the broker's storage.

Requests arrive as Werkzeug request objects passed in explicitly (no Flask globals); the database
session of the current request travels in a context variable set by the caller with
:meth:`BrokerAuthorizationServer.request_state`.

Client authentication (RFC 6749 section 2.3.1): HTTP Basic credentials are decoded strictly in one
place (:func:`.clients.basic_credentials`), for every endpoint that authenticates clients (token,
revocation, introspection); malformed ones are ``invalid_client`` with 401 (section 5.2).
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlencode

from authlib.oauth2.rfc6749 import AuthorizationServer, JsonRequest, OAuth2Request
from authlib.oauth2.rfc6749.errors import UnsupportedResponseTypeError
from authlib.oauth2.rfc6749.requests import JsonPayload, OAuth2Payload
from flask import after_this_request
from sqlalchemy import Connection, Table, bindparam, select, update
from sqlalchemy.orm import Session
from werkzeug.datastructures import CombinedMultiDict, MultiDict
from werkzeug.wrappers import Request, Response

from providers.contract import Identity as UpstreamIdentity

from .. import audit, metrics
from ..config import ResourceSettings, Settings
from ..crypto import Sealer, new_token
from ..db import Database, DriverStatements, UTCDateTime, utcnow
from ..keys import KeyRing
from ..models import Client, Grant, Identity, RefreshToken
from ..ratelimit import RateLimiter, Verdict
from .client_credentials import ClientCredentialsGrant, ClientSubject
from .clients import OAuthClient, authenticate_client_secret_basic, client_auth_methods
from .errors import TooManyRequestsError
from .rfc6749 import (
    AuthorizationCodeGrant,
    GrantRow,
    GrantUser,
    HotStatements,
    RecheckDue,
    RefreshTokenGrant,
)
from .rfc7636 import S256CodeChallenge
from .rfc9068 import AccessTokenClaims, identity_claims, issue_access_token
from .rfc9207 import IssuerParameter

log = logging.getLogger(__name__)


class RequestState:
    """Per-request storage context, and security actions that must survive a rolled-back
    request (revoking a grant after a replayed code or a reused refresh token).
    ``clients``: clients read along with the request's first statement (served by
    :meth:`BrokerAuthorizationServer.query_client` without one of their own); ``recheck``: the
    upstream re-check's test of a refresh grant (``broker.recheck``), ``None`` when off.

    Made with a ``session`` (the authorization endpoint, registration, revocation,
    introspection), or, at the token endpoint, with ``connect`` only, which opens the
    request's connection when it is first needed: the code and refresh grants run Core
    statements on it, and the ORM session, which costs more CPU than those statements, is made
    on the same connection and transaction only when something asks for :attr:`session` (the
    client credentials and token exchange grants, a signing key read again). The token
    endpoint's state then commits, rolls back and closes them (:meth:`commit`,
    :meth:`rollback`, :meth:`close`), and logs the audit events written on the connection
    (:meth:`audited`) once the commit succeeded."""

    def __init__(
        self,
        session: Session | None = None,
        address: str | None = None,
        *,
        connect: Callable[[], Connection] | None = None,
    ) -> None:
        if (session is None) == (connect is None):
            raise TypeError("a request state has a session or a way to connect")
        self._session = session
        self._connect = connect
        self._connection: Connection | None = None
        self.address = address
        self.revocations: list[tuple[str, str]] = []
        self.clients: dict[str, OAuthClient | None] = {}
        self.recheck: RecheckDue | None = None
        self._audited: list[dict[str, Any]] = []
        self._issued: list[tuple[str, ResourceSettings | None]] = []

    @property
    def session(self) -> Session:
        if self._session is None:
            self._session = Session(
                bind=self.connection(),
                join_transaction_mode="control_fully",
                expire_on_commit=False,
            )
        return self._session

    def revoke_grant(self, grant_id: str, reason: str) -> None:
        self.revocations.append((grant_id, reason))

    def connection(self) -> Connection:
        """The request's connection, for Core statements in its transaction (asked of the
        session once: each ask costs as much as a small statement's own overhead)."""
        if self._connection is None or self._connection.closed:
            self._connection = (
                self._connect() if self._connect is not None else self.session.connection()
            )
        return self._connection

    def audited(self, entry: dict[str, Any], event_id: int) -> None:
        """``entry`` (:func:`broker.audit.values`) was inserted as ``event_id`` in the
        request's transaction: logged once that commits."""
        if self._connect is None:
            audit.written(self.session, entry, event_id)
            return
        entry["id"] = event_id
        self._audited.append(entry)

    def issued(self, grant_type: str, resource: ResourceSettings | None) -> None:
        """A token of ``grant_type`` for ``resource`` is in the response: counted
        (``broker_tokens_issued_total``) once the request commits, so a token whose claim
        was then lost to a parallel request, or whose write failed, is not."""
        self._issued.append((grant_type, resource))

    def rollback(self) -> None:
        """Undo what the request wrote (before retrying its first statement on a fresh
        connection, or when it fails). A connection of the token endpoint's that was lost is
        closed: the next statement opens a new one (SQLAlchemy would reconnect the same
        ``Connection``, but without its isolation level, autocommit on PostgreSQL)."""
        if self._session is not None:
            self._session.rollback()
        elif self._connection is not None:
            self._connection.rollback()
        self._audited.clear()
        self._issued.clear()
        lost = self._connection is not None and self._connection.invalidated
        if lost and self._connect is not None:
            self.close()

    def commit(self) -> None:
        """Commit the request: the session's (at the token endpoint it commits the
        connection's transaction too, and logs what it audited), or the connection's; then the
        audit events written on the connection are logged."""
        if self._session is not None:
            self._session.commit()
        elif self._connection is not None:
            self._connection.commit()
        audited, self._audited = self._audited, []
        audit.log_written(audited)
        issued, self._issued = self._issued, []
        for grant_type, resource in issued:
            metrics.token_issued(grant_type, resource)

    def close(self) -> None:
        """Close the token endpoint's session and connection (a state made with a session
        leaves closing it to the session's owner)."""
        if self._connect is None:
            return
        if self._session is not None:
            self._session.close()
            self._session = None
        if self._connection is not None:
            self._connection.close()
            self._connection = None


USE_RECORDED = dt.timedelta(hours=1)
_CLIENTS: Table = Client.__table__  # type: ignore[assignment]
_CLIENT_USED = (
    update(_CLIENTS)
    .where(_CLIENTS.c.client_id == bindparam("client"))
    .values(last_used_at=bindparam("now", type_=UTCDateTime()))
)
_REGISTRATION_USED = _CLIENT_USED.values(expires_at=bindparam("expires", type_=UTCDateTime()))

_state: contextvars.ContextVar[RequestState] = contextvars.ContextVar("broker_oauth_state")


class _WerkzeugPayload(OAuth2Payload):  # type: ignore[misc]
    def __init__(self, values: MultiDict[str, str]) -> None:
        self._values = values
        self._datalist: dict[str, list[str]] | None = None

    @property
    def data(self) -> MultiDict[str, str]:
        return self._values

    @property
    def datalist(self) -> dict[str, list[str]]:
        if self._datalist is None:  # the request does not change: built once
            self._datalist = {k: self._values.getlist(k) for k in self._values}
        return self._datalist


class WerkzeugOAuth2Request(OAuth2Request):  # type: ignore[misc]
    """An Authlib request built from a Werkzeug request, or from stored authorization params."""

    def __init__(
        self,
        method: str,
        uri: str,
        headers: Any,
        args: MultiDict[str, str],
        form: MultiDict[str, str],
    ) -> None:
        super().__init__(method=method, uri=uri, headers=headers)
        self._args = args
        self._form = form
        # Query and body together, the query first, without copying either.
        self.payload = _WerkzeugPayload(CombinedMultiDict([args, form]))
        self.resource = None
        self.validated_redirect_uri: str | None = None

    @property
    def args(self) -> MultiDict[str, str]:
        return self._args

    @property
    def form(self) -> MultiDict[str, str]:
        return self._form


class _JsonPayload(JsonPayload):  # type: ignore[misc]
    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    @property
    def data(self) -> dict[str, Any]:
        return self._data


class UnsupportedResponseType(UnsupportedResponseTypeError):  # type: ignore[misc]
    """``unsupported_response_type`` whose description never repeats the request's value."""

    DESCRIPTION = "Only response_type=code is supported."

    def get_error_description(self) -> str:
        return self.DESCRIPTION


LIMITED_ENDPOINTS = {"token": "token", "revocation": "revoke", "introspection": "introspect"}
"""Authlib's endpoint names (``authenticate_client``'s ``endpoint``): their limits' names."""


class BrokerAuthorizationServer(AuthorizationServer):  # type: ignore[misc]
    limiter: RateLimiter | None = None
    """The app's rate limiter (set by :mod:`broker.views`), for the per-client limits."""

    # OAuth 2.1: the code grant with PKCE, refresh with rotation, client credentials for agents.
    TOKEN_GRANTS = (AuthorizationCodeGrant, RefreshTokenGrant, ClientCredentialsGrant)

    def __init__(self, settings: Settings, db: Database, keys: KeyRing, sealer: Sealer) -> None:
        super().__init__(scopes_supported=None)
        self.settings = settings
        self.db = db
        self.keys = keys
        self.sealer = sealer
        # The token endpoint's statements on the driver's cursor (rfc6749.py), and those of
        # the end of a sign-in (broker/flow.py, the code's insert).
        self.hot = HotStatements(db.engine)
        self.sql = DriverStatements(db.engine)
        for grant in self.TOKEN_GRANTS:
            # PKCE, S256 only, belongs to the code grant (OAuth 2.1 section 4.1.1).
            pkce = [S256CodeChallenge()] if grant is AuthorizationCodeGrant else None
            self.register_grant(grant, pkce)
        self.register_extension(IssuerParameter(settings.issuer))
        self.register_client_auth_method("client_secret_basic", authenticate_client_secret_basic)

    def get_authorization_grant(self, request: Any) -> Any:
        """RFC 6749 section 4.1.2.1: ``unsupported_response_type``, redirected only to a
        validated redirect URI (as Authlib does), with a fixed description: Authlib's echoes
        the request's ``response_type``, and a value outside printable ASCII was a 500."""
        if any(
            grant.check_authorization_endpoint(request) for grant, _ in self._authorization_grants
        ):
            return super().get_authorization_grant(request)
        redirect_uri = None
        client = self.query_client(request.payload.client_id or "")
        if client is not None:
            requested = request.payload.redirect_uri
            if requested:
                redirect_uri = requested if client.check_redirect_uri(requested) else None
            else:
                redirect_uri = client.get_default_redirect_uri()
        raise UnsupportedResponseType(
            "",
            description=UnsupportedResponseType.DESCRIPTION,
            redirect_uri=redirect_uri,
            state=request.payload.state,
        )

    def count_client(self, endpoint: str, client: Any) -> None:
        """The per-client limit of ``endpoint`` (``rate_limits.<token|revoke|introspect>
        .per_client``), decided once the client is authenticated, so that nobody spends another
        client's budget by naming it (a public client is named by its ``client_id`` alone).

        The window's count is read now and the request counted once the response is made,
        after the request's transaction: on SQLite a counter written from inside it would wait
        for its own lock. Requests of one client in flight at the same moment may pass the
        limit by their number."""
        name = LIMITED_ENDPOINTS.get(endpoint)
        rates = self.limiter
        if name is None or rates is None:
            return
        rate = rates.limit(name, "per_client")
        if rate is None:
            return
        client_id = client.get_client_id()
        verdict = rates.verdict(name, "per_client", client_id, rate)
        if verdict.count <= rate.count:  # counted: the allowed ones, and the first refused

            @after_this_request
            def counted(response: Any) -> Any:
                rates.hit(name, "per_client", client_id, rate)
                return response

        if verdict.count >= rate.count:
            if verdict.count == rate.count:  # logged once per window and client
                log.warning("rate limit %s.per_client (%s) reached by %s", name, rate, client_id)
            refused = Verdict(name, "per_client", rate, verdict.count + 1, verdict.retry_after)
            raise TooManyRequestsError(refused.description, refused.retry_after)

    def grant_types_supported(self) -> list[str]:
        """The ``grant_type`` values of the registered token grants (RFC 8414 section 2)."""
        return [grant.GRANT_TYPE for grant, _ in self._token_grants]

    def authenticate_client(self, request: Any, methods: list[str], endpoint: str = "token") -> Any:
        """RFC 6749 section 2.3: Authlib's methods, only ``client_secret_basic`` when the request
        has Basic credentials (one method per request); malformed ones are ``invalid_client``
        whatever else the request carries (:func:`.clients.client_auth_methods`)."""
        client = super().authenticate_client(
            request, client_auth_methods(request, methods), endpoint
        )
        self.count_client(endpoint, client)
        return client

    # -- request context ------------------------------------------------------------------

    @contextmanager
    def request_state(
        self,
        session: Session | None = None,
        address: str | None = None,
        *,
        connect: Callable[[], Connection] | None = None,
    ) -> Iterator[RequestState]:
        state = RequestState(session, address, connect=connect)
        token = _state.set(state)
        try:
            yield state
        finally:
            _state.reset(token)

    def state(self) -> RequestState:
        return _state.get()

    def current_state(self) -> RequestState | None:
        """The request's state, if one is set (:meth:`request_state`)."""
        return _state.get(None)

    def apply_revocations(self, state: RequestState) -> None:
        """Run the revocations a failed request asked for, in their own transaction."""
        if not state.revocations:
            return
        with self.db.session() as session:
            for grant_id, reason in state.revocations:
                revoke_grant(session, grant_id, reason)
                grant = session.get(Grant, grant_id)
                audit.record(
                    session,
                    "revoke",
                    "success",
                    reason=reason,
                    user_id=grant.user_id if grant else None,
                    client_id=grant.client_id if grant else None,
                    resource=grant.resource if grant else None,
                    address=state.address,
                    details={"grant": grant_id},
                )
                log.warning("grant revoked: %s (grant %s)", reason, grant_id)

    # -- Authlib framework hooks -----------------------------------------------------------

    def create_oauth2_request(self, request: Any) -> OAuth2Request:
        if isinstance(request, OAuth2Request):
            return request
        assert isinstance(request, Request)
        form = request.form if request.method == "POST" else MultiDict()
        # The issuer's URL, never one built from the Host header: Authlib refuses a plain-http
        # URL on a non-loopback host, so a forged Host was a 500 (issue 11).
        uri = self.settings.issuer + request.path
        return WerkzeugOAuth2Request(request.method, uri, request.headers, request.args, form)

    def stored_authorization_request(self, params: dict[str, list[str]]) -> WerkzeugOAuth2Request:
        """Rebuild the authorization request a pending login holds (any worker can finish it)."""
        args: MultiDict[str, str] = MultiDict([(k, v) for k, vs in params.items() for v in vs])
        uri = f"{self.settings.issuer}/authorize?{urlencode(list(args.items(multi=True)))}"
        return WerkzeugOAuth2Request("GET", uri, {}, args, MultiDict())

    def create_json_request(self, request: Any) -> JsonRequest:
        body = request.get_json(silent=True)
        json_request = JsonRequest(request.method, request.url, request.headers)
        json_request.payload = _JsonPayload(body if isinstance(body, dict) else {})
        return json_request

    def handle_response(self, status: int, body: Any, headers: Any) -> Response:
        if isinstance(body, dict):
            body = json.dumps(body)
        response = Response(body, status=status, headers=dict(headers))
        return response

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        pass

    # -- storage ---------------------------------------------------------------------------

    def query_client(self, client_id: str) -> OAuthClient | None:
        if not client_id or len(client_id) > 2048 or not client_id.isprintable():
            return None
        state = self.state()
        if client_id in state.clients:
            return state.clients[client_id]
        row = state.session.get(Client, client_id)
        client = (
            None if row is None else self._usable(row, lambda: self._has_live_grant(row.client_id))
        )
        # Kept for the request: it is asked again (the authorization request is validated in
        # steps), and the flow's own look-up of the row finds it in the session's identity map,
        # which holds rows only while something else does.
        state.clients[client_id] = client
        return client

    def keep_client(self, client_id: str, row: Client | None, *, live_grant: bool) -> None:
        """Serve ``client_id`` from ``row`` (``None``: there is no such client) for the rest of
        the request: the token grants read it along with the code or refresh token, which
        belongs to a grant of it (``live_grant``: one that is not revoked)."""
        state = self.state()
        if row is None:
            state.clients[client_id] = None
        elif live_grant or not self._expired(row):
            state.clients[client_id] = self._usable(row, lambda: live_grant)

    def _usable(self, row: Client, has_live_grant: Callable[[], bool]) -> OAuthClient | None:
        """The client, unless switched off or an expired registration."""
        if row.kind == "cimd":
            # A metadata document client's expires_at says when /authorize fetches the document
            # again (oauth2/cimd.py), not that the client is gone: grants keep working here.
            if not self.settings.client_metadata_documents.enabled:
                return None
            return OAuthClient(row)
        if self._expired(row) and not has_live_grant():
            # Only an unused registration expires: a client whose user granted it access keeps
            # working as long as that grant lives (its refresh tokens may outlive the TTL).
            return None
        return OAuthClient(row)

    @staticmethod
    def _expired(row: Client) -> bool:
        return row.kind != "cimd" and row.expires_at is not None and row.expires_at <= utcnow()

    def _has_live_grant(self, client_id: str) -> bool:
        live = (
            self.state()
            .session.scalars(
                select(Grant.id)
                .where(Grant.client_id == client_id, Grant.revoked_at.is_(None))
                .limit(1)
            )
            .first()
        )
        return live is not None

    def record_client_use(self, client: OAuthClient) -> None:
        """Record that ``client`` obtained a token, at most hourly: a client shared by many users
        (a metadata document) would otherwise be one hot row that every token request of every
        user updates. A registration is extended before half of its lifetime is gone, so a used
        one never expires."""
        row = client.row
        now = utcnow()
        ttl = dt.timedelta(seconds=self.settings.registration_ttl)
        registration = row.kind == "dcr"  # an unused registration expires; a used one lives on
        if not (
            row.last_used_at is None
            or now - row.last_used_at > USE_RECORDED
            or (registration and row.expires_at is not None and row.expires_at - now < ttl / 2)
        ):
            return
        connection = self.state().connection()
        if registration:
            connection.execute(
                _REGISTRATION_USED, {"client": row.client_id, "now": now, "expires": now + ttl}
            )
        else:
            connection.execute(_CLIENT_USED, {"client": row.client_id, "now": now})

    def generate_token(
        self,
        grant_type: str,
        client: OAuthClient,
        user: GrantUser | ClientSubject | None = None,
        scope: str | None = None,
        expires_in: int | None = None,
        include_refresh_token: bool = True,
    ) -> dict[str, Any]:
        """An RFC 9068 access token for a user's grant, or for the client itself (client
        credentials: ``sub`` is the client id, section 2.2, and there is no refresh token)."""
        extra: dict[str, Any] = {}
        auth_time: int | None
        if isinstance(user, GrantUser):
            subject, audience = user.grant.user_id, user.grant.resource
            auth_time = int(user.grant.auth_time.timestamp())
            extra = self._identity_claims(user.grant)
        elif isinstance(user, ClientSubject):
            # The client authenticated with this very request; no user, so no auth_time and
            # no identity claims (RFC 9068 section 2.2: auth_time is about an end user).
            subject, audience, auth_time = user.client_id, user.resource, None
            include_refresh_token = False
        else:
            raise TypeError(f"no token subject for the {grant_type} grant")
        lifetime = expires_in or self.settings.tokens.access_ttl
        key = self.keys.current() or self.keys.active(self.state().session)
        access_token, _ = issue_access_token(
            key,
            AccessTokenClaims(
                issuer=self.settings.issuer,
                subject=subject,
                audience=audience,
                client_id=client.get_client_id(),
                scope=scope or "",
                auth_time=auth_time,
                lifetime=lifetime,
                extra=extra,
            ),
        )
        self.state().issued(grant_type, self.settings.resource(audience))
        token: dict[str, Any] = {
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": lifetime,
            "scope": scope or "",
        }
        if include_refresh_token:
            token["refresh_token"] = new_token(32)
        return token

    def _identity_claims(self, grant: Grant | GrantRow) -> dict[str, Any]:
        """The identity claims the grant's resource may see (``resources[].claims``), from the
        stored identity: what the last sign-in or re-check saw. Nothing when none are listed."""
        resource = self.settings.resource(grant.resource)
        if resource is None or not resource.claims:
            return {}
        if isinstance(grant, GrantRow):  # read with the grant
            snapshot = grant.identity.snapshot if grant.identity is not None else None
        else:
            row = (
                self.state().session.get(Identity, grant.identity_id) if grant.identity_id else None
            )
            snapshot = row.snapshot if row is not None else None
        if snapshot is None:
            return {}
        return identity_claims(UpstreamIdentity.from_snapshot(snapshot), resource.claims)

    def save_token(self, token: dict[str, Any], request: OAuth2Request) -> None:
        """Authlib's storage hook, for the grants that do not store their own (the code and
        refresh grants do, in ``rfc6749``): the client credentials grant, audited."""
        state = self.state()
        self.record_client_use(request.client)
        if not isinstance(request.user, ClientSubject):
            raise TypeError("only the client credentials grant saves tokens here")
        audit.record(
            state.session,
            "issue",
            "success",
            client_id=request.user.client_id,
            resource=request.user.resource,
            address=state.address,
            details={"grant_type": "client_credentials", "scope": token.get("scope", "")},
        )


def revoke_grant(session: Session, grant_id: str, reason: str) -> None:
    session.execute(
        update(Grant)
        .where(Grant.id == grant_id, Grant.revoked_at.is_(None))
        .values(revoked_at=utcnow(), revoke_reason=reason)
    )
    # Sealed successors are useless once the family is revoked; drop them.
    session.execute(
        update(RefreshToken).where(RefreshToken.grant_id == grant_id).values(successor_sealed=None)
    )
