"""Static clients: defined by the operator, stored through Alembic data migrations.

``broker clients add`` validates a client definition and writes a migration into the
deployment-owned ``client_migrations`` folder (the ``clients`` branch, see :mod:`broker.migrate`);
``broker clients remove`` writes the one that deletes it and ends its grants. The migrations write
rows with ``sa.table()`` constructs and ``op.bulk_insert``, never the ORM models, which change
with later releases while a migration stays as it was reviewed. Each one carries the client's
whole row (``CLIENT``), with only a hash of a confidential client's secret, so that ``remove`` and
every downgrade can restore it exactly.

``broker clients list`` and ``show`` read every kind of client (``static``, ``cimd``, ``dcr``)
with its last use and its live grants; neither ever prints a secret or its hash.

Redirect URIs follow the rules of dynamic registration (RFC 7591 section 2, via
:func:`broker.oauth2.rfc7591.validate_redirect_uri`); a public client with a loopback or
private-use redirect URI is never trusted (RFC 8252 section 8.6: any local program can use its
client id).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import secrets
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from alembic.script import Script
from alembic.util import rev_id
from authlib.oauth2.base import OAuth2Error
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .config import SCOPE_TOKEN, Settings
from .crypto import hash_client_secret, new_token
from .db import utcnow
from .migrate import CLIENTS_BRANCH, script_directory
from .models import Client, Grant
from .oauth2.rfc7591 import MAX_REDIRECT_URIS, validate_redirect_uri

# The schema revision whose columns the migrations below write (``clients.trusted`` came in it).
# A later template that writes newer columns depends on the revision that added them.
SCHEMA_REVISION = "0002"

CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.~-]{0,127}$")
# Prefixes of generated ids: dynamic registrations (broker/oauth2/rfc7591.py) and users' ``sub``
# (broker/flow.py), which a client credentials token's ``sub`` (the client id) must not resemble.
RESERVED_PREFIXES = {"mcp_": "dynamic registrations", "usr_": "users' subjects"}
AUTH_CODE_GRANTS = ("authorization_code", "refresh_token")
OPTIONAL_GRANTS = ("client_credentials", "token-exchange")
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
"""``--grant token-exchange``: an MCP server's own client, bound to its one resource, that
exchanges its callers' tokens for their upstream tokens (RFC 8693, docs/token-exchange.md)."""
MAX_NAME = 200


