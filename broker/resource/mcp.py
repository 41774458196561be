"""The resource kit for servers built on the official MCP Python SDK (`mcp` 2.x).

The SDK does the HTTP side (RFC 9728 metadata at the path-inserted well-known URL, 401/403 with
`WWW-Authenticate`, scope checks); this module gives it a `TokenVerifier` that validates the
broker's RFC 9068 tokens with `BrokerTokenVerifier`, and `AuthSettings` built so that the issuer
and the resource keep their exact spelling (RFC 8414 section 3.3 and RFC 9207 compare issuers
as strings; a URL object would add a trailing slash to a path-less issuer).

MCP authorization spec: "MCP servers MUST validate that access tokens were issued specifically
for them as the intended audience" - `aud` is checked by the verifier, and again by the SDK
against `AccessToken.resource` (`validate_token_resource=True`).

`upstream_token(client, provider)` is the RFC 8693 token exchange in one call for a tool: the
caller's upstream token (Atlassian, GitHub...) in exchange for the broker token of the current
request, never by passing that token on (see `exchange`).

This module needs the `mcp` package; `broker.resource` itself does not import it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import anyio.to_thread
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings

from .exchange import UpstreamToken, UpstreamTokenClient
from .metadata import WELL_KNOWN_PATH, ResourceMetadata
from .verifier import BrokerTokenVerifier, InvalidToken, VerifiedToken

if TYPE_CHECKING:
    from mcp.server.mcpserver import MCPServer
    from starlette.requests import Request
    from starlette.responses import Response

__all__ = [
    "MCPTokenVerifier",
    "add_bare_metadata_route",
    "auth_settings",
    "current_token",
    "upstream_token",
]


class MCPTokenVerifier:
    """The SDK's `TokenVerifier` protocol over a `BrokerTokenVerifier`.

    A repeated token is answered from the verifier's cache on the event loop; a new one is
    verified in a worker thread, since an unknown `kid` may mean fetching the JWKS.
    `KeysUnavailable` is not caught: the request fails with 500, and the client keeps its token
    (a 401 would send it back to the broker for a new one while the broker is unreachable).
    """

    def __init__(self, verifier: BrokerTokenVerifier) -> None:
        self.verifier = verifier

    async def verify_token(self, token: str) -> AccessToken | None:
        verified = self.verifier.cached(token)
        if verified is None:
            try:
                verified = await anyio.to_thread.run_sync(self.verifier.verify, token)
            except InvalidToken:
                return None
        return _access_token(token, verified)


def _access_token(token: str, verified: VerifiedToken) -> AccessToken:
    return AccessToken(
        token=token,
        client_id=verified.client_id,
        scopes=list(verified.scopes),
        expires_at=verified.expires_at,
        resource=verified.audience,  # the `aud` entry equal to this server's canonical URI
        subject=verified.subject,
        claims=dict(verified.claims),
    )


def auth_settings(
    issuer: str, resource_url: str, required_scopes: Iterable[str] = ()
) -> AuthSettings:
    """`AuthSettings` for an MCP server protected by the broker at `issuer`.

    `resource_url` is the server's canonical URI (the tokens' `aud`), for example
    `https://mcp.example.com/mcp`. The URLs go in as strings: AuthSettings keeps a path-less
    issuer without the trailing slash a pre-built URL object would add.
    """
    scopes = list(dict.fromkeys(required_scopes))
    return AuthSettings.model_validate(
        {
            "issuer_url": issuer,
            "resource_server_url": resource_url,
            "required_scopes": scopes or None,
            "validate_token_resource": True,
        }
    )


def current_token() -> AccessToken | None:
    """The caller's access token inside a tool, resource or prompt; None without one."""
    return get_access_token()


async def upstream_token(client: UpstreamTokenClient, provider: str) -> UpstreamToken:
    """The caller's upstream token for `provider` inside a tool, by token exchange (RFC 8693)
    of the current request's broker token; from `client`'s cache while it is fresh, otherwise
    asked of the broker in a worker thread (the event loop never waits on the network).

    Raises `ExchangeRefused` (`sign_in_required` when the user must sign in with the provider
    again) or `ExchangeUnavailable`; `RuntimeError` outside a request the SDK authenticated.
    """
    token = get_access_token()
    if token is None:
        raise RuntimeError("upstream_token() needs a request authenticated with a broker token")
    hit = client.cached(token.token, provider)
    if hit is not None:
        return hit
    return await anyio.to_thread.run_sync(client.exchange, token.token, provider)


def add_bare_metadata_route(server: MCPServer[Any], metadata: ResourceMetadata) -> None:
    """Serve `metadata` at the bare `/.well-known/oauth-protected-resource` too.

    The SDK serves its document only at the path-inserted URL (RFC 9728 section 3.1); clients
    that ignore `WWW-Authenticate` fall back to the bare path. Build `metadata` from the same
    issuer, resource and scopes as `auth_settings`. Not for hosts serving several resources.
    """
    from starlette.responses import Response

    if metadata.metadata_path == WELL_KNOWN_PATH:
        return  # the SDK already serves it there
    body = metadata.json_bytes()
    headers = {
        "Access-Control-Allow-Origin": "*",
        "Access-Control-Allow-Methods": "GET, OPTIONS",
        "Access-Control-Allow-Headers": "*",
    }

    async def bare_metadata(request: Request) -> Response:
        if request.method == "OPTIONS":
            return Response(status_code=204, headers=headers)
        return Response(
            body,
            media_type="application/json",
            headers={**headers, "Cache-Control": "max-age=300"},
        )

    server.custom_route(WELL_KNOWN_PATH, methods=["GET", "OPTIONS"])(bare_metadata)
