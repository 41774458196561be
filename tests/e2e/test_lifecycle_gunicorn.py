"""Access follows the user, shown as an operator runs the broker: two gunicorn workers on
PostgreSQL, ``broker.yaml`` edited and the service restarted, the ``broker`` command run beside
it, and the official MCP client (its own refresh and re-authorization logic) on the other side.

Each case signs alice in through the SDK, lets the SDK refresh once (it works), changes
something, and lets the SDK refresh again: the broker refuses the refresh, and the SDK's new
authorization (through a browser that kept its broker session) ends at the client's redirect URI
with an error and no code. A narrowed rule instead narrows the next token.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import psycopg
import pytest
import yaml
from mcp.client import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientMetadata

from broker.demo import build_demo_mcp, serve_asgi
from tests.conftest import POSTGRES_URL
from tests.e2e.conftest import HeadlessBrowser, InMemoryTokenStorage, resources
from tests.e2e.test_gunicorn import BIN, ROOT, gunicorn
from tests.fakes.github import FakeGitHub
from tests.support import form_value, free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.parametrize("database_url", ["postgresql"], indirect=True),
]

REDIRECT = "http://127.0.0.1:{port}/callback"
READ_AND_WRITE = [
    {"grant": ["demo:read"], "when": {"groups": ["staff"]}},
    {"grant": ["demo:write"], "when": {"groups": ["staff"]}},
]


class NoCode(Exception):
    """The authorization ended at the client's redirect URI without a code."""


