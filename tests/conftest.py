"""Fixtures: a broker app on SQLite and on PostgreSQL, its test client, users, clients."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask import Flask
from flask.testing import FlaskClient

from broker import create_app
from broker.config import Settings, parse
from broker.db import Database
from broker.migrate import upgrade
from providers.local import hash_password
from tests.support import OTHER_RESOURCE, RESOURCE, pkce, unavailable

POSTGRES_URL = os.environ.get(
    "BROKER_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
PASSWORDS = {"alice": "alice-password", "bob": "bob-password", "carol": "carol-password"}


@pytest.fixture(scope="session")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("users") / "users.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "users": {
                    "alice": {
                        "password_hash": hash_password(PASSWORDS["alice"]),
                        "name": "Alice",
                        "email": "alice@example.com",
                        "groups": ["staff"],
                    },
                    "bob": {
                        "password_hash": hash_password(PASSWORDS["bob"]),
                        "email": "bob@example.com",
                        "groups": ["staff", "platform"],
                    },
                    "carol": {
                        "password_hash": hash_password(PASSWORDS["carol"]),
                        "email": "carol@contractor.example",
                        "groups": ["contractors"],
                    },
                }
            }
        )
    )
    return path


def postgres_available() -> bool:
    import psycopg

    try:
        with psycopg.connect(POSTGRES_URL.replace("+psycopg", ""), connect_timeout=3):
            return True
    except psycopg.Error:
        return False


@pytest.fixture(scope="session")
def _postgres_ok() -> bool:
    return postgres_available()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(
    request: pytest.FixtureRequest, tmp_path: Path, _postgres_ok: bool
) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a PostgreSQL schema of its own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'broker.db'}"
        return
    if not _postgres_ok:
        unavailable(f"PostgreSQL is not reachable at {POSTGRES_URL}")
    import psycopg

    schema = "t_" + secrets.token_hex(6)
    plain = POSTGRES_URL.replace("+psycopg", "")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def make_settings(database_url: str, users_file: Path, tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        data: dict[str, Any] = {
            "issuer": "http://127.0.0.1:8000",
            "secret_key": "test-secret-" + "x" * 40,
            "database_url": database_url,
            "instance_path": str(tmp_path / "instance"),
            "providers": {"local": {"users_file": str(users_file)}},
            "resources": [
                {
                    "uri": RESOURCE,
                    "name": "Demo tools",
                    "scopes": {"demo:read": "Read demo data", "demo:write": "Change demo data"},
                    "required_scopes": ["demo:read"],
                },
                {
                    "uri": OTHER_RESOURCE,
                    "name": "Other tools",
                    "scopes": {"other:read": "Read other data"},
                },
            ],
        }
        data.update(overrides)
        return parse(data, env={}, base_dir=str(tmp_path), testing=True)

    return make


@pytest.fixture
def make_app(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., Flask]]:
    apps: list[Flask] = []

    def make(**overrides: Any) -> Flask:
        settings = make_settings(**overrides)
        database = Database(settings.database_url)
        upgrade(database.engine, client_migrations=settings.client_migrations)
        database.dispose()
        app = create_app(settings)
        app.config["TESTING"] = True
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["broker"].db.dispose()
        app.extensions["broker"].http.close()


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def registered(client: FlaskClient) -> dict[str, Any]:
    """A public client registered through DCR, as the MCP SDK registers."""
    response = client.post(
        "/register",
        json={
            "client_name": "Test client",
            "redirect_uris": ["http://127.0.0.1/callback", "https://app.example.com/cb"],
            "token_endpoint_auth_method": "none",
            "grant_types": ["authorization_code", "refresh_token"],
            "application_type": "native",
        },
    )
    assert response.status_code == 201, response.json
    return dict(response.json)


@pytest.fixture
def pkce_pair() -> tuple[str, str]:
    return pkce()
