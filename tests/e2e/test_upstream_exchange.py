"""End to end: an MCP server built with the official SDK (``MCPServer``) and the resource kit
calls Jira for the user with the user's own Atlassian token, obtained by RFC 8693 token exchange
from the broker, never by passing the broker's token on.

The official MCP client registers, signs in through the broker and the Atlassian fake (a headless
browser plays the user) and calls the server's tool; the tool exchanges the caller's broker token
with ``broker.resource.mcp.upstream_token`` and calls the fake's Jira-shaped
``/ex/jira/<cloud id>/rest/api/3/myself``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from flask import Flask
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer
from sqlalchemy import delete

from broker.demo import serve_asgi
from broker.models import UpstreamToken
from broker.resource import BrokerTokenVerifier, ExchangeRefused, UpstreamTokenClient
from broker.resource.mcp import MCPTokenVerifier, auth_settings, current_token, upstream_token
from broker.resource.verifier import TokenIdentity
from tests.e2e.conftest import HeadlessBrowser, InMemoryTokenStorage
from tests.e2e.test_mcp_sdk import REDIRECT, sdk_provider
from tests.fakes.atlassian import FakeAtlassian
from tests.oauth2.test_rfc8693_token_exchange import (
    MCP_CLIENT,
    MCP_SECRET,
    ExchangeStack,
    add_static_client,
    ensure_token_exchange,
)
from tests.support import free_port, serve_wsgi


def build_jira_mcp(issuer: str, resource: str, exchange: UpstreamTokenClient) -> MCPServer[Any]:
    """A Jira MCP server: its tool acts upstream as the caller, with the caller's own token."""
    server: MCPServer[Any] = MCPServer(
        "Jira tools",
        token_verifier=MCPTokenVerifier(BrokerTokenVerifier(issuer, resource)),
        auth=auth_settings(issuer, resource, ["jira:read"]),
    )

    @server.tool()
    async def jira_myself() -> dict[str, Any]:
        """The caller's Jira account on their first site."""
        caller = current_token()
        assert caller is not None
        identity = TokenIdentity.from_claims(caller.claims or {})
        try:
            upstream = await upstream_token(exchange, "atlassian")
        except ExchangeRefused as refused:
            return {"error": refused.error, "sign_in_required": refused.sign_in_required}
        cloud_id = upstream.context["cloud_ids"][0]
        async with httpx.AsyncClient(timeout=10) as http:
            me = await http.get(
                f"{upstream.context['api_url']}/ex/jira/{cloud_id}/rest/api/3/myself",
                headers={"Authorization": f"Bearer {upstream.access_token}"},
            )
        return {
            "status": me.status_code,
            "account_id": me.json().get("accountId"),
            "display_name": me.json().get("displayName"),
            "cloud_id": cloud_id,
            "subject": caller.subject,
            # The identity claims this resource may see (its `claims`), and no others.
            "identity": {
                "email": identity.email,
                "tenants": list(identity.tenants),
                "name": identity.name,
            },
        }

    return server


@dataclass
class JiraStack:
    exchange: ExchangeStack
    mcp_url: str
    client: UpstreamTokenClient


@pytest.fixture
def jira_stack(make_app: Any) -> Iterator[JiraStack]:
    port, mcp_port = free_port(), free_port()
    issuer, mcp_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{mcp_port}/mcp"
    with FakeAtlassian.running(redirect_uris=[f"{issuer}/callback/atlassian"]) as fake:
        app: Flask = make_app(
            issuer=issuer,
            providers={"atlassian": fake.provider_config()},
            resources=[
                {
                    "uri": mcp_url,
                    "name": "Jira tools",
                    "scopes": {"jira:read": "Read your Jira account"},
                    "required_scopes": ["jira:read"],
                    "upstream_tokens": ["atlassian"],
                    "claims": ["email", "tenants"],
                }
            ],
        )
        ensure_token_exchange(app)
        add_static_client(app, resources=[mcp_url])
        client = UpstreamTokenClient.for_broker(issuer, MCP_CLIENT, MCP_SECRET, timeout=10)
        mcp = build_jira_mcp(issuer, mcp_url, client)
        with (
            serve_wsgi(app, port),
            serve_asgi(mcp.streamable_http_app(), "127.0.0.1", mcp_port),
        ):
            yield JiraStack(ExchangeStack(app, issuer, fake), mcp_url, client)


async def call_jira(url: str, provider: Any, times: int) -> list[dict[str, Any]]:
    results = []
    async with (
        httpx2.AsyncClient(auth=provider, timeout=30) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        tools = await client.list_tools()
        assert "jira_myself" in {t.name for t in tools.tools}
        for _ in range(times):
            result = await client.call_tool("jira_myself", {})
            assert not result.is_error, result
            data = result.structured_content
            assert isinstance(data, dict)
            results.append(data.get("result", data))
    return results


@pytest.mark.slow
def test_an_sdk_server_calls_jira_as_the_user_by_token_exchange(jira_stack: JiraStack) -> None:
    stack, fake = jira_stack.exchange, jira_stack.exchange.fake
    redirect_uri = REDIRECT.format(port=free_port())
    browser = HeadlessBrowser(redirect_prefix=redirect_uri, provider="atlassian")
    storage = InMemoryTokenStorage()
    oauth = sdk_provider(jira_stack.mcp_url, browser, storage, redirect_uri)
    first, second = anyio.run(call_jira, jira_stack.mcp_url, oauth, 2)

    alice = fake.users["alice"]
    assert first["status"] == 200, first
    assert (first["account_id"], first["display_name"]) == (alice.account_id, alice.name)
    assert first["cloud_id"] == alice.sites[0].id
    assert first["identity"] == {
        "email": alice.email,
        "tenants": sorted({site.id for site in alice.sites}),
        "name": None,  # not among the resource's claims
    }
    assert second == first
    assert any(u.startswith(f"{fake.auth_url}/authorize") for u in browser.visited)
    # One exchange served both calls: the kit cached the upstream token for this user.
    (event,) = stack.audit()
    assert event.outcome == "success" and event.user_id == first["subject"]
    assert event.resource == jira_stack.mcp_url
    # The broker's token never reached Atlassian, and would not work there.
    broker_token = storage.tokens.access_token
    sent = [request.headers.get("Authorization", "") for request, _ in fake.server.log]
    assert all(broker_token not in header for header in sent)
    assert (
        httpx.get(
            f"{fake.api_url}/ex/jira/{first['cloud_id']}/rest/api/3/myself",
            headers={"Authorization": f"Bearer {broker_token}"},
        ).status_code
        == 401
    )

    # Once the broker has no usable Atlassian token for her, the tool can say she must sign in.
    with stack.broker.db.session() as session:
        session.execute(delete(UpstreamToken))
    jira_stack.client.clear_cache()
    (refused,) = anyio.run(call_jira, jira_stack.mcp_url, oauth, 1)
    assert refused == {"error": "invalid_grant", "sign_in_required": True}
