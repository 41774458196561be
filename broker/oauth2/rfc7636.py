"""RFC 7636 - Proof Key for Code Exchange, S256 only.

OAuth 2.1 section 4.1.1 and the MCP authorization spec require PKCE for every client; ``plain`` is
refused (RFC 9700 section 2.1.1) and a missing ``code_challenge`` is an ``invalid_request``.
"""

from __future__ import annotations

from typing import Any

from authlib.oauth2.rfc6749.errors import InvalidRequestError
from authlib.oauth2.rfc7636 import CodeChallenge


class S256CodeChallenge(CodeChallenge):  # type: ignore[misc]
    DEFAULT_CODE_CHALLENGE_METHOD = "S256"
    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]

    def __init__(self) -> None:
        super().__init__(required=True)

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        data = grant.request.payload.data
        if not data.get("code_challenge"):
            raise InvalidRequestError("PKCE is required: send a S256 'code_challenge'.")
        if data.get("code_challenge_method", "plain") != "S256":
            raise InvalidRequestError("Only the S256 'code_challenge_method' is supported.")
        super().validate_code_challenge(grant, redirect_uri)

    def get_authorization_code_challenge(self, authorization_code: Any) -> str:
        return str(authorization_code.code_challenge)

    def get_authorization_code_challenge_method(self, authorization_code: Any) -> str:
        return str(authorization_code.code_challenge_method)
