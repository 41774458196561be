"""RFC 7662 - OAuth 2.0 Token Introspection.

Section 2.1: the caller authenticates (confidential clients only here). Section 2.2: an inactive,
unknown or foreign token is ``{"active": false}`` and nothing else. A client may introspect the
tokens issued to it; MCP servers normally verify the JWT locally instead.
"""

from __future__ import annotations

from typing import Any

from authlib.oauth2.rfc6749 import InvalidRequestError
from authlib.oauth2.rfc7662 import IntrospectionEndpoint

from .tokens import KnownToken, OwnTokenLookup


class TokenIntrospection(OwnTokenLookup, IntrospectionEndpoint):  # type: ignore[misc]
    CLIENT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]

    def check_params(self, request: Any, client: Any) -> None:
        """Section 2.1: ``token`` is required; ``token_type_hint`` is only a hint ("if the server
        is unable to locate the token using the given hint, it MUST extend its search"), so an
        unknown hint is ignored rather than ``unsupported_token_type``."""
        if "token" not in request.form:
            raise InvalidRequestError()

    def check_permission(self, token: KnownToken, client: Any, request: Any) -> bool:
        return bool(token.client_id == client.get_client_id())

    def introspect_token(self, token: KnownToken) -> dict[str, Any]:
        if not token.active:
            return {"active": False}
        claims = token.claims
        body = {"active": True, "iss": self.server.settings.issuer}
        for key in ("sub", "aud", "scope", "client_id", "exp", "iat", "nbf", "jti", "token_type"):
            if key in claims:
                body[key] = claims[key]
        return body
