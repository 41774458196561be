"""RFC 6749 section 4.4 - the Client Credentials Grant, for headless agents.

Section 4.4: the client asks for a token in its own name; the grant MUST only be used by
confidential clients, and section 4.4.2 says the client MUST authenticate (a client that cannot,
a public one, gets ``invalid_client``, section 5.2). The broker allows it only to static clients
the operator registered with ``client_credentials`` among their grant types (any other client gets
``unauthorized_client``), for the resources named in their ``allowed_resources`` (RFC 8707 section
2: ``invalid_target`` otherwise) and the scopes in their ``scope`` that the resource defines
(section 3.3: ``invalid_scope`` otherwise). Section 4.4.3: a refresh token SHOULD NOT be
included; none is. RFC 9068 section 2.2: for a token issued to the client itself, ``sub`` is the
client's identifier; section 5: it must not be confused with a user's ``sub``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from authlib.oauth2.rfc6749 import grants
from authlib.oauth2.rfc6749.errors import InvalidScopeError, UnauthorizedClientError

from ..config import ResourceSettings
from .clients import OAuthClient
from .errors import InvalidTargetError
from .rfc8707 import resolve_resource

log = logging.getLogger(__name__)

GRANT_TYPE = "client_credentials"
USER_SUBJECT_PREFIX = "usr_"  # every user's ``sub`` (broker.flow): a client id must not look alike


@dataclass(frozen=True)
class ClientSubject:
    """The resource owner of a client credentials token: the client itself (RFC 9068 section
    2.2), with the one resource and the scopes the token is for."""

    client_id: str
    resource: str
    scope: str

    def get_user_id(self) -> str:
        return self.client_id


def allowed_scopes(client: OAuthClient, resource: ResourceSettings) -> list[str]:
    """The scopes ``client`` may obtain for ``resource`` in its own name: those of its ``scope``
    that the resource defines, in the resource's order (none when it has no ``scope``)."""
    own = set((client.row.scope or "").split())
    return [s for s in resource.scopes if s in own]


def granted_scopes(requested: str | None, client: OAuthClient, resource: ResourceSettings) -> str:
    """RFC 6749 section 3.3: the requested scopes, each of them allowed, or all allowed scopes
    when none are requested; the resource's required scopes are always included."""
    allowed = allowed_scopes(client, resource)
    asked = list(dict.fromkeys((requested or "").split()))
    if any(s not in allowed for s in asked):
        raise InvalidScopeError("The client is not allowed the requested scope for this resource.")
    granted = asked or allowed
    for s in resource.required_scopes:
        if s not in allowed:
            raise InvalidScopeError("The client is not allowed the scopes this resource requires.")
        if s not in granted:
            granted.append(s)
    return " ".join(granted)


class ClientCredentialsGrant(grants.ClientCredentialsGrant):  # type: ignore[misc]
    """Authlib's grant (client authentication, the client's grant types) narrowed to static
    confidential clients, one allowed resource and allowed scopes."""

    # No "none": a public client cannot authenticate, so it gets invalid_client (section 4.4.2).
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]

    def validate_token_request(self) -> None:
        super().validate_token_request()
        request = self.request
        client: OAuthClient = request.client
        if client.row.kind != "static":
            # Only an operator's registration can grant this; never a self-registered client.
            raise UnauthorizedClientError(
                f"The client is not authorized to use 'grant_type={GRANT_TYPE}'"
            )
        if client.client_id.startswith(USER_SUBJECT_PREFIX):
            log.warning(
                "client %s refused the client_credentials grant: its id looks like a user's sub",
                client.client_id,
            )
            raise UnauthorizedClientError("This client's identifier could be taken for a user's.")
        resource = resolve_resource(
            self.server.settings, request.payload.datalist.get("resource", [])
        )
        allowed = {uri.rstrip("/") for uri in client.row.allowed_resources or ()}
        if resource.uri.rstrip("/") not in allowed:
            raise InvalidTargetError("The client is not allowed tokens for this resource.")
        request.resource = resource
        request.user = ClientSubject(
            client.client_id, resource.uri, granted_scopes(request.payload.scope, client, resource)
        )

    def generate_token(
        self,
        user: Any = None,
        scope: str | None = None,
        grant_type: str | None = None,
        expires_in: int | None = None,
        include_refresh_token: bool = True,
    ) -> dict[str, Any]:
        """The token for the validated subject and granted scopes (Authlib passes the requested
        ones), never with a refresh token (section 4.4.3)."""
        subject: ClientSubject = self.request.user
        token: dict[str, Any] = super().generate_token(
            user=subject,
            scope=subject.scope,
            grant_type=grant_type,
            expires_in=expires_in,
            include_refresh_token=False,
        )
        return token
