"""A WSGI middleware that makes any WSGI app a protected resource of the broker.

For MCP servers not built on the MCP Python SDK. It implements:

- RFC 9728 section 3: the metadata document at its well-known path(s), readable cross-origin
  (browser-based clients such as MCP Inspector fetch it);
- RFC 6750 section 2.1: the token only from `Authorization: Bearer`; OAuth 2.1 section 5.2 forbids
  the query string, and `bearer_methods_supported` says `header`, so nothing else is looked at;
- RFC 6750 section 3.1 and RFC 9728 section 5.1: 401 with a challenge naming `resource_metadata`
  (and `error="invalid_token"` when a token was presented), 403 `insufficient_scope`.

The verified token is put in `environ["broker.token"]` for the app. CORS for the protected paths
themselves (so that a browser can read a 401's `WWW-Authenticate`) belongs to a CORS middleware
wrapped around this one.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .challenges import (
    INSUFFICIENT_SCOPE_DESCRIPTION,
    INVALID_TOKEN_DESCRIPTION,
    insufficient_scope_challenge,
    invalid_token_challenge,
    missing_token_challenge,
)
from .metadata import ResourceMetadata, validate_scope_tokens
from .verifier import (
    BrokerTokenVerifier,
    InsufficientScope,
    InvalidToken,
    KeysUnavailable,
    require_scopes,
)

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

logger = logging.getLogger(__name__)

ENVIRON_KEY = "broker.token"

# RFC 6750 section 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_METADATA_METHODS = "GET, HEAD, OPTIONS"


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer` header (RFC 6750 section 2.1).

    None when there is no header or it uses another scheme (treated as "no token"); an empty or
    malformed bearer credential is returned as is, so that it is refused as an invalid token.
    """
    if not authorization:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credentials.strip(" ")


class ProtectedResource:
    """Wraps `app`: serves the metadata, demands a valid token with `required_scopes` elsewhere."""

    def __init__(
        self,
        app: WSGIApplication,
        verifier: BrokerTokenVerifier,
        resource_metadata: ResourceMetadata,
        required_scopes: Iterable[str] = (),
    ) -> None:
        if verifier.audience != resource_metadata.resource:
            raise ValueError("the verifier's audience must be the metadata's resource")
        self.app = app
        self.verifier = verifier
        self.metadata = resource_metadata
        self.required_scopes = validate_scope_tokens(required_scopes)
        self._metadata_paths = frozenset(resource_metadata.well_known_paths)
        self._metadata_url = resource_metadata.metadata_url

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        if path in self._metadata_paths:
            return self._serve_metadata(environ, start_response)

        token = bearer_token(environ.get("HTTP_AUTHORIZATION"))
        if token is None:
            return self._refuse(
                start_response,
                "401 Unauthorized",
                missing_token_challenge(self._metadata_url, self.required_scopes),
                {"error": "unauthorized", "error_description": "A bearer token is required"},
            )
        try:
            if _B64TOKEN.fullmatch(token) is None:
                raise InvalidToken("malformed token")
            verified = self.verifier.verify(token)
            require_scopes(verified, self.required_scopes)
        except InvalidToken:
            return self._refuse(
                start_response,
                "401 Unauthorized",
                invalid_token_challenge(self._metadata_url, self.required_scopes),
                {"error": "invalid_token", "error_description": INVALID_TOKEN_DESCRIPTION},
            )
        except InsufficientScope as error:
            return self._refuse(
                start_response,
                "403 Forbidden",
                insufficient_scope_challenge(self._metadata_url, error.required),
                {
                    "error": "insufficient_scope",
                    "error_description": INSUFFICIENT_SCOPE_DESCRIPTION,
                },
            )
        except KeysUnavailable:
            logger.warning("cannot verify access tokens: the broker's JWKS is unavailable")
            body = _json({"error": "temporarily_unavailable"})
            start_response(
                "503 Service Unavailable",
                [
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(body))),
                    ("Cache-Control", "no-store"),
                    ("Retry-After", "10"),
                ],
            )
            return [body]
        environ[ENVIRON_KEY] = verified
        return self.app(environ, start_response)

    def _serve_metadata(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        cors = [
            ("Access-Control-Allow-Origin", "*"),
            ("Access-Control-Allow-Methods", _METADATA_METHODS),
            ("Access-Control-Allow-Headers", "*"),
        ]
        if method == "OPTIONS":
            start_response("204 No Content", [*cors, ("Access-Control-Max-Age", "86400")])
            return []
        if method not in ("GET", "HEAD"):
            start_response(
                "405 Method Not Allowed", [("Allow", _METADATA_METHODS), ("Content-Length", "0")]
            )
            return []
        body = self.metadata.json_bytes()
        start_response(
            "200 OK",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "max-age=300"),
                *cors,
            ],
        )
        return [] if method == "HEAD" else [body]

    @staticmethod
    def _refuse(
        start_response: StartResponse, status: str, challenge: str, body: dict[str, str]
    ) -> list[bytes]:
        payload = _json(body)
        start_response(
            status,
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(payload))),
                ("Cache-Control", "no-store"),
                ("WWW-Authenticate", challenge),
            ],
        )
        return [payload]


def _json(body: dict[str, str]) -> bytes:
    return json.dumps(body).encode()