class ClientOptionError(Exception):
    """The options of ``broker clients add|remove`` are wrong; one line per problem, each
    naming its option."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class NewClient:
    """A validated static client: the row its migration inserts, and the secret, shown once."""

    row: dict[str, Any]
    secret: str | None

    @property
    def client_id(self) -> str:
        return str(self.row["client_id"])


@dataclass(frozen=True)
class DefinedClient:
    """A static client as the client migrations leave it: the migration that added it last and,
    when a later one removed it, that one."""

    client_id: str
    row: dict[str, Any]
    added_by: str
    removed_by: str | None = None


def new_client(
    settings: Settings,
    *,
    name: str,
    redirect_uris: Sequence[str],
    confidential: bool = False,
    providers: Sequence[str] = (),
    resources: Sequence[str] = (),
    client_id: str | None = None,
    trusted: bool = False,
    grants: Sequence[str] = (),
    scopes: Sequence[str] = (),
    defined: Mapping[str, DefinedClient] | None = None,
) -> NewClient:
    """Validate the options of ``broker clients add`` into a client row (``kind`` static, no
    expiry). Raises :class:`ClientOptionError` listing every problem."""
    problems: list[str] = []
    name = name.strip()
    if not name:
        problems.append("--name: must not be blank")
    elif len(name) > MAX_NAME or not name.isprintable():
        problems.append(f"--name: at most {MAX_NAME} printable characters")

    uris: list[str] = []
    for uri in dict.fromkeys(redirect_uris):
        try:
            uris.append(validate_redirect_uri(uri, "native"))
        except OAuth2Error as exc:  # InvalidRedirectURIError, with a fixed description
            problems.append(f"--redirect-uri {uri}: {exc.description}")
    if not redirect_uris:
        problems.append("--redirect-uri: at least one is required")
    elif len(uris) > MAX_REDIRECT_URIS:
        problems.append(f"--redirect-uri: at most {MAX_REDIRECT_URIS}")
    # RFC 8252 section 8.1: web applications redirect to https; anything else is a native app.
    web = bool(uris) and all(urlsplit(u).scheme.lower() == "https" for u in uris)

    for provider in dict.fromkeys(providers):
        if provider not in settings.providers:
            known = ", ".join(settings.providers) or "none"
            problems.append(
                f"--provider {provider}: not a configured provider (configured: {known})"
            )
    allowed_resources: list[str] = []
    for uri in dict.fromkeys(resources):
        resource = settings.resource(uri) or settings.resource(uri.rstrip("/"))
        if resource is None:
            known = ", ".join(r.uri for r in settings.resources) or "none"
            problems.append(f"--resource {uri}: not a configured resource (configured: {known})")
        elif resource.uri not in allowed_resources:
            allowed_resources.append(resource.uri)

    if client_id is None:
        client_id = _generated_id(name)
    elif not CLIENT_ID.match(client_id):
        problems.append(
            f"--client-id {client_id}: 1 to 128 characters of A-Z a-z 0-9 . _ ~ -, "
            "starting with a letter or digit"
        )
    elif reserved := next((p for p in RESERVED_PREFIXES if client_id.startswith(p)), None):
        problems.append(
            f"--client-id {client_id}: the prefix {reserved} is for {RESERVED_PREFIXES[reserved]}"
        )
    existing = (defined or {}).get(client_id)
    if existing is not None and existing.removed_by is None:
        problems.append(f"--client-id {client_id}: already added by {existing.added_by}")

    grant_types = list(AUTH_CODE_GRANTS)
    for grant in dict.fromkeys(grants):
        if grant not in OPTIONAL_GRANTS:
            problems.append(f"--grant {grant}: only {', '.join(OPTIONAL_GRANTS)} can be added")
        elif not confidential:
            problems.append(f"--grant {grant}: only for a confidential client (add --confidential)")
        elif grant == "token-exchange":
            grant_types.append(TOKEN_EXCHANGE)
            bound = [settings.resource(uri) for uri in allowed_resources]
            if len(bound) != 1:
                problems.append(
                    "--grant token-exchange: needs exactly one --resource (the MCP server whose "
                    "callers' tokens it exchanges)"
                )
            elif bound[0] is not None and not bound[0].upstream_tokens:
                problems.append(
                    f"--grant token-exchange: resource {bound[0].uri} lists no upstream_tokens "
                    "in the config"
                )
        else:
            grant_types.append(grant)
    scope = _client_credentials_scope(
        settings, grants, scopes, resources, allowed_resources, problems
    )

    method = "client_secret_basic" if confidential else "none"
    if trusted and not confidential and not web:
        problems.append(
            "--trusted: a public client with a loopback or private-use redirect URI cannot be "
            "trusted, since any local program can use its client id (RFC 8252 section 8.6)"
        )
    if problems:
        raise ClientOptionError(problems)

    secret = new_token(32) if confidential else None
    row: dict[str, Any] = {
        "client_id": client_id,
        "kind": "static",
        "name": name,
        "redirect_uris": uris,
        "grant_types": grant_types,
        "response_types": ["code"],
        "token_endpoint_auth_method": method,
        "application_type": "web" if web else "native",
        "scope": scope,
        "secret_hash": hash_client_secret(secret) if secret else None,
        "allowed_providers": list(dict.fromkeys(providers)) or None,
        "allowed_resources": allowed_resources or None,
        "trusted": trusted,
        "metadata": {},
    }
    return NewClient(row, secret)


def _client_credentials_scope(
    settings: Settings,
    grants: Sequence[str],
    scopes: Sequence[str],
    resources: Sequence[str],
    allowed_resources: list[str],
    problems: list[str],
) -> str | None:
    """The scopes a ``client_credentials`` client may get in its own name (RFC 6749 section
    4.4): scopes of its allowed resources, which it must name (the grant issues tokens only for
    a client's ``allowed_resources``), including what each of them requires."""
    if "client_credentials" not in grants:
        if scopes:
            problems.append("--scope: only with --grant client_credentials")
        return None
    if not resources:
        problems.append("--grant client_credentials: needs at least one --resource (the audience)")
    if not scopes:
        problems.append("--grant client_credentials: needs at least one --scope")
    if not resources or not scopes:
        return None
    targets = [r for r in settings.resources if r.uri in allowed_resources]
    known = {s for r in targets for s in r.scopes}
    for scope in dict.fromkeys(scopes):
        if not SCOPE_TOKEN.match(scope):
            problems.append(f"--scope {scope}: not a scope token (RFC 6749 section 3.3)")
        elif scope not in known:
            problems.append(f"--scope {scope}: not a scope of its --resource values")
    for resource in targets:
        missing = [s for s in resource.required_scopes if s not in scopes]
        if missing:
            problems.append(
                f"--scope: {resource.uri} requires {', '.join(missing)} in every token; add it"
            )
    return " ".join(dict.fromkeys(scopes))


def _generated_id(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40].strip("-")
    return f"{slug or 'client'}-{secrets.token_hex(3)}"


# -- the client migrations folder ---------------------------------------------------------


def defined_clients(client_migrations: str | Path) -> dict[str, DefinedClient]:
    """Every static client the migrations in ``client_migrations`` add, with the migration that
    removed it, if one did (in order, oldest first)."""
    folder = Path(client_migrations).resolve()
    if not folder.is_dir():
        return {}
    scripts = script_directory(folder)
    ordered = [s for s in reversed(list(scripts.walk_revisions())) if _in_folder(s, folder)]
    result: dict[str, DefinedClient] = {}
    for script in ordered:
        action = getattr(script.module, "ACTION", None)
        row = getattr(script.module, "CLIENT", None)
        if action not in ("add", "remove") or not isinstance(row, dict):
            continue  # a migration of another kind the operator wrote: not ours to read
        client_id = str(row["client_id"])
        if action == "add":
            result[client_id] = DefinedClient(client_id, dict(row), added_by=script.path)
        elif client_id in result:
            previous = result[client_id]
            result[client_id] = DefinedClient(
                client_id, previous.row, previous.added_by, removed_by=script.path
            )
    return result


def _in_folder(script: Script | None, folder: Path) -> bool:
    return script is not None and Path(script.path).resolve().is_relative_to(folder)


@dataclass(frozen=True)
class WrittenMigration:
    path: Path
    revision: str


def write_add_migration(client_migrations: str | Path, client: NewClient) -> WrittenMigration:
    """Write the migration that inserts ``client`` (its downgrade deletes it)."""
    return _write(client_migrations, "add", client.row)


def write_remove_migration(client_migrations: str | Path, client_id: str) -> WrittenMigration:
    """Write the migration that deletes the static client ``client_id`` and ends its grants (its
    downgrade re-inserts the client as it was added; the grants stay revoked)."""
    defined = defined_clients(client_migrations).get(client_id)
    if defined is None:
        raise ClientOptionError([f"{client_id}: no migration in {client_migrations} adds it"])
    if defined.removed_by is not None:
        raise ClientOptionError([f"{client_id}: already removed by {defined.removed_by}"])
    return _write(client_migrations, "remove", defined.row)


def _write(client_migrations: str | Path, action: str, row: dict[str, Any]) -> WrittenMigration:
    folder = Path(client_migrations).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    scripts = script_directory(folder)
    branch_heads = sorted(
        h for h in scripts.get_heads() if _in_folder(scripts.get_revision(h), folder)
    )
    revision = rev_id()
    now = utcnow()
    text = render_migration(
        action,
        row,
        revision=revision,
        # Several heads (two migrations written in parallel branches of the deployment
        # repository) are merged by the next one.
        down_revision=_one_or_tuple(branch_heads),
        branch_labels=None if branch_heads else (CLIENTS_BRANCH,),
        created=now,
    )
    slug = re.sub(r"[^A-Za-z0-9]+", "_", str(row["client_id"])).strip("_")
    path = folder / f"{now:%Y%m%d_%H%M%S}_{action}_{slug}_{revision}.py"
    with path.open("x", encoding="utf-8") as out:  # never overwrite a reviewed migration
        out.write(text)
    return WrittenMigration(path, revision)


def _one_or_tuple(values: list[str]) -> str | tuple[str, ...] | None:
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


# -- rendering ----------------------------------------------------------------------------

_HEADER = '''"""{title}

Revision ID: {revision}
{revises}
Create Date: {created}

Written by `broker clients {action}`. Review it, commit it to the deployment repository, and apply
it with `broker db upgrade`.

{summary}
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = {revision_literal}
down_revision: str | Sequence[str] | None = {down_literal}
branch_labels: str | Sequence[str] | None = {labels_literal}
depends_on: str | Sequence[str] | None = {depends_literal}

ACTION = {action_literal}
CLIENT = {client_literal}
'''

_BODY = '''
# Lightweight table constructs, never the ORM models: this file stays as it was reviewed.
clients = sa.table(
    "clients",
    sa.column("client_id", sa.String),
    sa.column("kind", sa.String),
    sa.column("name", sa.String),
    sa.column("redirect_uris", sa.JSON),
    sa.column("grant_types", sa.JSON),
    sa.column("response_types", sa.JSON),
    sa.column("token_endpoint_auth_method", sa.String),
    sa.column("application_type", sa.String),
    sa.column("scope", sa.Text),
    sa.column("secret_hash", sa.String),
    sa.column("allowed_providers", sa.JSON),
    sa.column("allowed_resources", sa.JSON),
    sa.column("trusted", sa.Boolean),
    sa.column("metadata", sa.JSON),
    sa.column("created_at", sa.DateTime(timezone=True)),
    sa.column("expires_at", sa.DateTime(timezone=True)),
)
grants = sa.table(
    "grants",
    sa.column("client_id", sa.String),
    sa.column("revoked_at", sa.DateTime(timezone=True)),
    sa.column("revoke_reason", sa.String),
)
consents = sa.table(
    "consents",
    sa.column("client_id", sa.String),
    sa.column("revoked_at", sa.DateTime(timezone=True)),
)


def insert_client() -> None:
    now = dt.datetime.now(dt.UTC)
    op.bulk_insert(clients, [{{**CLIENT, "created_at": now, "expires_at": None}}])


def delete_client() -> None:
    """Delete the client and end what it holds: its grants are revoked (their refresh tokens
    stop working) and its users' consents withdrawn."""
    now = dt.datetime.now(dt.UTC)
    client_id = CLIENT["client_id"]
    op.execute(
        grants.update()
        .where(grants.c.client_id == client_id, grants.c.revoked_at.is_(None))
        .values(revoked_at=now, revoke_reason="client_removed")
    )
    op.execute(
        consents.update()
        .where(consents.c.client_id == client_id, consents.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    op.execute(clients.delete().where(clients.c.client_id == client_id))


def upgrade() -> None:
    {upgrade}()


def downgrade() -> None:
    {downgrade}()
'''


def render_migration(
    action: str,
    row: Mapping[str, Any],
    *,
    revision: str,
    down_revision: str | tuple[str, ...] | None,
    branch_labels: tuple[str, ...] | None,
    created: dt.datetime,
) -> str:
    """The text of an ``add`` or ``remove`` client migration."""
    client_id = str(row["client_id"])
    name = str(row["name"]).replace("\\", "\\\\").replace('"', '\\"')
    if action == "add":
        title = f'Add static client {client_id} ("{name}").'
        summary = "Upgrade inserts the client; downgrade deletes it and ends its grants."
        if row.get("secret_hash"):
            summary += (
                " The secret is not in this file: only its hash (HMAC-SHA256 with a random salt)."
            )
        steps = ("insert_client", "delete_client")
    elif action == "remove":
        title = f'Remove static client {client_id} ("{name}").'
        summary = (
            "Upgrade deletes the client and ends its grants (revoked, reason client_removed) and "
            "consents; downgrade inserts it again as it was added, but its grants stay revoked."
        )
        if row.get("secret_hash"):
            summary += " Like the migration that added it, it holds only a hash of the secret."
        steps = ("delete_client", "insert_client")
    else:
        raise ValueError(f"unknown client migration action {action!r}")
    revises = (
        ", ".join(down_revision) if isinstance(down_revision, tuple) else (down_revision or "")
    )
    header = _HEADER.format(
        title=title,
        revision=revision,
        revises=f"Revises: {revises}".rstrip(),
        created=f"{created:%Y-%m-%d %H:%M:%S} UTC",
        action=action,
        summary=textwrap.fill(summary, 96),
        revision_literal=_literal(revision),
        down_literal=_literal(down_revision),
        labels_literal=_literal(branch_labels),
        depends_literal=_literal(SCHEMA_REVISION),
        action_literal=_literal(action),
        client_literal=_literal(dict(row)),
    )
    return header + _BODY.format(upgrade=steps[0], downgrade=steps[1])


def _literal(value: Any, indent: int = 0) -> str:
    """A Python literal, formatted as ruff would (double quotes, one item per line)."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid Python string literal
    if isinstance(value, int | float):
        return repr(value)
    pad = " " * (indent + 4)
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = "".join(
            f"{pad}{_literal(k)}: {_literal(v, indent + 4)},\n" for k, v in value.items()
        )
        return "{\n" + items + " " * indent + "}"
    if isinstance(value, list | tuple):
        open_, close = ("[", "]") if isinstance(value, list) else ("(", ")")
        if not value:
            return open_ + close
        flat = ", ".join(_literal(v) for v in value)
        if isinstance(value, tuple) and len(value) == 1:
            flat += ","
        if len(flat) + indent < 80 and all(not isinstance(v, dict | list) for v in value):
            return open_ + flat + close
        items = "".join(f"{pad}{_literal(v, indent + 4)},\n" for v in value)
        return open_ + "\n" + items + " " * indent + close
    raise TypeError(f"no literal for {type(value).__name__}")


# -- listing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientSummary:
    """What ``broker clients list|show`` shows of a client: never its secret or hash."""

    client_id: str
    kind: str
    name: str
    redirect_uris: list[str]
    token_endpoint_auth_method: str
    grant_types: list[str]
    scope: str | None
    allowed_providers: list[str] | None
    allowed_resources: list[str] | None
    trusted: bool
    created_at: dt.datetime | None
    last_used_at: dt.datetime | None
    expires_at: dt.datetime | None
    live_grants: int
    migration: str | None = field(default=None)

    def as_json(self) -> dict[str, Any]:
        def when(value: dt.datetime | None) -> str | None:
            return value.isoformat() if value else None

        return {
            "client_id": self.client_id,
            "kind": self.kind,
            "name": self.name,
            "redirect_uris": self.redirect_uris,
            "token_endpoint_auth_method": self.token_endpoint_auth_method,
            "grant_types": self.grant_types,
            "scope": self.scope,
            "allowed_providers": self.allowed_providers,
            "allowed_resources": self.allowed_resources,
            "trusted": self.trusted,
            "created_at": when(self.created_at),
            "last_used_at": when(self.last_used_at),
            "expires_at": when(self.expires_at),
            "live_grants": self.live_grants,
            **({"migration": self.migration} if self.kind == "static" else {}),
        }


# Every column but the secret hash and the registration token hash: they never leave the
# database through these commands.
_SHOWN = (
    Client.client_id,
    Client.kind,
    Client.name,
    Client.redirect_uris,
    Client.token_endpoint_auth_method,
    Client.grant_types,
    Client.scope,
    Client.allowed_providers,
    Client.allowed_resources,
    Client.trusted,
    Client.created_at,
    Client.last_used_at,
    Client.expires_at,
)


def client_summaries(
    session: Session,
    *,
    kind: str | None = None,
    client_id: str | None = None,
    defined: Mapping[str, DefinedClient] | None = None,
) -> list[ClientSummary]:
    """Clients (of one ``kind``, or the one ``client_id``) with their live grants (not
    revoked), oldest first within each kind."""
    live = (
        select(Grant.client_id, func.count().label("n"))
        .where(Grant.revoked_at.is_(None))
        .group_by(Grant.client_id)
        .subquery()
    )
    query = select(*_SHOWN, func.coalesce(live.c.n, 0)).outerjoin(
        live, live.c.client_id == Client.client_id
    )
    if kind is not None:
        query = query.where(Client.kind == kind)
    if client_id is not None:
        query = query.where(Client.client_id == client_id)
    query = query.order_by(Client.kind, Client.created_at, Client.client_id)
    result = []
    for row in session.execute(query):
        values: dict[str, Any] = dict(zip((c.key for c in _SHOWN), row[:-1], strict=True))
        static = (defined or {}).get(values["client_id"]) if values["kind"] == "static" else None
        result.append(_summary(values, int(row[-1]), static.added_by if static else None))
    return result


def _summary(values: dict[str, Any], live_grants: int, migration: str | None) -> ClientSummary:
    return ClientSummary(
        client_id=values["client_id"],
        kind=values["kind"],
        name=values["name"],
        redirect_uris=list(values["redirect_uris"] or []),
        token_endpoint_auth_method=values["token_endpoint_auth_method"],
        grant_types=list(values["grant_types"] or []),
        scope=values["scope"],
        allowed_providers=values["allowed_providers"],
        allowed_resources=values["allowed_resources"],
        trusted=bool(values["trusted"]),
        created_at=values["created_at"],
        last_used_at=values["last_used_at"],
        expires_at=values["expires_at"],
        live_grants=live_grants,
        migration=migration,
    )


def _printable(text: str) -> str:
    # Names and URIs of dynamic registrations come from anyone: no terminal escapes.
    return "".join(c if c.isprintable() else "?" for c in text)


def _when(value: dt.datetime | None, never: str = "never") -> str:
    return f"{value:%Y-%m-%d %H:%M} UTC" if value else never


def render_table(clients: Iterable[ClientSummary]) -> str:
    """``broker clients list``: one line per client."""
    header = ("CLIENT ID", "KIND", "NAME", "AUTH", "LAST USED", "GRANTS", "REDIRECT URIS")
    rows: list[tuple[str, ...]] = [header]
    for c in clients:
        fields = (
            c.client_id,
            c.kind,
            c.name,
            c.token_endpoint_auth_method,
            _when(c.last_used_at),
            str(c.live_grants),
            ", ".join(c.redirect_uris),
        )
        rows.append(tuple(_printable(v) for v in fields))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
        for r in rows
    )


def render_details(c: ClientSummary) -> str:
    """``broker clients show``: every field of one client, one per line."""

    def listing(values: list[str] | None, empty: str) -> str:
        return ("\n" + " " * 15).join(_printable(v) for v in values) if values else empty

    lines = [
        ("client_id", _printable(c.client_id)),
        ("kind", c.kind),
        ("name", _printable(c.name)),
        ("redirect URIs", listing(c.redirect_uris, "none")),
        ("auth method", _printable(c.token_endpoint_auth_method)),
        ("grant types", _printable(" ".join(c.grant_types))),
        ("scope", _printable(c.scope or "-")),
        ("providers", listing(c.allowed_providers, "all")),
        ("resources", listing(c.allowed_resources, "all")),
        ("trusted", "yes (no consent screen)" if c.trusted else "no"),
        ("created", _when(c.created_at, "-")),
        ("last used", _when(c.last_used_at)),
        ("expires", _when(c.expires_at)),
        ("live grants", str(c.live_grants)),
    ]
    if c.kind == "static":
        lines.append(("migration", c.migration or "not in client_migrations"))
    return "\n".join(f"{k + ':':14} {v}" for k, v in lines)
