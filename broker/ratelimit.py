"""Rate limits: one mechanism for every limit of the product.

RFC 6585 section 4: a client that sent too many requests in a given amount of time gets 429 Too
Many Requests, with details explaining the condition and MAY a ``Retry-After`` header (RFC 9110
section 10.2.3: seconds to wait). Every limit here is a fixed-window counter keyed by the limit's
name, what it counts (``per_address``, ``per_client``, ``per_host``, ...), a keyed hash of the
subject and the window (``floor(now / period)``), so a window ends at the same instant for every
worker and ``Retry-After`` is the time to its end.

Where the counters live:

- In Redis when ``redis_url`` is configured and answers: ``SET key 0 EX ttl NX`` then ``INCR
  key`` in one MULTI/EXEC, one round trip, with commands Redis 2.6.12 already had (``EXPIRE ...
  NX`` is Redis 7 and aborts the whole transaction on Redis 6).
- Otherwise in the database, ``rate_limit_counters``: one atomic ``INSERT ... ON CONFLICT DO UPDATE
  SET count = count + 1 RETURNING count`` (SQLite 3.35+ and PostgreSQL), so every worker and host
  sharing the database shares the counters.
- While Redis does not answer, the database counts (each failure class is logged once, never a
  key); Redis is tried again a few seconds later. Each request is counted in exactly one place, so
  :meth:`RateLimiter.count` adds both up; :meth:`RateLimiter.hit` decides on the store that counted
  it, so a window that spans a fail-over may let up to twice its limit through, never fewer than it.

Subjects are stored only as HMAC-SHA256 digests under a key derived from ``secret_key``: neither
Redis nor the database holds addresses or user names, and a digest cannot be reversed by hashing
every IPv4 address.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.exceptions import RedisError
from sqlalchemy import Table, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from .config import RateLimit, Settings
from .crypto import derive_key
from .db import Database
from .models import RateLimitCounter

log = logging.getLogger(__name__)

REDIS_RETRY_INTERVAL = 5.0
"""Seconds during which a Redis that just failed is not asked again (its timeouts would otherwise
be paid by every request of an outage)."""

TOO_MANY_REQUESTS = "too_many_requests"
"""The ``error`` of a 429 JSON body. OAuth defines no error code for rate limiting: RFC 8628's
``slow_down`` belongs to the device-code polling loop (it tells a client to poll 5 seconds more
slowly) and ``temporarily_unavailable`` (RFC 6749 section 4.1.2.1) is what the broker answers with
503 when its database is down. ``too_many_requests`` is what the MCP TypeScript SDK's own
authorization server sends with 429 and what its client parses into a ``TooManyRequestsError``."""

_COUNTERS: Table = RateLimitCounter.__table__  # type: ignore[assignment]


@dataclass(frozen=True)
class Verdict:
    """The outcome of counting one request against a limit."""

    name: str
    per: str
    rate: RateLimit
    count: int
    retry_after: int  # seconds to the end of the window (at least 1)

    @property
    def allowed(self) -> bool:
        return self.count <= self.rate.count

    @property
    def description(self) -> str:
        """One line for the client (printable ASCII, RFC 6749 section 5.2)."""
        subject = self.per.removeprefix("per_").replace("_", " ")
        return (
            f"Rate limit exceeded ({self.name}: {self.rate} per {subject}); "
            f"retry after {self.retry_after} seconds."
        )

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


def address_subject(address: str | None) -> str:
    """Whom a per-address limit counts: an IPv4 address, or the /64 network of an IPv6 address
    (RFC 4291 section 2.5.4: one /64 is one link, and a single host is routinely given all of
    it). IPv4-mapped IPv6 addresses count as their IPv4 address."""
    if not address:
        return "unknown"
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{ip}/64", strict=False))
    return str(ip)


def redis_client(url: str) -> Any:
    """A Redis client with short timeouts: a slow Redis must not hold requests up."""
    return redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)


class RateLimiter:
    """Fixed-window counters in Redis or the database (see the module docstring).

    ``limits`` are the configured ones (``settings.rate_limits``); code-defined limits (failed
    logins) pass their :class:`RateLimit` to :meth:`hit` and :meth:`count` directly. ``clock``
    returns the wall-clock time in seconds (the windows of every worker must agree on it);
    ``redis_retry_interval``: seconds a Redis that failed is left alone before it is asked again.
    """

    def __init__(
        self,
        db: Database,
        *,
        secret_key: str,
        limits: Mapping[str, Mapping[str, RateLimit]] | None = None,
        redis: Any | None = None,
        prefix: str = "broker:",
        clock: Callable[[], float] = time.time,
        redis_retry_interval: float = REDIS_RETRY_INTERVAL,
    ) -> None:
        self.db = db
        self.redis = redis
        self.limits = limits or {}
        self.prefix = prefix
        self._clock = clock
        self._digest_key = derive_key(secret_key, "rate-limit")
        self._lock = threading.Lock()
        self._redis_failures: set[str] = set()
        self._redis_retry_at = 0.0
        self._redis_retry_interval = redis_retry_interval

    @classmethod
    def for_settings(
        cls, settings: Settings, db: Database, *, redis: Any | None = None
    ) -> RateLimiter:
        if redis is None and settings.redis_url:
            redis = redis_client(settings.redis_url)
        return cls(
            db,
            secret_key=settings.secret_key,
            limits=settings.rate_limits,
            redis=redis,
            prefix=settings.redis_prefix,
        )

    def limit(self, name: str, per: str) -> RateLimit | None:
        """The configured limit ``rate_limits.<name>.<per>``, or ``None`` when it is off."""
        return self.limits.get(name, {}).get(per)

    # -- counting -------------------------------------------------------------------------

    def hit(self, name: str, per: str, subject: str, rate: RateLimit) -> Verdict:
        """Count one request of ``subject`` in the current window and say whether it is within
        ``rate``. Raises only what the database raises when Redis is not there to count."""
        now = self._clock()
        window = int(now // rate.period)
        end = (window + 1) * rate.period
        key = self._key(name, per, subject, rate, window)
        # Kept through the next window too: count(windows=2) reads the previous one.
        keep_until = end + rate.period
        count = self._redis_hit(key, math.ceil(keep_until - now))
        if count is None:
            count = self._database_hit(key, dt.datetime.fromtimestamp(keep_until, dt.UTC))
        return Verdict(name, per, rate, count, max(1, math.ceil(end - now)))

    def verdict(self, name: str, per: str, subject: str, rate: RateLimit) -> Verdict:
        """What the current window holds for ``subject``, without counting a request."""
        now = self._clock()
        end = (int(now // rate.period) + 1) * rate.period
        count = self.count(name, per, subject, rate)
        return Verdict(name, per, rate, count, max(1, math.ceil(end - now)))

    def count(
        self,
        name: str,
        per: str,
        subject: str,
        rate: RateLimit,
        *,
        windows: int = 1,
        session: Session | None = None,
    ) -> int:
        """How many requests of ``subject`` were counted in the current window and the
        ``windows - 1`` before it, in Redis and in the database together (a request counted
        while Redis was down is in the database). ``session``: read through the caller's."""
        window = int(self._clock() // rate.period)
        keys = [self._key(name, per, subject, rate, window - i) for i in range(windows)]
        return self._redis_count(keys) + self._database_count(keys, session)

    def _key(self, name: str, per: str, subject: str, rate: RateLimit, window: int) -> str:
        digest = hmac.new(
            self._digest_key, f"{name}\x00{per}\x00{subject}".encode(), hashlib.sha256
        ).hexdigest()[:32]
        return f"{name}:{per}:{rate.period}:{window}:{digest}"

    # -- Redis ----------------------------------------------------------------------------

    def _redis_usable(self) -> bool:
        return self.redis is not None and time.monotonic() >= self._redis_retry_at

    def _redis_hit(self, key: str, ttl: int) -> int | None:
        if self.redis is None or not self._redis_usable():
            return None
        name = f"{self.prefix}rl:{key}"
        try:
            pipe = self.redis.pipeline(transaction=True)
            pipe.set(name, 0, ex=ttl, nx=True)
            pipe.incr(name)
            _, count = pipe.execute()
        except (RedisError, OSError) as exc:
            self._redis_failed(exc)
            return None
        self._redis_answered()
        return int(count)

    def _redis_count(self, keys: Sequence[str]) -> int:
        if self.redis is None or not self._redis_usable():
            return 0
        try:
            values = self.redis.mget([f"{self.prefix}rl:{key}" for key in keys])
        except (RedisError, OSError) as exc:
            self._redis_failed(exc)
            return 0
        self._redis_answered()
        return sum(int(v or 0) for v in values)

    def _redis_failed(self, exc: BaseException) -> None:
        kind = type(exc).__name__
        with self._lock:
            self._redis_retry_at = time.monotonic() + self._redis_retry_interval
            first = kind not in self._redis_failures
            self._redis_failures.add(kind)
        if first:  # the class only: messages may quote keys or addresses
            log.warning(
                "redis does not answer for rate limits (%s): counting in the database", kind
            )

    def _redis_answered(self) -> None:
        if not self._redis_failures:
            return
        with self._lock:
            recovered = bool(self._redis_failures)
            self._redis_failures.clear()
        if recovered:
            log.warning("redis answers again: rate limits are counted there")

    # -- the database ---------------------------------------------------------------------

    def _database_hit(self, key: str, expires_at: dt.datetime) -> int:
        insert = sqlite.insert if self.db.is_sqlite else postgresql.insert
        statement = (
            insert(_COUNTERS)
            .values(key=key, count=1, expires_at=expires_at)
            .on_conflict_do_update(
                index_elements=[_COUNTERS.c.key], set_={"count": _COUNTERS.c.count + 1}
            )
            .returning(_COUNTERS.c.count)
        )
        with self.db.session() as session:
            return int(session.execute(statement).scalar_one())

    def _database_count(self, keys: Sequence[str], session: Session | None) -> int:
        query = select(func.coalesce(func.sum(_COUNTERS.c.count), 0)).where(
            _COUNTERS.c.key.in_(list(keys))
        )
        if session is not None:
            return int(session.execute(query).scalar_one())
        with self.db.read() as own:
            return int(own.execute(query).scalar_one())
