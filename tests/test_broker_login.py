"""``broker login``: the RFC 8252 loopback flow with PKCE, run as a real subprocess against a live
broker (the demo's settings: SQLite, the local provider and its demo user), with a cookie-keeping
HTTP client playing the browser up to the command's loopback listener."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import anyio
import httpx
import pytest
import yaml
from click.testing import CliRunner
from flask import Flask
from sqlalchemy import select

from broker import create_app
from broker.cli import main
from broker.db import Database
from broker.demo import DEMO_PASSWORD, DEMO_USER, build_demo_mcp, demo_settings, serve_asgi
from broker.migrate import upgrade
from broker.models import Client
from broker.resource import BrokerTokenVerifier
from tests.e2e.conftest import HeadlessBrowser
from tests.support import form_value, free_port, query, serve_wsgi

BROKER = Path(sys.executable).parent / "broker"
TOKEN_FILE_FIELDS = {
    "access_token",
    "refresh_token",
    "expires_at",
    "resource",
    "scope",
    "issuer",
    "client_id",
    "created",
}


@dataclass
class DemoBroker:
    issuer: str
    resource: str
    mcp_port: int
    app: Flask
    config: Path

    def dcr_clients(self) -> list[Client]:
        with self.app.extensions["broker"].db.read() as session:
            rows = list(session.scalars(select(Client).where(Client.kind == "dcr")))
            session.expunge_all()
        return rows


@pytest.fixture
def demo_broker(tmp_path: Path) -> Iterator[DemoBroker]:
    """The broker as ``broker demo`` configures it, in-process on a free port, and a config
    file naming it (for the --config default of --issuer)."""
    port, mcp_port = free_port(), free_port()
    settings = demo_settings(tmp_path / "demo", port, mcp_port)
    database = Database(settings.database_url)
    upgrade(database.engine, client_migrations=settings.client_migrations)
    database.dispose()
    app = create_app(settings)
    config = tmp_path / "broker.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "issuer": settings.issuer,
                "secret_key": settings.secret_key,
                "database_url": settings.database_url,
                "providers": {name: dict(conf) for name, conf in settings.providers.items()},
                "resources": [
                    {"uri": r.uri, "name": r.name, "scopes": dict(r.scopes)}
                    for r in settings.resources
                ],
            }
        )
    )
    with serve_wsgi(app, port) as issuer:
        yield DemoBroker(issuer, settings.resources[0].uri, mcp_port, app, config)
    app.extensions["broker"].db.dispose()
    app.extensions["broker"].http.close()


RUNNING: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _stop_leftover_runs() -> Iterator[None]:
    """A failed assertion must not leave a command waiting for its browser."""
    yield
    while RUNNING:
        proc = RUNNING.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


@dataclass
class LoginRun:
    """``broker login ...`` in a subprocess; its standard error is read as it comes."""

    args: list[str]
    proc: subprocess.Popen[str] = field(init=False)
    stderr_lines: list[str] = field(default_factory=list)
    _reader: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.proc = subprocess.Popen(
            [str(BROKER), *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"},
        )
        RUNNING.append(self.proc)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line.rstrip("\n"))

    def authorization_url(self, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.stderr_lines):
                if "/authorize?" in line:
                    return line.strip()
            assert self.proc.poll() is None, self.stderr
            time.sleep(0.05)
        raise AssertionError(f"no authorization URL printed: {self.stderr}")

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        """The exit code and standard output."""
        assert self.proc.stdout is not None
        out = self.proc.stdout.read()
        code = self.proc.wait(timeout)
        self._reader.join(5)
        self.proc.stdout.close()
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return code, out

    @property
    def stderr(self) -> str:
        return "\n".join(self.stderr_lines)


def login(broker: DemoBroker, *args: str) -> LoginRun:
    return LoginRun(["login", "--issuer", broker.issuer, "--no-browser", "--timeout", "60", *args])


def sign_in(url: str) -> tuple[dict[str, str], httpx.Response]:
    """Play the user through consent and the demo user's login (the e2e headless browser), then
    let the final redirect hit the command's loopback listener; returns the authorization
    response's parameters and the listener's page."""
    browser = HeadlessBrowser(
        redirect_prefix=query(url)["redirect_uri"], username=DEMO_USER, password=DEMO_PASSWORD
    )
    anyio.run(browser.run, url)
    assert browser.result is not None
    return browser.result, httpx.get(browser.visited[-1], timeout=10)


def follow_to_listener(url: str, consent: str | None = None) -> httpx.Response:
    """Follow the broker's redirects (answering the consent page with ``consent``) until the
    loopback listener answers."""
    loopback = query(url)["redirect_uri"]
    with httpx.Client(follow_redirects=False, timeout=30) as browser:
        for _ in range(10):
            response = browser.get(url)
            if url.startswith(loopback):
                return response
            if response.status_code == 200 and consent is not None:
                response = browser.post(
                    urljoin(url, "/consent"),
                    data={
                        "login": form_value(response.text, "login"),
                        "csrf": form_value(response.text, "csrf"),
                        "action": consent,
                    },
                )
            assert response.is_redirect, f"{url}: {response.status_code} {response.text[:300]}"
            url = urljoin(url, response.headers["location"])
    raise AssertionError("the broker never redirected to the loopback listener")


def verify(broker: DemoBroker, token: str) -> tuple[str, ...]:
    verified = BrokerTokenVerifier(issuer=broker.issuer, audience=broker.resource).verify(token)
    assert verified.audience == broker.resource and verified.issuer == broker.issuer
    return verified.scopes


@pytest.mark.slow
def test_login_prints_a_token_for_the_resource_that_its_mcp_server_accepts(
    demo_broker: DemoBroker,
) -> None:
    run = login(demo_broker, "--resource", demo_broker.resource, "--scope", "demo:read")
    url = run.authorization_url()
    params = query(url)
    assert url.startswith(f"{demo_broker.issuer}/authorize?")
    assert params["code_challenge_method"] == "S256" and len(params["code_challenge"]) == 43
    assert params["resource"] == demo_broker.resource and params["scope"] == "demo:read"
    redirect = urlsplit(params["redirect_uri"])
    assert (redirect.scheme, redirect.hostname, redirect.path) == ("http", "127.0.0.1", "/callback")
    assert redirect.port and redirect.port != 80

    response_params, page = sign_in(url)
    code, out = run.finish()
    assert code == 0, run.stderr
    assert response_params["iss"] == demo_broker.issuer  # RFC 9207, checked by the command
    assert page.status_code == 200 and "You can close this window" in page.text
    assert "src=" not in page.text and "href=" not in page.text
    assert page.headers["cache-control"] == "no-store"

    token = out.strip()
    assert out == token + "\n"  # the token alone on stdout
    assert token not in run.stderr and token not in page.text
    assert verify(demo_broker, token) == ("demo:read",)
    (client,) = demo_broker.dcr_clients()
    assert client.name == "broker login" and client.token_endpoint_auth_method == "none"
    assert client.redirect_uris == ["http://127.0.0.1/callback"]
    assert params["client_id"] == client.client_id

    # What docs/login.md shows with curl: the demo MCP server accepts the token.
    mcp_url = demo_broker.resource
    app = build_demo_mcp(demo_broker.issuer, mcp_url).streamable_http_app()
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "curl", "version": "1"},
        },
    }
    headers = {"Accept": "application/json, text/event-stream"}
    with serve_asgi(app, "127.0.0.1", demo_broker.mcp_port):
        refused = httpx.post(mcp_url, json=initialize, headers=headers, timeout=10)
        accepted = httpx.post(
            mcp_url,
            json=initialize,
            headers={**headers, "Authorization": f"Bearer {token}"},
            timeout=10,
        )
    assert refused.status_code == 401
    assert accepted.status_code == 200, accepted.text
    assert "Broker demo" in accepted.text


@pytest.mark.slow
def test_token_file_refresh_and_the_remembered_registration(
    demo_broker: DemoBroker, tmp_path: Path
) -> None:
    token_file = tmp_path / "tokens" / "demo.json"
    token_file.parent.mkdir()
    run = login(demo_broker, "--resource", demo_broker.resource, "--token-file", str(token_file))
    sign_in(run.authorization_url())
    code, out = run.finish()
    assert code == 0, run.stderr
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert [p.name for p in token_file.parent.iterdir()] == ["demo.json"]  # no temporary left
    first = json.loads(token_file.read_text())
    assert set(first) >= TOKEN_FILE_FIELDS
    assert first["access_token"] == out.strip() and first["refresh_token"]
    assert first["issuer"] == demo_broker.issuer and first["resource"] == demo_broker.resource
    assert first["client_registration"] == "dynamic"
    assert set(first["scope"].split()) == {"demo:read", "demo:write"}  # nothing asked: every one
    assert first["expires_at"] > time.time() + 60
    (client,) = demo_broker.dcr_clients()
    assert first["client_id"] == client.client_id

    # --refresh: no browser, a new access token, a rotated refresh token, the file rewritten.
    token_file.chmod(0o644)
    refreshed = LoginRun(["login", "--refresh", "--token-file", str(token_file), "--json"])
    code, out = refreshed.finish()
    assert code == 0, refreshed.stderr
    response = json.loads(out)
    second = json.loads(token_file.read_text())
    assert response["access_token"] == second["access_token"] != first["access_token"]
    assert response["token_type"] == "Bearer" and response["refresh_token"]
    assert second["refresh_token"] != first["refresh_token"]
    assert set(verify(demo_broker, second["access_token"])) == {"demo:read", "demo:write"}
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert f"{token_file} was readable by others; its mode is now 0600" in refreshed.stderr

    # A later sign-in with the same file reuses the stored registration: no new client.
    again = login(demo_broker, "--resource", demo_broker.resource, "--token-file", str(token_file))
    url = again.authorization_url()
    assert query(url)["client_id"] == first["client_id"]
    sign_in(url)
    code, out = again.finish()
    assert code == 0, again.stderr
    assert "registered" not in again.stderr
    assert [c.client_id for c in demo_broker.dcr_clients()] == [first["client_id"]]
    assert json.loads(token_file.read_text())["access_token"] == out.strip()


@pytest.mark.slow
def test_an_expired_registration_in_the_token_file_is_replaced(
    demo_broker: DemoBroker, tmp_path: Path
) -> None:
    token_file = tmp_path / "demo.json"
    token_file.write_text(
        json.dumps(
            {
                "issuer": demo_broker.issuer,
                "client_id": "mcp_purged-long-ago",
                "client_registration": "dynamic",
            }
        )
    )
    token_file.chmod(0o600)
    run = login(demo_broker, "--resource", demo_broker.resource, "--token-file", str(token_file))
    url = run.authorization_url()
    (client,) = demo_broker.dcr_clients()
    assert query(url)["client_id"] == client.client_id
    assert "registering again" in run.stderr
    sign_in(url)
    code, _ = run.finish()
    assert code == 0, run.stderr
    assert json.loads(token_file.read_text())["client_id"] == client.client_id


@pytest.mark.slow
def test_a_pre_registered_client(demo_broker: DemoBroker, tmp_path: Path) -> None:
    registered = httpx.post(
        f"{demo_broker.issuer}/register",
        json={"client_name": "Scripts", "redirect_uris": ["http://127.0.0.1/callback"]},
    ).json()
    token_file = tmp_path / "t.json"
    run = login(
        demo_broker,
        "--resource",
        demo_broker.resource,
        "--client-id",
        registered["client_id"],
        "--token-file",
        str(token_file),
    )
    url = run.authorization_url()
    assert query(url)["client_id"] == registered["client_id"]
    sign_in(url)
    code, out = run.finish()
    assert code == 0, run.stderr
    assert "registered" not in run.stderr and len(demo_broker.dcr_clients()) == 1
    stored = json.loads(token_file.read_text())
    assert stored["client_id"] == registered["client_id"]
    assert stored["client_registration"] == "pre-registered"
    assert verify(demo_broker, out.strip())

    # A client the broker does not know fails at once, before any browser.
    unknown = login(demo_broker, "--resource", demo_broker.resource, "--client-id", "nobody")
    code, out = unknown.finish()
    assert (code, out) == (1, "")
    assert unknown.stderr_lines[-1] == (
        "broker login: the broker does not know the client nobody with the redirect URI "
        "http://127.0.0.1/callback"
    )


@pytest.mark.slow
def test_denied_consent_ends_with_exit_1_and_one_line(demo_broker: DemoBroker) -> None:
    run = login(demo_broker, "--resource", demo_broker.resource)
    page = follow_to_listener(run.authorization_url(), consent="deny")
    code, out = run.finish()
    assert (code, out) == (1, "")
    assert page.status_code == 200 and "did not complete" in page.text
    assert run.stderr_lines[-1] == "broker login: access_denied: The user denied the request."
    assert "Traceback" not in run.stderr


@pytest.mark.slow
def test_an_unknown_resource_is_invalid_target(demo_broker: DemoBroker) -> None:
    run = login(demo_broker, "--resource", "http://127.0.0.1:1/not-configured")
    follow_to_listener(run.authorization_url())
    code, out = run.finish()
    assert (code, out) == (1, "")
    assert run.stderr_lines[-1].startswith("broker login: invalid_target: "), run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.slow
def test_the_listener_refuses_a_wrong_state_and_keeps_waiting(demo_broker: DemoBroker) -> None:
    run = login(demo_broker, "--resource", demo_broker.resource)
    url = run.authorization_url()
    callback = query(url)["redirect_uri"]
    for forged in ("?code=stolen&state=wrong", "?code=stolen", "?error=access_denied&state="):
        refused = httpx.get(callback + forged, timeout=10)
        assert refused.status_code == 400
        assert "does not belong to the sign-in in progress" in refused.text
    assert httpx.get(callback.replace("/callback", "/other"), timeout=10).status_code == 404

    sign_in(url)  # the real response still gets through
    code, out = run.finish()
    assert code == 0, run.stderr
    assert verify(demo_broker, out.strip())
    assert run.stderr.count("refused a response with a wrong or missing state") == 3


@pytest.mark.slow
@pytest.mark.parametrize(
    ("iss", "refusal"),
    [
        (
            "&iss=https%3A%2F%2Fevil.example",
            "the authorization response names the issuer 'https://evil.example', not {issuer} "
            "(RFC 9207); refused",
        ),
        (
            "",
            "the authorization response has no iss although the broker's metadata promises it "
            "(RFC 9207); refused",
        ),
    ],
)
def test_a_response_from_another_issuer_is_refused(
    demo_broker: DemoBroker, iss: str, refusal: str
) -> None:
    """RFC 9207 section 2.4 (mix-up attacks): the right state but not this broker's iss."""
    run = login(demo_broker, "--resource", demo_broker.resource)
    params = query(run.authorization_url())
    page = httpx.get(f"{params['redirect_uri']}?code=c&state={params['state']}{iss}", timeout=10)
    code, out = run.finish()
    assert (code, out) == (1, "")
    assert page.status_code == 200 and "did not complete" in page.text
    assert run.stderr_lines[-1] == "broker login: " + refusal.format(issuer=demo_broker.issuer)


