"""RFC 8693 - OAuth 2.0 Token Exchange, for the user's upstream tokens.

Token passthrough is forbidden (MCP security best practices): an MCP server never forwards the
broker's token upstream, and the broker's token is never an upstream token. An MCP server that
must call an upstream API for the user (Jira with the user's Atlassian token) asks the broker for
that token at ``/token``, with this grant:

- section 2.1: ``grant_type=urn:ietf:params:oauth:grant-type:token-exchange``; the client is the
  MCP server's own confidential client (a ``static`` client authenticated with
  ``client_secret_basic`` or ``client_secret_post``, bound by ``allowed_resources`` to exactly one
  resource); ``subject_token`` is the user's broker access token for that resource,
  ``subject_token_type`` ``urn:ietf:params:oauth:token-type:access_token``; ``audience`` is the
  logical name of the target service, here the provider (``atlassian``); ``requested_token_type``
  absent or the access token type. ``actor_token`` (delegation) and ``resource`` are not
  supported;
- section 2.2.1: the response is the user's current upstream access token with
  ``issued_token_type``, ``token_type`` Bearer, ``expires_in`` and ``scope`` when known, plus the
  extra member ``upstream`` (``provider``, ``context``: Atlassian cloud ids and sites, Salesforce
  ``instance_url``, GitHub API host; ``expires_at``). Never a refresh token: section 2.2.1 makes
  it optional, and the upstream refresh token never leaves the broker;
- section 2.2.2: a subject token that is invalid for any reason, or unacceptable by policy
  (another resource's, expired, revoked, its user disabled), is ``invalid_request``; a target the
  broker will not or cannot issue for (an unknown provider, or one the resource may not obtain)
  is ``invalid_target``. Beyond those (section 2.2.2 allows other codes "as appropriate"): a user
  with no usable token for the provider (never signed in with it, or the upstream refused the
  refresh) is ``invalid_grant``, so the MCP server knows the user must sign in with it again;
  a temporary upstream or database failure is ``temporarily_unavailable`` (503), never
  ``invalid_grant``. Client problems are RFC 6749 section 5.2's: a public client cannot
  authenticate (``invalid_client``), a client that is not a static one with this grant type and
  one resource is ``unauthorized_client``.

The upstream token comes from :class:`broker.upstream.UpstreamTokenService` (refreshed before
expiry, one refresh at a time across workers). The service reaches the grant through an Authlib
grant extension, :class:`UpstreamTokenSource`; :func:`register_token_exchange` registers both.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import jwt
from authlib.oauth2.rfc6749 import grants
from authlib.oauth2.rfc6749.errors import (
    InvalidGrantError,
    InvalidRequestError,
    UnauthorizedClientError,
)
from sqlalchemy import select
from sqlalchemy.orm import Session

from .. import audit
from ..db import utcnow
from ..keys import KeyRing, verification_key
from ..models import Identity, RevokedToken, SigningKey, User
from ..plugins import ProviderRegistry
from ..upstream import SignInRequired, UpstreamTokenService, UpstreamTokenUnavailable
from .clients import OAuthClient
from .errors import InvalidTargetError, ServerError, TemporarilyUnavailableError
from .tokens import MAX_TOKEN_LENGTH

if TYPE_CHECKING:
    from .server import BrokerAuthorizationServer

log = logging.getLogger(__name__)

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
"""RFC 8693 section 2.1 ``grant_type``."""
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
"""RFC 8693 section 3: the token type identifier of an OAuth 2.0 access token."""
ACCESS_TOKEN_TYPES = frozenset({"at+jwt", "application/at+jwt"})
"""RFC 9068 section 2.1 (and section 4: compared case-insensitively)."""
REQUIRED_CLAIMS = ["iss", "exp", "aud", "sub", "client_id", "iat", "jti"]
"""RFC 9068 section 2.2."""
SINGLE_VALUED = ("subject_token", "subject_token_type", "requested_token_type", "actor_token")
"""RFC 6749 section 3.2: parameters MUST NOT be included more than once."""


class SubjectTokenRejected(Exception):
    """The subject token cannot be accepted; ``reason`` is a short fixed code for the log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RetryLater(TemporarilyUnavailableError):
    """``temporarily_unavailable`` (503) with ``Retry-After``."""

    def get_headers(self) -> list[tuple[str, str]]:
        headers: list[tuple[str, str]] = super().get_headers()
        return [*headers, ("Retry-After", "2")]