@dataclass
class Deployment:
    """broker.yaml, ``broker db upgrade``, gunicorn with two workers, the demo MCP server."""

    tmp_path: Path
    database_url: str
    config: dict[str, Any]
    port: int = field(default_factory=free_port)
    mcp_port: int = field(default_factory=free_port)
    starts: int = 0

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def mcp_url(self) -> str:
        return f"http://127.0.0.1:{self.mcp_port}/mcp"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "BROKER_CONFIG": str(self.tmp_path / "broker.yaml")}

    def write(self, **changes: Any) -> None:
        self.config.update(changes)
        document = {"issuer": self.issuer, "database_url": self.database_url, **self.config}
        (self.tmp_path / "broker.yaml").write_text(yaml.safe_dump(document))

    def broker(self, *args: str) -> str:
        done = subprocess.run(
            [str(BIN / "broker"), *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"broker {' '.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """gunicorn with two workers from the current broker.yaml, until the block ends."""
        self.starts += 1
        log = self.tmp_path / f"gunicorn-{self.starts}.log"
        with gunicorn(self.env, self.port, log, workers=2):
            yield
        text = log.read_text()
        assert len(re.findall(r"Booting worker with pid", text)) >= 2, text[-2000:]
        assert "Traceback" not in text, text[-3000:]

    def sql(self, statement: str, *params: Any) -> None:
        """A statement on the broker's PostgreSQL schema (the test moving the clock)."""
        schema = re.search(r"search_path%3D(\w+)", self.database_url)
        assert schema
        with psycopg.connect(POSTGRES_URL.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(f"SET search_path TO {schema.group(1)}")
            conn.execute(statement, params)


@pytest.fixture
def deployment(database_url: str, users_file: Path, tmp_path: Path) -> Iterator[Deployment]:
    config = {
        "secret_key": "l" * 48,
        "providers": {"local": {"users_file": str(users_file)}},
        "rules": READ_AND_WRITE,
    }
    deployment = Deployment(tmp_path, database_url, config)
    deployment.config["resources"] = resources(deployment.mcp_port, free_port())
    deployment.write()
    deployment.broker("db", "upgrade")
    app = build_demo_mcp(deployment.issuer, deployment.mcp_url).streamable_http_app()
    with serve_asgi(asking_for_both(app), "127.0.0.1", deployment.mcp_port):
        yield deployment


def asking_for_both(app: Any) -> Any:
    """The demo MCP server, whose challenge names ``scope="demo:read demo:write"`` (MCP servers
    should say there what a request needs; a server whose tools also write would ask for both).
    The SDK requests the scope the challenge names, so the first token carries both and a
    narrowed rule has something to take away. Its tools still need ``demo:read`` only."""

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and message["status"] == 401:
                message["headers"] = [
                    (name, value + b', scope="demo:read demo:write"')
                    if name.lower() == b"www-authenticate"
                    else (name, value)
                    for name, value in message["headers"]
                ]
            await send(message)

        await app(scope, receive, sending)

    return wrapped


@dataclass
class McpUser:
    """One MCP client of the official SDK (its registration and tokens) and the person using it,
    whose browser keeps its broker session from one authorization to the next."""

    url: str
    browser: HeadlessBrowser
    redirect_uri: str = field(default_factory=lambda: REDIRECT.format(port=free_port()))
    storage: InMemoryTokenStorage = field(default_factory=InMemoryTokenStorage)
    token_answers: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)
    provider: OAuthClientProvider | None = None

    def __post_init__(self) -> None:
        async def redirect_handler(url: str) -> None:
            self.browser.redirect_prefix = self.redirect_uri  # one browser, several clients
            await self.browser.run(url)

        async def callback_handler() -> AuthorizationCodeResult:
            result = self.browser.result or {}
            if "code" not in result:
                raise NoCode(result.get("error", "no answer"))
            return AuthorizationCodeResult(
                code=result["code"], state=result.get("state"), iss=result.get("iss")
            )

        metadata = OAuthClientMetadata(
            client_name="Lifecycle test",
            redirect_uris=[self.redirect_uri],
            grant_types=["authorization_code", "refresh_token"],
            response_types=["code"],
            token_endpoint_auth_method="none",
        )
        self.provider = OAuthClientProvider(
            self.url, metadata, self.storage, redirect_handler, callback_handler
        )

    @property
    def client_id(self) -> str:
        return str(self.storage.client_info.client_id)

    def call(self) -> dict[str, Any]:
        """Call the demo MCP server's whoami tool (the SDK signs in or refreshes as it needs)."""

        async def record(response: httpx2.Response) -> None:
            if response.request.url.path == "/token":
                await response.aread()
                grant = dict(httpx.QueryParams(response.request.content.decode()))
                self.token_answers.append(
                    (grant.get("grant_type", ""), response.status_code, response.json())
                )

        async def whoami() -> dict[str, Any]:
            async with (
                httpx2.AsyncClient(
                    auth=self.provider, timeout=30, event_hooks={"response": [record]}
                ) as http,
                Client(streamable_http_client(self.url, http_client=http)) as client,
            ):
                result = await client.call_tool("whoami", {})
                assert not result.is_error, result
                data = result.structured_content
                assert isinstance(data, dict)
                return data.get("result", data) if isinstance(data.get("result"), dict) else data

        return anyio.run(whoami)

    def expire(self) -> None:
        """The SDK's access token reaches its expiry: its next call refreshes first."""
        assert self.provider is not None
        self.provider.context.token_expiry_time = time.time() - 1

    def refresh(self) -> dict[str, Any]:
        """Let the SDK refresh, then call the tool: the refresh must have worked."""
        before = len(self.token_answers)
        self.expire()
        whoami = self.call()
        answers = self.token_answers[before:]
        assert [(g, s) for g, s, _ in answers] == [("refresh_token", 200)], answers
        return whoami

    def refused(self, error: str) -> None:
        """Let the SDK refresh: the broker refuses it, and the SDK's new authorization (through
        the remembered browser session) ends at the redirect URI with ``error`` and no code."""
        before = len(self.token_answers)
        self.expire()
        with pytest.raises(BaseException) as raised:  # the SDK wraps it in groups
            self.call()
        assert _no_code(raised.value), raised.value
        answers = self.token_answers[before:]
        assert [(g, s) for g, s, _ in answers] == [("refresh_token", 400)], answers
        assert answers[0][2]["error"] == "invalid_grant"
        result = self.browser.result
        assert result is not None and "code" not in result, result
        assert result["error"] == error, result


def _no_code(exc: BaseException) -> bool:
    if isinstance(exc, NoCode):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return any(_no_code(inner) for inner in exc.exceptions)
    return exc.__cause__ is not None and _no_code(exc.__cause__)


def _scopes(whoami: dict[str, Any]) -> set[str]:
    scopes = whoami["scopes"]
    return set(scopes.split() if isinstance(scopes, str) else scopes)


def signed_in(deployment: Deployment, browser: HeadlessBrowser | None = None) -> McpUser:
    """alice signs in through the SDK, calls the tool, and one refresh works."""
    browser = browser or HeadlessBrowser(redirect_prefix="", remember=True)
    user = McpUser(deployment.mcp_url, browser)
    whoami = user.call()
    assert whoami["authenticated"] is True and whoami["issuer"] == deployment.issuer
    assert _scopes(whoami) == {"demo:read", "demo:write"}
    user.refresh()
    return user


def test_a_disabled_user_is_refused_at_the_next_refresh_and_authorization(
    deployment: Deployment,
) -> None:
    with deployment.serving():
        user = signed_in(deployment)
        assert "disabled" in deployment.broker("users", "disable", "alice@example.com")
        user.refused("access_denied")
        # Enabled again, alice signs in anew (revoked grants stay revoked).
        deployment.broker("users", "enable", "alice@example.com")
        again = McpUser(deployment.mcp_url, user.browser)
        assert again.call()["authenticated"] is True


def test_a_rule_change_and_restart_narrows_then_denies(deployment: Deployment) -> None:
    with deployment.serving():
        user = signed_in(deployment)
    # The operator takes demo:write away from staff and restarts.
    deployment.write(rules=READ_AND_WRITE[:1])
    with deployment.serving():
        assert _scopes(user.refresh()) == {"demo:read"}
    # Then denies staff altogether and restarts.
    deployment.write(
        rules=[{"deny": "Staff are out", "when": {"groups": ["staff"]}}, *READ_AND_WRITE]
    )
    with deployment.serving():
        user.refused("access_denied")


def test_a_resource_removed_from_the_config_ends_its_grants(deployment: Deployment) -> None:
    with deployment.serving():
        user = signed_in(deployment)
    # The operator removes the demo MCP server (and the rule for its write scope) and restarts.
    deployment.write(resources=deployment.config["resources"][1:], rules=READ_AND_WRITE[:1])
    with deployment.serving():
        user.refused("invalid_target")


def test_a_disconnect_on_account_and_grants_revoke_stop_that_grant_only(
    deployment: Deployment,
) -> None:
    with deployment.serving():
        browser = HeadlessBrowser(redirect_prefix="", remember=True)
        first, second, third = (signed_in(deployment, browser) for _ in range(3))
        assert len({first.client_id, second.client_id, third.client_id}) == 3

        # alice disconnects the first client on /account, in the browser that signed her in.
        with httpx.Client(base_url=deployment.issuer, cookies=dict(browser.cookies)) as http:
            page = http.get("/account")
            assert page.status_code == 200, page.text
            grant_ids = re.findall(r'name="grant" value="([^"]+)"', page.text)
            assert len(grant_ids) == 3, page.text
            listed = json.loads(deployment.broker("grants", "list", "--json"))
            by_client = {row["client_id"]: row["id"] for row in listed}
            assert set(by_client.values()) == set(grant_ids), listed
            answer = http.post(
                "/account/disconnect",
                data={"grant": by_client[first.client_id], "csrf": form_value(page.text, "csrf")},
            )
            assert answer.is_redirect, answer.text
        # The operator revokes the second client's grant.
        assert "1 grant(s) revoked" in deployment.broker(
            "grants", "revoke", "--client", second.client_id
        )

        third.refresh()
        for gone in (first, second):
            before = len(gone.token_answers)
            gone.expire()
            # The refresh is refused; the SDK then authorizes anew, and alice, still signed in
            # with the broker, gets a new grant through consent: access came back only because
            # she approved it again.
            assert gone.call()["authenticated"] is True
            answers = gone.token_answers[before:]
            assert [(g, s) for g, s, _ in answers] == [
                ("refresh_token", 400),
                ("authorization_code", 200),
            ], answers
        third.refresh()


@pytest.fixture
def github() -> Iterator[FakeGitHub]:
    with FakeGitHub() as fake:
        yield fake


def test_a_user_removed_from_the_upstream_team_loses_access_after_the_recheck_interval(
    deployment: Deployment, github: FakeGitHub
) -> None:
    deployment.write(
        providers={"github": github.provider_config(allowed_orgs=["acme"], recheck_interval=60)},
        # demo:read is the resource's required scope: without the team no token is issued.
        rules=[{"grant": ["demo:read", "demo:write"], "when": {"teams": ["acme/platform"]}}],
    )
    with deployment.serving():
        user = signed_in(deployment, HeadlessBrowser(redirect_prefix="", provider="github"))
        asked = len(github.requests("/user"))
        github.users["alice"].teams.remove("Acme/platform")
        # Inside the interval the upstream is not asked, and access goes on.
        user.refresh()
        assert len(github.requests("/user")) == asked
        # The interval passes (the clock of the stored identity moves back a minute and more).
        past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=65)
        deployment.sql("UPDATE identities SET last_login_at = %s, last_recheck_at = NULL", past)
        user.refused("access_denied")
        assert len(github.requests("/user")) > asked
        events = [
            json.loads(line)
            for line in deployment.broker("audit", "--type", "recheck", "--json").splitlines()
        ]
        assert [(e["outcome"], e["provider"]) for e in events] == [("changed", "github")], events
        assert "teams" in events[0]["details"]["changed"], events