@pytest.mark.slow
def test_the_issuer_from_the_config_and_the_timeout(demo_broker: DemoBroker) -> None:
    run = LoginRun(
        [
            "--config",
            str(demo_broker.config),
            "login",
            "--resource",
            demo_broker.resource,
            "--no-browser",
            "--timeout",
            "1",
        ]
    )
    assert run.authorization_url().startswith(f"{demo_broker.issuer}/authorize?")
    code, out = run.finish()
    assert (code, out) == (1, "")
    assert run.stderr_lines[-1] == (
        "broker login: timed out: no sign-in response within 1 second (--timeout)"
    )


def test_usage_problems_exit_2() -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["login", "--issuer", "http://127.0.0.1:9"])
    assert result.exit_code == 2 and "--resource" in result.output
    result = runner.invoke(main, ["login", "--refresh", "--issuer", "http://127.0.0.1:9"])
    assert result.exit_code == 2 and "--refresh needs --token-file" in result.output
    result = runner.invoke(main, ["login", "--resource", "http://127.0.0.1:9/mcp"])
    assert result.exit_code == 2 and "--issuer" in result.output
    result = runner.invoke(
        main, ["login", "--issuer", "http://127.0.0.1:9", "--resource", "mcp#frag"]
    )
    assert result.exit_code == 2 and "RFC 8707" in result.output


def test_an_unreachable_broker_is_one_line() -> None:
    result = CliRunner().invoke(
        main, ["login", "--issuer", f"http://127.0.0.1:{free_port()}", "--resource", "https://x/"]
    )
    assert result.exit_code == 1
    assert result.output.startswith("broker login: cannot fetch the broker's metadata from ")
    assert result.output.count("\n") == 1