def verify_subject_token(
    session: Session, keys: KeyRing, issuer: str, token: str, audience: str
) -> dict[str, Any]:
    """The claims of ``token`` if it is a live broker access token for ``audience``.

    Checked as RFC 9068 section 4 has a resource server check it (``typ`` ``at+jwt``, a signing
    key the broker still publishes, the key's own algorithm, signature, ``iss``, ``aud``,
    ``exp``/``nbf``/``iat``, the required claims), and beyond what a resource server can see:
    not revoked (RFC 7009, ``revoked_tokens`` by ``jti``) and its user not disabled. Raises
    :class:`SubjectTokenRejected`.
    """
    if not token or len(token) > MAX_TOKEN_LENGTH or not token.isascii():
        raise SubjectTokenRejected("malformed")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise SubjectTokenRejected("malformed") from None
    typ, kid = header.get("typ"), header.get("kid")
    if not isinstance(typ, str) or typ.lower() not in ACCESS_TOKEN_TYPES:
        raise SubjectTokenRejected("not_an_access_token")
    if not isinstance(kid, str) or not kid or len(kid) > 64:
        raise SubjectTokenRejected("unknown_key")
    row = session.get(SigningKey, kid)
    if row is None or (
        row.state == "retired" and row.expires_at is not None and row.expires_at <= utcnow()
    ):
        raise SubjectTokenRejected("unknown_key")
    if header.get("alg") != row.alg:
        raise SubjectTokenRejected("wrong_algorithm")  # the key decides, never the header
    found = verification_key(keys, session, kid)
    if found is None:
        raise SubjectTokenRejected("unknown_key")
    key, alg = found
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[alg],
            issuer=issuer,
            audience=audience,
            options={"require": REQUIRED_CLAIMS},
        )
    except jwt.ExpiredSignatureError:
        raise SubjectTokenRejected("expired") from None
    except jwt.InvalidAudienceError:
        raise SubjectTokenRejected("wrong_audience") from None
    except jwt.InvalidIssuerError:
        raise SubjectTokenRejected("wrong_issuer") from None
    except jwt.PyJWTError:
        raise SubjectTokenRejected("invalid") from None
    if not isinstance(claims["sub"], str) or not isinstance(claims["jti"], str):
        raise SubjectTokenRejected("invalid")
    if session.get(RevokedToken, claims["jti"]) is not None:
        raise SubjectTokenRejected("revoked")
    user = session.get(User, claims["sub"])
    if user is None or user.disabled_at is not None:
        raise SubjectTokenRejected("user_disabled")
    return claims


@dataclass(frozen=True)
class Exchange:
    """A validated token exchange request: whose upstream token, for which client."""

    client_id: str
    resource: str
    provider: str
    user_id: str
    identity_id: int
    subject_client_id: str


