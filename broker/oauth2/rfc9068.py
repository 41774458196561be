"""RFC 9068 - JSON Web Token (JWT) Profile for OAuth 2.0 Access Tokens.

Section 2.1: the header ``typ`` is ``at+jwt``. Section 2.2: ``iss``, ``exp``, ``aud``, ``sub``,
``client_id``, ``iat`` and ``jti`` are REQUIRED; ``scope`` carries the granted scopes and
``auth_time`` when the user last authenticated. ``aud`` is the one resource (RFC 8707) the token
was issued for. Signed with pyjwt using key objects loaded once (see ``broker.keys``).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

import jwt

from ..keys import LoadedKey


@dataclass(frozen=True)
class AccessTokenClaims:
    issuer: str
    subject: str
    audience: str
    client_id: str
    scope: str
    auth_time: int
    lifetime: int


def issue_access_token(
    key: LoadedKey, claims: AccessTokenClaims, *, now: int | None = None
) -> tuple[str, dict[str, Any]]:
    """Sign an access token; returns the JWT and its payload."""
    now = int(time.time()) if now is None else now
    payload: dict[str, Any] = {
        "iss": claims.issuer,
        "sub": claims.subject,
        "aud": claims.audience,
        "client_id": claims.client_id,
        "scope": claims.scope,
        "iat": now,
        "nbf": now,
        "exp": now + claims.lifetime,
        "auth_time": claims.auth_time,
        "jti": secrets.token_urlsafe(16),
    }
    token = jwt.encode(
        payload, key.private_key, algorithm=key.alg, headers={"typ": "at+jwt", "kid": key.kid}
    )
    return token, payload
