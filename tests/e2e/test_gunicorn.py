"""The same end-to-end flow against the broker served by gunicorn with two workers, set up as an
operator would: ``broker.yaml``, ``broker db upgrade``, then
``gunicorn wsgi:app -c gunicorn.conf.py``."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from broker.demo import build_demo_mcp, serve_asgi
from tests.e2e.conftest import Stack, resources
from tests.e2e.test_mcp_sdk import run_flow
from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _wait_ready(url: str, proc: subprocess.Popen[str], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gunicorn exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"gunicorn did not become ready: {log.read_text()[-3000:]}")


CHECKOUT = ("wsgi:app", "-c", "gunicorn.conf.py")
"""How a checkout serves the broker; an installed package: ``-c python:broker.gunicorn_conf
broker.wsgi:app``."""


@contextlib.contextmanager
def gunicorn(
    env: dict[str, str],
    port: int,
    log: Path,
    workers: int = 2,
    *,
    app: tuple[str, ...] = CHECKOUT,
    cwd: Path = ROOT,
) -> Iterator[subprocess.Popen[str]]:
    """gunicorn serving ``app`` from ``cwd`` until the block ends, once ``/ready`` answers."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                str(BIN / "gunicorn"),
                *app,
                "--bind",
                f"127.0.0.1:{port}",
                "--workers",
                str(workers),
                "--threads",
                "2",
            ],
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, so a test can kill it whole
        )
    try:
        _wait_ready(f"http://127.0.0.1:{port}/ready", proc, log)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def configure(
    tmp_path: Path, issuer: str, database_url: str, users_file: Path, mcp_port: int
) -> dict[str, str]:
    """Write broker.yaml and run ``broker db upgrade``, as an operator would; the environment
    for gunicorn."""
    config = tmp_path / "broker.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "issuer": issuer,
                "secret_key": "s" * 48,
                "database_url": database_url,
                "providers": {"local": {"users_file": str(users_file)}},
                "resources": resources(mcp_port, free_port()),
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
    return env


