"""Shared test helpers: servers on free ports, PKCE, the sign-in steps a browser performs."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from werkzeug.serving import make_server

REQUIRE_ALL = os.environ.get("BROKER_TEST_REQUIRE_ALL") == "1"
RESOURCE = "http://127.0.0.1:8001/mcp"
OTHER_RESOURCE = "http://127.0.0.1:8002/mcp"


def unavailable(reason: str) -> None:
    """Skip a test whose external part is missing; under CI (BROKER_TEST_REQUIRE_ALL=1) fail."""
    if REQUIRE_ALL:
        pytest.fail(f"required for CI: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve_wsgi(app: Any, port: int) -> Iterator[str]:
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        thread.join(5)


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=")
    return verifier, challenge.decode()


def form_value(html: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match, f"no {name} in page"
    return match.group(1)


def query(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def authorize_params(client_id: str, challenge: str, **extra: str) -> dict[str, str]:
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": "http://127.0.0.1:5555/callback",
        "state": "st-" + secrets.token_urlsafe(8),
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "resource": RESOURCE,
        "scope": "demo:read",
    }
    params.update(extra)
    return {k: v for k, v in params.items() if v is not None}


def sign_in_local(
    client: Any,
    params: dict[str, str],
    *,
    username: str = "alice",
    password: str | None = None,
    approve: bool = True,
) -> Any:
    """Play the browser through consent and the local login form; returns the final response
    (a redirect to the client, or a page)."""
    from tests.conftest import PASSWORDS

    response = client.get("/authorize", query_string=params)
    if response.status_code != 302 or not response.headers["Location"].startswith("/consent"):
        return response
    consent = client.get(response.headers["Location"])
    assert consent.status_code == 200, consent.text
    login_id = form_value(consent.text, "login")
    csrf = form_value(consent.text, "csrf")
    if not approve:
        return client.post("/consent", data={"login": login_id, "csrf": csrf, "action": "deny"})
    response = client.post(
        "/consent", data={"login": login_id, "csrf": csrf, "action": "approve", "provider": "local"}
    )
    assert response.status_code == 302, response.text
    form = client.get(response.headers["Location"])
    assert form.status_code == 200, form.text
    return client.post(
        response.headers["Location"].split("?")[0],
        data={
            "login": login_id,
            "csrf": form_value(form.text, "csrf"),
            "username": username,
            "password": password if password is not None else PASSWORDS[username],
        },
    )


def redemption(client_id: str, code: str, verifier: str, **extra: str) -> dict[str, str]:
    """The token request's form that redeems ``code`` (``extra`` changes or, as ``None``, drops
    a field)."""
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "client_id": client_id,
        "redirect_uri": "http://127.0.0.1:5555/callback",
        "code_verifier": verifier,
        "resource": RESOURCE,
    }
    data.update(extra)
    return {k: v for k, v in data.items() if v is not None}


def redeem(client: Any, client_id: str, code: str, verifier: str, **extra: str) -> Any:
    return client.post("/token", data=redemption(client_id, code, verifier, **extra))


def open_consent(client: Any, client_id: str | None = None, **extra: str) -> Any:
    """Register a public client (unless given), send /authorize and open the consent page with
    the Flask test client; returns the consent page response."""
    if client_id is None:
        client_id = client.post(
            "/register", json={"redirect_uris": ["http://127.0.0.1/callback"]}
        ).json["client_id"]
    _, challenge = pkce()
    response = client.get(
        "/authorize", query_string=authorize_params(client_id, challenge, **extra)
    )
    assert response.status_code == 302, response.text
    return client.get(response.headers["Location"])


def approve(client: Any, consent: Any, provider: str = "local") -> Any:
    """Submit the consent page's approve form for ``provider``."""
    return client.post(
        "/consent",
        data={
            "login": form_value(consent.text, "login"),
            "csrf": form_value(consent.text, "csrf"),
            "action": "approve",
            "provider": provider,
        },
    )


def login_form(client: Any, client_id: str | None = None) -> tuple[str, str]:
    """Get as far as the local login form; returns its (login id, csrf token)."""
    consent = open_consent(client, client_id)
    form = client.get(approve(client, consent).headers["Location"])
    return form_value(consent.text, "login"), form_value(form.text, "csrf")
