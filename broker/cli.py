"""The ``broker`` command (a Flask CLI group)."""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
from flask import Flask

from .config import ENV_CONFIG, ConfigError
from .config import load as load_config
from .failures import describe
from .login_cli import login

if TYPE_CHECKING:
    from .migrate import BranchStatus


def _app(ctx: click.Context, *, check_schema: bool = True) -> Flask:
    from . import create_app

    settings = _settings(ctx)
    try:
        return create_app(settings, check_schema=check_schema)
    except ConfigError as exc:
        _fail(exc)


def _fail(exc: ConfigError) -> NoReturn:
    click.echo("broker: invalid configuration", err=True)
    for problem in exc.problems:
        click.echo(f"  {problem}", err=True)
    sys.exit(2)


class BrokerGroup(click.Group):
    """The ``broker`` command: an expected failure (the database unreachable, Redis refusing, a
    port taken) ends in one line naming what, where and why, and exit status 1; anything else
    in one line too, with the hint that ``--debug`` shows the traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except Exception as exc:
            if ctx.params.get("debug"):
                raise
            settings = ctx.meta.get(_SETTINGS)
            line = describe(
                exc,
                database_url=getattr(settings, "database_url", None),
                redis_url=getattr(settings, "redis_url", None),
            )
            if line is None:
                cause = " ".join(str(exc).split())[:300]
                line = f"unexpected {type(exc).__name__}: {cause} (--debug shows the traceback)"
            click.echo(f"broker: {line}", err=True)
            sys.exit(1)


_SETTINGS = "broker.settings"


@click.group(cls=BrokerGroup)
@click.option(
    "--config",
    "-c",
    type=click.Path(dir_okay=False),
    envvar=ENV_CONFIG,
    help=f"Path to broker.yaml (default: ${ENV_CONFIG}).",
)
@click.option("--debug", is_flag=True, help="On a failure, print the full traceback.")
def main(config: str | None, debug: bool) -> None:
    """The MCP identity broker."""


@main.command("check-config")
@click.option(
    "--connect",
    is_flag=True,
    help="Also check the database (reachable, at head, keys open), Redis, and every provider.",
)
@click.pass_context
def check_config(ctx: click.Context, connect: bool) -> None:
    """Validate the configuration and the provider plugins without writing anything; with
    --connect, check what it points at, one line per check."""
    from .plugins import ProviderRegistry, plugin_manager

    settings = _settings(ctx)
    try:
        registry = ProviderRegistry.for_settings(plugin_manager(), settings)
    except ConfigError as exc:
        _fail(exc)
    click.echo(
        f"configuration ok: issuer {settings.issuer}, "
        f"{len(settings.providers)} provider(s), {len(settings.resources)} resource(s)"
    )
    if not connect:
        return
    from . import checks

    results = checks.run(settings, registry)
    for result in results:
        click.echo(result.line(), err=not result.ok)
    failed = sum(not r.ok for r in results)
    if failed:
        click.echo(f"broker check-config: {failed} check(s) failed", err=True)
        sys.exit(1)


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
    from .demo import PortTaken, run_demo

    try:
        run_demo(Path(directory), port=port, mcp_port=mcp_port)
    except PortTaken as exc:
        click.echo(f"broker demo: {exc}", err=True)
        sys.exit(1)


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
@click.argument("revision", default="heads")
@click.pass_context
def db_upgrade(ctx: click.Context, revision: str) -> None:
    """Upgrade the schema and apply the client migrations (default: every head)."""
    from .migrate import migration_status, upgrade

    settings = _settings(ctx)
    with _database(ctx, settings) as database, _migration_errors("db upgrade"):
        upgrade(database.engine, revision, client_migrations=settings.client_migrations)
        status = migration_status(database.engine, settings.client_migrations)
    click.echo(f"database at revision {_revisions(status.current)}")


@db.command("downgrade")
@click.argument("revision")
@click.pass_context
def db_downgrade(ctx: click.Context, revision: str) -> None:
    """Downgrade to REVISION (``base`` removes every table, ``clients@-1`` one client migration)."""
    from .migrate import downgrade, migration_status

    settings = _settings(ctx)
    with _database(ctx, settings) as database, _migration_errors("db downgrade"):
        downgrade(database.engine, revision, client_migrations=settings.client_migrations)
        status = migration_status(database.engine, settings.client_migrations)
    click.echo(f"database at revision {_revisions(status.current)}")


@db.command("current")
@click.pass_context
def db_current(ctx: click.Context) -> None:
    """Print the revisions of the database and of the migrations here, per branch."""
    from .migrate import migration_status

    settings = _settings(ctx)
    with _database(ctx, settings) as database, _migration_errors("db current"):
        status = migration_status(database.engine, settings.client_migrations)
    click.echo(f"current: {_revisions(status.current)}\nhead:    {_revisions(status.heads)}")
    click.echo(f"schema:  {_branch(status.schema)}")
    click.echo(f"clients: {_branch(status.clients)} ({status.client_migrations})")
    for problem in status.problems:
        click.echo(f"broker db current: {problem}", err=True)
    if status.problems:
        sys.exit(1)


@db.command("check")
@click.pass_context
def db_check(ctx: click.Context) -> None:
    """Exit non-zero when the database is not at every head or the models and migrations
    differ."""
    from alembic.util import AutogenerateDiffsDetected

    from .migrate import check, migration_status

    settings = _settings(ctx)
    with _database(ctx, settings) as database, _migration_errors("db check"):
        status = migration_status(database.engine, settings.client_migrations)
        for problem in status.problems:
            click.echo(f"schema check failed: {problem}", err=True)
        if status.problems:
            sys.exit(1)
        try:
            check(database.engine, client_migrations=settings.client_migrations)
        except AutogenerateDiffsDetected as exc:
            click.echo(f"schema check failed: {exc}", err=True)
            sys.exit(1)
    applied = status.clients.current
    click.echo("schema ok" + (f", client migrations at {_revisions(applied)}" if applied else ""))


def _revisions(revisions: tuple[str, ...]) -> str:
    return " ".join(revisions) or "none"


def _branch(branch: BranchStatus) -> str:
    state = "up to date" if branch.is_current else f"{branch.pending} not applied"
    return f"{_revisions(branch.current)} (head {_revisions(branch.heads)}, {state})"


@contextlib.contextmanager
def _migration_errors(command: str) -> Iterator[None]:
    """A failing migration command explains itself in one line (its transaction is rolled
    back); a database error is said by :class:`BrokerGroup`, without the SQL parameters, which
    may hold a secret's hash."""
    from alembic.util import CommandError

    try:
        yield
    except CommandError as exc:
        click.echo(f"broker {command}: {exc}", err=True)
        sys.exit(1)
    except (SyntaxError, ImportError) as exc:  # a client migration that does not load
        click.echo(f"broker {command}: a migration does not load: {exc}", err=True)
        sys.exit(1)


