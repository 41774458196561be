"""``broker purge``: delete what can no longer be used, so tables do not grow with every login.

Nothing live is touched: a row goes only when it has expired (or its grant was revoked long
enough ago that no client can still present anything of it). Clients from Client ID Metadata
Documents are never purged here: their grants keep working after their cache expires. Rate-limit
counters go once their window (and the next, which still reads them) is over; cached metadata
document failures once they no longer hold a fetch back.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import and_, delete, exists, or_, select
from sqlalchemy.orm import Session

from .db import utcnow
from .models import (
    AuditEvent,
    AuthorizationCode,
    BrowserSession,
    Client,
    ClientMetadataFailure,
    Grant,
    PendingLogin,
    RateLimitCounter,
    RefreshToken,
    RevokedToken,
)

REVOKED_GRACE = dt.timedelta(days=1)


@dataclass
class PurgeResult:
    counts: dict[str, int]

    def total(self) -> int:
        return sum(self.counts.values())


def purge(
    session: Session,
    *,
    access_ttl: int,
    audit_days: int | None = None,
    now: dt.datetime | None = None,
) -> PurgeResult:
    now = now or utcnow()
    counts: dict[str, int] = {}

    def run(name: str, statement: object) -> None:
        result = session.execute(statement)  # type: ignore[call-overload]
        counts[name] = counts.get(name, 0) + int(getattr(result, "rowcount", 0) or 0)

    run("pending_logins", delete(PendingLogin).where(PendingLogin.expires_at < now))
    run("authorization_codes", delete(AuthorizationCode).where(AuthorizationCode.expires_at < now))
    # Rotated refresh tokens stay until their family's absolute expiry: they are what detects a
    # stolen token replayed later (the replay revokes the grant, RFC 9700 section 4.14.2).
    run("refresh_tokens", delete(RefreshToken).where(RefreshToken.expires_at < now))
    run("revoked_tokens", delete(RevokedToken).where(RevokedToken.expires_at < now))
    run("rate_limit_counters", delete(RateLimitCounter).where(RateLimitCounter.expires_at < now))
    run(
        "client_metadata_failures",
        delete(ClientMetadataFailure).where(ClientMetadataFailure.retry_at < now),
    )
    run(
        "browser_sessions",
        delete(BrowserSession).where(
            or_(BrowserSession.expires_at < now, BrowserSession.revoked_at.is_not(None))
        ),
    )
    # A grant with nothing left that a client could present: revoked a while ago, or without
    # refresh tokens and codes once its last access token has expired.
    live_refresh = exists().where(RefreshToken.grant_id == Grant.id)
    live_code = exists().where(AuthorizationCode.grant_id == Grant.id)
    quiet_since = now - dt.timedelta(seconds=access_ttl) - dt.timedelta(hours=1)
    grants = select(Grant.id).where(
        or_(
            Grant.revoked_at < now - REVOKED_GRACE,
            and_(~live_refresh, ~live_code, Grant.created_at < quiet_since),
        )
    )
    doomed = list(session.scalars(grants))
    for start in range(0, len(doomed), 500):
        chunk = doomed[start : start + 500]
        run("refresh_tokens", delete(RefreshToken).where(RefreshToken.grant_id.in_(chunk)))
        run(
            "authorization_codes",
            delete(AuthorizationCode).where(AuthorizationCode.grant_id.in_(chunk)),
        )
        run("grants", delete(Grant).where(Grant.id.in_(chunk)))
    counts.setdefault("grants", 0)
    # Dynamically registered clients that expired unused and hold no grant.
    has_grant = exists().where(Grant.client_id == Client.client_id)
    run("clients", delete(Client).where(Client.kind == "dcr", Client.expires_at < now, ~has_grant))
    if audit_days is not None:
        run(
            "audit_events",
            delete(AuditEvent).where(AuditEvent.at < now - dt.timedelta(days=audit_days)),
        )
    return PurgeResult(counts)
