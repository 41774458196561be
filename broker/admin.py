"""What an operator does to users and grants (``broker users``, ``broker grants``).

Every change is a conditional UPDATE in the shared database and takes effect at the next request
of any worker: a disabled user's refreshes and authorizations are refused, a revoked grant's
refresh tokens die with it, ended browser sessions must sign in upstream again. Each change is
an audit event (type ``admin``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from . import audit
from .db import utcnow
from .models import BrowserSession, Consent, Grant, Identity, RefreshToken, User


class NotFound(Exception):
    """No user or grant matches what the operator named."""


@dataclass(frozen=True)
class UserSummary:
    id: str
    created_at: str
    disabled: bool
    identities: list[dict[str, Any]]
    live_grants: int


def find_user(session: Session, ref: str) -> User:
    """A user by broker id (``usr_...``), by ``provider:subject``, or by email (unique)."""
    user = session.get(User, ref)
    if user is not None:
        return user
    provider, _, subject = ref.partition(":")
    if subject:
        identity = session.scalars(
            select(Identity).where(Identity.provider == provider, Identity.subject == subject)
        ).first()
        if identity is not None:
            found = session.get(User, identity.user_id)
            if found is not None:
                return found
    if "@" in ref:
        owners = {
            row.user_id
            for row in session.scalars(select(Identity))
            if str((row.snapshot or {}).get("email") or "").lower() == ref.lower()
        }
        if len(owners) == 1:
            found = session.get(User, owners.pop())
            if found is not None:
                return found
        if len(owners) > 1:
            raise NotFound(f"{ref}: several users have this email; name one by id")
    raise NotFound(f"{ref}: no such user (give a user id, provider:subject or an email)")


def _live_grants(session: Session, user_id: str) -> int:
    return int(
        session.scalar(
            select(func.count())
            .select_from(Grant)
            .where(Grant.user_id == user_id, Grant.revoked_at.is_(None))
        )
        or 0
    )


def summary(session: Session, user: User) -> UserSummary:
    identities = [
        {
            "provider": row.provider,
            "subject": row.subject,
            "email": (row.snapshot or {}).get("email"),
            "username": (row.snapshot or {}).get("username"),
            "last_login_at": row.last_login_at.isoformat() if row.last_login_at else None,
            "last_recheck_at": row.last_recheck_at.isoformat() if row.last_recheck_at else None,
        }
        for row in session.scalars(select(Identity).where(Identity.user_id == user.id))
    ]
    return UserSummary(
        id=user.id,
        created_at=user.created_at.isoformat(),
        disabled=user.disabled_at is not None,
        identities=identities,
        live_grants=_live_grants(session, user.id),
    )


def list_users(session: Session, *, provider: str | None = None) -> list[UserSummary]:
    query = select(User).order_by(User.created_at)
    if provider is not None:
        query = query.where(
            User.id.in_(select(Identity.user_id).where(Identity.provider == provider))
        )
    return [summary(session, user) for user in session.scalars(query)]


def end_browser_sessions(session: Session, user_id: str) -> int:
    result = session.execute(
        update(BrowserSession)
        .where(BrowserSession.user_id == user_id, BrowserSession.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    return int(getattr(result, "rowcount", 0))


def set_disabled(session: Session, user: User, disabled: bool, *, actor: str) -> bool:
    """Disable (or enable) a user; returns whether anything changed. Disabling also ends the
    user's broker sessions (a remembered sign-in never outlives it)."""
    now = utcnow()
    condition = User.disabled_at.is_(None) if disabled else User.disabled_at.is_not(None)
    result = session.execute(
        update(User)
        .where(User.id == user.id, condition)
        .values(disabled_at=now if disabled else None)
    )
    changed = bool(getattr(result, "rowcount", 0))
    if changed and disabled:
        end_browser_sessions(session, user.id)
    if changed:
        audit.record(
            session,
            "admin",
            "success",
            user_id=user.id,
            actor=actor,
            reason="user_disabled" if disabled else "user_enabled",
        )
    return changed


def grants_query(
    *, user_id: str | None = None, client_id: str | None = None, resource: str | None = None
) -> Any:
    query = select(Grant).where(Grant.revoked_at.is_(None)).order_by(Grant.created_at)
    if user_id is not None:
        query = query.where(Grant.user_id == user_id)
    if client_id is not None:
        query = query.where(Grant.client_id == client_id)
    if resource is not None:
        query = query.where(Grant.resource == resource)
    return query


def list_grants(session: Session, **filters: str | None) -> list[dict[str, Any]]:
    rows: Sequence[Grant] = session.scalars(grants_query(**filters)).all()
    last_used = dict(
        session.execute(
            select(RefreshToken.grant_id, func.max(RefreshToken.issued_at))
            .where(RefreshToken.grant_id.in_([row.id for row in rows]))
            .group_by(RefreshToken.grant_id)
        ).all()
    )
    return [
        {
            "id": row.id,
            "user_id": row.user_id,
            "client_id": row.client_id,
            "resource": row.resource,
            "scope": row.scope,
            "created_at": row.created_at.isoformat(),
            "last_used_at": last_used[row.id].isoformat() if row.id in last_used else None,
        }
        for row in rows
    ]


def revoke_grants(
    session: Session,
    *,
    actor: str,
    reason: str = "revoked_by_operator",
    grant_id: str | None = None,
    user_id: str | None = None,
    client_id: str | None = None,
    resource: str | None = None,
) -> list[str]:
    """Revoke the live grants that match (every filter given must match); their refresh
    tokens stop working at once. Returns the ids revoked."""
    query = grants_query(user_id=user_id, client_id=client_id, resource=resource)
    if grant_id is not None:
        query = query.where(Grant.id == grant_id)
    ids = list(session.scalars(query.with_only_columns(Grant.id)))
    if not ids:
        return []
    now = utcnow()
    session.execute(
        update(Grant)
        .where(Grant.id.in_(ids), Grant.revoked_at.is_(None))
        .values(revoked_at=now, revoke_reason=reason[:64])
    )
    session.execute(
        update(RefreshToken).where(RefreshToken.grant_id.in_(ids)).values(successor_sealed=None)
    )
    for grant in ids:
        audit.record(
            session,
            "revoke",
            "success",
            user_id=user_id,
            client_id=client_id,
            resource=resource,
            actor=actor,
            reason=reason,
            details={"grant": grant},
        )
    return ids


def revoke_user(session: Session, user: User, *, actor: str) -> list[str]:
    """Everything a user holds: grants, consents and broker sessions."""
    ids = revoke_grants(session, actor=actor, user_id=user.id, reason="user_revoked")
    session.execute(
        update(Consent)
        .where(Consent.user_id == user.id, Consent.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    end_browser_sessions(session, user.id)
    return ids


def withdraw_consent(
    session: Session, *, user_id: str, client_id: str, resource: str, actor: str
) -> bool:
    """Withdraw a user's consent for a client and a resource: the next authorization of that
    client asks again (grants already issued are not touched: see :func:`revoke_grants`).
    Returns whether there was a consent to withdraw."""
    result = session.execute(
        update(Consent)
        .where(
            Consent.user_id == user_id,
            Consent.client_id == client_id,
            Consent.resource == resource,
            Consent.revoked_at.is_(None),
        )
        .values(revoked_at=utcnow())
    )
    withdrawn = bool(getattr(result, "rowcount", 0))
    if withdrawn:
        audit.record(
            session,
            "consent",
            "success",
            user_id=user_id,
            client_id=client_id,
            resource=resource,
            actor=actor,
            reason="consent_withdrawn",
        )
    return withdrawn
