"""The resource kit: what an MCP server needs to accept the broker's access tokens.

- `verifier`: RFC 9068 validation of the broker's JWT access tokens against its JWKS;
- `metadata`: the RFC 9728 protected resource metadata document and its well-known paths;
- `challenges`: RFC 6750 / RFC 9728 `WWW-Authenticate: Bearer` values;
- `wsgi`: a WSGI middleware putting these together for servers without the MCP SDK;
- `exchange`: RFC 8693 token exchange of the caller's broker token for their upstream token;
- `mcp`: the adapter for the MCP Python SDK (needs the `mcp` package, imported on first use).

The core needs only PyJWT and cryptography. See docs/resource-kit.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .challenges import (
    bearer_challenge,
    insufficient_scope_challenge,
    invalid_token_challenge,
    missing_token_challenge,
)
from .exchange import (
    ExchangeError,
    ExchangeRefused,
    ExchangeUnavailable,
    UpstreamToken,
    UpstreamTokenClient,
)
from .metadata import WELL_KNOWN_PATH, ResourceMetadata
from .verifier import (
    DEFAULT_ALGORITHMS,
    BrokerTokenVerifier,
    InsufficientScope,
    InvalidToken,
    KeysUnavailable,
    RemoteKeySet,
    VerifiedToken,
    require_scopes,
)
from .wsgi import ProtectedResource

if TYPE_CHECKING:
    from .mcp import (
        MCPTokenVerifier,
        add_bare_metadata_route,
        auth_settings,
        current_token,
        upstream_token,
    )

__all__ = [
    "DEFAULT_ALGORITHMS",
    "WELL_KNOWN_PATH",
    "BrokerTokenVerifier",
    "ExchangeError",
    "ExchangeRefused",
    "ExchangeUnavailable",
    "InsufficientScope",
    "InvalidToken",
    "KeysUnavailable",
    "MCPTokenVerifier",
    "ProtectedResource",
    "RemoteKeySet",
    "ResourceMetadata",
    "UpstreamToken",
    "UpstreamTokenClient",
    "VerifiedToken",
    "add_bare_metadata_route",
    "auth_settings",
    "bearer_challenge",
    "current_token",
    "insufficient_scope_challenge",
    "invalid_token_challenge",
    "missing_token_challenge",
    "require_scopes",
    "upstream_token",
]

_MCP_NAMES = frozenset(
    {
        "MCPTokenVerifier",
        "add_bare_metadata_route",
        "auth_settings",
        "current_token",
        "upstream_token",
    }
)


def __getattr__(name: str) -> Any:
    # The MCP SDK adapter is imported on first use, so that the core works without the SDK.
    if name in _MCP_NAMES:
        from . import mcp

        return getattr(mcp, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
