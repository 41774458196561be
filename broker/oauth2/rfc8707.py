"""RFC 8707 - Resource Indicators for OAuth 2.0.

The ``resource`` parameter names the MCP server a token is for; it becomes the token's ``aud``.
Section 2: it MUST be an absolute URI without a fragment; the server answers ``invalid_target``
for a resource it does not know. The broker issues tokens for exactly one resource.
"""

from __future__ import annotations

from ..config import ResourceSettings, Settings
from .errors import InvalidTargetError


def resolve_resource(
    settings: Settings,
    values: list[str],
    *,
    redirect_uri: str | None = None,
    state: str | None = None,
) -> ResourceSettings:
    """The configured resource that ``values`` (all ``resource`` parameters) name.

    Without a ``resource`` parameter the single configured resource is assumed when there is
    exactly one (older MCP clients send none); otherwise the client must say which.
    """
    if not values:
        if len(settings.resources) == 1:
            return settings.resources[0]
        raise InvalidTargetError(
            "The 'resource' parameter is required.", redirect_uri=redirect_uri, state=state
        )
    if len(values) > 1:
        raise InvalidTargetError(
            "Tokens are issued for one resource at a time.", redirect_uri=redirect_uri, state=state
        )
    resource = settings.resource(values[0]) or settings.resource(values[0].rstrip("/"))
    if resource is None:
        raise InvalidTargetError(
            "The resource is not known to this server.", redirect_uri=redirect_uri, state=state
        )
    return resource
