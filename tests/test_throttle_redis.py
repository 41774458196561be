"""Login throttling counted in Redis (``redis_url``), shared by every worker, and counted in the
database when Redis does not answer."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from tests.conftest import PASSWORDS
from tests.support import free_port, login_form, unavailable
from tests.test_ratelimit import RedisServer, redis6  # noqa: F401 - the Redis 6 fixture

REDIS_URL = os.environ.get("BROKER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def redis_settings() -> dict[str, Any]:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=1, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError:
        unavailable(f"Redis is not reachable at {REDIS_URL}")
    finally:
        client.close()
    return {"redis_url": REDIS_URL, "redis_prefix": f"test-{secrets.token_hex(6)}:"}


def _form(app: Flask) -> tuple[Any, str, str]:
    client = app.test_client()
    login_id, csrf = login_form(client)
    return client, login_id, csrf


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_failures_are_counted_in_redis_and_shared(
    make_app: Callable[..., Flask], redis_settings: dict[str, Any]
) -> None:
    import redis

    first, second = make_app(**redis_settings), make_app(**redis_settings)  # two "workers"
    client, login_id, csrf = _form(first)
    for _ in range(5):
        response = client.post(
            "/login/local",
            data={"login": login_id, "csrf": csrf, "username": "alice", "password": "x"},
        )
        assert response.status_code == 400
    cache = redis.Redis.from_url(REDIS_URL)
    try:
        keys = cache.keys(redis_settings["redis_prefix"] + "rl:login_failures:*")
        # Every counter expires: kept through its 15-minute window and the next one.
        assert keys and all(0 < cache.ttl(k) <= 1800 for k in keys)
        assert not any(b"alice" in k for k in keys)  # user names are hashed
        other, other_login, other_csrf = _form(second)
        blocked = other.post(
            "/login/local",
            data={
                "login": other_login,
                "csrf": other_csrf,
                "username": "alice",
                "password": PASSWORDS["alice"],
            },
        )
        assert blocked.status_code == 429
    finally:
        for key in cache.keys(redis_settings["redis_prefix"] + "*"):
            cache.delete(key)
        cache.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_redis_down_falls_back_to_the_database(make_app: Callable[..., Flask]) -> None:
    app = make_app(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    client, login_id, csrf = _form(app)
    for _ in range(5):
        response = client.post(
            "/login/local",
            data={"login": login_id, "csrf": csrf, "username": "alice", "password": "x"},
        )
        assert response.status_code == 400
    blocked = client.post(
        "/login/local",
        data={"login": login_id, "csrf": csrf, "username": "alice", "password": PASSWORDS["alice"]},
    )
    assert blocked.status_code == 429


def test_redis_url_is_validated() -> None:
    from broker.config import ConfigError, parse

    with pytest.raises(ConfigError) as info:
        parse(
            {
                "issuer": "https://sso.example.com",
                "secret_key": "k" * 40,
                "redis_url": "http://cache:6379",
                "providers": {"local": {"users_file": "u.yaml"}},
                "resources": [{"uri": "https://mcp.example.com/x"}],
            },
            env={},
        )
    assert "redis_url: must be a redis://, rediss:// or unix:// URL" in info.value.problems


# -- Redis 6 (issue 11): the throttle counts there too -----------------------------------------


def test_redis6_has_no_expire_nx(redis6: RedisServer) -> None:  # noqa: F811
    """Why the throttle no longer uses ``EXPIRE ... NX``: Redis 6 refuses it, and the refusal
    aborts the whole MULTI, so nothing at all was counted."""
    import redis

    cache = redis.Redis.from_url(redis6.url)
    key = f"test-{secrets.token_hex(6)}"
    try:
        pipe = cache.pipeline()
        pipe.incr(key)
        pipe.expire(key, 60, nx=True)
        with pytest.raises(redis.ResponseError):
            pipe.execute()
        assert cache.get(key) is None  # the INCR did not happen either
    finally:
        cache.delete(key)
        cache.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_failures_are_counted_on_redis6(
    make_app: Callable[..., Flask],
    redis6: RedisServer,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    import redis
    from sqlalchemy import select

    from broker.models import RateLimitCounter

    prefix = f"test-{secrets.token_hex(6)}:"
    app = make_app(redis_url=redis6.url, redis_prefix=prefix)
    client, login_id, csrf = _form(app)
    for _ in range(5):
        response = client.post(
            "/login/local",
            data={"login": login_id, "csrf": csrf, "username": "alice", "password": "x"},
        )
        assert response.status_code == 400
    blocked = client.post(
        "/login/local",
        data={"login": login_id, "csrf": csrf, "username": "alice", "password": PASSWORDS["alice"]},
    )
    assert blocked.status_code == 429
    cache = redis.Redis.from_url(redis6.url)
    try:
        keys = cache.keys(prefix + "rl:login_failures:per_user:*")
        assert len(keys) == 1 and int(cache.get(keys[0])) == 5  # counted in Redis 6
    finally:
        for key in cache.keys(prefix + "*"):
            cache.delete(key)
        cache.close()
    with app.extensions["broker"].db.read() as session:
        assert session.scalars(select(RateLimitCounter)).first() is None  # not in the database
    assert "redis does not answer" not in caplog.text


# -- the bound is sliding: a window boundary lets no burst through ---------------------------


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_failures_around_a_window_boundary_still_block(make_app: Callable[..., Flask]) -> None:
    """Four failures at the very end of a 15-minute window and one at the start of the next
    block the user: the current and the previous window are added up, so no 15-minute span
    holds more than 5 failures (a single fixed window would allow 9 within a second)."""
    from broker.ratelimit import RateLimiter
    from broker.throttle import LoginThrottle
    from tests.test_ratelimit import Clock

    b = make_app().extensions["broker"]
    clock = Clock(1_800_000_000.0 + 899.5)  # 1_800_000_000 starts a 900-second window
    throttle = LoginThrottle(
        limiter=RateLimiter(b.db, secret_key=b.settings.secret_key, clock=clock)
    )
    for _ in range(4):
        throttle.record_failure("local:alice", "192.0.2.9")
    clock.now += 1.0  # the next window
    with b.db.read() as session:
        assert not throttle.blocked(session, "local:alice", "192.0.2.9")
    throttle.record_failure("local:alice", "192.0.2.9")
    with b.db.read() as session:
        assert throttle.blocked(session, "local:alice", "192.0.2.9")
        assert not throttle.blocked(session, "local:bob", "192.0.2.10")
    clock.now += 900  # the window of the four is no longer the previous one
    with b.db.read() as session:
        assert not throttle.blocked(session, "local:alice", "192.0.2.9")
