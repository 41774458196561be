"""The same end-to-end flow against the broker served by gunicorn with two workers, set up as an
operator would: ``broker.yaml``, ``broker db upgrade``, then
``gunicorn wsgi:app -c gunicorn.conf.py``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
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
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                str(BIN / "gunicorn"),
                "wsgi:app",
                "-c",
                "gunicorn.conf.py",
                "--bind",
                f"127.0.0.1:{port}",
                "--workers",
                "2",
                "--threads",
                "2",
            ],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        _wait_ready(f"{issuer}/ready", proc, log)
        stack = Stack(
            issuer, f"http://127.0.0.1:{mcp_port}/mcp", f"http://127.0.0.1:{other_port}/mcp"
        )
        with serve_asgi(
            build_demo_mcp(issuer, stack.mcp_url).streamable_http_app(), "127.0.0.1", mcp_port
        ):
            yield stack, log
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.mark.slow
def test_sdk_flow_against_gunicorn_with_two_workers(gunicorn_stack: tuple[Stack, Path]) -> None:
    stack, log = gunicorn_stack
    whoami, _, storage = run_flow(stack)
    assert whoami["authenticated"] is True and whoami["issuer"] == stack.issuer
    # Spread more requests over the workers, then check that two processes served the flow.
    for _ in range(20):
        httpx.get(f"{stack.issuer}/jwks.json", timeout=5)
    text = log.read_text()
    pids = set(re.findall(r"pid=<?(\d+)", text))
    assert len(pids) >= 2, text[-2000:]
    # Codes and states never reach the access log.
    assert "code=" not in text and "state=" not in text
    assert storage.tokens.refresh_token not in text
