"""The upstream re-check: access follows the user's standing at the upstream, not only at sign-in.

A refresh grant whose identity was last checked upstream (signed in, or re-checked) more than the
provider's ``recheck_interval`` ago asks the provider again, through its
:class:`~providers.contract.RecheckingProvider` capability, before the refresh is decided:

- the upstream answers with the identity as it is now: the stored identity is replaced, and the
  refresh that follows is decided on it (a team left narrows or ends the grant by the rules);
- the upstream refuses the user (left the organisation, lost the site, refresh token revoked,
  user disabled upstream): every grant and broker session of that identity ends, and the refresh
  answers ``invalid_grant``;
- the upstream cannot be reached, or the broker holds nothing to ask it with (no stored token,
  an expired token without a refresh token): access goes on as decided at the last check, the
  check is tried again a minute later, and the log says why. An outage never ends access by
  itself; a user is only cut off on the upstream's word.

Whether a check is due costs no statement of its own: the refresh grant reads the identity's
check times with the grant (``broker.oauth2.rfc6749``) and asks :meth:`UpstreamRecheck.due`. When
one is due, the token request's transaction is rolled back and :meth:`UpstreamRecheck.run` asks
the upstream outside any transaction (the upstream call never holds a database lock: on SQLite
every token request would wait behind it); the refresh is then decided again on what it said. Of
several workers seeing the same identity due, one conditional UPDATE picks the one that asks the
upstream; the others go on with the stored identity. The upstream access token comes from the
token-exchange service, so a refresh it needs happens under the same cross-worker lock as every
other upstream refresh.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

import httpx
from sqlalchemy import or_, select, update

from providers.contract import Identity as UpstreamIdentity
from providers.contract import RecheckingProvider, UpstreamTokens
from providers.errors import AccessDenied, LoginFailed, UpstreamUnavailable

from . import audit
from .config import Settings
from .db import Database, rows_affected, utcnow
from .models import BrowserSession, Grant, Identity, RefreshToken
from .oauth2.rfc6749 import GrantRow
from .plugins import ProviderRegistry
from .upstream import SignInRequired, UpstreamTokenService, UpstreamTokenUnavailable

log = logging.getLogger(__name__)

RETRY_AFTER = dt.timedelta(seconds=60)
"""How soon a check that could not reach the upstream is tried again."""

# SignInRequired reasons that mean "nothing to ask the upstream with", not "the upstream said no".
_CANNOT_ASK = frozenset(
    {"no_upstream_token", "upstream_token_expired", "not_refreshable", "upstream_token_unreadable"}
)


@dataclass(frozen=True)
class _Due:
    identity_id: int
    user_id: str
    provider: str
    snapshot: dict[str, object]
    checked_at: dt.datetime


class UpstreamRecheck:
    """Runs the re-check of the identity behind a refresh token when its interval has passed."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        providers: ProviderRegistry,
        tokens: UpstreamTokenService,
        http: httpx.Client,
    ) -> None:
        self.settings = settings
        self.db = db
        self.providers = providers
        self.tokens = tokens
        self.http = http
        # Providers that can re-check and have it on: nothing to read for the others.
        self.intervals = {
            name: dt.timedelta(seconds=seconds)
            for name, seconds in settings.recheck_intervals.items()
            if seconds and isinstance(providers.get(name), RecheckingProvider)
        }

    @property
    def enabled(self) -> bool:
        return bool(self.intervals)

    def due(self, grant: GrantRow) -> _Due | None:
        """What to re-check before refreshing ``grant``: its identity, when its provider
        re-checks and the interval since the last sign-in or check has passed; else ``None``."""
        identity = grant.identity
        if identity is None:
            return None
        interval = self.intervals.get(identity.provider)
        if interval is None:
            return None
        checked_at = max(
            t for t in (identity.last_login_at, identity.last_recheck_at) if t is not None
        )
        if utcnow() - checked_at < interval:
            return None
        return _Due(
            identity.id, grant.user_id, identity.provider, dict(identity.snapshot), checked_at
        )

    def run(self, due: object, *, client_id: str | None, address: str | None) -> None:
        """Ask the upstream about ``due`` (from :meth:`due`), unless another worker does."""
        assert isinstance(due, _Due)
        if self._claim(due):
            self._check(due, client_id=client_id, address=address)

    # -- whether this worker asks -----------------------------------------------------------------

    def _claim(self, due: _Due) -> bool:
        """One worker asks: the conditional UPDATE succeeds for whoever moves the check time
        first (a new sign-in in between moves ``last_login_at`` and makes the check moot)."""
        now = utcnow()
        before = now - self.intervals[due.provider]
        with self.db.session() as session:
            return bool(
                rows_affected(
                    session,
                    update(Identity)
                    .where(
                        Identity.id == due.identity_id,
                        Identity.last_login_at <= before,
                        or_(Identity.last_recheck_at.is_(None), Identity.last_recheck_at <= before),
                    )
                    .values(last_recheck_at=now),
                )
            )

    def _retry_soon(self, due: _Due) -> None:
        """Put the check time back so that the next refresh after :data:`RETRY_AFTER` asks
        again, instead of a whole interval later."""
        retry_at = utcnow() - self.intervals[due.provider] + RETRY_AFTER
        with self.db.session() as session:
            session.execute(
                update(Identity)
                .where(Identity.id == due.identity_id)
                .values(last_recheck_at=retry_at)
            )

    # -- asking the upstream ----------------------------------------------------------------------

    def _check(self, due: _Due, *, client_id: str | None, address: str | None) -> None:
        provider = self.providers.get(due.provider)
        assert isinstance(provider, RecheckingProvider)
        stored = UpstreamIdentity.from_snapshot(due.snapshot)
        where = f"re-check of identity {due.identity_id} at provider {due.provider}"
        try:
            current = self.tokens.current(
                due.identity_id, due.provider, client_id=client_id, address=address
            )
            tokens = UpstreamTokens(
                access_token=current.access_token,
                expires_at=current.expires_at,
                scope=current.scope,
                context=current.context,
            )
            fresh = provider.recheck(stored, tokens, self.http)
        except SignInRequired as exc:
            if exc.reason in _CANNOT_ASK:
                log.info("%s skipped: %s (access stays as last decided)", where, exc.reason)
                return
            self._end(due, f"upstream_{exc.reason}", client_id=client_id, address=address)
            log.warning("%s: the upstream refused the user's token (%s)", where, exc.reason)
            return
        except (UpstreamTokenUnavailable, UpstreamUnavailable) as exc:
            log.warning(
                "%s failed: upstream unavailable: %s; access stays as last decided, retried in "
                "%d s",
                where,
                exc,
                RETRY_AFTER.total_seconds(),
            )
            self._retry_soon(due)
            return
        except AccessDenied as exc:
            log.warning("%s: no longer allowed (%s): %s", where, exc.reason, exc.detail)
            self._end(due, exc.reason, client_id=client_id, address=address)
            return
        except LoginFailed as exc:
            log.warning("%s: refused (%s): %s", where, exc.reason, exc.detail or "no detail")
            self._end(due, exc.reason, client_id=client_id, address=address)
            return
        if fresh.provider != due.provider or fresh.subject != stored.subject:
            log.error("%s: the provider answered another identity; access ended", where)
            self._end(due, "subject_mismatch", client_id=client_id, address=address)
            return
        snapshot = fresh.snapshot()
        if snapshot != due.snapshot:
            old = due.snapshot or {}
            changed = sorted(k for k in {*old, *snapshot} if old.get(k) != snapshot.get(k))
            with self.db.session() as session:
                session.execute(
                    update(Identity).where(Identity.id == due.identity_id).values(snapshot=snapshot)
                )
                # Which facts changed, never their values: the rules decide on the new ones.
                audit.record(
                    session,
                    "recheck",
                    "changed",
                    user_id=due.user_id,
                    client_id=client_id,
                    provider=due.provider,
                    actor="upstream",
                    address=address,
                    details={"identity": due.identity_id, "changed": changed},
                )
            log.info("%s: identity facts changed (%s)", where, ", ".join(changed))

    def _end(self, due: _Due, reason: str, *, client_id: str | None, address: str | None) -> None:
        """The upstream no longer vouches for the user: every grant and broker session of this
        identity ends (other identities of the same user keep theirs)."""
        now = utcnow()
        reason = f"recheck:{reason}"[:64]
        with self.db.session() as session:
            ids = list(
                session.scalars(
                    select(Grant.id).where(
                        Grant.identity_id == due.identity_id, Grant.revoked_at.is_(None)
                    )
                )
            )
            if ids:
                session.execute(
                    update(Grant)
                    .where(Grant.id.in_(ids), Grant.revoked_at.is_(None))
                    .values(revoked_at=now, revoke_reason=reason)
                )
                session.execute(
                    update(RefreshToken)
                    .where(RefreshToken.grant_id.in_(ids))
                    .values(successor_sealed=None)
                )
            session.execute(
                update(BrowserSession)
                .where(
                    BrowserSession.identity_id == due.identity_id,
                    BrowserSession.revoked_at.is_(None),
                )
                .values(revoked_at=now)
            )
            audit.record(
                session,
                "recheck",
                "failure",
                user_id=due.user_id,
                client_id=client_id,
                provider=due.provider,
                actor="upstream",
                reason=reason,
                address=address,
                details={"identity": due.identity_id, "grants": ids},
            )
