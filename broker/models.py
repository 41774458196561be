"""The tables of the whole product (see DESIGN.md); columns fill in as capabilities land.

Secrets: SHA-256 hashes for what is presented back to us (codes, refresh tokens, session ids,
registration tokens), salted HMAC-SHA256 for the client secrets we generate (argon2id for older
ones and for passwords), AES-GCM seals (``*_sealed``) for what we must
read again (private keys, upstream tokens, upstream PKCE verifiers and nonces).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column

from .db import Base, UTCDateTime, utcnow

URI = String(2048)


class SigningKey(Base):
    """A JWT signing key. JWKS = next + active + retired-but-unexpired."""

    __tablename__ = "signing_keys"

    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    alg: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), index=True)  # next / active / retired
    private_key_sealed: Mapped[str] = mapped_column(Text)
    public_jwk: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    activated_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    retired_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class Client(Base):
    """An OAuth client: static (operator-managed), dcr (RFC 7591) or cimd (metadata document)."""

    __tablename__ = "clients"

    client_id: Mapped[str] = mapped_column(URI, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(255))
    redirect_uris: Mapped[list[str]] = mapped_column(JSON)
    grant_types: Mapped[list[str]] = mapped_column(JSON)
    response_types: Mapped[list[str]] = mapped_column(JSON)
    token_endpoint_auth_method: Mapped[str] = mapped_column(String(32))
    application_type: Mapped[str] = mapped_column(String(16), default="native")
    scope: Mapped[str | None] = mapped_column(Text)
    secret_hash: Mapped[str | None] = mapped_column(String(255))
    secret_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    allowed_providers: Mapped[list[str] | None] = mapped_column(JSON)
    allowed_resources: Mapped[list[str] | None] = mapped_column(JSON)
    # A first-party static client: the consent screen is skipped for it.
    trusted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    client_metadata: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    registration_token_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, index=True)


class User(Base):
    """A broker user; ``id`` is the opaque, stable ``sub`` of every token."""

    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    disabled_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class Identity(Base):
    """An upstream identity linked to a user; unique per (provider, upstream subject)."""

    __tablename__ = "identities"
    __table_args__ = (UniqueConstraint("provider", "subject"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    provider: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(255))
    snapshot: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_login_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_recheck_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class BrowserSession(Base):
    """The broker's own sign-in, so repeat logins skip the upstream; keyed by the cookie's hash."""

    __tablename__ = "browser_sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    identity_id: Mapped[int] = mapped_column(ForeignKey("identities.id", ondelete="CASCADE"))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class PendingLogin(Base):
    """An authorization request in progress: any worker can finish it; single use."""

    __tablename__ = "pending_logins"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    browser_hash: Mapped[str] = mapped_column(String(64))
    client_id: Mapped[str] = mapped_column(URI)
    redirect_uri: Mapped[str] = mapped_column(URI)
    scope: Mapped[str] = mapped_column(Text, default="")
    resource: Mapped[str] = mapped_column(URI)
    state: Mapped[str | None] = mapped_column(Text)
    code_challenge: Mapped[str] = mapped_column(String(128))
    code_challenge_method: Mapped[str] = mapped_column(String(16))
    request_params: Mapped[dict[str, list[str]]] = mapped_column(JSON)
    provider: Mapped[str | None] = mapped_column(String(64))
    upstream_state_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    upstream_secrets_sealed: Mapped[str | None] = mapped_column(Text)
    approved_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    user_id: Mapped[str | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    identity_id: Mapped[int | None] = mapped_column(ForeignKey("identities.id", ondelete="CASCADE"))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    completed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class Consent(Base):
    """What a user approved for a client and a resource; asked again when scopes widen or the
    client's redirect URIs change."""

    __tablename__ = "consents"
    __table_args__ = (UniqueConstraint("user_id", "client_id", "resource"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    client_id: Mapped[str] = mapped_column(URI)
    resource: Mapped[str] = mapped_column(URI)
    scopes: Mapped[list[str]] = mapped_column(JSON)
    redirect_digest: Mapped[str] = mapped_column(String(64))
    granted_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class Grant(Base):
    """The family every code and refresh token belongs to; revoking it ends them all."""

    __tablename__ = "grants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    client_id: Mapped[str] = mapped_column(URI, index=True)
    resource: Mapped[str] = mapped_column(URI)
    scope: Mapped[str] = mapped_column(Text, default="")
    identity_id: Mapped[int | None] = mapped_column(
        ForeignKey("identities.id", ondelete="SET NULL")
    )
    auth_time: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    revoke_reason: Mapped[str | None] = mapped_column(String(64))


class AuthorizationCode(Base):
    """A single-use authorization code, stored by hash; a replay revokes its grant."""

    __tablename__ = "authorization_codes"

    code_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    grant_id: Mapped[str] = mapped_column(ForeignKey("grants.id", ondelete="CASCADE"), index=True)
    client_id: Mapped[str] = mapped_column(URI)
    redirect_uri: Mapped[str] = mapped_column(URI)
    scope: Mapped[str] = mapped_column(Text, default="")
    resource: Mapped[str] = mapped_column(URI)
    code_challenge: Mapped[str] = mapped_column(String(128))
    code_challenge_method: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class RefreshToken(Base):
    """A refresh token, stored by hash; rotation links parent and successor. Within the reuse
    grace window the successor is handed out again, so it is kept sealed until the window ends."""

    __tablename__ = "refresh_tokens"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    grant_id: Mapped[str] = mapped_column(ForeignKey("grants.id", ondelete="CASCADE"), index=True)
    parent_hash: Mapped[str | None] = mapped_column(String(64))
    successor_hash: Mapped[str | None] = mapped_column(String(64))
    successor_sealed: Mapped[str | None] = mapped_column(Text)
    scope: Mapped[str] = mapped_column(Text, default="")
    issued_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    idle_expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class RevokedToken(Base):
    """Revoked access tokens by ``jti``, kept until they would have expired anyway."""

    __tablename__ = "revoked_tokens"

    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)


class UpstreamToken(Base):
    """An identity's upstream tokens, sealed; they leave only through token exchange."""

    __tablename__ = "upstream_tokens"

    identity_id: Mapped[int] = mapped_column(
        ForeignKey("identities.id", ondelete="CASCADE"), primary_key=True
    )
    provider: Mapped[str] = mapped_column(String(64))
    access_token_sealed: Mapped[str] = mapped_column(Text)
    refresh_token_sealed: Mapped[str | None] = mapped_column(Text)
    expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    scope: Mapped[str | None] = mapped_column(Text)
    context: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    key_version: Mapped[int] = mapped_column(Integer, default=1)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    refresh_lock_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class AuditEvent(Base):
    """Who did what, when, from where: login, consent, issue, refresh, revoke, deny, register."""

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_type_actor_at", "type", "actor", "at"),
        Index("ix_audit_events_type_address_at", "type", "address", "at"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    type: Mapped[str] = mapped_column(String(32))
    outcome: Mapped[str] = mapped_column(String(16))
    user_id: Mapped[str | None] = mapped_column(String(64))
    client_id: Mapped[str | None] = mapped_column(URI)
    resource: Mapped[str | None] = mapped_column(URI)
    provider: Mapped[str | None] = mapped_column(String(64))
    actor: Mapped[str | None] = mapped_column(String(255))
    reason: Mapped[str | None] = mapped_column(String(255))
    address: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class RateLimitCounter(Base):
    """A fixed-window counter of a rate limit, when no Redis is configured (or it is down):
    ``key`` names the limit, who is counted and the window."""

    __tablename__ = "rate_limit_counters"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    count: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)


class ClientMetadataFailure(Base):
    """A Client ID Metadata Document that could not be fetched or was invalid: not fetched
    again before ``retry_at`` (a failed fetch is cached briefly, never as a client)."""

    __tablename__ = "client_metadata_failures"

    client_id: Mapped[str] = mapped_column(URI, primary_key=True)
    reason: Mapped[str] = mapped_column(String(64))
    failed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    retry_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