@pytest.fixture
def gunicorn_stack(
    database_url: str, users_file: Path, tmp_path: Path
) -> Iterator[tuple[Stack, Path]]:
    port, mcp_port, other_port = free_port(), free_port(), free_port()
    issuer = f"http://127.0.0.1:{port}"
    config = tmp_path / "broker.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "issuer": issuer,
                "secret_key": "${TEST_SECRET}",
                "database_url": database_url,
                "providers": {"local": {"users_file": str(users_file)}},
                "resources": resources(mcp_port, other_port),
            }
        )
    )
    env = {**os.environ, "BROKER_CONFIG": str(config), "TEST_SECRET": "g" * 48}
    upgrade = subprocess.run(
        [str(BIN / "broker"), "db", "upgrade"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert upgrade.returncode == 0, upgrade.stderr
    check = subprocess.run(
        [str(BIN / "broker"), "db", "check"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    log = tmp_path / "gunicorn.log"
    with gunicorn(env, port, log):
        stack = Stack(
            issuer, f"http://127.0.0.1:{mcp_port}/mcp", f"http://127.0.0.1:{other_port}/mcp"
        )
        with serve_asgi(
            build_demo_mcp(issuer, stack.mcp_url).streamable_http_app(), "127.0.0.1", mcp_port
        ):
            yield stack, log


@pytest.mark.slow
def test_sdk_flow_against_gunicorn_with_two_workers(gunicorn_stack: tuple[Stack, Path]) -> None:
    stack, log = gunicorn_stack
    whoami, _, storage = run_flow(stack)
    assert whoami["authenticated"] is True and whoami["issuer"] == stack.issuer
    text = log.read_text()
    # Two worker processes served; which one accepts a connection is the kernel's choice, so the
    # cross-worker cases (a code issued by one, redeemed by the other) are tested with two
    # gunicorn instances sharing one database elsewhere.
    assert len(re.findall(r"Booting worker with pid", text)) == 2, text[-2000:]
    # Codes and states never reach the access log.
    assert "code=" not in text and "state=" not in text
    assert storage.tokens.refresh_token not in text


@pytest.mark.slow
def test_two_instances_share_one_database(
    database_url: str, users_file: Path, tmp_path: Path
) -> None:
    """Any worker on any host finishes what another started: a code issued through one
    instance is redeemed through the other, and two parallel refreshes of one refresh token
    (one through each instance) both get the same successor."""
    import anyio

    from tests.e2e.conftest import HeadlessBrowser
    from tests.support import authorize_params, pkce

    port_a, port_b, mcp_port = free_port(), free_port(), free_port()
    issuer = f"http://127.0.0.1:{port_a}"
    env = configure(tmp_path, issuer, database_url, users_file, mcp_port)
    with (
        gunicorn(env, port_a, tmp_path / "a.log", workers=1),
        gunicorn(env, port_b, tmp_path / "b.log", workers=1),
    ):
        a, b = issuer, f"http://127.0.0.1:{port_b}"
        client = httpx.post(
            f"{a}/register",
            json={
                "redirect_uris": ["http://127.0.0.1/callback"],
                "token_endpoint_auth_method": "none",
                "grant_types": ["authorization_code", "refresh_token"],
            },
        ).json()
        verifier, challenge = pkce()
        params = authorize_params(
            client["client_id"], challenge, resource=f"http://127.0.0.1:{mcp_port}/mcp"
        )
        browser = HeadlessBrowser(redirect_prefix=params["redirect_uri"])
        anyio.run(browser.run, f"{a}/authorize?" + httpx.QueryParams(params).__str__())
        assert browser.result is not None and "code" in browser.result
        assert browser.result["iss"] == issuer
        token = httpx.post(
            f"{b}/token",
            data={
                "grant_type": "authorization_code",
                "code": browser.result["code"],
                "client_id": client["client_id"],
                "redirect_uri": params["redirect_uri"],
                "code_verifier": verifier,
                "resource": params["resource"],
            },
        )
        assert token.status_code == 200, token.text
        replay = httpx.post(
            f"{a}/token",
            data={
                "grant_type": "authorization_code",
                "code": browser.result["code"],
                "client_id": client["client_id"],
                "redirect_uri": params["redirect_uri"],
                "code_verifier": verifier,
            },
        )
        assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"

        # The replay revoked that grant; start a fresh one for the parallel refreshes.
        verifier, challenge = pkce()
        params = authorize_params(
            client["client_id"], challenge, resource=f"http://127.0.0.1:{mcp_port}/mcp"
        )
        browser = HeadlessBrowser(redirect_prefix=params["redirect_uri"])
        anyio.run(browser.run, f"{a}/authorize?" + str(httpx.QueryParams(params)))
        assert browser.result is not None
        first = httpx.post(
            f"{a}/token",
            data={
                "grant_type": "authorization_code",
                "code": browser.result["code"],
                "client_id": client["client_id"],
                "redirect_uri": params["redirect_uri"],
                "code_verifier": verifier,
            },
        ).json()
        data = {
            "grant_type": "refresh_token",
            "refresh_token": first["refresh_token"],
            "client_id": client["client_id"],
        }
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda url: httpx.post(f"{url}/token", data=data), [a, b]))
        assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
        successors = {r.json()["refresh_token"] for r in answers}
        assert len(successors) == 1  # the grace window hands out the same successor
        assert first["refresh_token"] not in successors


@pytest.mark.slow
def test_a_login_started_on_a_killed_instance_finishes_on_another(
    database_url: str, users_file: Path, tmp_path: Path
) -> None:
    """Nothing about a sign-in in progress lives in process memory: kill -9 the instance that
    showed the consent page and the login form, and the other instance finishes the sign-in."""
    import signal

    from tests.conftest import PASSWORDS
    from tests.support import authorize_params, form_value, pkce, query

    port_a, port_b, mcp_port = free_port(), free_port(), free_port()
    issuer = f"http://127.0.0.1:{port_a}"
    env = configure(tmp_path, issuer, database_url, users_file, mcp_port)
    with (
        gunicorn(env, port_a, tmp_path / "a.log", workers=1) as proc_a,
        gunicorn(env, port_b, tmp_path / "b.log", workers=1),
        httpx.Client(follow_redirects=False, timeout=15) as browser,
    ):
        a, b = issuer, f"http://127.0.0.1:{port_b}"
        client = browser.post(
            f"{a}/register", json={"redirect_uris": ["http://127.0.0.1/callback"]}
        ).json()
        verifier, challenge = pkce()
        params = authorize_params(
            client["client_id"], challenge, resource=f"http://127.0.0.1:{mcp_port}/mcp"
        )
        consent_url = browser.get(f"{a}/authorize", params=params).headers["location"]
        consent = browser.get(f"{a}{consent_url}")
        login_id = form_value(consent.text, "login")
        form_url = browser.post(
            f"{a}/consent",
            data={
                "login": login_id,
                "csrf": form_value(consent.text, "csrf"),
                "action": "approve",
                "provider": "local",
            },
        ).headers["location"]
        form = browser.get(f"{a}{form_url}")
        os.killpg(proc_a.pid, signal.SIGKILL)
        proc_a.wait(10)
        done = browser.post(
            f"{b}/login/local",
            data={
                "login": login_id,
                "csrf": form_value(form.text, "csrf"),
                "username": "alice",
                "password": PASSWORDS["alice"],
            },
        )
        assert done.status_code == 302, done.text
        result = query(done.headers["location"])
        assert result["iss"] == issuer and result["state"] == params["state"]
        token = browser.post(
            f"{b}/token",
            data={
                "grant_type": "authorization_code",
                "code": result["code"],
                "client_id": client["client_id"],
                "redirect_uri": params["redirect_uri"],
                "code_verifier": verifier,
            },
        )
        assert token.status_code == 200, token.text
