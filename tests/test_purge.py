"""``broker purge`` deletes what can no longer be used, and nothing that can."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner
from flask.testing import FlaskClient
from sqlalchemy import func, select

from broker.cli import main
from broker.db import utcnow
from broker.models import (
    AuditEvent,
    AuthorizationCode,
    Client,
    Grant,
    PendingLogin,
    RefreshToken,
)
from broker.purge import purge
from tests.support import authorize_params, pkce, query, redeem, sign_in_local


def _counts(app: Any) -> dict[str, int]:
    with app.extensions["broker"].db.session() as session:
        return {
            m.__tablename__: int(session.execute(select(func.count()).select_from(m)).scalar_one())
            for m in (PendingLogin, AuthorizationCode, RefreshToken, Grant, Client, AuditEvent)
        }


def test_purge_keeps_live_rows_and_deletes_dead_ones(
    app: Any, client: FlaskClient, registered: dict[str, Any]
) -> None:
    verifier, challenge = pkce()
    response = sign_in_local(client, authorize_params(registered["client_id"], challenge))
    code = query(response.headers["Location"])["code"]
    tokens = redeem(client, registered["client_id"], code, verifier).json
    client.get(
        "/authorize",
        query_string=authorize_params(registered["client_id"], challenge, prompt="consent"),
    )  # a pending login
    unused = client.post("/register", json={"redirect_uris": ["http://127.0.0.1/cb"]}).json
    broker = app.extensions["broker"]
    with broker.db.session() as session:
        session.add(
            Client(
                client_id="https://app.example.com/client.json",
                kind="cimd",
                name="CIMD app",
                redirect_uris=["http://127.0.0.1/cb"],
                grant_types=["authorization_code"],
                response_types=["code"],
                token_endpoint_auth_method="none",
                client_metadata={},
                expires_at=utcnow() - dt.timedelta(days=1),
            )
        )
    before = _counts(app)

    with broker.db.session() as session:  # now: nothing live may go
        purge(session, access_ttl=3600)
    assert _counts(app) == before
    refreshed = client.post(
        "/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
            "client_id": registered["client_id"],
        },
    )
    assert refreshed.status_code == 200
    audit_before = _counts(app)["audit_events"]

    later = utcnow() + dt.timedelta(days=60)  # everything has expired by then
    with broker.db.session() as session:
        result = purge(session, access_ttl=3600, now=later)
    after = _counts(app)
    assert after["pending_logins"] == 0 and after["authorization_codes"] == 0
    assert after["refresh_tokens"] == 0 and after["grants"] == 0
    assert after["audit_events"] == audit_before  # kept unless asked
    with broker.db.session() as session:
        remaining = set(session.scalars(select(Client.client_id)))
    assert "https://app.example.com/client.json" in remaining  # CIMD rows are never purged
    assert unused["client_id"] not in remaining and registered["client_id"] not in remaining
    assert result.total() > 0


def test_purge_command(tmp_path: Path, database_url: str, users_file: Path) -> None:
    config = tmp_path / "broker.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "issuer": "http://127.0.0.1:8000",
                "secret_key": "p" * 40,
                "database_url": database_url,
                "providers": {"local": {"users_file": str(users_file)}},
                "resources": [{"uri": "http://127.0.0.1:8001/mcp"}],
            }
        )
    )
    runner = CliRunner()
    assert runner.invoke(main, ["--config", str(config), "db", "upgrade"]).exit_code == 0
    result = runner.invoke(main, ["--config", str(config), "purge", "--audit-days", "30"])
    assert result.exit_code == 0, result.output
    assert "pending_logins" in result.output and "audit_events" in result.output
    assert "total" in result.output


def test_rotated_tokens_are_kept_for_reuse_detection(make_app: Any) -> None:
    app = make_app(tokens={"refresh_reuse_grace": 0})
    client = app.test_client()
    registered = client.post(
        "/register", json={"redirect_uris": ["http://127.0.0.1/callback"]}
    ).json
    verifier, challenge = pkce()
    response = sign_in_local(client, authorize_params(registered["client_id"], challenge))
    code = query(response.headers["Location"])["code"]
    old = redeem(client, registered["client_id"], code, verifier).json["refresh_token"]
    data = {"grant_type": "refresh_token", "client_id": registered["client_id"]}
    new = client.post("/token", data={**data, "refresh_token": old}).json["refresh_token"]
    broker = app.extensions["broker"]
    # Past the rotated token's idle expiry, well within the family's absolute lifetime.
    with broker.db.session() as session:
        result = purge(session, access_ttl=3600, now=utcnow() + dt.timedelta(days=20))
    assert result.counts["refresh_tokens"] == 0
    # So a replay of the rotated token is still recognised, and revokes the family.
    replay = client.post("/token", data={**data, "refresh_token": old})
    assert replay.status_code == 400 and replay.json["error"] == "invalid_grant"
    after = client.post("/token", data={**data, "refresh_token": new})
    assert after.status_code == 400 and after.json["error"] == "invalid_grant"
