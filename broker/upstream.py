"""The user's upstream tokens as token exchange (RFC 8693) hands them out: read, refreshed before
they expire, sealed again.

The sign-in stores an identity's upstream tokens sealed (``broker/flow.py``); from then on this
module is the one place that reads and writes them. An access token is handed out while it is
fresh; shortly before ``expires_at`` (a minute, or half its lifetime for short-lived tokens) it is
refreshed with the provider's :class:`~providers.contract.RefreshingProvider` capability.

One refresh at a time per identity, across every worker and host: Atlassian rotates refresh
tokens and revokes the whole family when one is used twice, so two workers refreshing at once
would sign the user out. The lock is the row's ``refresh_lock_until``, taken by a conditional
``UPDATE`` (NULL or past -> now + a lease) whose row count says who won, like every other race in
the broker (``broker/db.py``). The winner calls the upstream outside any database transaction
(a SQLite transaction holds the write lock; a PostgreSQL one would sit idle), then writes the
new sealed tokens and clears the lock in one short transaction. The others poll the row for a
bounded time and take the fresh token; meanwhile an access token that has not yet expired is
still handed out.

A refresh the upstream refuses for good (:class:`~providers.errors.LoginFailed`: the refresh
token was revoked or rotated away) deletes the row: the user must sign in with that provider
again, and the next sign-in stores a new one. A temporary failure
(:class:`~providers.errors.UpstreamUnavailable`) releases the lock and changes nothing else.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy import delete, or_, update

from providers.contract import RefreshingProvider, UpstreamTokens
from providers.errors import LoginFailed, UpstreamUnavailable

from . import audit
from .crypto import SEAL_VERSION, Sealer, SealError
from .db import Database, rows_affected, utcnow
from .models import Identity, UpstreamToken
from .plugins import ProviderRegistry

log = logging.getLogger(__name__)

REFRESH_MARGIN = 60.0
"""Seconds before ``expires_at`` from which a token is refreshed (at most half its lifetime)."""
LOCK_LEASE = 30.0
"""Seconds a refresh lock is held at most; a worker that dies holding it delays the next refresh
by this much. Keep it above the providers' ``timeout``: a refresh that outlives its lease may
race with the next one."""
WAIT = 10.0
"""Seconds a request waits for another worker's refresh before answering ``temporarily
unavailable``."""
POLL = 0.1
"""Seconds between two looks at a row another worker is refreshing."""


class UpstreamTokenError(Exception):
    """Base of what :meth:`UpstreamTokenService.current` raises; ``reason`` is a short fixed code
    for the audit log and the operator's log (never token material or upstream text)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SignInRequired(UpstreamTokenError):
    """There is no usable upstream token for this identity (none stored, expired without a
    refresh token, or refused by the upstream on refresh): the user must sign in with the
    provider again."""


class UpstreamTokenUnavailable(UpstreamTokenError):
    """Temporary: the upstream could not be reached, or another worker's refresh did not finish
    in time. Nothing was lost; try again shortly."""


@dataclass(frozen=True)
class CurrentUpstreamToken:
    """The identity's current upstream access token, opened. ``expires_at`` is a Unix time (None:
    the upstream said nothing), ``context`` what MCP servers need beside it (Atlassian cloud ids
    and sites, Salesforce ``instance_url``, GitHub API host), ``refreshed`` whether this call
    refreshed it. Never holds the refresh token."""

    provider: str
    access_token: str = field(repr=False)
    expires_at: int | None
    scope: str | None
    context: Mapping[str, Any]
    refreshed: bool = False


@dataclass(frozen=True)
class _Lease:
    """This worker holds the refresh lock of ``row`` until ``until``."""

    until: dt.datetime
    row: _Row