class TokenExchangeGrant(grants.BaseGrant, grants.TokenEndpointMixin):  # type: ignore[misc]
    """RFC 8693 token exchange at ``/token``: a broker access token for the user's upstream
    access token (module docstring)."""

    GRANT_TYPE = TOKEN_EXCHANGE
    # RFC 8693 section 2.1 leaves client authentication to RFC 6749 section 2.3; only
    # confidential clients may exchange, so "none" is not among the methods.
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]

    server: BrokerAuthorizationServer
    upstream: UpstreamTokenService | None = None  # set by UpstreamTokenSource
    exchange: Exchange | None = None  # set by validate_token_request

    def validate_token_request(self) -> None:
        """RFC 8693 section 2.1, with the errors of section 2.2.2 (module docstring)."""
        if self.upstream is None:
            log.error("token exchange is registered without its upstream token service")
            raise ServerError("Token exchange is not available.")
        client: OAuthClient = self.authenticate_token_endpoint_client()
        self.request.client = client
        if client.row.kind != "static" or not client.check_grant_type(TOKEN_EXCHANGE):
            raise UnauthorizedClientError("The client may not use token exchange.")
        settings = self.server.settings
        bound = client.row.allowed_resources or []
        resource = settings.resource(bound[0]) if len(bound) == 1 else None
        if resource is None:
            raise UnauthorizedClientError("The client is not bound to one resource of this server.")

        payload = self.request.payload
        datalist: dict[str, list[str]] = payload.datalist
        data = payload.data
        for name in SINGLE_VALUED:
            if len(datalist.get(name, [])) > 1:
                raise InvalidRequestError(f"Repeated '{name}' parameter.")
        subject_token = data.get("subject_token")
        if not subject_token:
            raise InvalidRequestError("Missing 'subject_token' parameter.")
        if data.get("subject_token_type") != ACCESS_TOKEN_TYPE:
            raise InvalidRequestError(
                "The subject_token_type must be urn:ietf:params:oauth:token-type:access_token."
            )
        if data.get("requested_token_type", ACCESS_TOKEN_TYPE) != ACCESS_TOKEN_TYPE:
            raise InvalidRequestError("Only access tokens are issued by token exchange.")
        if data.get("actor_token") or data.get("actor_token_type"):
            raise InvalidRequestError("Delegation (actor_token) is not supported.")
        if datalist.get("resource"):
            raise InvalidTargetError("Name the provider with the 'audience' parameter.")
        audiences = datalist.get("audience", [])
        if not audiences or not audiences[0]:
            raise InvalidRequestError("Missing 'audience' parameter: name the provider.")
        if len(audiences) > 1:
            raise InvalidTargetError("Token exchange is for one provider at a time.")
        provider = audiences[0]
        if provider not in settings.providers:
            raise InvalidTargetError("The audience is not a provider of this server.")
        if provider not in resource.upstream_tokens:
            raise InvalidTargetError("This resource may not obtain tokens of that provider.")

        session = self.server.state().session
        try:
            claims = verify_subject_token(
                session, self.server.keys, settings.issuer, subject_token, resource.uri
            )
        except SubjectTokenRejected as exc:
            log.info(
                "token exchange refused for client %s: subject token %s",
                client.get_client_id(),
                exc.reason,
            )
            raise InvalidRequestError(
                "The subject token is not a valid access token for this client's resource."
            ) from None
        identity = session.scalars(
            select(Identity).where(Identity.user_id == claims["sub"], Identity.provider == provider)
        ).first()
        if identity is None:
            raise InvalidGrantError(_sign_in_again(provider))
        self.exchange = Exchange(
            client_id=client.get_client_id(),
            resource=resource.uri,
            provider=provider,
            user_id=claims["sub"],
            identity_id=identity.id,
            subject_client_id=str(claims["client_id"]),
        )

    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        """RFC 8693 section 2.2.1. The upstream leg (a refresh, when the token is about to
        expire) runs outside any database transaction, so the request's read transaction is
        ended first (on SQLite it holds the write lock every worker waits for)."""
        exchange, upstream = self.exchange, self.upstream
        assert exchange is not None and upstream is not None
        state = self.server.state()
        state.session.commit()
        try:
            current = upstream.current(
                exchange.identity_id,
                exchange.provider,
                client_id=exchange.client_id,
                resource=exchange.resource,
                address=state.address,
            )
        except SignInRequired as exc:
            log.info(
                "token exchange: no usable %s token for user %s (%s)",
                exchange.provider,
                exchange.user_id,
                exc.reason,
            )
            raise InvalidGrantError(_sign_in_again(exchange.provider)) from None
        except UpstreamTokenUnavailable as exc:
            log.info("token exchange for %s: %s", exchange.provider, exc.reason)
            raise RetryLater(
                f"The {exchange.provider} token cannot be obtained right now; try again shortly."
            ) from None
        upstream_member: dict[str, Any] = {
            "provider": current.provider,
            "context": dict(current.context),
        }
        body: dict[str, Any] = {
            "access_token": current.access_token,
            "issued_token_type": ACCESS_TOKEN_TYPE,
            "token_type": "Bearer",
        }
        if current.expires_at is not None:
            body["expires_in"] = max(1, current.expires_at - int(time.time()))
            upstream_member["expires_at"] = current.expires_at
        if current.scope:
            body["scope"] = current.scope
        body["upstream"] = upstream_member
        audit.record(
            state.session,
            "exchange",
            "success",
            user_id=exchange.user_id,
            client_id=exchange.client_id,
            resource=exchange.resource,
            provider=exchange.provider,
            address=state.address,
            details={
                "subject_client": exchange.subject_client_id,
                "refreshed": current.refreshed,
            },
        )
        state.issued(TOKEN_EXCHANGE, self.server.settings.resource(exchange.resource))
        headers: list[tuple[str, str]] = list(self.TOKEN_RESPONSE_HEADER)
        return 200, body, headers


def _sign_in_again(provider: str) -> str:
    return f"No usable {provider} token for this user: they must sign in with {provider} again."


class UpstreamTokenSource:
    """Authlib grant extension (``register_grant(grant, [extension])``): hands each
    :class:`TokenExchangeGrant` the application's upstream token service."""

    def __init__(self, service: UpstreamTokenService) -> None:
        self.service = service

    def __call__(self, grant: TokenExchangeGrant) -> None:
        grant.upstream = self.service


def register_token_exchange(
    server: BrokerAuthorizationServer,
    providers: ProviderRegistry,
    http: httpx.Client,
    **options: float,
) -> UpstreamTokenService:
    """Register the token exchange grant on ``server``, with an upstream token service over the
    application's providers and back-channel HTTP client (``options``: the service's
    ``refresh_margin``, ``lease``, ``wait``, ``poll``)."""
    service = UpstreamTokenService(server.db, server.sealer, providers, http, **options)
    server.register_grant(TokenExchangeGrant, [UpstreamTokenSource(service)])
    return service
