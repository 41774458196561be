"""Static clients managed through Alembic migrations, on SQLite and PostgreSQL.

``broker clients add|remove`` write data migrations into the deployment's ``client_migrations``
folder (the ``clients`` branch); ``broker db upgrade|downgrade|current|check`` apply and report
them beside the broker's schema migrations; ``broker clients list|show`` read every kind of
client. Everything runs through the real command against a temporary config, and the client then
signs in against the real app.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from click.testing import CliRunner, Result
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import inspect, select, text

from broker.cli import main
from broker.crypto import hash_client_secret, hash_password, verify_password
from broker.migrate import (
    check,
    current_revision,
    head_revision,
    is_current,
    migration_status,
)
from broker.models import Base, Client, Consent, Grant
from broker.static_clients import defined_clients, new_client, write_add_migration
from tests.support import OTHER_RESOURCE, RESOURCE, authorize_params, pkce, query, sign_in_local

LOOPBACK = "http://127.0.0.1/callback"  # any port matches (RFC 8252 section 7.3)


@dataclass
class Deployment:
    """A deployment of the broker: its config file, its client migrations, the running app."""

    config: Path
    folder: Path
    app: Flask

    def run(self, *args: str) -> Result:
        return CliRunner().invoke(main, ["--config", str(self.config), *args])

    def ok(self, *args: str) -> dict[str, str]:
        """Run a command that must succeed; its ``key: value`` lines as a mapping."""
        result = self.run(*args)
        assert result.exit_code == 0, result.output
        return dict(
            (key.strip(), value.strip())
            for key, _, value in (line.partition(":") for line in result.stdout.splitlines())
            if value
        )

    def add(self, *args: str) -> dict[str, str]:
        return self.ok("clients", "add", *args)

    @property
    def database(self) -> Any:
        return self.app.extensions["broker"].db

    def client_row(self, client_id: str) -> Client | None:
        with self.database.session() as session:
            return session.get(Client, client_id)


@pytest.fixture
def deployment(make_app: Callable[..., Flask], tmp_path: Path) -> Deployment:
    """The app (schema upgraded) and a config for the command that names the same database,
    providers and resources; ``client_migrations`` is its default, beside the config file."""
    app = make_app()
    settings = app.extensions["broker"].settings
    config = tmp_path / "broker.yaml"
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
    folder = tmp_path / "client_migrations"
    assert Path(settings.client_migrations) == folder  # the app and the command agree
    return Deployment(config, folder, app)


def _code(client: FlaskClient, client_id: str) -> tuple[str, str]:
    verifier, challenge = pkce()
    response = sign_in_local(client, authorize_params(client_id, challenge))
    assert response.status_code == 302, response.text
    return query(response.headers["Location"])["code"], verifier


def _redeem(client: FlaskClient, code: str, verifier: str, **extra: Any) -> Any:
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": "http://127.0.0.1:5555/callback",
        "code_verifier": verifier,
        "resource": RESOURCE,
    }
    auth = extra.pop("auth", None)
    data.update(extra)
    return client.post("/token", data=data, auth=auth)


def _refresh(client: FlaskClient, client_id: str, refresh_token: str) -> Any:
    return client.post(
        "/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": client_id,
        },
    )


# -- add, upgrade, authenticate ---------------------------------------------------------------


def test_confidential_client_added_by_migration_authenticates_with_basic(
    deployment: Deployment,
) -> None:
    added = deployment.add("--name", "Agent", "--redirect-uri", LOOPBACK, "--confidential")
    client_id, secret = added["client_id"], added["client_secret"]
    migration = Path(added["migration"])
    assert migration.parent == deployment.folder and migration.is_file()
    assert deployment.client_row(client_id) is None  # written, not applied
    deployment.ok("db", "upgrade")

    row = deployment.client_row(client_id)
    assert row is not None
    assert (row.kind, row.name, row.expires_at) == ("static", "Agent", None)
    assert row.grant_types == ["authorization_code", "refresh_token"]
    assert row.token_endpoint_auth_method == "client_secret_basic"
    assert row.redirect_uris == [LOOPBACK] and row.trusted is False

    client = deployment.app.test_client()
    code, verifier = _code(client, client_id)
    wrong = _redeem(client, code, verifier, auth=(client_id, secret + "x"))
    assert wrong.status_code == 401 and wrong.json["error"] == "invalid_client"
    tokens = _redeem(client, code, verifier, auth=(client_id, secret))
    assert tokens.status_code == 200, tokens.json
    assert tokens.json["token_type"] == "Bearer" and tokens.json["refresh_token"]
    # The secret also authenticates in the request body (here at introspection).
    introspected = client.post(
        "/introspect",
        data={
            "token": tokens.json["access_token"],
            "client_id": client_id,
            "client_secret": secret,
        },
    )
    assert introspected.status_code == 200 and introspected.json["active"] is True
    assert introspected.json["client_id"] == client_id


def test_confidential_static_client_authenticates_with_post_at_the_token_endpoint(
    deployment: Deployment,
) -> None:
    added = deployment.add("--name", "Agent", "--redirect-uri", LOOPBACK, "--confidential")
    client_id, secret = added["client_id"], added["client_secret"]
    deployment.ok("db", "upgrade")
    client = deployment.app.test_client()
    code, verifier = _code(client, client_id)
    wrong = _redeem(client, code, verifier, client_id=client_id, client_secret=secret + "x")
    assert wrong.status_code == 401 and wrong.json["error"] == "invalid_client"
    tokens = _redeem(client, code, verifier, client_id=client_id, client_secret=secret)
    assert tokens.status_code == 200, tokens.json


def test_public_client_options_are_stored(deployment: Deployment) -> None:
    added = deployment.add(
        "--name",
        "Company IDE",
        "--client-id",
        "company-ide",
        "--redirect-uri",
        "https://ide.example.com/cb",
        "--redirect-uri",
        LOOPBACK,
        "--redirect-uri",
        LOOPBACK,  # repeated: kept once
        "--provider",
        "local",
        "--resource",
        OTHER_RESOURCE,
    )
    assert added["client_id"] == "company-ide" and "client_secret" not in added
    deployment.ok("db", "upgrade")
    row = deployment.client_row("company-ide")
    assert row is not None
    assert row.redirect_uris == ["https://ide.example.com/cb", LOOPBACK]
    assert row.token_endpoint_auth_method == "none" and row.secret_hash is None
    assert row.allowed_providers == ["local"] and row.allowed_resources == [OTHER_RESOURCE]
    assert row.application_type == "native"


def test_trusted_confidential_client_with_client_credentials(deployment: Deployment) -> None:
    added = deployment.add(
        "--name",
        "Nightly agent",
        "--redirect-uri",
        "https://agent.example.com/cb",
        "--confidential",
        "--trusted",
        "--grant",
        "client_credentials",
        "--resource",
        RESOURCE,
        "--scope",
        "demo:read",
        "--scope",
        "demo:write",
    )
    deployment.ok("db", "upgrade")
    row = deployment.client_row(added["client_id"])
    assert row is not None and row.trusted is True
    assert row.grant_types == ["authorization_code", "refresh_token", "client_credentials"]
    assert row.scope == "demo:read demo:write" and row.allowed_resources == [RESOURCE]
    assert row.application_type == "web"
    # The row is what the client credentials grant expects: a token in the agent's own name.
    token = deployment.app.test_client().post(
        "/token",
        data={"grant_type": "client_credentials", "resource": RESOURCE, "scope": "demo:read"},
        auth=(added["client_id"], added["client_secret"]),
    )
    assert token.status_code == 200, token.json
    assert "refresh_token" not in token.json and token.json["scope"] == "demo:read"
    claims = jwt.decode(token.json["access_token"], options={"verify_signature": False})
    assert claims["sub"] == added["client_id"] and claims["aud"] == RESOURCE


# -- remove, downgrade --------------------------------------------------------------------------


def test_remove_deletes_the_client_and_revokes_its_grants_downgrade_restores_it(
    deployment: Deployment,
) -> None:
    client_id = deployment.add("--name", "CLI", "--redirect-uri", LOOPBACK)["client_id"]
    deployment.ok("db", "upgrade")
    client = deployment.app.test_client()
    code, verifier = _code(client, client_id)
    tokens = _redeem(client, code, verifier, client_id=client_id)
    assert tokens.status_code == 200, tokens.json
    listed = json.loads(deployment.run("clients", "show", client_id, "--json").stdout)
    assert listed["live_grants"] == 1

    removed = deployment.ok("clients", "remove", client_id)
    assert Path(removed["migration"]).parent == deployment.folder
    deployment.ok("db", "upgrade")
    assert deployment.client_row(client_id) is None
    with deployment.database.session() as session:
        grant = session.scalars(select(Grant).where(Grant.client_id == client_id)).one()
        assert grant.revoked_at is not None and grant.revoke_reason == "client_removed"
        consent = session.scalars(select(Consent).where(Consent.client_id == client_id)).one()
        assert consent.revoked_at is not None
    _, challenge = pkce()
    unknown = client.get("/authorize", query_string=authorize_params(client_id, challenge))
    assert unknown.status_code == 400  # an error page, never a redirect
    refused = _refresh(client, client_id, tokens.json["refresh_token"])
    assert refused.status_code in (400, 401) and refused.json["error"] == "invalid_client"

    # Downgrading the removal brings the client back as it was added; its grants stay revoked.
    deployment.ok("db", "downgrade", "clients@-1")
    row = deployment.client_row(client_id)
    assert row is not None and row.kind == "static" and row.redirect_uris == [LOOPBACK]
    revoked = _refresh(client, client_id, tokens.json["refresh_token"])
    assert revoked.status_code == 400 and revoked.json["error"] == "invalid_grant"
    back = client.get("/authorize", query_string=authorize_params(client_id, challenge))
    assert back.status_code == 302 and back.headers["Location"].startswith("/consent")

    # Downgrading the addition deletes it again.
    deployment.ok("db", "downgrade", "clients@-1")
    assert deployment.client_row(client_id) is None


def test_remove_refuses_unknown_and_already_removed_clients(deployment: Deployment) -> None:
    client_id = deployment.add("--name", "CLI", "--redirect-uri", LOOPBACK)["client_id"]
    unknown = deployment.run("clients", "remove", "nobody")
    assert unknown.exit_code == 2
    assert unknown.stderr.strip() == (
        f"broker clients remove: nobody: no migration in {deployment.folder} adds it"
    )
    deployment.ok("clients", "remove", client_id)
    again = deployment.run("clients", "remove", client_id)
    assert again.exit_code == 2 and "already removed by" in again.stderr
    assert len(list(deployment.folder.glob("*.py"))) == 2
    # The id is free again: adding it once more is allowed.
    deployment.add("--name", "CLI", "--redirect-uri", LOOPBACK, "--client-id", client_id)


def test_rotating_a_secret_is_remove_and_add_in_one_upgrade(deployment: Deployment) -> None:
    first = deployment.add(
        "--name", "Agent", "--redirect-uri", LOOPBACK, "--confidential", "--client-id", "agent"
    )
    deployment.ok("db", "upgrade")
    client = deployment.app.test_client()
    code, verifier = _code(client, "agent")
    old = _redeem(client, code, verifier, auth=("agent", first["client_secret"]))
    assert old.status_code == 200

    deployment.ok("clients", "remove", "agent")
    second = deployment.add(
        "--name", "Agent", "--redirect-uri", LOOPBACK, "--confidential", "--client-id", "agent"
    )
    assert second["client_secret"] != first["client_secret"]
    deployment.ok("db", "upgrade")
    row = deployment.client_row("agent")
    assert row is not None and row.secret_hash is not None
    assert verify_password(row.secret_hash, second["client_secret"])
    assert not verify_password(row.secret_hash, first["client_secret"])
    # The old grant ended with the old client.
    refresh = client.post(
        "/token",
        data={"grant_type": "refresh_token", "refresh_token": old.json["refresh_token"]},
        auth=("agent", second["client_secret"]),
    )
    assert refresh.status_code == 400 and refresh.json["error"] == "invalid_grant"


# -- the branch layout: current, check, several heads ------------------------------------------


def test_db_current_and_check_report_the_client_branch(deployment: Deployment) -> None:
    engine = deployment.database.engine
    first = deployment.add("--name", "One", "--redirect-uri", LOOPBACK)["client_id"]
    behind = deployment.run("db", "current")
    assert behind.exit_code == 1
    assert f"client migrations: 1 in {deployment.folder} not applied" in behind.stderr
    assert "run `broker db upgrade`" in behind.stderr
    failed = deployment.run("db", "check")
    assert failed.exit_code == 1 and "schema check failed: client migrations" in failed.stderr
    assert not is_current(engine, deployment.folder)

    deployment.ok("db", "upgrade")
    assert is_current(engine, deployment.folder)
    current = deployment.run("db", "current")
    assert current.exit_code == 0, current.output
    status = migration_status(engine, deployment.folder)
    assert status.schema.current == (head_revision(),) and status.clients.pending == 0
    assert f"current: {' '.join(status.current)}" in current.stdout
    checked = deployment.run("db", "check")
    assert checked.exit_code == 0 and checked.stdout.startswith("schema ok"), checked.output
    check(engine, client_migrations=deployment.folder)  # no drift with client migrations present
    assert current_revision(engine, deployment.folder) == head_revision()

    # Without the folder, the client revision in the database is unknown: said so, never ok.
    assert not is_current(engine)
    assert "no client_migrations folder given" in migration_status(engine).problems[0]

    deployment.add("--name", "Two", "--redirect-uri", LOOPBACK)
    assert not is_current(engine, deployment.folder)
    assert migration_status(engine, deployment.folder).clients.pending == 1
    deployment.ok("db", "upgrade")
    assert {first} <= {c["client_id"] for c in _listed(deployment)}


def test_downgrade_base_and_upgrade_again_with_client_migrations(deployment: Deployment) -> None:
    client_id = deployment.add("--name", "One", "--redirect-uri", LOOPBACK)["client_id"]
    deployment.ok("db", "upgrade")
    deployment.ok("db", "downgrade", "base")  # client revisions first: they depend on the schema
    engine = deployment.database.engine
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    # Downgrading the schema below the revision the client branch depends on takes it along.
    deployment.ok("db", "upgrade")
    deployment.ok("db", "downgrade", "0001")
    assert migration_status(engine, deployment.folder).clients.current == ()
    deployment.ok("db", "upgrade")
    assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
    assert deployment.client_row(client_id) is not None
    assert deployment.run("db", "check").exit_code == 0


def test_migrations_written_in_parallel_are_applied_and_merged(
    deployment: Deployment, tmp_path: Path
) -> None:
    """Two operators add a client in two branches of the deployment repository: two heads on
    the client branch, both applied; the next migration merges them."""
    deployment.add("--name", "Base", "--redirect-uri", LOOPBACK)
    other = tmp_path / "other-checkout"
    shutil.copytree(deployment.folder, other)
    settings = deployment.app.extensions["broker"].settings
    theirs = new_client(settings, name="Theirs", redirect_uris=[LOOPBACK])
    written = write_add_migration(other, theirs)
    ours = deployment.add("--name", "Ours", "--redirect-uri", LOOPBACK)["client_id"]
    shutil.copy(written.path, deployment.folder)  # the merge of the two repository branches

    status = migration_status(deployment.database.engine, deployment.folder)
    assert len(status.clients.heads) == 2
    deployment.ok("db", "upgrade")
    assert deployment.client_row(ours) and deployment.client_row(theirs.client_id)
    merged = Path(deployment.add("--name", "Next", "--redirect-uri", LOOPBACK)["migration"])
    assert all(head in merged.read_text() for head in status.clients.heads)
    deployment.ok("db", "upgrade")
    status = migration_status(deployment.database.engine, deployment.folder)
    assert len(status.clients.heads) == 1 and status.is_current


def test_a_failing_client_migration_leaves_nothing_behind(deployment: Deployment) -> None:
    # A row with the id exists already (created by hand, outside the migrations).
    with deployment.database.session() as session:
        session.add(
            Client(
                client_id="taken",
                kind="static",
                name="By hand",
                redirect_uris=[LOOPBACK],
                grant_types=["authorization_code"],
                response_types=["code"],
                token_endpoint_auth_method="none",
            )
        )
    first = deployment.add("--name", "Fine", "--redirect-uri", LOOPBACK)["client_id"]
    deployment.add(
        "--name", "Clash", "--redirect-uri", LOOPBACK, "--client-id", "taken", "--confidential"
    )
    failed = deployment.run("db", "upgrade")
    assert failed.exit_code == 1
    assert len(failed.stderr.strip().splitlines()) == 1
    assert failed.stderr.startswith("broker: database ")
    assert " refused a statement: " in failed.stderr
    assert "UNIQUE constraint failed" in failed.stderr or "duplicate key" in failed.stderr
    assert "hmac-sha256" not in failed.output and "[parameters" not in failed.output
    # One transaction: the first migration of the run is not applied either.
    assert deployment.client_row(first) is None
    assert migration_status(deployment.database.engine, deployment.folder).clients.current == ()


def test_a_broken_client_migration_file_is_named_in_one_line(deployment: Deployment) -> None:
    deployment.add("--name", "Fine", "--redirect-uri", LOOPBACK)
    broken = deployment.folder / "20990101_000000_edited.py"
    broken.write_text("revision = (\n")
    for args in (("db", "current"), ("db", "upgrade"), ("clients", "list")):
        result = deployment.run(*args)
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "a migration does not load" in lines[0], lines
        assert "20990101_000000_edited.py" in lines[0]
    broken.unlink()
    unknown = deployment.run("db", "downgrade", "nonexistent")
    assert unknown.exit_code == 1 and unknown.stderr.startswith("broker db downgrade: ")
    assert "nonexistent" in unknown.stderr and len(unknown.stderr.strip().splitlines()) == 1


# -- list and show --------------------------------------------------------------------------------


def _listed(deployment: Deployment, *args: str) -> list[dict[str, Any]]:
    result = deployment.run("clients", "list", "--json", *args)
    assert result.exit_code == 0, result.output
    listed: list[dict[str, Any]] = json.loads(result.stdout)
    return listed


def test_list_and_show_every_kind_of_client(deployment: Deployment) -> None:
    added = deployment.add("--name", "Static one", "--redirect-uri", LOOPBACK, "--confidential")
    static_id, secret = added["client_id"], added["client_secret"]
    deployment.ok("db", "upgrade")
    client = deployment.app.test_client()
    dcr = client.post(
        "/register",
        json={
            "client_name": "Registered",
            "redirect_uris": [LOOPBACK],
            "token_endpoint_auth_method": "client_secret_post",
        },
    ).json
    code, verifier = _code(client, dcr["client_id"])
    used = _redeem(
        client, code, verifier, client_id=dcr["client_id"], client_secret=dcr["client_secret"]
    )
    assert used.status_code == 200
    with deployment.database.session() as session:
        # A metadata-document client as /authorize stores it after fetching its document.
        session.add(
            Client(
                client_id="https://client.example.com/meta.json",
                kind="cimd",
                name="Document client",
                redirect_uris=["https://client.example.com/cb"],
                grant_types=["authorization_code", "refresh_token"],
                response_types=["code"],
                token_endpoint_auth_method="none",
            )
        )
        hashes = [r.secret_hash for r in session.scalars(select(Client)) if r.secret_hash]
    assert len(hashes) == 2

    listed = {c["client_id"]: c for c in _listed(deployment)}
    assert {c["kind"] for c in listed.values()} == {"static", "cimd", "dcr"}
    static, registered = listed[static_id], listed[dcr["client_id"]]
    assert static["name"] == "Static one" and static["redirect_uris"] == [LOOPBACK]
    assert static["token_endpoint_auth_method"] == "client_secret_basic"
    assert static["live_grants"] == 0 and static["last_used_at"] is None
    assert static["migration"] == added["migration"]
    assert registered["live_grants"] == 1 and registered["last_used_at"] is not None
    assert registered["token_endpoint_auth_method"] == "client_secret_post"
    assert listed["https://client.example.com/meta.json"]["kind"] == "cimd"
    assert [c["client_id"] for c in _listed(deployment, "--kind", "static")] == [static_id]

    table = deployment.run("clients", "list")
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["CLIENT", "ID", "KIND"]
    line = next(line for line in lines if line.startswith(dcr["client_id"]))
    assert re.search(
        r"\bdcr\s+Registered\s+client_secret_post\s+\d{4}-\d\d-\d\d .* UTC\s+1\s", line
    )

    shown = deployment.run("clients", "show", dcr["client_id"])
    assert shown.exit_code == 0
    assert "live grants:   1" in shown.stdout and "kind:          dcr" in shown.stdout
    static_shown = deployment.run("clients", "show", static_id)
    assert f"migration:     {added['migration']}" in static_shown.stdout
    missing = deployment.run("clients", "show", "nobody")
    assert missing.exit_code == 1 and missing.stderr == "broker clients show: no client nobody\n"

    everything = "".join(
        deployment.run(*args).output
        for args in (
            ("clients", "list"),
            ("clients", "list", "--json"),
            ("clients", "show", static_id),
            ("clients", "show", static_id, "--json"),
            ("clients", "show", dcr["client_id"], "--json"),
        )
    )
    for value in (secret, dcr["client_secret"], *hashes, "hmac-sha256", "argon2"):
        assert value not in everything


# -- validation ---------------------------------------------------------------------------------

VALID = ["--name", "Valid", "--redirect-uri", "https://app.example.com/cb"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (["--name", "  "], "--name: must not be blank"),
        (["--redirect-uri", "javascript:alert(1)"], "--redirect-uri javascript:alert(1): "),
        (["--redirect-uri", "http://evil.example.com/cb"], "--redirect-uri http://evil"),
        (["--redirect-uri", "https://app.example.com/cb#x"], "--redirect-uri https://app"),
        (["--provider", "nope"], "--provider nope: not a configured provider (configured: local)"),
        (["--resource", "https://nope.example.com/mcp"], "--resource https://nope.example.com"),
        (["--client-id", "mcp_abc"], "--client-id mcp_abc: the prefix mcp_ is for dynamic"),
        (["--client-id", "usr_abc"], "--client-id usr_abc: the prefix usr_ is for users'"),
        (["--client-id", "has space"], "--client-id has space: 1 to 128 characters"),
        (["--client-id", "https://x.example.com/c"], "--client-id https://x.example.com/c: "),
        (
            ["--grant", "client_credentials", "--resource", RESOURCE, "--scope", "demo:read"],
            "--grant client_credentials: only for a confidential client",
        ),
        (
            ["--grant", "password"],
            "--grant password: only client_credentials, token-exchange can be added",
        ),
        (["--scope", "demo:read"], "--scope: only with --grant client_credentials"),
        (["--trusted", "--redirect-uri", LOOPBACK], "--trusted: a public client with a loopback"),
        (
            ["--confidential", "--grant", "client_credentials", "--resource", RESOURCE],
            "--grant client_credentials: needs at least one --scope",
        ),
        (
            ["--confidential", "--grant", "client_credentials", "--scope", "demo:read"],
            "--grant client_credentials: needs at least one --resource",
        ),
        (
            [
                "--confidential",
                "--grant",
                "client_credentials",
                "--resource",
                RESOURCE,
                "--scope",
                "demo:read",
                "--scope",
                "nope:read",
            ],
            "--scope nope:read: not a scope of its --resource values",
        ),
        (
            [
                "--confidential",
                "--grant",
                "client_credentials",
                "--resource",
                RESOURCE,
                "--scope",
                "demo:write",
            ],
            f"--scope: {RESOURCE} requires demo:read in every token",
        ),
        (
            [
                "--confidential",
                "--grant",
                "client_credentials",
                "--resource",
                OTHER_RESOURCE,
                "--scope",
                "demo:read",
            ],
            "--scope demo:read: not a scope of its --resource values",
        ),
        (
            ["--confidential", "--grant", "token-exchange"],
            "--grant token-exchange: needs exactly one --resource",
        ),
        (
            ["--confidential", "--grant", "token-exchange", "--resource", RESOURCE],
            f"--grant token-exchange: resource {RESOURCE} lists no upstream_tokens",
        ),
    ],
)
def test_bad_options_are_refused_one_line_each_and_nothing_is_written(
    deployment: Deployment, change: list[str], expected: str
) -> None:
    assert deployment.run("clients", "add", *VALID, "--client-id", "control").exit_code == 0
    before = sorted(deployment.folder.iterdir())
    # The one change: another name, or options added to the valid ones.
    args = ["--name", change[1], *VALID[2:]] if change[0] == "--name" else [*VALID, *change]
    result = deployment.run("clients", "add", *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"broker clients add: {expected}"), lines[0]
    assert result.stdout == ""
    assert sorted(deployment.folder.iterdir()) == before


def test_a_client_id_is_added_once(deployment: Deployment) -> None:
    deployment.add(*VALID, "--client-id", "once")
    again = deployment.run("clients", "add", *VALID, "--client-id", "once")
    assert again.exit_code == 2
    assert again.stderr.startswith("broker clients add: --client-id once: already added by ")


# -- secrets ------------------------------------------------------------------------------------


def test_the_secret_is_printed_once_and_stored_nowhere_usable(
    deployment: Deployment, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    added = deployment.add("--name", "Agent", "--redirect-uri", LOOPBACK, "--confidential")
    client_id, secret = added["client_id"], added["client_secret"]
    assert len(secret) >= 43  # 256 bits, base64url
    migration = Path(added["migration"]).read_text()
    assert secret not in migration
    deployment.ok("db", "upgrade")
    deployment.ok("db", "current")
    client = deployment.app.test_client()
    code, verifier = _code(client, client_id)
    assert _redeem(client, code, verifier, auth=(client_id, secret)).status_code == 200
    assert secret not in caplog.text

    with deployment.database.engine.connect() as conn:
        dump = repr(conn.execute(text("SELECT * FROM clients")).all())
    assert secret not in dump
    row = deployment.client_row(client_id)
    assert row is not None and row.secret_hash is not None
    # The stored form is the fast salted HMAC, not argon2id, and it is what the migration holds.
    assert row.secret_hash.startswith("hmac-sha256$") and "argon2" not in row.secret_hash
    assert row.secret_hash in migration
    assert defined_clients(deployment.folder)[client_id].row["secret_hash"] == row.secret_hash


def test_client_secret_hash_verifies_in_its_own_format_and_argon2_still_works() -> None:
    secret = "s" * 43
    hashed = hash_client_secret(secret)
    scheme, salt, digest = hashed.split("$")
    assert scheme == "hmac-sha256" and len(salt) == 22 and len(digest) == 43
    assert verify_password(hashed, secret)
    assert not verify_password(hashed, secret + "x")
    assert hash_client_secret(secret) != hashed  # a random salt per secret
    for broken in (
        hashed.replace("hmac-sha256", "hmac-sha1"),
        f"hmac-sha256${salt}$",
        f"hmac-sha256$${digest}",
        f"hmac-sha256${salt}${digest[:-2]}",
        f"hmac-sha256$!!${digest}",
        "hmac-sha256$",
    ):
        assert not verify_password(broken, secret), broken
    old = hash_password(secret)  # argon2id, as dynamic registration stored secrets until now
    assert old.startswith("$argon2id$") and verify_password(old, secret)
    assert not verify_password(old, secret + "x")
