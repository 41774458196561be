"""The signed-in user's own connections (``/account``): what it lists, and what disconnecting does.

A connection is a live grant of the user (of any of the user's identities): one client, one
resource, its scopes. Disconnecting revokes that grant through :func:`broker.admin.revoke_grants`
(its refresh tokens stop at the next refresh; the user's other grants are untouched) and
withdraws the user's consent for that client and resource, so the client cannot come back
without asking. Each change is an audit event with actor ``user``.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from . import admin
from .config import Settings
from .flow import host_of
from .models import BrowserSession, Client, Grant, Identity

ACTOR = "user"
REASON = "revoked_by_user"
# What the broker's own grant ids look like ("gr_" + URL-safe base64, see broker.flow).
GRANT_ID = re.compile(r"gr_[A-Za-z0-9_-]{1,61}")


class InvalidConnection(ValueError):
    """The form named no grant, or something that cannot be a grant id."""


class UnknownConnection(LookupError):
    """No live grant of this user has that id (another user's, revoked, or none at all)."""


@dataclass(frozen=True)
class Connection:
    grant_id: str
    client_name: str
    client_ref: str  # the host of a metadata-document client_id, else the client_id
    resource_uri: str
    resource_name: str
    scopes: list[tuple[str, str]]  # (scope, its description, or "")
    connected_at: dt.datetime
    # The latest refresh token of the grant: issued with the first tokens and at each refresh.
    last_token_at: dt.datetime | None


@dataclass(frozen=True)
class Account:
    user_id: str
    signed_in_as: str
    connections: list[Connection]


def overview(session: Session, settings: Settings, browser: BrowserSession) -> Account:
    """What ``/account`` shows the user of ``browser`` (a live broker session)."""
    identity = session.get(Identity, browser.identity_id)
    snapshot = identity.snapshot if identity is not None else {}
    who = snapshot.get("email") or snapshot.get("username") or snapshot.get("subject")
    return Account(
        user_id=browser.user_id,
        signed_in_as=str(who or browser.user_id),
        connections=connections(session, settings, browser.user_id),
    )


def connections(session: Session, settings: Settings, user_id: str) -> list[Connection]:
    """The user's live grants, oldest first, with what the page says of client and resource."""
    grants = admin.list_grants(session, user_id=user_id)
    ids = {g["client_id"] for g in grants}
    clients = {
        row.client_id: row
        for row in session.scalars(select(Client).where(Client.client_id.in_(ids)))
    }
    found = []
    for grant in grants:
        client = clients.get(grant["client_id"])
        resource = settings.resource(grant["resource"])
        descriptions = resource.scopes if resource is not None else {}
        last = grant["last_used_at"]
        found.append(
            Connection(
                grant_id=grant["id"],
                client_name=client.name if client is not None else "Unknown application",
                client_ref=host_of(grant["client_id"])
                if client is not None and client.kind == "cimd"
                else grant["client_id"],
                resource_uri=grant["resource"],
                resource_name=resource.name if resource is not None else grant["resource"],
                scopes=[(s, descriptions.get(s, "")) for s in grant["scope"].split()],
                connected_at=dt.datetime.fromisoformat(grant["created_at"]),
                last_token_at=dt.datetime.fromisoformat(last) if last else None,
            )
        )
    return found


def disconnect(session: Session, user_id: str, grant_id: str | None) -> list[str]:
    """Disconnect one of the user's grants, or all of them (``grant_id`` ``None``); the ids
    revoked. Raises :class:`InvalidConnection` or :class:`UnknownConnection` (nothing changed)."""
    query = select(Grant).where(Grant.user_id == user_id, Grant.revoked_at.is_(None))
    if grant_id is not None:
        if not GRANT_ID.fullmatch(grant_id):
            raise InvalidConnection(grant_id)
        query = query.where(Grant.id == grant_id)
    grants = list(session.scalars(query.order_by(Grant.created_at)))
    if grant_id is not None and not grants:
        raise UnknownConnection(grant_id)
    revoked: list[str] = []
    for grant in grants:
        # Every filter names this grant, so the audit event carries its client and resource.
        revoked += admin.revoke_grants(
            session,
            actor=ACTOR,
            reason=REASON,
            grant_id=grant.id,
            user_id=user_id,
            client_id=grant.client_id,
            resource=grant.resource,
        )
        admin.withdraw_consent(
            session,
            user_id=user_id,
            client_id=grant.client_id,
            resource=grant.resource,
            actor=ACTOR,
        )
    return revoked
