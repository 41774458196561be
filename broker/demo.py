"""``broker demo``: the broker on SQLite with the ``local`` provider and a demo user, plus a demo
MCP server protected by it (built with the official MCP Python SDK and ``broker.resource``)."""

from __future__ import annotations

import contextlib
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

DEMO_USER = "demo"
DEMO_PASSWORD = "demo"
DEMO_SCOPES = {"demo:read": "Call the demo tools", "demo:write": "Change demo data"}


def build_demo_mcp(
    issuer: str,
    resource_url: str,
    *,
    required_scopes: tuple[str, ...] = ("demo:read",),
    name: str = "Broker demo",
) -> Any:
    """An MCP server whose tools need a broker token with ``aud`` = ``resource_url``."""
    from mcp.server.mcpserver import MCPServer

    from .resource import BrokerTokenVerifier, ResourceMetadata
    from .resource.mcp import (
        MCPTokenVerifier,
        add_bare_metadata_route,
        auth_settings,
        current_token,
    )
    from .resource.verifier import TokenIdentity

    verifier = BrokerTokenVerifier(issuer=issuer, audience=resource_url)
    server: Any = MCPServer(
        name,
        instructions="A demo MCP server protected by the MCP identity broker.",
        token_verifier=MCPTokenVerifier(verifier),
        auth=auth_settings(issuer, resource_url, required_scopes),
    )

    @server.tool()  # type: ignore[untyped-decorator]
    def whoami() -> dict[str, Any]:
        """Who is calling: the broker subject, the client, the granted scopes, and the identity
        claims this resource may see (its ``claims`` in the broker's config)."""
        token = current_token()
        if token is None:
            return {"authenticated": False}
        claims = token.claims or {}
        identity = TokenIdentity.from_claims(claims)
        seen = {f.name: getattr(identity, f.name) for f in fields(identity) if f.name != "other"}
        return {
            "identity": {k: v for k, v in seen.items() if v not in (None, ())}
            | dict(identity.other),
            "authenticated": True,
            "subject": token.subject,
            "client_id": token.client_id,
            "scopes": sorted(token.scopes),
            "audience": token.resource,
            "issuer": claims.get("iss"),
            "expires_at": token.expires_at,
        }

    @server.tool()  # type: ignore[untyped-decorator]
    def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    @server.tool()  # type: ignore[untyped-decorator]
    def add(a: float, b: float) -> float:
        """Add two numbers."""
        return a + b

    add_bare_metadata_route(
        server,
        ResourceMetadata.for_broker(
            resource=resource_url,
            issuer=issuer,
            scopes_supported=list(required_scopes),
            resource_name=name,
        ),
    )
    return server


@contextlib.contextmanager
def serve_asgi(app: Any, host: str, port: int) -> Iterator[None]:
    """Run an ASGI app with uvicorn in a background thread."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the MCP server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(10)


def demo_settings(directory: Path, port: int, mcp_port: int) -> Any:
    """Write the demo's users file and secret (once) and return its settings."""
    from providers.local import hash_password

    from .config import parse

    directory.mkdir(parents=True, exist_ok=True)
    users = directory / "users.yaml"
    if not users.exists():
        users.write_text(
            yaml.safe_dump(
                {
                    "users": {
                        DEMO_USER: {
                            "password_hash": hash_password(DEMO_PASSWORD),
                            "name": "Demo User",
                            "email": "demo@example.com",
                            "groups": ["staff"],
                        }
                    }
                }
            )
        )
    secret_file = directory / "secret_key"
    if not secret_file.exists():
        secret_file.write_text(secrets.token_hex(32))
        secret_file.chmod(0o600)
    return parse(
        {
            "issuer": f"http://127.0.0.1:{port}",
            "secret_key": secret_file.read_text().strip(),
            "database_url": f"sqlite:///{(directory / 'broker.db').resolve()}",
            "instance_path": str(directory),
            "providers": {"local": {"users_file": str(users.resolve())}},
            "resources": [
                {
                    "uri": f"http://127.0.0.1:{mcp_port}/mcp",
                    "name": "Demo MCP server",
                    "scopes": DEMO_SCOPES,
                    "required_scopes": ["demo:read"],
                }
            ],
        },
        env={},
        base_dir=str(directory),
    )


class PortTaken(Exception):
    """A port the demo needs is in use (or not allowed): said before anything else."""


def check_ports(host: str, ports: dict[str, int]) -> None:
    """Bind each port once, as the servers will, so that a taken one is said first."""
    if len(set(ports.values())) < len(ports):
        raise PortTaken(f"the ports must differ: {', '.join(f'{k} {v}' for k, v in ports.items())}")
    for what, port in ports.items():
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                reason = (exc.strerror or str(exc)).lower()
                raise PortTaken(
                    f"cannot listen on {host}:{port} for the {what}: {reason} "
                    "(choose other ports: make demo PORT=8010 MCP_PORT=8011, "
                    "or broker demo --port 8010 --mcp-port 8011)"
                ) from None


def run_demo(directory: Path, *, port: int = 8000, mcp_port: int = 8001) -> None:
    from .app import create_app
    from .db import Database
    from .devserver import serve
    from .migrate import upgrade

    check_ports("127.0.0.1", {"broker": port, "demo MCP server": mcp_port})
    settings = demo_settings(directory, port, mcp_port)
    database = Database(settings.database_url)
    upgrade(database.engine, client_migrations=settings.client_migrations)
    database.dispose()
    app = create_app(settings)
    resource = settings.resources[0].uri
    mcp = build_demo_mcp(settings.issuer, resource)
    with serve_asgi(mcp.streamable_http_app(), "127.0.0.1", mcp_port):
        print(
            f"""
  MCP identity broker demo
  ------------------------
  Broker (authorization server): {settings.issuer}
  Demo MCP server:               {resource}
  Sign in as:                    {DEMO_USER} / {DEMO_PASSWORD}

  Add this URL to your MCP client (streamable HTTP): {resource}
  e.g.  claude mcp add --transport http broker-demo {resource}
  Files (SQLite database, users, secret): {directory}
  Press Ctrl+C to stop.
""",
            flush=True,
        )
        serve(app, "127.0.0.1", port)
