"""End-to-end parts: a live broker on a free port, the demo MCP server it protects, and the
official MCP Python SDK client driven through consent and sign-in by a cookie-keeping HTTP
"browser"."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html import unescape
from typing import Any
from urllib.parse import urljoin

import httpx2
import pytest
from flask import Flask

from broker.demo import build_demo_mcp, serve_asgi
from tests.support import free_port, query, serve_wsgi


@dataclass
class Stack:
    issuer: str
    mcp_url: str
    other_mcp_url: str
    app: Flask | None = None


def resources(mcp_port: int, other_port: int, claims: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    return [
        {
            "uri": f"http://127.0.0.1:{mcp_port}/mcp",
            "name": "Demo MCP server",
            "scopes": {"demo:read": "Call the demo tools", "demo:write": "Change demo data"},
            "required_scopes": ["demo:read"],
            "claims": list(claims),
        },
        {
            "uri": f"http://127.0.0.1:{other_port}/mcp",
            "name": "Other MCP server",
            "scopes": {"demo:read": "Call the other tools"},
            "required_scopes": ["demo:read"],
        },
    ]


@pytest.fixture
def stack_factory(make_app: Callable[..., Flask]) -> Iterator[Callable[..., Stack]]:
    """Start a broker (in-process, threaded WSGI) and two demo MCP servers."""
    contexts: list[Any] = []

    def start(port: int | None = None, claims: tuple[str, ...] = (), **overrides: Any) -> Stack:
        """``claims``: the identity facts the demo MCP server may see in its tokens."""
        port = port or free_port()
        mcp_port, other_port = free_port(), free_port()
        issuer = f"http://127.0.0.1:{port}"
        app = make_app(
            issuer=issuer, resources=resources(mcp_port, other_port, claims), **overrides
        )
        stack = Stack(
            issuer, f"http://127.0.0.1:{mcp_port}/mcp", f"http://127.0.0.1:{other_port}/mcp", app
        )
        for ctx in (
            serve_wsgi(app, port),
            serve_asgi(
                build_demo_mcp(issuer, stack.mcp_url).streamable_http_app(), "127.0.0.1", mcp_port
            ),
            serve_asgi(
                build_demo_mcp(issuer, stack.other_mcp_url, name="Other").streamable_http_app(),
                "127.0.0.1",
                other_port,
            ),
        ):
            ctx.__enter__()
            contexts.append(ctx)
        return stack

    yield start
    for ctx in reversed(contexts):
        ctx.__exit__(None, None, None)


class InMemoryTokenStorage:
    def __init__(self) -> None:
        self.tokens: Any = None
        self.client_info: Any = None

    async def get_tokens(self) -> Any:
        return self.tokens

    async def set_tokens(self, tokens: Any) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> Any:
        return self.client_info

    async def set_client_info(self, client_info: Any) -> None:
        self.client_info = client_info


@dataclass
class HeadlessBrowser:
    """Plays the user: follows redirects, approves consent with a provider, fills the local
    login form, and stops at the client's redirect URI."""

    redirect_prefix: str
    provider: str = "local"
    username: str = "alice"
    password: str = "alice-password"
    visited: list[str] = field(default_factory=list)
    result: dict[str, str] | None = None
    remember: bool = False
    """Keep the broker's cookies from one run to the next (a remembered browser session)."""
    cookies: httpx2.Cookies = field(default_factory=httpx2.Cookies)

    async def run(self, url: str) -> None:
        self.result = None
        jar = self.cookies if self.remember else None
        async with httpx2.AsyncClient(follow_redirects=False, timeout=30, cookies=jar) as http:
            try:
                await self._walk(http, url)
            finally:
                if self.remember:
                    self.cookies = httpx2.Cookies(http.cookies)

    async def _walk(self, http: httpx2.AsyncClient, url: str) -> None:
        for _ in range(30):
            self.visited.append(url)
            if url.startswith(self.redirect_prefix):
                self.result = query(url)
                return
            response = await http.get(url)
            if response.is_redirect:
                url = urljoin(url, response.headers["location"])
                continue
            html = response.text
            back = re.search(r'id="return" href="([^"]+)"', html)
            if response.status_code == 403 and back:  # refused: the user returns to the app
                url = urljoin(url, unescape(back.group(1)))
                continue
            if response.status_code == 200 and 'name="action" value="approve"' in html:
                response = await http.post(
                    urljoin(url, "/consent"),
                    data={
                        "login": _field(html, "login"),
                        "csrf": _field(html, "csrf"),
                        "action": "approve",
                        "provider": self.provider,
                    },
                )
            elif response.status_code == 200 and 'name="password"' in html:
                response = await http.post(
                    url.split("?")[0],
                    data={
                        "login": _field(html, "login"),
                        "csrf": _field(html, "csrf"),
                        "username": self.username,
                        "password": self.password,
                    },
                )
            else:
                raise AssertionError(f"stuck at {url}: {response.status_code} {html[:500]}")
            back = re.search(r'id="return" href="([^"]+)"', response.text)
            if response.status_code == 403 and back:
                url = urljoin(url, unescape(back.group(1)))
                continue
            assert response.is_redirect, f"{url}: {response.status_code} {response.text[:500]}"
            url = urljoin(url, response.headers["location"])
        raise AssertionError(f"too many redirects: {self.visited}")


def _field(html: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match, name
    return match.group(1)
