"""A flood of registrations from one address against two gunicorn workers sharing PostgreSQL:
held at the limit by the two together, answered with 429 and Retry-After, and let through again
after the window; with the counters in the database and in Redis. Also what gunicorn does with an
oversized body on a kept-alive connection."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from sqlalchemy import func, select

from broker.db import Database
from broker.models import Client, RateLimitCounter
from tests.e2e.conftest import resources
from tests.e2e.test_gunicorn import BIN, ROOT, gunicorn
from tests.support import free_port, unavailable

REDIS_URL = os.environ.get("BROKER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
BODY = {"client_name": "Flood", "redirect_uris": ["http://127.0.0.1/callback"]}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.parametrize("database_url", ["postgresql"], indirect=True),
]


@pytest.fixture(params=["database", "redis"])
def counters(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """Where the workers count: the database (no redis_url), or Redis."""
    if request.param == "database":
        yield {}
        return
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=1, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError:
        unavailable(f"Redis is not reachable at {REDIS_URL}")
    prefix = f"test-flood-{secrets.token_hex(6)}:"
    try:
        yield {"redis_url": REDIS_URL, "redis_prefix": prefix}
    finally:
        for key in client.keys(prefix + "*"):
            client.delete(key)
        client.close()


@contextlib.contextmanager
def two_workers(
    tmp_path: Path,
    database_url: str,
    users_file: Path,
    rate: str,
    counters: dict[str, Any],
    limits: dict[str, Any] | None = None,
) -> Iterator[tuple[str, str]]:
    """Two gunicorn instances of one worker each, on one database and one configuration:
    alternating between them puts every other request on the other worker."""
    import subprocess

    port_a, port_b = free_port(), free_port()
    directory = tmp_path / f"flood-{secrets.token_hex(3)}"
    directory.mkdir()
    config = directory / "broker.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "issuer": f"http://127.0.0.1:{port_a}",
                "secret_key": "f" * 48,
                "database_url": database_url,
                "providers": {"local": {"users_file": str(users_file)}},
                "resources": resources(free_port(), free_port()),
                "rate_limits": {"register": {"per_address": rate}, **(limits or {})},
                **counters,
            }
        )
    )
    env = {**os.environ, "BROKER_CONFIG": str(config)}
    subprocess.run(
        [str(BIN / "broker"), "db", "upgrade"],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=60,
    )
    with (
        gunicorn(env, port_a, directory / "a.log", workers=1),
        gunicorn(env, port_b, directory / "b.log", workers=1),
    ):
        yield f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"


def register(url: str) -> httpx.Response:
    return httpx.post(f"{url}/register", json=BODY, timeout=30)


def wait_for_window(period: int, needed: float) -> None:
    """Sleep into a fresh window when less than ``needed`` seconds are left in this one."""
    left = period - time.time() % period
    if left < needed:
        time.sleep(left + 0.05)


def clients_and_counters(database_url: str) -> tuple[int, int]:
    database = Database(database_url)
    try:
        with database.read() as session:
            clients = session.execute(select(func.count()).select_from(Client)).scalar_one()
            rows = session.execute(select(func.count()).select_from(RateLimitCounter)).scalar_one()
            return int(clients), int(rows)
    finally:
        database.dispose()


def test_a_flood_is_held_at_the_limit_by_two_workers_together(
    tmp_path: Path, database_url: str, users_file: Path, counters: dict[str, Any]
) -> None:
    with two_workers(tmp_path, database_url, users_file, "10/minute", counters) as (a, b):
        wait_for_window(60, needed=20)  # the whole flood within one window
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(register, [a, b] * 15))
        statuses = [r.status_code for r in answers]
        assert statuses.count(201) == 10, statuses
        assert statuses.count(429) == 20, statuses
        window_end = set()
        for response in answers:
            if response.status_code == 429:
                assert response.json()["error"] == "too_many_requests"
                retry_after = int(response.headers["Retry-After"])
                assert 1 <= retry_after <= 60
                window_end.add(round((time.time() + retry_after) / 60))
        assert len(window_end) == 1  # every refusal points at the same end of the window
        # Both workers refused requests of the one flood: with a counter each, 20 would pass.
        for first in (0, 1):
            assert 429 in statuses[first::2], statuses
    clients, rows = clients_and_counters(database_url)
    assert clients == 10
    assert rows == (0 if counters else 1)  # Redis counted, or one database counter


def test_the_flood_is_let_through_again_after_the_window(
    tmp_path: Path, database_url: str, users_file: Path, counters: dict[str, Any]
) -> None:
    with two_workers(tmp_path, database_url, users_file, "3/second", counters) as (a, b):
        wait_for_window(1, needed=0.9)
        refused = None
        for i in range(20):
            response = register((a, b)[i % 2])
            if response.status_code == 429:
                refused = response
                break
            assert response.status_code == 201, response.text
        assert refused is not None, "the limit never held"
        assert refused.headers["Retry-After"] == "1"
        time.sleep(int(refused.headers["Retry-After"]) + 0.05)
        assert register(b).status_code == 201
        assert register(a).status_code == 201


def test_token_and_authorize_limits_are_held_by_two_workers_together(
    tmp_path: Path, database_url: str, users_file: Path, counters: dict[str, Any]
) -> None:
    """Per client at /token (counted once the client is authenticated: a refresh with a bad
    token still counts, a wrong client does not), per address at /authorize."""
    limits = {
        "token": {"per_client": "10/minute"},
        "authorize": {"per_address": "10/minute"},
    }
    with two_workers(tmp_path, database_url, users_file, "100/minute", counters, limits) as (
        a,
        b,
    ):
        client_id = register(a).json()["client_id"]

        def refresh(url: str) -> httpx.Response:
            form = {"grant_type": "refresh_token", "refresh_token": "x", "client_id": client_id}
            return httpx.post(f"{url}/token", data=form, timeout=30)

        def authorize(url: str) -> httpx.Response:
            return httpx.get(f"{url}/authorize", params={"client_id": "nobody"}, timeout=30)

        wait_for_window(60, needed=20)
        with ThreadPoolExecutor(4) as pool:
            tokens = list(pool.map(refresh, [a, b] * 15))
            pages = list(pool.map(authorize, [a, b] * 15))
        statuses = [r.status_code for r in tokens]
        # Read, then counted once answered: requests in flight together may pass by their number.
        assert 10 <= statuses.count(400) <= 10 + 4, statuses
        assert statuses.count(400) + statuses.count(429) == 30, statuses
        for first in (0, 1):
            assert 429 in statuses[first::2], statuses  # both workers refused
        refused = next(r for r in tokens if r.status_code == 429)
        assert refused.json()["error"] == "too_many_requests"
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        # Another client keeps its own budget.
        other = register(b).json()["client_id"]
        form = {"grant_type": "refresh_token", "refresh_token": "x", "client_id": other}
        assert httpx.post(f"{a}/token", data=form).status_code == 400
        statuses = [r.status_code for r in pages]
        assert statuses.count(400) == 10 and statuses.count(429) == 20, statuses
        for first in (0, 1):
            assert 429 in statuses[first::2], statuses


# -- an oversized body on a kept-alive connection to gunicorn -----------------------------------


def _exchange(sock: socket.socket, body: bytes) -> bytes:
    sock.sendall(
        b"POST /register HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n"
        b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(rest) < length:
        rest += sock.recv(65536)
    return head


@pytest.mark.parametrize("size", [20_000, 200_000])
def test_gunicorn_never_reads_an_unread_body_as_the_next_request(
    tmp_path: Path, database_url: str, users_file: Path, size: int
) -> None:
    """gunicorn drops the app's ``Connection: close`` but drains a small unread body (the next
    request on the connection works) and closes the connection after a large one; either way
    the next request is never made of the previous body."""
    import json

    with two_workers(tmp_path, database_url, users_file, "600/hour", {}) as (a, _):
        port = int(a.rsplit(":", 1)[1])
        big = json.dumps({**BODY, "extra": "y" * size}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            head = _exchange(sock, big)
            assert head.startswith(b"HTTP/1.1 413")
            try:
                after = _exchange(sock, json.dumps(BODY).encode())
            except (ConnectionResetError, BrokenPipeError):
                after = b""
            assert after == b"" or after.startswith(b"HTTP/1.1 201"), after
        assert register(a).status_code == 201
