"""The ``broker`` command and the Alembic migrations, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import yaml
from click.testing import CliRunner
from sqlalchemy import inspect

from broker.cli import main
from broker.db import Database
from broker.migrate import check, current_revision, downgrade, head_revision, upgrade
from broker.models import Base
from providers.local import verify_password


def _config(tmp_path: Path, database_url: str, users_file: Path) -> Path:
    path = tmp_path / "broker.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "issuer": "http://127.0.0.1:8000",
                "secret_key": "${SECRET:-" + "c" * 40 + "}",
                "database_url": database_url,
                "providers": {"local": {"users_file": str(users_file)}},
                "resources": [
                    {"uri": "http://127.0.0.1:8001/mcp", "scopes": {"demo:read": "Read"}}
                ],
            }
        )
    )
    return path


def test_upgrade_check_downgrade_upgrade(database_url: str) -> None:
    database = Database(database_url)
    try:
        upgrade(database.engine)
        assert current_revision(database.engine) == head_revision(database.engine)
        check(database.engine)  # models and migrations agree: no drift
        tables = set(inspect(database.engine).get_table_names())
        assert set(Base.metadata.tables) <= tables
        downgrade(database.engine, "base")
        assert set(inspect(database.engine).get_table_names()) <= {"alembic_version"}
        upgrade(database.engine)
        check(database.engine)
    finally:
        database.dispose()


def test_cli_db_commands(tmp_path: Path, database_url: str, users_file: Path) -> None:
    config = str(_config(tmp_path, database_url, users_file))
    runner = CliRunner()
    current = runner.invoke(main, ["--config", config, "db", "current"])
    assert current.exit_code == 1 and "current: none" in current.output
    failed_check = runner.invoke(main, ["--config", config, "db", "check"])
    assert failed_check.exit_code == 1
    upgraded = runner.invoke(main, ["--config", config, "db", "upgrade"])
    assert upgraded.exit_code == 0, upgraded.output
    assert runner.invoke(main, ["--config", config, "db", "current"]).exit_code == 0
    checked = runner.invoke(main, ["--config", config, "db", "check"])
    assert checked.exit_code == 0 and "schema ok" in checked.output
    keys = runner.invoke(main, ["--config", config, "keys", "list"])
    assert keys.exit_code == 0 and "ES256" in keys.output and "active" in keys.output
    ok = runner.invoke(main, ["--config", config, "check-config"])
    assert ok.exit_code == 0 and "configuration ok" in ok.output
    down = runner.invoke(main, ["--config", config, "db", "downgrade", "base"])
    assert down.exit_code == 0, down.output


def test_cli_reports_config_problems(tmp_path: Path) -> None:
    path = tmp_path / "broker.yaml"
    path.write_text("issuer: https://sso.example.com/\nproviders: {}\n")
    result = CliRunner().invoke(main, ["--config", str(path), "check-config"])
    assert result.exit_code == 2
    assert "issuer: must not end with a slash" in result.output
    assert "secret_key: required" in result.output


def test_hash_password() -> None:
    result = CliRunner().invoke(main, ["hash-password", "--password-stdin"], input="s3cret\n")
    assert result.exit_code == 0
    assert verify_password(result.output.strip(), "s3cret")
    empty = CliRunner().invoke(main, ["hash-password", "--password-stdin"], input="\n")
    assert empty.exit_code != 0
