"""A static client end to end with the official MCP Python SDK client (``mcp`` 2.x).

The operator creates a public client with ``broker clients add`` and applies it with ``broker db
upgrade`` against the running broker's database; the SDK is given that client as pre-registered
(``storage.client_info``), so it never registers: no row of kind ``dcr`` appears. The client lists
``http://127.0.0.1/callback`` without a port and the SDK's redirect URI uses an ephemeral one
(RFC 8252 section 7.3). After ``remove`` + ``upgrade`` the client is gone and its grant revoked;
after a downgrade it is back.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio
import jwt
import pytest
import yaml
from click.testing import CliRunner, Result
from mcp.shared.auth import OAuthClientInformationFull
from sqlalchemy import func, select

from broker.cli import main
from broker.models import AuditEvent, Client, Grant
from tests.e2e.conftest import HeadlessBrowser, InMemoryTokenStorage, Stack
from tests.e2e.test_mcp_sdk import REDIRECT, call_whoami, sdk_provider
from tests.support import authorize_params, free_port, pkce

REGISTERED_REDIRECT = "http://127.0.0.1/callback"


def _command(stack: Stack, tmp_path: Path) -> Callable[..., Result]:
    """``broker --config <a config naming the stack's database> ...``"""
    assert stack.app is not None
    settings = stack.app.extensions["broker"].settings
    config = tmp_path / "deployment" / "broker.yaml"
    config.parent.mkdir()
    config.write_text(
        yaml.safe_dump(
            {
                "issuer": settings.issuer,
                "secret_key": settings.secret_key,
                "database_url": settings.database_url,
                "providers": {name: dict(conf) for name, conf in settings.providers.items()},
                "resources": [
                    {
                        "uri": r.uri,
                        "name": r.name,
                        "scopes": dict(r.scopes),
                        "required_scopes": list(r.required_scopes),
                    }
                    for r in settings.resources
                ],
            }
        )
    )

    def run(*args: str) -> Result:
        result = CliRunner().invoke(main, ["--config", str(config), *args])
        assert result.exit_code == 0, result.output
        return result

    return run


@pytest.mark.slow
def test_sdk_signs_in_with_a_static_client_from_a_migration(
    stack_factory: Callable[..., Stack], tmp_path: Path
) -> None:
    stack = stack_factory()
    broker = _command(stack, tmp_path)
    added = broker(
        "clients",
        "add",
        "--name",
        "Company MCP client",
        "--redirect-uri",
        REGISTERED_REDIRECT,
        "--resource",
        stack.mcp_url,
    )
    client_id = next(
        line.split(":", 1)[1].strip()
        for line in added.stdout.splitlines()
        if line.startswith("client_id:")
    )
    broker("db", "upgrade")

    redirect_uri = REDIRECT.format(port=free_port())
    browser = HeadlessBrowser(redirect_prefix=redirect_uri)
    storage = InMemoryTokenStorage()
    storage.client_info = OAuthClientInformationFull(
        client_id=client_id,
        redirect_uris=[REGISTERED_REDIRECT],
        token_endpoint_auth_method="none",
        grant_types=["authorization_code", "refresh_token"],
        response_types=["code"],
        client_name="Company MCP client",
    )
    oauth = sdk_provider(stack.mcp_url, browser, storage, redirect_uri)
    whoami = anyio.run(call_whoami, stack.mcp_url, oauth)

    assert whoami["authenticated"] is True and whoami["client_id"] == client_id
    assert whoami["issuer"] == stack.issuer and whoami["audience"] == stack.mcp_url
    assert any("/consent" in u for u in browser.visited)
    assert browser.result is not None and browser.result["iss"] == stack.issuer
    claims = jwt.decode(storage.tokens.access_token, options={"verify_signature": False})
    assert claims["client_id"] == client_id and claims["aud"] == stack.mcp_url
    assert storage.client_info.client_id == client_id  # the SDK kept the pre-registered client

    app = stack.app
    assert app is not None
    database = app.extensions["broker"].db
    with database.session() as session:
        kinds = dict(session.execute(select(Client.kind, func.count()).group_by(Client.kind)).all())
        assert kinds == {"static": 1}  # no dynamic registration happened
        assert not session.scalars(select(AuditEvent).where(AuditEvent.type == "register")).all()
        row = session.get(Client, client_id)
        assert row is not None and row.last_used_at is not None

    # Removed: the client is unknown and its grant revoked. Downgraded: it is back.
    broker("clients", "remove", client_id)
    broker("db", "upgrade")
    http = app.test_client()
    _, challenge = pkce()
    params = authorize_params(client_id, challenge, resource=stack.mcp_url)
    assert http.get("/authorize", query_string=params).status_code == 400
    with database.session() as session:
        grants = session.scalars(select(Grant).where(Grant.client_id == client_id)).all()
        assert grants and all(g.revoke_reason == "client_removed" for g in grants)
    broker("db", "downgrade", "clients@-1")
    back = http.get("/authorize", query_string=params)
    assert back.status_code == 302 and back.headers["Location"].startswith("/consent")
