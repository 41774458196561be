"""The MCP SDK adapter: a real `MCPServer` on uvicorn, protected by the broker's tokens."""

from __future__ import annotations

import inspect
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest
import uvicorn
from mcp.server.mcpserver import MCPServer

from broker.resource import BrokerTokenVerifier, ResourceMetadata
from broker.resource.mcp import (
    MCPTokenVerifier,
    add_bare_metadata_route,
    auth_settings,
    current_token,
)

if TYPE_CHECKING:
    from conftest import FakeBroker

ACCEPT = {"Accept": "application/json, text/event-stream"}
PROTOCOL_VERSION = "2025-11-25"


def initialize_request() -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "resource-kit-test", "version": "0"},
        },
    }


@dataclass
class RunningServer:
    base_url: str
    resource: str
    client: httpx.Client

    def post(
        self, body: dict[str, Any], token: str | None = None, **headers: str
    ) -> httpx.Response:
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return self.client.post(self.resource, json=body, headers={**ACCEPT, **headers})


@pytest.fixture
def mcp_server(broker: FakeBroker) -> Iterator[RunningServer]:
    # Bound and listening before uvicorn starts: requests wait in the backlog, no polling needed.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    base_url = f"http://127.0.0.1:{port}"
    resource = f"{base_url}/mcp"

    verifier = BrokerTokenVerifier(broker.issuer, resource, timeout=2.0)
    server: MCPServer[Any] = MCPServer(
        "resource-kit-test",
        token_verifier=MCPTokenVerifier(verifier),
        auth=auth_settings(broker.issuer, resource, ["mcp:read"]),
    )

    @server.tool()
    def whoami() -> str:
        """The caller's subject and client, as the adapter passed them on."""
        token = current_token()
        assert token is not None
        return f"{token.subject} via {token.client_id} for {token.resource}"

    add_bare_metadata_route(
        server, ResourceMetadata.for_broker(resource, broker.issuer, scopes_supported=["mcp:read"])
    )
    app = server.streamable_http_app(json_response=True)
    config = uvicorn.Config(app, log_config=None, log_level="warning", lifespan="on")
    uvicorn_server = uvicorn.Server(config)
    thread = threading.Thread(target=uvicorn_server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=base_url, timeout=10.0) as client:
            yield RunningServer(base_url, resource, client)
    finally:
        uvicorn_server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def test_no_token_gets_401_with_resource_metadata(mcp_server: RunningServer) -> None:
    response = mcp_server.post(initialize_request())
    assert response.status_code == 401
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    metadata_url = f"{mcp_server.base_url}/.well-known/oauth-protected-resource/mcp"
    assert f'resource_metadata="{metadata_url}"' in challenge


def test_valid_token_initializes_and_reaches_tools(
    mcp_server: RunningServer, broker: FakeBroker
) -> None:
    token = broker.sign(aud=mcp_server.resource, scope="mcp:read", sub="user-9")
    response = mcp_server.post(initialize_request(), token)
    assert response.status_code == 200, response.text
    result = response.json()["result"]
    assert result["serverInfo"]["name"] == "resource-kit-test"

    session = {"mcp-session-id": response.headers["mcp-session-id"]}
    protocol = {"mcp-protocol-version": result["protocolVersion"]}
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    assert mcp_server.post(initialized, token, **session, **protocol).status_code == 202
    call = {
        "jsonrpc": "2.0",
        "id": 2,
        "method": "tools/call",
        "params": {"name": "whoami", "arguments": {}},
    }
    response = mcp_server.post(call, token, **session, **protocol)
    assert response.status_code == 200, response.text
    text = response.json()["result"]["content"][0]["text"]
    assert text == f"user-9 via client-1 for {mcp_server.resource}"


def test_token_for_another_resource_gets_401(mcp_server: RunningServer, broker: FakeBroker) -> None:
    token = broker.sign(aud="http://127.0.0.1:1/mcp", scope="mcp:read")
    response = mcp_server.post(initialize_request(), token)
    assert response.status_code == 401
    assert "resource_metadata=" in response.headers["WWW-Authenticate"]


def test_missing_scope_gets_403(mcp_server: RunningServer, broker: FakeBroker) -> None:
    token = broker.sign(aud=mcp_server.resource, scope="mcp:write")
    response = mcp_server.post(initialize_request(), token)
    assert response.status_code == 403
    assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]


@pytest.mark.parametrize(
    "path", ["/.well-known/oauth-protected-resource/mcp", "/.well-known/oauth-protected-resource"]
)
def test_metadata_keeps_the_exact_strings(
    mcp_server: RunningServer, broker: FakeBroker, path: str
) -> None:
    # A browser-based client (MCP Inspector) reads it cross-origin.
    response = mcp_server.client.get(path, headers={"Origin": "http://localhost:6274"})
    assert response.status_code == 200
    document = response.json()
    assert document["resource"] == mcp_server.resource
    assert document["authorization_servers"] == [broker.issuer]  # no trailing slash added
    assert response.headers["access-control-allow-origin"] in ("*", "http://localhost:6274")


def test_verify_token_maps_claims(broker: FakeBroker, verifier: BrokerTokenVerifier) -> None:
    adapter = MCPTokenVerifier(verifier)
    token = broker.sign(aud=["http://other.example/mcp", broker.audience], sub="user-3")

    access = anyio.run(adapter.verify_token, token)
    assert access is not None
    assert access.token == token
    assert access.subject == "user-3"
    assert access.client_id == "client-1"
    assert access.scopes == ["mcp:read", "mcp:write"]
    assert access.resource == broker.audience
    assert access.claims is not None
    assert access.claims["iss"] == broker.issuer
    assert access.expires_at == verifier.verify(token).expires_at

    # A repeat is served from the cache, without a thread hop.
    assert anyio.run(adapter.verify_token, token) == access
    assert anyio.run(adapter.verify_token, broker.sign(iss="http://evil.example")) is None


def test_auth_settings_keep_the_issuer_string() -> None:
    settings = auth_settings("http://127.0.0.1:8000", "http://127.0.0.1:8001/mcp", ["a", "a"])
    assert str(settings.issuer_url) == "http://127.0.0.1:8000"
    assert str(settings.resource_server_url) == "http://127.0.0.1:8001/mcp"
    assert settings.required_scopes == ["a"]
    assert settings.validate_token_resource is True


def test_core_imports_without_the_sdk() -> None:
    code = (
        "import sys; sys.modules['mcp'] = None\n"
        "import broker.resource as kit\n"
        "assert 'mcp' not in [m.split('.')[0] for m in sys.modules if sys.modules[m]]\n"
        "try:\n    kit.MCPTokenVerifier\nexcept ImportError:\n    pass\n"
        "else:\n    raise SystemExit('the adapter imported without the SDK')\n"
    )
    root = Path(inspect.getfile(BrokerTokenVerifier)).resolve().parents[2]
    completed = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0, completed.stderr


def test_unreachable_jwks_is_a_server_error_not_a_401(
    mcp_server: RunningServer, broker: FakeBroker
) -> None:
    broker.failing = True
    response = mcp_server.post(initialize_request(), broker.sign(aud=mcp_server.resource))
    assert response.status_code == 500
