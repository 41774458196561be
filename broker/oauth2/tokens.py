"""Recognising tokens the broker issued, for revocation (RFC 7009) and introspection (RFC 7662)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import jwt
from sqlalchemy.orm import Session

from ..crypto import token_hash
from ..db import utcnow
from ..keys import KeyRing, verification_key
from ..models import Grant, RefreshToken, RevokedToken

MAX_TOKEN_LENGTH = 8192


@dataclass
class KnownToken:
    kind: str  # "access_token" or "refresh_token"
    client_id: str
    active: bool
    claims: dict[str, Any] = field(default_factory=dict)
    refresh: RefreshToken | None = None
    grant: Grant | None = None

    def get_client_id(self) -> str:
        return self.client_id

    def is_expired(self) -> bool:
        return not self.active

    def is_revoked(self) -> bool:
        return not self.active


def find_token(
    session: Session, keys: KeyRing, issuer: str, token: str, hint: str | None = None
) -> KnownToken | None:
    if not token or len(token) > MAX_TOKEN_LENGTH:
        return None
    order = (
        ("refresh_token", "access_token")
        if hint == "refresh_token"
        else ("access_token", "refresh_token")
    )
    for kind in order:
        found = (
            _refresh(session, token)
            if kind == "refresh_token"
            else _access(session, keys, issuer, token)
        )
        if found is not None:
            return found
    return None


def _refresh(session: Session, token: str) -> KnownToken | None:
    row = session.get(RefreshToken, token_hash(token))
    if row is None:
        return None
    grant = session.get(Grant, row.grant_id)
    if grant is None:
        return None
    now = utcnow()
    active = (
        grant.revoked_at is None
        and row.used_at is None
        and row.expires_at > now
        and row.idle_expires_at > now
    )
    claims = {
        "sub": grant.user_id,
        "aud": grant.resource,
        "scope": row.scope,
        "client_id": grant.client_id,
        "exp": int(row.expires_at.timestamp()),
        "iat": int(row.issued_at.timestamp()),
        "token_type": "refresh_token",
    }
    return KnownToken("refresh_token", grant.client_id, active, claims, row, grant)


def _access(session: Session, keys: KeyRing, issuer: str, token: str) -> KnownToken | None:
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        return None
    kid = header.get("kid")
    if not isinstance(kid, str):
        return None
    found = verification_key(keys, session, kid)
    if found is None:
        return None
    key, alg = found
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[alg],
            issuer=issuer,
            options={
                "verify_aud": False,
                "verify_exp": False,
                "require": ["exp", "jti", "client_id", "sub"],
            },
        )
    except jwt.PyJWTError:
        return None
    now = utcnow()
    revoked = session.get(RevokedToken, str(claims["jti"])) is not None
    active = not revoked and claims["exp"] > now.timestamp()
    claims["token_type"] = "Bearer"
    return KnownToken("access_token", str(claims["client_id"]), active, claims)


def revoke_access_token(session: Session, known: KnownToken) -> None:
    jti = str(known.claims["jti"])
    if session.get(RevokedToken, jti) is None:
        session.add(
            RevokedToken(
                jti=jti, expires_at=dt.datetime.fromtimestamp(int(known.claims["exp"]), dt.UTC)
            )
        )


class OwnTokenLookup:
    """Mixin for Authlib's revocation and introspection endpoints: find a token this broker
    issued (an access token JWT or a refresh token)."""

    server: Any

    def query_token(self, token_string: str, token_type_hint: str | None) -> KnownToken | None:
        server = self.server
        return find_token(
            server.state().session,
            server.keys,
            server.settings.issuer,
            token_string,
            token_type_hint,
        )
