"""Upstream tokens refreshed before they expire, one refresh at a time per user and provider
across every worker and host (``broker/upstream.py``), against the Atlassian fake, whose refresh
tokens rotate and whose families die when one is used twice.

The user signs in while the fake issues two-second access tokens, then the fake goes back to an
hour, and the test waits until the stored token has expired: the next exchange must refresh.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from flask import Flask
from sqlalchemy import select, update

from broker.crypto import Sealer, hash_password
from broker.db import Database, utcnow
from broker.models import Client, UpstreamToken
from broker.oauth2.rfc8693 import TOKEN_EXCHANGE
from broker.upstream import sealed_aad
from tests.fakes.atlassian import FakeAtlassian
from tests.oauth2.test_rfc8693_token_exchange import (
    MCP_CLIENT,
    MCP_SECRET,
    ExchangeStack,
    exchange_form,
    exchange_resources,
    exchange_stack,
    jira_myself,
    sign_in,
)
from tests.support import RESOURCE, free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHORT_TTL = {"access_token_ttl": 2}


def expire(fake: FakeAtlassian, expires_at: dt.datetime | None) -> None:
    """Let the token issued at sign-in expire; the fake issues hour-long tokens from now on."""
    fake.access_token_ttl = 3600
    assert expires_at is not None
    while time.time() <= expires_at.timestamp() + 0.05:
        time.sleep(0.05)


@pytest.fixture
def stack(make_app: Callable[..., Flask], users_file: Path) -> Iterator[ExchangeStack]:
    with exchange_stack(make_app, users_file, fake_options=SHORT_TTL) as running:
        yield running


def signed_in_and_expired(stack: ExchangeStack) -> str:
    subject = stack.sign_in()
    row = stack.upstream_row()
    assert row is not None
    expire(stack.fake, row.expires_at)
    return subject


def test_an_expiring_token_is_refreshed_once_and_sealed_again(stack: ExchangeStack) -> None:
    subject = signed_in_and_expired(stack)
    before = stack.upstream_row()
    assert before is not None
    old_refresh = stack.stored_refresh_token()
    response = stack.exchange(subject)
    assert response.status_code == 200, response.text
    body = response.json()
    assert 3500 < body["expires_in"] <= 3600
    assert jira_myself(stack.fake, body["access_token"]).status_code == 200
    assert stack.fake.refresh_calls == 1
    after = stack.upstream_row()
    assert after is not None and after.refresh_lock_until is None
    assert after.access_token_sealed != before.access_token_sealed
    assert after.expires_at is not None and after.expires_at > utcnow() + dt.timedelta(hours=0.9)
    # The context of the sign-in survives the refresh.
    assert after.context == before.context
    assert body["upstream"]["context"] == before.context
    # Atlassian rotated the refresh token: the new one is stored (sealed), the old one is spent.
    new_refresh = stack.stored_refresh_token()
    assert new_refresh != old_refresh
    assert stack.fake.refresh_token_active(new_refresh)
    assert not stack.fake.refresh_token_active(old_refresh)
    dump = stack.dump()
    assert body["access_token"] not in dump and new_refresh not in dump
    # Fresh now: the next exchange hands out the same token without asking the upstream.
    again = stack.exchange(subject)
    assert again.json()["access_token"] == body["access_token"]
    assert stack.fake.refresh_calls == 1
    assert [event.details["refreshed"] for event in stack.audit()] == [True, False]


def test_parallel_exchanges_in_one_process_refresh_once(stack: ExchangeStack) -> None:
    subject = signed_in_and_expired(stack)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: stack.exchange(subject), range(8)))
    assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
    tokens = {a.json()["access_token"] for a in answers}
    assert len(tokens) == 1
    assert stack.fake.refresh_calls == 1
    assert jira_myself(stack.fake, tokens.pop()).status_code == 200
    assert stack.fake.refresh_token_active(stack.stored_refresh_token())


def test_an_unavailable_upstream_releases_the_lock(stack: ExchangeStack) -> None:
    subject = signed_in_and_expired(stack)
    before = stack.upstream_row()
    stack.fake.fail("token", 503)
    response = stack.exchange(subject)
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "temporarily_unavailable"
    assert response.headers["retry-after"]
    row = stack.upstream_row()
    assert row is not None and before is not None
    assert row.refresh_lock_until is None
    assert row.access_token_sealed == before.access_token_sealed  # nothing else changed
    stack.fake.reset_faults()
    response = stack.exchange(subject)
    assert response.status_code == 200, response.text
    assert stack.fake.refresh_calls == 1


def test_a_refused_refresh_asks_the_user_to_sign_in_again(stack: ExchangeStack) -> None:
    subject = signed_in_and_expired(stack)
    # The broker's refresh token is used elsewhere: Atlassian rotates it away, and the broker's
    # own refresh then reuses it, which revokes the family.
    used = httpx.post(
        f"{stack.fake.auth_url}/oauth/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": stack.stored_refresh_token(),
            "client_id": stack.fake.client_id,
            "client_secret": stack.fake.client_secret,
        },
    )
    assert used.status_code == 200
    response = stack.exchange(subject)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_grant"
    assert "sign in with atlassian again" in response.json()["error_description"]
    assert stack.upstream_row() is None  # unusable: gone, lock and all
    (event,) = stack.audit()
    assert (event.outcome, event.reason, event.client_id) == (
        "failure",
        "upstream_refresh_refused",
        MCP_CLIENT,
    )
    assert stack.exchange(subject).json()["error"] == "invalid_grant"
    assert stack.fake.refresh_calls == 2  # the test's own, and the broker's one attempt
    # Signing in again stores a new token, and the exchange works again.
    fresh = stack.sign_in()
    response = stack.exchange(fresh)
    assert response.status_code == 200, response.text
    assert jira_myself(stack.fake, response.json()["access_token"]).status_code == 200


def test_a_lock_left_by_a_dead_worker_lasts_only_its_lease(
    make_app: Callable[..., Flask], users_file: Path
) -> None:
    with exchange_stack(
        make_app, users_file, fake_options=SHORT_TTL, service_options={"wait": 0.5}
    ) as stack:
        subject = signed_in_and_expired(stack)
        with stack.broker.db.session() as session:
            session.execute(
                update(UpstreamToken).values(refresh_lock_until=utcnow() + dt.timedelta(hours=1))
            )
        response = stack.exchange(subject)
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "temporarily_unavailable"
        assert stack.fake.refresh_calls == 0  # never two refreshes at once
        with stack.broker.db.session() as session:
            session.execute(
                update(UpstreamToken).values(refresh_lock_until=utcnow() - dt.timedelta(seconds=1))
            )
        response = stack.exchange(subject)
        assert response.status_code == 200, response.text
        assert stack.fake.refresh_calls == 1
        row = stack.upstream_row()
        assert row is not None and row.refresh_lock_until is None


def test_a_token_without_refresh_token_is_handed_out_until_it_expires(
    make_app: Callable[..., Flask], users_file: Path
) -> None:
    with exchange_stack(make_app, users_file, fake_options=SHORT_TTL) as stack:
        subject = stack.sign_in()
        with stack.broker.db.session() as session:
            session.execute(update(UpstreamToken).values(refresh_token_sealed=None))
        assert stack.exchange(subject).status_code == 200  # still valid for a moment
        row = stack.upstream_row()
        assert row is not None
        expire(stack.fake, row.expires_at)
        response = stack.exchange(subject)
        assert response.status_code == 400 and response.json()["error"] == "invalid_grant"
        assert stack.fake.refresh_calls == 0


# -- across processes: two gunicorn instances on one database -------------------------------------

WSGI_MODULE = '''\
"""The broker as wsgi.py builds it, with the token exchange grant registered (until the
application registers it itself)."""
from broker.app import create_app
from broker.oauth2.rfc8693 import TokenExchangeGrant, register_token_exchange

app = create_app()
_broker = app.extensions["broker"]
if not any(cls is TokenExchangeGrant for cls, _ in _broker.server._token_grants):
    register_token_exchange(_broker.server, _broker.providers, _broker.http)
'''


@contextlib.contextmanager
def gunicorn(env: dict[str, str], port: int, log: Path, app_dir: Path) -> Iterator[None]:
    """One gunicorn instance with one worker process, as ``gunicorn.conf.py`` configures it."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                str(BIN / "gunicorn"),
                "exchange_wsgi:app",
                "-c",
                "gunicorn.conf.py",
                "--pythonpath",
                str(app_dir),
                "--bind",
                f"127.0.0.1:{port}",
                "--workers",
                "1",
                "--threads",
                "4",
            ],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"gunicorn exited: {log.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"gunicorn did not start: {log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.mark.slow
def test_parallel_exchanges_through_two_gunicorn_workers_refresh_once(
    database_url: str, users_file: Path, tmp_path: Path
) -> None:
    """Eight exchanges at once, half through each of two gunicorn processes sharing one
    database, for a user whose Atlassian token has expired: exactly one refresh upstream, every
    caller gets the new token and it works, and the rotated family stays alive."""
    secret = "e" * 48
    with FakeAtlassian.running(**SHORT_TTL) as fake:
        port_a, port_b = free_port(), free_port()
        a, b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
        config = tmp_path / "broker.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "issuer": a,
                    "secret_key": secret,
                    "database_url": database_url,
                    "providers": {
                        "local": {"users_file": str(users_file)},
                        "atlassian": fake.provider_config(),
                    },
                    "resources": exchange_resources(),
                }
            )
        )
        (tmp_path / "exchange_wsgi.py").write_text(WSGI_MODULE)
        env = {**os.environ, "BROKER_CONFIG": str(config)}
        upgrade = subprocess.run(
            [str(BIN / "broker"), "db", "upgrade"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert upgrade.returncode == 0, upgrade.stderr
        db = Database(database_url)
        try:
            with db.session() as session:
                session.add(
                    Client(
                        client_id=MCP_CLIENT,
                        kind="static",
                        name="Jira MCP server",
                        redirect_uris=[],
                        grant_types=[TOKEN_EXCHANGE],
                        response_types=[],
                        token_endpoint_auth_method="client_secret_basic",
                        secret_hash=hash_password(MCP_SECRET),
                        allowed_resources=[RESOURCE],
                    )
                )
            with (
                gunicorn(env, port_a, tmp_path / "a.log", tmp_path),
                gunicorn(env, port_b, tmp_path / "b.log", tmp_path),
            ):
                subject = sign_in(a, "atlassian")["access_token"]
                with db.session() as session:
                    row = session.scalars(select(UpstreamToken)).one()
                    expires_at, identity_id = row.expires_at, row.identity_id
                expire(fake, expires_at)

                def exchange(base: str) -> httpx.Response:
                    return httpx.post(
                        f"{base}/token",
                        data=exchange_form(subject),
                        auth=(MCP_CLIENT, MCP_SECRET),
                        timeout=30,
                    )

                with ThreadPoolExecutor(8) as pool:
                    answers = list(pool.map(exchange, [a, b] * 4))
                assert [r.status_code for r in answers] == [200] * 8, [r.text for r in answers]
                assert fake.refresh_calls == 1
                tokens = {r.json()["access_token"] for r in answers}
                assert len(tokens) == 1
                for token in tokens:
                    assert jira_myself(fake, token).status_code == 200
                with db.session() as session:
                    after = session.get(UpstreamToken, identity_id)
                    assert after is not None and after.refresh_token_sealed is not None
                    assert after.refresh_lock_until is None
                    stored = Sealer(secret).open_text(
                        after.refresh_token_sealed, sealed_aad(identity_id, "refresh")
                    )
                assert fake.refresh_token_active(stored)  # the family is alive
        finally:
            db.dispose()
        for log in ("a.log", "b.log"):
            text = (tmp_path / log).read_text()
            assert text.count('"POST /token"') >= 4, text[-2000:]  # both processes served
            assert stored not in text and subject not in text
