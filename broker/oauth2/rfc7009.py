"""RFC 7009 - OAuth 2.0 Token Revocation.

Section 2.1: revoking a refresh token SHOULD also invalidate the access tokens of the same grant;
here it revokes the whole grant (every refresh token of the family). Revoking an access token
lists its ``jti`` until it expires. Section 2.2: the answer is 200 also for unknown or invalid
tokens; a token of another client is not revoked.

Section 2.1: ``token_type_hint`` is only a hint; "if the server is unable to locate the token
using the given hint, it MUST extend its search across all of its supported token types", and a
server MAY ignore it. So a hint the broker does not know is ignored and every type is searched.
Authlib answers ``unsupported_token_type`` for it, but section 2.2.1 keeps that error for a token
the server cannot revoke, not for a hint.
"""

from __future__ import annotations

from typing import Any

from authlib.oauth2.rfc6749 import InvalidRequestError
from authlib.oauth2.rfc7009 import RevocationEndpoint

from .. import audit
from .rfc6749 import CLIENT_AUTH_METHODS
from .tokens import KnownToken, OwnTokenLookup, revoke_access_token


class TokenRevocation(OwnTokenLookup, RevocationEndpoint):  # type: ignore[misc]
    CLIENT_AUTH_METHODS = CLIENT_AUTH_METHODS

    def check_params(self, request: Any, client: Any) -> None:
        """Section 2.1: ``token`` is required; ``token_type_hint`` is never an error."""
        if "token" not in request.form:
            raise InvalidRequestError()

    def authenticate_token(self, request: Any, client: Any) -> KnownToken | None:
        self.check_params(request, client)
        hint = request.form.get("token_type_hint")
        known = hint if hint in self.SUPPORTED_TOKEN_TYPES else None
        token = self.query_token(request.form["token"], known)
        if token is not None and token.client_id == client.get_client_id():
            return token
        return None

    def revoke_token(self, token: KnownToken, request: Any) -> None:
        from .server import revoke_grant

        state = self.server.state()
        if token.kind == "refresh_token":
            assert token.grant is not None
            revoke_grant(state.session, token.grant.id, "revoked_by_client")
        else:
            revoke_access_token(state.session, token)
        audit.record(
            state.session,
            "revoke",
            "success",
            client_id=token.client_id,
            user_id=str(token.claims.get("sub")),
            address=state.address,
            reason=f"{token.kind}_revoked_by_client",
        )