@main.group("clients")
def clients() -> None:
    """Static clients (written as migrations) and every client the database holds."""


@clients.command("add")
@click.option("--name", required=True, help="Shown on the consent page.")
@click.option("--redirect-uri", "redirect_uris", multiple=True, required=True, help="Repeatable.")
@click.option("--confidential", is_flag=True, help="Generate a secret (client_secret_basic/post).")
@click.option("--provider", "providers", multiple=True, help="Allowed provider (default: all).")
@click.option("--resource", "resources", multiple=True, help="Allowed resource (default: all).")
@click.option("--client-id", help="Default: derived from the name, with a random suffix.")
@click.option("--trusted", is_flag=True, help="First-party: no consent screen.")
@click.option(
    "--grant",
    "grants",
    multiple=True,
    help="Extra grant type (confidential clients): client_credentials, or token-exchange for "
    "an MCP server's own client (with its one --resource).",
)
@click.option("--scope", "scopes", multiple=True, help="Scope for client_credentials (repeatable).")
@click.pass_context
def clients_add(
    ctx: click.Context,
    name: str,
    redirect_uris: tuple[str, ...],
    confidential: bool,
    providers: tuple[str, ...],
    resources: tuple[str, ...],
    client_id: str | None,
    trusted: bool,
    grants: tuple[str, ...],
    scopes: tuple[str, ...],
) -> None:
    """Write the migration that adds a static client; print its id (and secret, once)."""
    from .static_clients import defined_clients, new_client, write_add_migration

    settings = _settings(ctx)
    with _client_errors("add"):
        client = new_client(
            settings,
            name=name,
            redirect_uris=redirect_uris,
            confidential=confidential,
            providers=providers,
            resources=resources,
            client_id=client_id,
            trusted=trusted,
            grants=grants,
            scopes=scopes,
            defined=defined_clients(settings.client_migrations),
        )
        written = write_add_migration(settings.client_migrations, client)
    click.echo(f"client_id:     {client.client_id}")
    if client.secret is not None:
        click.echo(f"client_secret: {client.secret}")
    click.echo(f"migration:     {written.path}")
    if client.secret is not None:
        click.echo("The secret is shown only now; the migration holds only its hash.")
    click.echo("Review it, commit it to the deployment repository, then run `broker db upgrade`.")


