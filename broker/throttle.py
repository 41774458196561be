"""Throttling of failed form logins, per user and per address.

Every failure is an audit event in the database, and the database can count them, so throttling
is correct with any number of workers and hosts. With ``redis_url`` configured the counting
happens in Redis instead (two INCRs and two GETs, no table scan on the hot path), shared by every
worker; when Redis does not answer, the database counts, so an outage of the cache never opens
the door nor locks everyone out.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .db import utcnow
from .models import AuditEvent

log = logging.getLogger(__name__)

MAX_FAILURES = 5
MAX_FAILURES_PER_ADDRESS = 20
FAILURE_WINDOW = dt.timedelta(minutes=15)


class LoginThrottle:
    def __init__(self, redis: Any | None = None, *, prefix: str = "broker:") -> None:
        self.redis = redis
        self.prefix = prefix

    def _keys(self, actor: str, address: str | None) -> tuple[str, str | None]:
        user = hashlib.sha256(actor.encode()).hexdigest()[:32]  # no user names in the cache
        return (
            f"{self.prefix}login-failures:user:{user}",
            f"{self.prefix}login-failures:address:{address}" if address else None,
        )

    def blocked(self, session: Session, actor: str, address: str | None) -> bool:
        if self.redis is not None:
            try:
                user_key, address_key = self._keys(actor, address)
                keys = [user_key] + ([address_key] if address_key else [])
                values = self.redis.mget(keys)
                counts = [int(v or 0) for v in values]
                if counts[0] >= MAX_FAILURES:
                    return True
                return len(counts) > 1 and counts[1] >= MAX_FAILURES_PER_ADDRESS
            except Exception as exc:
                log.warning(
                    "redis unavailable for login throttling (%s): using the database",
                    type(exc).__name__,
                )
        return self._blocked_in_database(session, actor, address)

    def record_failure(self, actor: str, address: str | None) -> None:
        """Count a failure in Redis (the caller records the audit event in the database)."""
        if self.redis is None:
            return
        window = int(FAILURE_WINDOW.total_seconds())
        try:
            pipe = self.redis.pipeline()
            for key in self._keys(actor, address):
                if key is not None:
                    pipe.incr(key)
                    pipe.expire(key, window, nx=True)
            pipe.execute()
        except Exception as exc:
            log.warning("redis unavailable for login throttling (%s)", type(exc).__name__)

    @staticmethod
    def _blocked_in_database(session: Session, actor: str, address: str | None) -> bool:
        since = utcnow() - FAILURE_WINDOW
        failures = (
            select(func.count())
            .select_from(AuditEvent)
            .where(
                AuditEvent.type == "login", AuditEvent.outcome == "failure", AuditEvent.at > since
            )
        )
        if session.execute(failures.where(AuditEvent.actor == actor)).scalar_one() >= MAX_FAILURES:
            return True
        if address is None:
            return False
        per_address = failures.where(AuditEvent.address == address)
        return int(session.execute(per_address).scalar_one()) >= MAX_FAILURES_PER_ADDRESS


def redis_client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
