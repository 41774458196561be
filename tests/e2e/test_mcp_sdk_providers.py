"""The official MCP client through the whole flow with the named providers upstream.

GitHub is a fake of our own over real HTTP (``tests/fakes/github.py``); Keycloak is the real
OpenID provider of the tests (``oidc-provider``) in Keycloak's URL layout. In both the rules
read facts only that provider declares (GitHub teams, Keycloak realm roles), so the token the
MCP server sees proves the identity went from the upstream through the rules.
"""

from __future__ import annotations

from collections.abc import Callable

import jwt
import pytest
from sqlalchemy import select

from broker.models import Identity, UpstreamToken
from tests.e2e.conftest import Stack
from tests.e2e.test_mcp_sdk import run_flow
from tests.fakes.github import FakeGitHub
from tests.support import free_port


def _scopes(access_token: str) -> set[str]:
    claims = jwt.decode(access_token, options={"verify_signature": False})
    return set(claims["scope"].split())


@pytest.mark.slow
def test_sdk_client_through_github(stack_factory: Callable[..., Stack]) -> None:
    with FakeGitHub() as github:
        stack = stack_factory(
            providers={"github": github.provider_config(allowed_orgs=["acme"])},
            rules=[{"grant": ["demo:read"], "when": {"teams": ["acme/platform"]}}],
            claims=("preferred_username", "email", "teams"),
        )
        whoami, browser, storage = run_flow(stack, provider="github")
        assert whoami["authenticated"] is True and whoami["issuer"] == stack.issuer
        # The tool sees the identity claims its resource may see, and no others (not orgs,
        # not name: the resource's claims do not list them).
        assert whoami["identity"] == {
            "preferred_username": "alice",
            "email": "alice@example.com",
            "teams": ["acme/platform", "acme/sre", "globex/research"],
        }
        assert any(
            u.startswith(f"{github.base_url}/login/oauth/authorize") for u in browser.visited
        )
        # alice is an active member of Acme and in Acme/platform: the rule on teams granted.
        assert "demo:read" in _scopes(storage.tokens.access_token)
        assert stack.app is not None
        with stack.app.extensions["broker"].db.session() as session:
            identity = session.scalars(select(Identity)).one()
            assert (identity.provider, identity.subject) == ("github", "1001")
            sealed = session.get(UpstreamToken, identity.id)
            assert sealed is not None and sealed.access_token_sealed.startswith("v1.")


@pytest.mark.slow
def test_sdk_client_through_keycloak(stack_factory: Callable[..., Stack]) -> None:
    from tests.idp_server import idp_or_skip

    port = free_port()
    secret = "broker-secret-0123456789"
    clients = [
        {
            "client_id": "broker",
            "client_secret": secret,
            "redirect_uris": [f"http://127.0.0.1:{port}/callback/staff"],
        }
    ]
    with idp_or_skip(clients, prefix="/realms/test") as idp:
        stack = stack_factory(
            port=port,
            providers={
                "staff": {
                    "type": "keycloak",
                    "server_url": f"http://127.0.0.1:{idp.port}",
                    "realm": "test",
                    "client_id": "broker",
                    "client_secret": secret,
                    "scopes": ["openid", "email", "profile", "groups"],
                }
            },
            rules=[
                {"deny": "Contractors have no MCP access", "when": {"groups": ["contractors"]}},
                {"grant": ["demo:read"], "when": {"roles": ["mcp-user"]}},
            ],
        )
        whoami, browser, storage = run_flow(stack, provider="staff")
        assert whoami["authenticated"] is True and whoami["issuer"] == stack.issuer
        assert whoami["identity"] == {}  # no claims configured: nothing beyond RFC 9068
        assert any(
            u.startswith(f"{idp.issuer}/protocol/openid-connect/auth") for u in browser.visited
        )
        assert "demo:read" in _scopes(storage.tokens.access_token)
        assert stack.app is not None
        with stack.app.extensions["broker"].db.session() as session:
            identity = session.scalars(select(Identity)).one()
            assert identity.provider == "staff"
            assert identity.snapshot["extra_facts"]["client_roles"] == [
                "broker/admin",
                "broker/viewer",
            ]
            assert identity.snapshot["roles"] == ["mcp-user"]
            assert identity.snapshot["raw"]["issuer"] == idp.issuer
