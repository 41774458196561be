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
        keys = cache.keys(redis_settings["redis_prefix"] + "*")
        assert keys and all(0 < cache.ttl(k) <= 900 for k in keys)
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
