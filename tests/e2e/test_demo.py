"""``broker demo`` (what ``make demo`` runs) on a fresh directory: it serves, and the official MCP
SDK client signs in as the demo user and calls the demo tools."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Stack
from tests.e2e.test_mcp_sdk import run_flow
from tests.support import free_port

BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_demo_serves_and_the_sdk_calls_its_tools(tmp_path: Path) -> None:
    port, mcp_port = free_port(), free_port()
    log = tmp_path / "demo.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                str(BIN / "broker"),
                "demo",
                "--dir",
                str(tmp_path / "demo"),
                "--port",
                str(port),
                "--mcp-port",
                str(mcp_port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        deadline = time.monotonic() + 30
        while "Press Ctrl+C" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        issuer, mcp_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{mcp_port}/mcp"
        for _ in range(50):
            try:
                httpx.get(f"{issuer}/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        text = log.read_text()
        assert mcp_url in text and "demo / demo" in text
        whoami, _, _ = run_flow(Stack(issuer, mcp_url, mcp_url), username="demo", password="demo")
        assert whoami["authenticated"] is True and whoami["issuer"] == issuer
        assert "demo:read" in whoami["scopes"]
    finally:
        proc.terminate()
        proc.wait(15)
    logged = log.read_text()
    assert "code=" not in logged and "state=" not in logged