@clients.command("remove")
@click.argument("client_id")
@click.pass_context
def clients_remove(ctx: click.Context, client_id: str) -> None:
    """Write the migration that deletes a static client and ends its grants."""
    from .static_clients import write_remove_migration

    settings = _settings(ctx)
    with _client_errors("remove"):
        written = write_remove_migration(settings.client_migrations, client_id)
    click.echo(f"migration:     {written.path}")
    click.echo(
        "Review it, commit it to the deployment repository, then run `broker db upgrade` "
        "(it revokes the client's grants)."
    )


@clients.command("list")
@click.option(
    "--kind", type=click.Choice(["static", "cimd", "dcr"]), help="Only clients of this kind."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def clients_list(ctx: click.Context, kind: str | None, as_json: bool) -> None:
    """List clients: kind, name, auth method, last use, live grants, redirect URIs."""
    from .static_clients import render_table

    summaries = _client_summaries(ctx, kind=kind)
    if as_json:
        click.echo(json.dumps([c.as_json() for c in summaries], indent=2))
    else:
        click.echo(render_table(summaries))


@clients.command("show")
@click.argument("client_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def clients_show(ctx: click.Context, client_id: str, as_json: bool) -> None:
    """Show one client (never its secret)."""
    from .static_clients import render_details

    summaries = _client_summaries(ctx, client_id=client_id)
    if not summaries:
        click.echo(f"broker clients show: no client {client_id}", err=True)
        sys.exit(1)
    click.echo(
        json.dumps(summaries[0].as_json(), indent=2) if as_json else render_details(summaries[0])
    )


def _client_summaries(ctx: click.Context, **where: Any) -> list[Any]:
    from .migrate import migration_status
    from .static_clients import client_summaries, defined_clients

    settings = _settings(ctx)
    with _database(ctx, settings) as database, _migration_errors("clients"):
        schema = migration_status(database.engine, settings.client_migrations)
        if schema.unknown or not schema.schema.is_current:
            for problem in schema.problems:
                click.echo(f"broker clients: {problem}", err=True)
            sys.exit(1)
        with _client_errors("list"):
            defined = defined_clients(settings.client_migrations)
        with database.read() as session:
            return client_summaries(session, defined=defined, **where)


@contextlib.contextmanager
def _client_errors(command: str) -> Iterator[None]:
    from alembic.util import CommandError

    from .static_clients import ClientOptionError

    try:
        yield
    except ClientOptionError as exc:
        for problem in exc.problems:
            click.echo(f"broker clients {command}: {problem}", err=True)
        sys.exit(2)
    except (CommandError, OSError) as exc:  # an unreadable client_migrations folder
        click.echo(f"broker clients {command}: {exc}", err=True)
        sys.exit(1)
    except (SyntaxError, ImportError) as exc:  # a client migration that does not load
        click.echo(f"broker clients {command}: a migration does not load: {exc}", err=True)
        sys.exit(1)


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


@keys.command("rotate")
@click.option("--force", is_flag=True, help="Activate the next key even if it was just published.")
@click.pass_context
def keys_rotate(ctx: click.Context, force: bool) -> None:
    """Activate the published next key, retire the active one, publish a new next key."""
    from .keys import RotationRefused

    app = _app(ctx)
    broker = app.extensions["broker"]
    try:
        with broker.db.session() as session:
            rotation = broker.keys.rotate(session, force=force)
    except RotationRefused as exc:
        _close(app)
        click.echo(f"broker keys rotate: {exc}", err=True)
        sys.exit(1)
    _close(app)
    click.echo(f"active: {rotation.active}")
    if rotation.retired:
        until = f"{rotation.retired_until:%Y-%m-%d %H:%M:%S} UTC" if rotation.retired_until else ""
        click.echo(f"retired: {rotation.retired} (in the JWKS until {until})")
    click.echo(f"next: {rotation.next}")


@keys.command("reseal")
@click.option("--dry-run", is_flag=True, help="Count what would be re-sealed; change nothing.")
@click.option(
    "--discard-unreadable",
    is_flag=True,
    help="The old secret is lost: retire signing keys and delete upstream tokens and sign-ins "
    "that no configured secret opens (their users sign in again).",
)
@click.pass_context
def keys_reseal(ctx: click.Context, dry_run: bool, discard_unreadable: bool) -> None:
    """Seal every sealed value again under secret_key, so previous_secret_keys can be emptied."""
    from . import create_app
    from .keys import reseal

    path = ctx.find_root().params.get("config") or os.environ.get(ENV_CONFIG)
    try:
        # --discard-unreadable is what repairs a database the start-up check refuses.
        app = create_app(path, check_keys=not discard_unreadable)
    except ConfigError as exc:
        _fail(exc)
    broker = app.extensions["broker"]
    try:
        counts = reseal(
            broker.db, broker.keys, dry_run=dry_run, discard_unreadable=discard_unreadable
        )
    finally:
        _close(app)
    verb = "would re-seal" if dry_run else "re-sealed"
    for count in counts:
        line = f"{count.table}: {count.resealed} {verb}, {count.current} already current"
        line += f", {count.unreadable} open with no key"
        if count.discarded:
            line += f" ({count.discarded} discarded)"
        if count.left:
            line += f", {count.left} still under a previous secret"
        click.echo(line)
    left = sum(count.left for count in counts)
    kept = sum(count.unreadable - count.discarded for count in counts)
    if dry_run:
        return
    if left:
        click.echo(f"broker keys reseal: {left} row(s) were in use; run it again", err=True)
        sys.exit(1)
    if kept and not discard_unreadable:
        click.echo(
            f"{kept} row(s) open with no configured secret and were left alone "
            "(--discard-unreadable drops them)"
        )
    click.echo("every readable value is sealed under secret_key: previous_secret_keys can go")


@contextlib.contextmanager
def _session(ctx: click.Context) -> Iterator[Any]:
    """One transaction of the configured broker's database (committed when the command ends)."""
    app = _app(ctx)
    try:
        with app.extensions["broker"].db.session() as session:
            yield session
    finally:
        _close(app)


def _echo(rows: Any, as_json: bool, line: Any) -> None:
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    for row in rows:
        click.echo(line(row))


def _user_or_exit(session: Any, ref: str) -> Any:
    from .admin import NotFound, find_user

    try:
        return find_user(session, ref)
    except NotFound as exc:
        click.echo(f"broker: {exc}", err=True)
        sys.exit(1)


def _actor() -> str:
    return f"cli:{getpass.getuser()}"


@main.group("users")
def users() -> None:
    """Users: list, show, disable, enable, revoke (effective at the next request)."""


@users.command("list")
@click.option("--provider", help="Only users with an identity at this provider.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def users_list(ctx: click.Context, provider: str | None, as_json: bool) -> None:
    """List users with their identities and live grants."""
    from dataclasses import asdict

    from .admin import list_users

    with _session(ctx) as session:
        rows = [asdict(user) for user in list_users(session, provider=provider)]

    def line(row: dict[str, Any]) -> str:
        who = ", ".join(
            f"{i['provider']}:{i.get('email') or i.get('username') or i['subject']}"
            for i in row["identities"]
        )
        state = "disabled" if row["disabled"] else "active"
        return f"{row['id']}  {state:8}  grants {row['live_grants']:<3}  {who}"

    _echo(rows, as_json, line)


@users.command("show")
@click.argument("user")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def users_show(ctx: click.Context, user: str, as_json: bool) -> None:
    """One user (by id, provider:subject or email) with identities and live grants."""
    from dataclasses import asdict

    from .admin import list_grants, summary

    with _session(ctx) as session:
        found = _user_or_exit(session, user)
        data = asdict(summary(session, found)) | {"grants": list_grants(session, user_id=found.id)}
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    click.echo(f"user: {data['id']} ({'disabled' if data['disabled'] else 'active'})")
    for identity in data["identities"]:
        click.echo(
            f"identity: {identity['provider']}:{identity['subject']} {identity['email'] or ''}"
        )
    for grant in data["grants"]:
        click.echo(
            f"grant: {grant['id']} {grant['client_id']} {grant['resource']} [{grant['scope']}]"
        )


def _set_disabled(ctx: click.Context, user: str, disabled: bool) -> None:
    from .admin import set_disabled

    with _session(ctx) as session:
        found = _user_or_exit(session, user)
        changed = set_disabled(session, found, disabled, actor=_actor())
    word = "disabled" if disabled else "enabled"
    click.echo(f"{found.id}: {word}" if changed else f"{found.id}: already {word}")


@users.command("disable")
@click.argument("user")
@click.pass_context
def users_disable(ctx: click.Context, user: str) -> None:
    """Refuse the user's refreshes and sign-ins, and end their broker sessions."""
    _set_disabled(ctx, user, True)


@users.command("enable")
@click.argument("user")
@click.pass_context
def users_enable(ctx: click.Context, user: str) -> None:
    """Let a disabled user sign in again (revoked grants stay revoked)."""
    _set_disabled(ctx, user, False)


@users.command("revoke")
@click.argument("user")
@click.pass_context
def users_revoke(ctx: click.Context, user: str) -> None:
    """Revoke everything the user holds: grants, consents, broker sessions."""
    from .admin import revoke_user

    with _session(ctx) as session:
        found = _user_or_exit(session, user)
        ids = revoke_user(session, found, actor=_actor())
    click.echo(f"{found.id}: {len(ids)} grant(s) revoked, consents and sessions ended")


def _grant_filters(
    ctx: click.Context, session: Any, user: str | None, client: str | None, resource: str | None
) -> dict[str, str | None]:
    return {
        "user_id": _user_or_exit(session, user).id if user else None,
        "client_id": client,
        "resource": resource,
    }


@main.group("grants")
def grants() -> None:
    """Grants (a user's access for one client and resource): list, revoke."""


@grants.command("list")
@click.option("--user")
@click.option("--client")
@click.option("--resource")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def grants_list(
    ctx: click.Context, user: str | None, client: str | None, resource: str | None, as_json: bool
) -> None:
    """Live grants, by user, client or resource."""
    from .admin import list_grants

    with _session(ctx) as session:
        rows = list_grants(session, **_grant_filters(ctx, session, user, client, resource))
    _echo(
        rows,
        as_json,
        lambda g: f"{g['id']}  {g['user_id']}  {g['client_id']}  {g['resource']}  [{g['scope']}]",
    )


@grants.command("revoke")
@click.argument("grant_id", required=False)
@click.option("--user")
@click.option("--client")
@click.option("--resource")
@click.pass_context
def grants_revoke(
    ctx: click.Context,
    grant_id: str | None,
    user: str | None,
    client: str | None,
    resource: str | None,
) -> None:
    """Revoke one grant, or every live grant of a user, client or resource."""
    from .admin import revoke_grants

    if not (grant_id or user or client or resource):
        click.echo(
            "broker grants revoke: name a grant id, --user, --client or --resource", err=True
        )
        sys.exit(2)
    with _session(ctx) as session:
        filters = _grant_filters(ctx, session, user, client, resource)
        ids = revoke_grants(
            session,
            actor=_actor(),
            grant_id=grant_id,
            user_id=filters["user_id"],
            client_id=client,
            resource=resource,
        )
    click.echo(f"{len(ids)} grant(s) revoked")


@main.command("audit")
@click.option("--user")
@click.option("--client")
@click.option("--type", "event_type", help="login, consent, issue, refresh, revoke, deny, ...")
@click.option("--since", help="ISO date or time (UTC), e.g. 2026-12-01 or 2026-12-01T08:00.")
@click.option("--limit", type=int, default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def audit_cmd(
    ctx: click.Context,
    user: str | None,
    client: str | None,
    event_type: str | None,
    since: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """The audit trail, newest first."""
    import datetime as dt

    from sqlalchemy import select

    from .audit import as_dict
    from .models import AuditEvent

    query = select(AuditEvent).order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(limit)
    if since:
        try:
            start = dt.datetime.fromisoformat(since)
        except ValueError:
            click.echo(f"broker audit: --since {since}: not an ISO date or time", err=True)
            sys.exit(2)
        query = query.where(AuditEvent.at >= start.replace(tzinfo=start.tzinfo or dt.UTC))
    with _session(ctx) as session:
        if user:
            query = query.where(AuditEvent.user_id == _user_or_exit(session, user).id)
        if client:
            query = query.where(AuditEvent.client_id == client)
        if event_type:
            query = query.where(AuditEvent.type == event_type)
        rows = [as_dict(row) for row in session.scalars(query)]
    for row in rows:
        if as_json:
            click.echo(json.dumps(row, sort_keys=True, default=str))
        else:
            who = row["user_id"] or row["actor"] or "-"
            click.echo(
                f"{row['at']}  {row['type']:8} {row['outcome']:8} {who}  "
                f"{row['client_id'] or '-'}  {row['reason'] or ''}"
            )


@contextlib.contextmanager
def _database(ctx: click.Context, settings: Any = None) -> Iterator[Any]:
    from .db import Database

    database = Database((settings or _settings(ctx)).database_url)
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
        settings = load_config(path)
    except ConfigError as exc:
        _fail(exc)
    ctx.meta[_SETTINGS] = settings  # for the one-line failure of what it points at
    return settings


def init_app(app: Flask) -> None:
    """Make the broker's groups available as ``flask --app wsgi broker ...`` too."""
    app.cli.add_command(main, "broker")


@main.command("explain")
@click.option(
    "--identity",
    "identity_file",
    type=click.Path(dir_okay=False),
    help="A YAML or JSON file describing the identity (the shape of a stored snapshot).",
)
@click.option("--user", help="A user already signed in: id, provider:subject or email.")
@click.option("--resource", "resource_uri", required=True, help="A configured resource's URI.")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    help="A scope the client asks (repeatable or space-separated; default: every scope).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def explain_cmd(
    ctx: click.Context,
    identity_file: str | None,
    user: str | None,
    resource_uri: str,
    scopes: tuple[str, ...],
    as_json: bool,
) -> None:
    """The policy decision for an identity and a resource, and the rules that made it.

    Exit code 0 when a sign-in would be allowed, 1 when refused, 2 for a usage or config error.
    """
    from providers.contract import provider_facts

    from . import explain
    from .plugins import ProviderRegistry, plugin_manager

    if (identity_file is None) == (user is None):
        raise click.UsageError("give exactly one of --identity FILE and --user REF")
    settings = _settings(ctx)
    try:
        registry = ProviderRegistry.for_settings(plugin_manager(), settings)
    except ConfigError as exc:
        _fail(exc)
    facts = {name: provider_facts(provider) for name, provider in registry.items()}
    resource = settings.resource(resource_uri)
    if resource is None:
        configured = ", ".join(r.uri for r in settings.resources) or "none"
        click.echo(
            f"broker explain: --resource {resource_uri}: not a configured resource "
            f"(configured: {configured})",
            err=True,
        )
        sys.exit(2)
    notes: tuple[str, ...] = ()
    try:
        if identity_file is not None:
            identity = explain.read_identity_file(identity_file, facts)
        else:
            with (
                _database(ctx, settings) as database,
                _migration_errors("explain"),
                database.read() as session,
            ):
                stored = explain.stored_identity(session, user or "")
            identity, notes = stored.identity, stored.notes()
    except explain.ExplainError as exc:
        for problem in exc.problems:
            click.echo(f"broker explain: {problem}", err=True)
        sys.exit(2)
    result = explain.explain(
        settings, resource, identity, scopes, configured_providers=facts, notes=notes
    )
    if as_json:
        click.echo(json.dumps(explain.as_json(result), indent=2))
    else:
        click.echo(explain.render_text(result))
    sys.exit(result.exit_code)


main.add_command(login)
