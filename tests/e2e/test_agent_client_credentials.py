"""A headless agent end to end: the official MCP SDK's ``ClientCredentialsOAuthProvider``
(``mcp`` 2.3.0, ``mcp.client.auth.extensions.client_credentials``) discovers the broker from the
demo MCP server, gets a client credentials token (RFC 6749 section 4.4) for that server and
calls a tool with it; the tool sees the agent itself as the subject. The token is refused by
another MCP server, and the broker refuses a resource the agent is not allowed and a client not
allowed the grant.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import httpx2
import jwt
import pytest
from mcp.client import Client
from mcp.client.auth import OAuthTokenError
from mcp.client.auth.extensions.client_credentials import ClientCredentialsOAuthProvider
from mcp.client.streamable_http import streamable_http_client

from tests.e2e.conftest import InMemoryTokenStorage, Stack
from tests.oauth2.test_client_credentials import SECRET, add_static_client

pytestmark = pytest.mark.slow


class TokenAnswers:
    """The broker's answers to the SDK's token requests, seen through an httpx event hook."""

    def __init__(self) -> None:
        self.answers: list[tuple[int, dict[str, Any]]] = []

    async def __call__(self, response: httpx2.Response) -> None:
        if response.request.url.path == "/token":
            await response.aread()
            self.answers.append((response.status_code, response.json()))


def agent_provider(
    stack: Stack, url: str, client_id: str, storage: InMemoryTokenStorage, **extra: Any
) -> ClientCredentialsOAuthProvider:
    return ClientCredentialsOAuthProvider(
        server_url=url,
        storage=storage,
        client_id=client_id,
        client_secret=SECRET,
        scope="demo:read",
        issuer=stack.issuer,
        **extra,
    )


async def call_whoami(
    url: str, provider: ClientCredentialsOAuthProvider, answers: TokenAnswers
) -> dict[str, Any]:
    async with (
        httpx2.AsyncClient(auth=provider, timeout=30, event_hooks={"response": [answers]}) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        result = await client.call_tool("whoami", {})
        assert not result.is_error, result
        data = result.structured_content
        assert isinstance(data, dict)
        if "result" in data and isinstance(data["result"], dict):
            data = data["result"]
        return data


def test_an_agent_calls_a_tool_with_a_client_credentials_token(
    stack_factory: Callable[..., Stack],
) -> None:
    stack = stack_factory()
    assert stack.app is not None
    agent = add_static_client(
        stack.app, allowed_resources=[stack.mcp_url], scope="demo:read demo:write"
    )
    storage, answers = InMemoryTokenStorage(), TokenAnswers()
    whoami = anyio.run(
        call_whoami, stack.mcp_url, agent_provider(stack, stack.mcp_url, agent, storage), answers
    )
    assert whoami["authenticated"] is True
    assert whoami["subject"] == agent and whoami["client_id"] == agent
    assert whoami["audience"] == stack.mcp_url and whoami["issuer"] == stack.issuer
    assert whoami["scopes"] == ["demo:read"]
    assert [status for status, _ in answers.answers] == [200]
    assert storage.tokens.refresh_token is None  # RFC 6749 section 4.4.3

    # The same token at another MCP server: refused there (its audience is not that server).
    async def initialize(url: str) -> httpx2.Response:
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
                        "clientInfo": {"name": "agent", "version": "1"},
                    },
                },
                headers={
                    "Authorization": f"Bearer {storage.tokens.access_token}",
                    "Accept": "application/json, text/event-stream",
                },
            )

    claims = jwt.decode(storage.tokens.access_token, options={"verify_signature": False})
    assert claims["aud"] == stack.mcp_url and claims["sub"] == agent
    assert anyio.run(initialize, stack.mcp_url).status_code == 200
    other = anyio.run(initialize, stack.other_mcp_url)
    assert other.status_code == 401 and "resource_metadata=" in other.headers["www-authenticate"]


def test_client_secret_post_agent(stack_factory: Callable[..., Stack]) -> None:
    stack = stack_factory()
    assert stack.app is not None
    agent = add_static_client(
        stack.app, allowed_resources=[stack.mcp_url], auth_method="client_secret_post"
    )
    provider = agent_provider(
        stack,
        stack.mcp_url,
        agent,
        InMemoryTokenStorage(),
        token_endpoint_auth_method="client_secret_post",
    )
    whoami = anyio.run(call_whoami, stack.mcp_url, provider, TokenAnswers())
    assert whoami["subject"] == agent


@pytest.mark.parametrize(
    ("grant_types", "target", "error"),
    [
        (["client_credentials"], "other", "invalid_target"),  # a resource it is not allowed
        (["authorization_code"], "own", "unauthorized_client"),  # a client not allowed the grant
    ],
)
def test_the_broker_refuses_what_the_agent_is_not_allowed(
    stack_factory: Callable[..., Stack], grant_types: list[str], target: str, error: str
) -> None:
    stack = stack_factory()
    assert stack.app is not None
    agent = add_static_client(stack.app, allowed_resources=[stack.mcp_url], grant_types=grant_types)
    url = stack.other_mcp_url if target == "other" else stack.mcp_url
    storage, answers = InMemoryTokenStorage(), TokenAnswers()
    with pytest.raises(ExceptionGroup) as raised:  # the SDK's error, out of anyio's task group
        anyio.run(call_whoami, url, agent_provider(stack, url, agent, storage), answers)
    assert answers.answers, "the SDK never asked the broker for a token"
    assert {(status, body["error"]) for status, body in answers.answers} == {(400, error)}
    assert raised.group_contains(OAuthTokenError, match=error)
    assert storage.tokens is None
