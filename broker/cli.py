"""The ``broker`` command (a Flask CLI group)."""

from __future__ import annotations

import contextlib
import getpass
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import click
from flask import Flask

from .config import ENV_CONFIG, ConfigError
from .config import load as load_config


def _app(ctx: click.Context, *, check_schema: bool = True) -> Flask:
    from . import create_app

    path = ctx.find_root().params.get("config") or os.environ.get(ENV_CONFIG)
    try:
        return create_app(path, check_schema=check_schema)
    except ConfigError as exc:
        _fail(exc)


def _fail(exc: ConfigError) -> NoReturn:
    click.echo("broker: invalid configuration", err=True)
    for problem in exc.problems:
        click.echo(f"  {problem}", err=True)
    sys.exit(2)


@click.group()
@click.option(
    "--config",
    "-c",
    type=click.Path(dir_okay=False),
    envvar=ENV_CONFIG,
    help=f"Path to broker.yaml (default: ${ENV_CONFIG}).",
)
def main(config: str | None) -> None:
    """The MCP identity broker."""


@main.command("check-config")
@click.pass_context
def check_config(ctx: click.Context) -> None:
    """Validate the configuration and the provider plugins, then exit."""
    app = _app(ctx, check_schema=False)
    settings = app.extensions["broker"].settings
    _close(app)
    click.echo(
        f"configuration ok: issuer {settings.issuer}, "
        f"{len(settings.providers)} provider(s), {len(settings.resources)} resource(s)"
    )


@main.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.pass_context
def serve(ctx: click.Context, host: str, port: int) -> None:
    """Run the development server (use gunicorn in production)."""
    from .devserver import serve as run

    run(_app(ctx), host, port)


@main.command("demo")
@click.option(
    "--dir",
    "directory",
    default="instance/demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the demo keeps its files.",
)
@click.option("--port", default=8000, show_default=True, type=int, help="Broker port.")
@click.option("--mcp-port", default=8001, show_default=True, type=int, help="Demo MCP server port.")
def demo(directory: str, port: int, mcp_port: int) -> None:
    """Run the broker (SQLite, local provider, a demo user) and a demo MCP server it protects."""
    from .demo import run_demo

    run_demo(Path(directory), port=port, mcp_port=mcp_port)


@main.command("purge")
@click.option(
    "--audit-days",
    type=click.IntRange(min=1),
    default=None,
    help="Also delete audit events older than this many days (default: keep all).",
)
@click.pass_context
def purge_cmd(ctx: click.Context, audit_days: int | None) -> None:
    """Delete expired sign-ins, codes, tokens, sessions, grants and unused registrations."""
    from .purge import purge

    settings = _settings(ctx)
    with _database(ctx) as database, database.session() as session:
        result = purge(session, access_ttl=settings.tokens.access_ttl, audit_days=audit_days)
    for name, count in sorted(result.counts.items()):
        click.echo(f"{name:22} {count}")
    click.echo(f"{'total':22} {result.total()}")


@main.command("hash-password")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def hash_password_cmd(password_stdin: bool) -> None:
    """Print an argon2id hash for a users file of the local provider."""
    from providers.local import hash_password

    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise click.ClickException("the passwords differ")
    if not password:
        raise click.ClickException("empty password")
    click.echo(hash_password(password))


@main.group("db")
def db() -> None:
    """Database schema (Alembic migrations)."""


@db.command("upgrade")
@click.argument("revision", default="head")
@click.pass_context
def db_upgrade(ctx: click.Context, revision: str) -> None:
    """Upgrade the schema (default: to the newest revision)."""
    from .migrate import current_revision, upgrade

    with _database(ctx) as database:
        upgrade(database.engine, revision)
        click.echo(f"database at revision {current_revision(database.engine)}")


@db.command("downgrade")
@click.argument("revision")
@click.pass_context
def db_downgrade(ctx: click.Context, revision: str) -> None:
    """Downgrade the schema to REVISION (``base`` removes every table)."""
    from .migrate import current_revision, downgrade

    with _database(ctx) as database:
        downgrade(database.engine, revision)
        click.echo(f"database at revision {current_revision(database.engine)}")


@db.command("current")
@click.pass_context
def db_current(ctx: click.Context) -> None:
    """Print the schema revision of the database and of this release."""
    from .migrate import current_revision, head_revision

    with _database(ctx) as database:
        current, head = current_revision(database.engine), head_revision(database.engine)
    click.echo(f"current: {current or 'none'}\nhead:    {head}")
    if current != head:
        sys.exit(1)


@db.command("check")
@click.pass_context
def db_check(ctx: click.Context) -> None:
    """Exit non-zero when the database is not at head or the models and migrations differ."""
    from alembic.util import AutogenerateDiffsDetected, CommandError

    from .migrate import check

    with _database(ctx) as database:
        try:
            check(database.engine)
        except (AutogenerateDiffsDetected, CommandError) as exc:
            click.echo(f"schema check failed: {exc}", err=True)
            sys.exit(1)
    click.echo("schema ok")


@main.group("keys")
def keys() -> None:
    """Signing keys."""


@keys.command("list")
@click.pass_context
def keys_list(ctx: click.Context) -> None:
    """List signing keys (never the private parts)."""
    app = _app(ctx)
    broker = app.extensions["broker"]
    with broker.db.session() as session:
        rows = broker.keys.public_keys(session)
    _close(app)
    for row in rows:
        click.echo(
            f"{row.kid}  {row.alg:6}  {row.state:8}  created {row.created_at:%Y-%m-%d %H:%M}"
        )


@contextlib.contextmanager
def _database(ctx: click.Context) -> Iterator[Any]:
    from .db import Database

    database = Database(_settings(ctx).database_url)
    try:
        yield database
    finally:
        database.dispose()


def _close(app: Flask) -> None:
    broker = app.extensions["broker"]
    broker.db.dispose()
    broker.http.close()


def _settings(ctx: click.Context) -> Any:
    path = ctx.find_root().params.get("config") or os.environ.get(ENV_CONFIG)
    try:
        return load_config(path)
    except ConfigError as exc:
        _fail(exc)


def init_app(app: Flask) -> None:
    """Make the broker's groups available as ``flask --app wsgi broker ...`` too."""
    app.cli.add_command(main, "broker")
