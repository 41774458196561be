"""The whole login, end to end, with the official MCP Python SDK client (``mcp`` 2.x).

The SDK discovers the broker from the demo MCP server's protected resource metadata, registers
(DCR), is sent through consent and sign-in by a headless browser, gets a token and calls a tool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import httpx2
import jwt
import pytest
from mcp.client import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientMetadata

from tests.e2e.conftest import HeadlessBrowser, InMemoryTokenStorage, Stack
from tests.support import free_port

REDIRECT = "http://127.0.0.1:{port}/callback"


def sdk_provider(
    stack_url: str, browser: HeadlessBrowser, storage: InMemoryTokenStorage, redirect_uri: str
) -> OAuthClientProvider:
    async def redirect_handler(url: str) -> None:
        await browser.run(url)

    async def callback_handler() -> AuthorizationCodeResult:
        assert browser.result is not None and "code" in browser.result, browser.result
        return AuthorizationCodeResult(
            code=browser.result["code"],
            state=browser.result.get("state"),
            iss=browser.result.get("iss"),
        )

    metadata = OAuthClientMetadata(
        client_name="SDK end-to-end test",
        redirect_uris=[redirect_uri],
        grant_types=["authorization_code", "refresh_token"],
        response_types=["code"],
        token_endpoint_auth_method="none",
    )
    return OAuthClientProvider(stack_url, metadata, storage, redirect_handler, callback_handler)


async def call_whoami(url: str, provider: OAuthClientProvider) -> dict[str, Any]:
    async with (
        httpx2.AsyncClient(auth=provider, timeout=30) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        tools = await client.list_tools()
        assert {"whoami", "echo", "add"} <= {t.name for t in tools.tools}
        result = await client.call_tool("whoami", {})
        assert not result.is_error, result
        data = result.structured_content
        assert isinstance(data, dict)
        if "result" in data and isinstance(data["result"], dict):
            data = data["result"]
        added = await client.call_tool("add", {"a": 2, "b": 3})
        assert not added.is_error
        return data


def run_flow(
    stack: Stack,
    *,
    provider: str = "local",
    url: str | None = None,
    storage: InMemoryTokenStorage | None = None,
    username: str = "alice",
    password: str = "alice-password",
) -> tuple[dict[str, Any], HeadlessBrowser, InMemoryTokenStorage]:
    redirect_uri = REDIRECT.format(port=free_port())
    browser = HeadlessBrowser(
        redirect_prefix=redirect_uri, provider=provider, username=username, password=password
    )
    storage = storage or InMemoryTokenStorage()
    target = url or stack.mcp_url
    oauth = sdk_provider(target, browser, storage, redirect_uri)
    whoami = anyio.run(call_whoami, target, oauth)
    return whoami, browser, storage


@pytest.mark.slow
def test_sdk_client_registers_signs_in_and_calls_a_tool(
    stack_factory: Callable[..., Stack],
) -> None:
    stack = stack_factory()
    whoami, browser, storage = run_flow(stack)
    assert whoami["authenticated"] is True
    assert whoami["issuer"] == stack.issuer
    assert whoami["audience"] == stack.mcp_url
    assert "demo:read" in whoami["scopes"]
    # The browser went through consent before the sign-in form, and ended with iss = issuer.
    assert any("/consent" in u for u in browser.visited)
    assert browser.result is not None and browser.result["iss"] == stack.issuer
    assert storage.client_info is not None
    assert not str(storage.client_info.client_id).startswith("https://")
    claims = jwt.decode(storage.tokens.access_token, options={"verify_signature": False})
    assert claims["aud"] == stack.mcp_url and claims["iss"] == stack.issuer


@pytest.mark.slow
def test_token_for_one_resource_is_refused_by_another(stack_factory: Callable[..., Stack]) -> None:
    stack = stack_factory()
    _, _, storage = run_flow(stack)
    token = storage.tokens.access_token

    async def call(url: str) -> httpx2.Response:
        async with httpx2.AsyncClient(timeout=10) as http:
            return await http.post(
                url,
                json={
                    "jsonrpc": "2.0",
                    "id": 1,
                    "method": "initialize",
                    "params": {
                        "protocolVersion": "2025-06-18",
                        "capabilities": {},
                        "clientInfo": {"name": "t", "version": "1"},
                    },
                },
                headers={
                    "Authorization": f"Bearer {token}",
                    "Accept": "application/json, text/event-stream",
                },
            )

    own = anyio.run(call, stack.mcp_url)
    assert own.status_code == 200
    other = anyio.run(call, stack.other_mcp_url)
    assert other.status_code == 401
    assert "resource_metadata=" in other.headers["www-authenticate"]


@pytest.mark.slow
def test_sdk_client_through_the_generic_oidc_provider(stack_factory: Callable[..., Stack]) -> None:
    """The upstream leg against a real OpenID provider (oidc-provider, OpenID-certified)."""
    from tests.idp_server import idp_or_skip

    port = free_port()
    callback = f"http://127.0.0.1:{port}/callback/corp"
    clients = [
        {
            "client_id": "broker",
            "client_secret": "broker-secret-0123456789",
            "redirect_uris": [callback],
        }
    ]
    with idp_or_skip(clients) as idp:
        stack = stack_factory(
            port=port,
            providers={
                "corp": {
                    "type": "oidc",
                    "issuer": idp.issuer,
                    "client_id": "broker",
                    "client_secret": "broker-secret-0123456789",
                    "display_name": "Corporate SSO",
                }
            },
        )
        whoami, browser, _ = run_flow(stack, provider="corp")
        assert whoami["authenticated"] is True and whoami["issuer"] == stack.issuer
        # Consent came first; the upstream was visited after it, with our callback.
        consent_at = next(i for i, u in enumerate(browser.visited) if "/consent" in u)
        upstream_at = next(i for i, u in enumerate(browser.visited) if u.startswith(idp.issuer))
        assert consent_at < upstream_at
        assert any(u.startswith(callback) for u in browser.visited)
        app = stack.app
        assert app is not None
        from sqlalchemy import select

        from broker.models import Identity, UpstreamToken

        with app.extensions["broker"].db.session() as session:
            identity = session.scalars(select(Identity)).one()
            assert identity.provider == "corp"
            assert identity.snapshot["email"] == "alice@example.com"
            assert identity.snapshot["email_verified"] is True
            sealed = session.get(UpstreamToken, identity.id)
            assert sealed is not None and sealed.access_token_sealed.startswith("v1.")
