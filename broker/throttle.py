"""Throttling of failed form logins, per user and per address, on the rate-limit mechanism.

Failures are counted by :class:`broker.ratelimit.RateLimiter` (Redis when configured and
answering, the database otherwise), so every worker and host agrees. A user or an address is
refused when the current and the previous 15-minute window together hold its limit: every
15-minute span then holds at most the limit, as a sliding window would (a single fixed window
would let twice the limit through around its end), and a refused user waits between 15 and 30
minutes. Failures counted in the database while Redis was down still count once it answers again.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from .config import RateLimit
from .ratelimit import RateLimiter, address_subject, redis_client

__all__ = ["FAILURES_PER_ADDRESS", "FAILURES_PER_USER", "LoginThrottle", "redis_client"]

FAILURES_PER_USER = RateLimit(5, 15 * 60)
FAILURES_PER_ADDRESS = RateLimit(20, 15 * 60)
_NAME = "login_failures"


class LoginThrottle:
    """Failed form logins. ``redis`` is the client the app's :class:`RateLimiter` shares; the
    limiter itself is attached by :func:`broker.views.init_app` (:meth:`attach`)."""

    def __init__(
        self,
        redis: Any | None = None,
        *,
        prefix: str = "broker:",
        limiter: RateLimiter | None = None,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self._limiter = limiter

    def attach(self, limiter: RateLimiter) -> None:
        self._limiter = limiter

    @property
    def limiter(self) -> RateLimiter:
        if self._limiter is None:
            raise RuntimeError("LoginThrottle has no RateLimiter: call attach() first")
        return self._limiter

    def blocked(self, session: Session, actor: str, address: str | None) -> bool:
        """Whether ``actor`` (``provider:username``) or ``address`` reached its limit over the
        current and the previous window; read through the caller's ``session``."""
        limiter = self.limiter
        user = limiter.count(
            _NAME, "per_user", actor, FAILURES_PER_USER, windows=2, session=session
        )
        if user >= FAILURES_PER_USER.count:
            return True
        if address is None:
            return False
        per_address = limiter.count(
            _NAME,
            "per_address",
            address_subject(address),
            FAILURES_PER_ADDRESS,
            windows=2,
            session=session,
        )
        return per_address >= FAILURES_PER_ADDRESS.count

    def record_failure(self, actor: str, address: str | None) -> None:
        """Count one failed login (call it outside the request's database transaction)."""
        limiter = self.limiter
        limiter.hit(_NAME, "per_user", actor, FAILURES_PER_USER)
        if address is not None:
            limiter.hit(_NAME, "per_address", address_subject(address), FAILURES_PER_ADDRESS)