@dataclass(frozen=True)
class _Row:
    """What one read of an ``upstream_tokens`` row saw (sealed values stay sealed)."""

    identity_id: int
    provider: str
    access_sealed: str
    refresh_sealed: str | None
    expires_at: float | None
    updated_at: float
    scope: str | None
    context: dict[str, Any]
    locked_until: float | None

    @classmethod
    def of(cls, row: UpstreamToken) -> _Row:
        return cls(
            identity_id=row.identity_id,
            provider=row.provider,
            access_sealed=row.access_token_sealed,
            refresh_sealed=row.refresh_token_sealed,
            expires_at=row.expires_at.timestamp() if row.expires_at is not None else None,
            updated_at=row.updated_at.timestamp(),
            scope=row.scope,
            context=dict(row.context or {}),
            locked_until=(
                row.refresh_lock_until.timestamp() if row.refresh_lock_until is not None else None
            ),
        )


def sealed_aad(identity_id: int, which: str) -> str:
    """The associated data of an upstream token seal (``which``: ``access`` or ``refresh``), as
    the sign-in writes it."""
    return f"upstream_tokens:{identity_id}:{which}"


class UpstreamTokenService:
    """Reads, refreshes and re-seals upstream tokens for token exchange (module docstring)."""

    def __init__(
        self,
        db: Database,
        sealer: Sealer,
        providers: ProviderRegistry,
        http: httpx.Client,
        *,
        refresh_margin: float = REFRESH_MARGIN,
        lease: float = LOCK_LEASE,
        wait: float = WAIT,
        poll: float = POLL,
    ) -> None:
        self.db = db
        self.sealer = sealer
        self.providers = providers
        self.http = http
        self.refresh_margin = refresh_margin
        self.lease = lease
        self.wait = wait
        self.poll = poll

    def current(
        self,
        identity_id: int,
        provider: str,
        *,
        client_id: str | None = None,
        resource: str | None = None,
        address: str | None = None,
    ) -> CurrentUpstreamToken:
        """The identity's current upstream access token, refreshed first when it is about to
        expire. Call it outside any database transaction: it runs its own short ones, and the
        upstream call runs in none. ``client_id``, ``resource`` and ``address`` only go into the
        audit event of a refresh the upstream refused.

        Raises :class:`SignInRequired` or :class:`UpstreamTokenUnavailable`.
        """
        deadline = time.monotonic() + self.wait
        while True:
            seen = self._read(identity_id)
            if seen is None or seen.provider != provider:
                raise SignInRequired("no_upstream_token")
            now = time.time()
            if not self._needs_refresh(seen, now):
                return self._open(seen)
            usable = seen.expires_at is not None and seen.expires_at > now
            if seen.refresh_sealed is None:
                # Nothing to refresh with: usable until it expires, then the user signs in again.
                if usable:
                    return self._open(seen)
                raise SignInRequired("upstream_token_expired")
            # Waiters only read; the conditional UPDATE is tried when the lock looks free.
            locked = seen.locked_until is not None and seen.locked_until > now
            taken = None if locked else self._take_lock(seen)
            if isinstance(taken, _Row):
                return self._open(taken)  # another worker refreshed it just before
            if taken is not None:
                return self._refresh(taken, client_id=client_id, resource=resource, address=address)
            # Another worker is refreshing: the old token still works until it expires.
            if usable:
                return self._open(seen)
            if time.monotonic() >= deadline:
                raise UpstreamTokenUnavailable("refresh_in_progress")
            time.sleep(self.poll)

    # -- reading --------------------------------------------------------------------------------

    def _read(self, identity_id: int) -> _Row | None:
        with self.db.read() as session:
            row = session.get(UpstreamToken, identity_id)
            return _Row.of(row) if row is not None else None

    def _needs_refresh(self, seen: _Row, now: float) -> bool:
        if seen.expires_at is None:
            return False  # GitHub OAuth App tokens do not expire
        lifetime = max(seen.expires_at - seen.updated_at, 0.0)
        return seen.expires_at - min(self.refresh_margin, lifetime / 2) <= now

    def _open(self, seen: _Row) -> CurrentUpstreamToken:
        try:
            access_token = self.sealer.open_text(
                seen.access_sealed, sealed_aad(seen.identity_id, "access")
            )
        except SealError:
            # secret_key changed (or the row was tampered with): the token cannot be read, but
            # restoring the key would bring it back, so the row stays.
            log.error("upstream token of identity %s does not open", seen.identity_id)
            raise SignInRequired("upstream_token_unreadable") from None
        return CurrentUpstreamToken(
            provider=seen.provider,
            access_token=access_token,
            expires_at=int(seen.expires_at) if seen.expires_at is not None else None,
            scope=seen.scope,
            context=seen.context,
        )

    # -- the refresh lock -----------------------------------------------------------------------

    def _take_lock(self, seen: _Row) -> _Lease | _Row | None:
        """Take the row's refresh lock. Returns the lease (with the row as it is now) when this
        worker won and the row still needs refreshing; the row when it won but another worker had
        refreshed it in the meantime (the lock is given back at once); None when another worker
        holds the lock."""
        with self.db.session() as session:
            now = utcnow()
            until = now + dt.timedelta(seconds=self.lease)
            won = rows_affected(
                session,
                update(UpstreamToken)
                .where(
                    UpstreamToken.identity_id == seen.identity_id,
                    or_(
                        UpstreamToken.refresh_lock_until.is_(None),
                        UpstreamToken.refresh_lock_until <= now,
                    ),
                )
                .values(refresh_lock_until=until),
            )
            if not won:
                return None
            row = session.get(UpstreamToken, seen.identity_id, populate_existing=True)
            assert row is not None  # the UPDATE just matched it, in this transaction
            current = _Row.of(row)
            if not self._needs_refresh(current, time.time()):
                row.refresh_lock_until = None
                return current
            return _Lease(until, current)

    def _release(self, identity_id: int, until: dt.datetime) -> None:
        with self.db.session() as session:
            session.execute(
                update(UpstreamToken)
                .where(
                    UpstreamToken.identity_id == identity_id,
                    UpstreamToken.refresh_lock_until == until,
                )
                .values(refresh_lock_until=None)
            )

    # -- refreshing -----------------------------------------------------------------------------

    def _refresh(
        self,
        lease: _Lease,
        *,
        client_id: str | None,
        resource: str | None,
        address: str | None,
    ) -> CurrentUpstreamToken:
        """Refresh under the lock this worker holds; the upstream call runs outside any
        transaction."""
        seen, until = lease.row, lease.until
        identity_id, provider = seen.identity_id, seen.provider
        try:
            plugin = self.providers.get(provider)
            if not isinstance(plugin, RefreshingProvider):
                self._release(identity_id, until)
                log.warning("provider %s cannot refresh upstream tokens", provider)
                raise SignInRequired("not_refreshable")
            if seen.refresh_sealed is None:  # a sign-in without one replaced the row just now
                self._release(identity_id, until)
                if seen.expires_at is not None and seen.expires_at > time.time():
                    return self._open(seen)
                raise SignInRequired("upstream_token_expired")
            try:
                tokens = UpstreamTokens(
                    access_token=self.sealer.open_text(
                        seen.access_sealed, sealed_aad(identity_id, "access")
                    ),
                    refresh_token=self.sealer.open_text(
                        seen.refresh_sealed, sealed_aad(identity_id, "refresh")
                    ),
                    expires_at=int(seen.expires_at) if seen.expires_at is not None else None,
                    scope=seen.scope,
                    context=seen.context,
                )
            except SealError:
                self._release(identity_id, until)
                log.error("upstream token of identity %s does not open", identity_id)
                raise SignInRequired("upstream_token_unreadable") from None
            fresh = plugin.refresh(tokens, self.http)
        except LoginFailed as exc:
            log.warning(
                "upstream token refresh refused by %s for identity %s (%s): %s; the user must "
                "sign in again",
                provider,
                identity_id,
                exc.reason,
                exc.detail or "no detail",
            )
            self._forget(
                seen, until, exc.reason, client_id=client_id, resource=resource, address=address
            )
            raise SignInRequired("upstream_refresh_refused") from None
        except UpstreamUnavailable as exc:
            log.warning(
                "upstream token refresh for identity %s: %s unavailable: %s",
                identity_id,
                provider,
                exc,
            )
            self._release(identity_id, until)
            raise UpstreamTokenUnavailable("upstream_unavailable") from None
        except SignInRequired:
            raise
        except BaseException:
            self._release(identity_id, until)
            raise
        try:
            return self._store(seen, until, fresh)
        except Exception:
            # The database failed just now: the answer is 503, and the lock lapses with its lease.
            # A provider that rotated its refresh token has lost it: that user signs in again.
            log.error(
                "refreshed %s tokens of identity %s could not be stored", provider, identity_id
            )
            raise

    def _store(self, seen: _Row, until: dt.datetime, fresh: UpstreamTokens) -> CurrentUpstreamToken:
        """Seal and write the refreshed tokens and clear the lock, unless the row changed while
        the upstream was asked (a new sign-in stored newer tokens): then those win."""
        identity_id = seen.identity_id
        now = utcnow()
        access_sealed = self.sealer.seal_text(fresh.access_token, sealed_aad(identity_id, "access"))
        refresh_sealed = (
            self.sealer.seal_text(fresh.refresh_token, sealed_aad(identity_id, "refresh"))
            if fresh.refresh_token
            else seen.refresh_sealed  # the upstream sent none: the old one stays good
        )
        expires_at = (
            dt.datetime.fromtimestamp(fresh.expires_at, dt.UTC) if fresh.expires_at else None
        )
        scope = fresh.scope or seen.scope
        context = {**seen.context, **dict(fresh.context)}
        with self.db.session() as session:
            won = rows_affected(
                session,
                update(UpstreamToken)
                .where(
                    UpstreamToken.identity_id == identity_id,
                    UpstreamToken.access_token_sealed == seen.access_sealed,
                )
                .values(
                    access_token_sealed=access_sealed,
                    refresh_token_sealed=refresh_sealed,
                    expires_at=expires_at,
                    scope=scope,
                    context=context,
                    key_version=SEAL_VERSION,
                    updated_at=now,
                    refresh_lock_until=None,
                ),
            )
            if not won:
                session.execute(
                    update(UpstreamToken)
                    .where(
                        UpstreamToken.identity_id == identity_id,
                        UpstreamToken.refresh_lock_until == until,
                    )
                    .values(refresh_lock_until=None)
                )
        if not won:
            log.warning(
                "upstream tokens of identity %s changed during a refresh; keeping the newer ones",
                identity_id,
            )
            newer = self._read(identity_id)
            if newer is None:
                raise SignInRequired("no_upstream_token")
            return self._open(newer)
        log.info("upstream token of identity %s refreshed (%s)", identity_id, seen.provider)
        return CurrentUpstreamToken(
            provider=seen.provider,
            access_token=fresh.access_token,
            expires_at=fresh.expires_at,
            scope=scope,
            context=context,
            refreshed=True,
        )

    def _forget(
        self,
        seen: _Row,
        until: dt.datetime,
        reason: str,
        *,
        client_id: str | None,
        resource: str | None,
        address: str | None,
    ) -> None:
        """The upstream refused the refresh for good: delete the row (unless a new sign-in
        replaced it meanwhile), which also drops the lock, and record why."""
        with self.db.session() as session:
            deleted = rows_affected(
                session,
                delete(UpstreamToken).where(
                    UpstreamToken.identity_id == seen.identity_id,
                    UpstreamToken.access_token_sealed == seen.access_sealed,
                ),
            )
            if not deleted:
                session.execute(
                    update(UpstreamToken)
                    .where(
                        UpstreamToken.identity_id == seen.identity_id,
                        UpstreamToken.refresh_lock_until == until,
                    )
                    .values(refresh_lock_until=None)
                )
            identity = session.get(Identity, seen.identity_id)
            audit.record(
                session,
                "exchange",
                "failure",
                reason="upstream_refresh_refused",
                user_id=identity.user_id if identity is not None else None,
                client_id=client_id,
                resource=resource,
                provider=seen.provider,
                address=address,
                details={"identity": seen.identity_id, "cause": reason[:64]},
            )
