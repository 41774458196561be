"""Access follows the user: every refresh decides again, and operators cut access from the CLI.

One database, the broker started again with a changed config (as an operator restarts it after
editing the rules), and the ``broker`` command run against the same config file, as an operator
runs it on another host: each change takes effect at the next request.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from broker.app import create_app
from broker.cli import main
from broker.db import Database
from broker.migrate import upgrade
from broker.models import Grant
from tests.support import OTHER_RESOURCE, RESOURCE, authorize_params, pkce, query, redeem
from tests.support import sign_in_local as sign_in

WEB = "https://app.example.com/cb"  # an https redirect: no per-request confirmation


@dataclass
class Deployment:
    path: Path
    base: dict[str, Any]
    apps: list[Flask]

    def start(self, **changes: Any) -> FlaskClient:
        """(Re)start the broker with ``changes`` to the config file."""
        self.path.write_text(yaml.safe_dump({**self.base, **changes}))
        app = create_app(str(self.path))
        app.config["TESTING"] = True
        self.apps.append(app)
        return app.test_client()

    def cli(self, *args: str) -> Any:
        result = CliRunner().invoke(main, ["--config", str(self.path), *args])
        assert result.exit_code == 0, result.output
        return result


@pytest.fixture
def deployment(database_url: str, users_file: Path, tmp_path: Path) -> Iterator[Deployment]:
    base = {
        "issuer": "http://127.0.0.1:8000",
        "secret_key": "lifecycle-secret-" + "x" * 40,
        "database_url": database_url,
        "providers": {"local": {"users_file": str(users_file)}},
        "resources": [
            {
                "uri": RESOURCE,
                "scopes": {"demo:read": "Read", "demo:write": "Write"},
                "required_scopes": ["demo:read"],
            },
            {"uri": OTHER_RESOURCE, "scopes": {"other:read": "Read"}},
        ],
    }
    database = Database(database_url)
    upgrade(database.engine)
    database.dispose()
    deployment = Deployment(tmp_path / "broker.yaml", base, [])
    yield deployment
    for app in deployment.apps:
        app.extensions["broker"].db.dispose()
        app.extensions["broker"].http.close()


def signed_in(
    client: FlaskClient, scope: str = "demo:read demo:write"
) -> tuple[str, dict[str, Any]]:
    """alice signs in through a dynamically registered client; its id and the token response."""
    registered = client.post(
        "/register", json={"redirect_uris": [WEB], "token_endpoint_auth_method": "none"}
    ).json
    verifier, challenge = pkce()
    params = authorize_params(registered["client_id"], challenge, redirect_uri=WEB, scope=scope)
    done = sign_in(client, params)
    assert done.status_code == 302, done.text
    code = query(done.headers["Location"])["code"]
    tokens = redeem(client, registered["client_id"], code, verifier, redirect_uri=WEB)
    assert tokens.status_code == 200, tokens.json
    return registered["client_id"], tokens.json


def refresh(client: FlaskClient, client_id: str, token: str) -> Any:
    return client.post(
        "/token",
        data={"grant_type": "refresh_token", "refresh_token": token, "client_id": client_id},
    )


def scopes(tokens: dict[str, Any]) -> set[str]:
    claims = jwt.decode(tokens["access_token"], options={"verify_signature": False})
    return set(claims["scope"].split())


def again(client: FlaskClient, client_id: str) -> Any:
    """A new authorization in the same browser (its broker session remembered)."""
    _, challenge = pkce()
    params = authorize_params(client_id, challenge, redirect_uri=WEB)
    return client.get("/authorize", query_string=params)


def test_a_disabled_user_refreshes_nothing_and_gets_no_code(deployment: Deployment) -> None:
    client = deployment.start()
    client_id, tokens = signed_in(client)
    assert "code=" in again(client, client_id).headers["Location"]  # remembered: straight through
    listed = json.loads(deployment.cli("users", "list", "--json").output)
    assert [u["identities"][0]["subject"] for u in listed] == ["alice"]
    assert "disabled" in deployment.cli("users", "disable", "local:alice").output
    refused = refresh(client, client_id, tokens["refresh_token"])
    assert refused.status_code == 400 and refused.json["error"] == "invalid_grant"
    assert "code=" not in again(client, client_id).headers["Location"]  # sign in again
    # Signing in again is refused too: the local provider still knows alice, the broker says no.
    _, challenge = pkce()
    params = authorize_params(client_id, challenge, redirect_uri=WEB)
    page = sign_in(client, params)
    assert page.status_code == 403 and "Your account is disabled" in page.text
    assert "error=access_denied" in page.text and "code=" not in page.text
    assert (
        client.get_cookie("broker_session") is None or again(client, client_id).status_code == 302
    )
    assert "code=" not in again(client, client_id).headers["Location"]  # no session was started
    deployment.cli("users", "enable", "alice@example.com")
    assert refresh(client, client_id, tokens["refresh_token"]).status_code == 200
    events = [json.loads(line) for line in deployment.cli("audit", "--json").output.splitlines()]
    assert {"user_disabled", "user_enabled"} <= {e["reason"] for e in events}


def test_a_rule_change_and_restart_ends_the_grant(deployment: Deployment) -> None:
    client_id, tokens = signed_in(deployment.start())
    client = deployment.start(rules=[{"deny": "No staff", "when": {"groups": ["staff"]}}])
    refused = refresh(client, client_id, tokens["refresh_token"])
    assert refused.status_code == 400 and refused.json["error"] == "invalid_grant"
    with deployment.apps[-1].extensions["broker"].db.session() as session:
        grant = session.scalars(select(Grant)).one()
        assert grant.revoked_at is not None and grant.revoke_reason == "denied_by_policy"


def test_a_narrowed_rule_narrows_the_next_token(deployment: Deployment) -> None:
    client_id, tokens = signed_in(deployment.start())
    assert scopes(tokens) == {"demo:read", "demo:write"}
    client = deployment.start(rules=[{"grant": ["demo:read"], "when": {"groups": ["staff"]}}])
    narrowed = refresh(client, client_id, tokens["refresh_token"])
    assert narrowed.status_code == 200, narrowed.json
    assert scopes(narrowed.json) == {"demo:read"}
    # Widening the rules again does not widen the grant without the user's consent.
    client = deployment.start()
    later = refresh(client, client_id, narrowed.json["refresh_token"])
    assert scopes(later.json) == {"demo:read"}


def test_a_lost_required_scope_ends_the_grant(deployment: Deployment) -> None:
    client_id, tokens = signed_in(deployment.start())
    client = deployment.start(rules=[{"grant": ["demo:write"], "when": {"groups": ["staff"]}}])
    refused = refresh(client, client_id, tokens["refresh_token"])
    assert refused.status_code == 400 and refused.json["error"] == "invalid_grant"


def test_a_removed_resource_ends_its_grants(deployment: Deployment) -> None:
    client_id, tokens = signed_in(deployment.start())
    client = deployment.start(resources=[{"uri": OTHER_RESOURCE, "scopes": {"other:read": "Read"}}])
    refused = refresh(client, client_id, tokens["refresh_token"])
    assert refused.status_code == 400 and refused.json["error"] == "invalid_grant"


def test_grants_revoke_stops_the_next_refresh_of_that_grant_only(deployment: Deployment) -> None:
    client = deployment.start()
    first_client, first = signed_in(client)
    second_client, second = signed_in(client)
    grants = json.loads(deployment.cli("grants", "list", "--json").output)
    assert {g["client_id"] for g in grants} == {first_client, second_client}
    assert (
        "1 grant(s) revoked" in deployment.cli("grants", "revoke", "--client", first_client).output
    )
    assert refresh(client, first_client, first["refresh_token"]).json["error"] == "invalid_grant"
    assert refresh(client, second_client, second["refresh_token"]).status_code == 200
    shown = json.loads(deployment.cli("users", "show", "local:alice", "--json").output)
    assert [g["client_id"] for g in shown["grants"]] == [second_client]
    deployment.cli("users", "revoke", "local:alice")
    assert refresh(client, second_client, second["refresh_token"]).json["error"] == "invalid_grant"


def test_keys_rotate_from_the_command_line(deployment: Deployment) -> None:
    client = deployment.start()
    result = CliRunner().invoke(main, ["--config", str(deployment.path), "keys", "rotate"])
    assert result.exit_code == 1 and "rotate again in" in result.output  # next key too new
    rotated = deployment.cli("keys", "rotate", "--force").output
    active = rotated.splitlines()[0].removeprefix("active: ")
    _, tokens = signed_in(client)
    assert jwt.get_unverified_header(tokens["access_token"])["kid"] == active
