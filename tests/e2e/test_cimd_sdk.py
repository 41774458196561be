"""Client ID Metadata Documents end to end with the official MCP Python SDK client (``mcp`` 2.x).

The SDK is given a ``client_metadata_url``; the broker's metadata advertises
``client_id_metadata_document_supported``, so the SDK uses the URL as its ``client_id`` and never
registers. The broker fetches the document from a local HTTPS server whose certificate comes from a
test CA, reached through the test-only allowance (``allow_hosts: [localhost]`` + ``ca_file``); the
SDK itself never fetches it. The document lists ``http://127.0.0.1/callback`` without a port, as
Claude Code's does, and the SDK's redirect URI uses an ephemeral port.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import jwt
import pytest
import trustme
from pytest_httpserver import HTTPServer
from sqlalchemy import select
from werkzeug.wrappers import Response

from broker.models import AuditEvent, Client
from tests.e2e.conftest import HeadlessBrowser, InMemoryTokenStorage, Stack
from tests.e2e.test_mcp_sdk import call_whoami
from tests.support import free_port

DOCUMENT_PATH = "/oauth/client-metadata.json"


@pytest.fixture
def test_ca(tmp_path: Path) -> Iterator[tuple[trustme.CA, str]]:
    ca = trustme.CA()
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    yield ca, str(path)


@pytest.fixture
def document_host(test_ca: tuple[trustme.CA, str]) -> Iterator[tuple[HTTPServer, str]]:
    """An HTTPS server for ``localhost`` serving the client's metadata document."""
    ca, _ = test_ca
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    server = HTTPServer(host="127.0.0.1", port=0, ssl_context=context, threaded=True)
    server.start()
    url = f"https://localhost:{server.port}{DOCUMENT_PATH}"
    document = {
        "client_id": url,
        "client_name": "SDK CIMD end-to-end test",
        "client_uri": "https://client.example.com",
        "redirect_uris": ["http://localhost/callback", "http://127.0.0.1/callback"],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
    }
    server.expect_request(DOCUMENT_PATH).respond_with_response(
        Response(
            json.dumps(document),
            content_type="application/json",
            headers={"Cache-Control": "max-age=3600"},
        )
    )
    try:
        yield server, url
    finally:
        server.clear()
        server.stop()


def cimd_provider(
    server_url: str, metadata_url: str, browser: HeadlessBrowser, redirect_uri: str
) -> tuple[Any, InMemoryTokenStorage]:
    from mcp.client.auth import OAuthClientProvider
    from mcp.shared.auth import AuthorizationCodeResult, OAuthClientMetadata

    async def redirect_handler(url: str) -> None:
        await browser.run(url)

    async def callback_handler() -> AuthorizationCodeResult:
        assert browser.result is not None and "code" in browser.result, browser.result
        return AuthorizationCodeResult(
            code=browser.result["code"],
            state=browser.result.get("state"),
            iss=browser.result.get("iss"),
        )

    storage = InMemoryTokenStorage()
    metadata = OAuthClientMetadata(
        client_name="SDK CIMD end-to-end test",
        redirect_uris=[redirect_uri],
        grant_types=["authorization_code", "refresh_token"],
        response_types=["code"],
        token_endpoint_auth_method="none",
    )
    provider = OAuthClientProvider(
        server_url,
        metadata,
        storage,
        redirect_handler,
        callback_handler,
        client_metadata_url=metadata_url,
    )
    return provider, storage


@pytest.mark.slow
def test_sdk_client_uses_its_metadata_document_instead_of_registering(
    stack_factory: Callable[..., Stack],
    test_ca: tuple[trustme.CA, str],
    document_host: tuple[HTTPServer, str],
) -> None:
    _, trusted = test_ca
    doc_server, metadata_url = document_host
    stack = stack_factory(
        client_metadata_documents={"allow_hosts": ["localhost"], "ca_file": trusted}
    )
    redirect_uri = f"http://127.0.0.1:{free_port()}/callback"  # an ephemeral port
    browser = HeadlessBrowser(redirect_prefix=redirect_uri)
    provider, storage = cimd_provider(stack.mcp_url, metadata_url, browser, redirect_uri)

    whoami = anyio.run(call_whoami, stack.mcp_url, provider)

    assert whoami["authenticated"] is True and whoami["issuer"] == stack.issuer
    assert storage.client_info is not None and storage.client_info.client_id == metadata_url
    claims = jwt.decode(storage.tokens.access_token, options={"verify_signature": False})
    assert claims["client_id"] == metadata_url and claims["aud"] == stack.mcp_url
    # The browser went through consent, which named the document's host.
    assert any("/consent" in u for u in browser.visited)
    assert browser.result is not None and browser.result["iss"] == stack.issuer
    # The broker fetched the document once and never saw a registration.
    assert [r.path for r, _ in doc_server.log] == [DOCUMENT_PATH]
    assert doc_server.log[0][0].headers["Host"] == f"localhost:{doc_server.port}"
    app = stack.app
    assert app is not None
    with app.extensions["broker"].db.session() as session:
        clients = session.scalars(select(Client)).all()
        assert [(c.client_id, c.kind) for c in clients] == [(metadata_url, "cimd")]
        assert clients[0].name == "SDK CIMD end-to-end test"
        registrations = session.scalars(
            select(AuditEvent).where(AuditEvent.type == "register")
        ).all()
        assert [(e.outcome, e.reason, e.details["kind"]) for e in registrations] == [
            ("success", "created", "cimd")
        ]
