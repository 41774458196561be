"""RFC 6749 grants as OAuth 2.1 keeps them: authorization code (with PKCE) and refresh token.

Section 4.1.2 / OAuth 2.1 section 4.1.3: codes are single use and short-lived; a code used twice
revokes what it produced. OAuth 2.1 section 4.3.1: refresh tokens of public clients rotate on
every use. Reuse of a rotated token after the grace window revokes the whole grant (RFC 9700
section 4.14.2); within the window the same successor is handed out again, because real clients
refresh twice in parallel.

Storage is the token endpoint's hot path, so it is SQLAlchemy Core statements built once, each
compiled once for the server's engine and run on the driver's cursor (``HotStatements``, with
:class:`broker.db.DriverStatement`). Each grant first reads everything it decides on in one
statement: the presented code or refresh token joined with its grant, the grant's user and
identity, and the client (so authenticating the client costs no statement of its own, see
``BrokerAuthorizationServer.keep_client``). Once the whole request is valid it writes, together: a
conditional ``UPDATE ... WHERE used_at IS NULL`` whose outcome decides, across workers and hosts
sharing the database, which request uses the code or token (a refresh that loses reads the
winner's successor for the grace window), the new refresh token, and the audit event. On SQLite
these are three statements in one transaction, begun with ``BEGIN IMMEDIATE`` by the first
write (a rotation's claim also links the successor and drops the parent's kept successor); the
read before them runs in no transaction, so the write lock every worker waits for is held for
the writes only, not while the request is validated and its token signed. On PostgreSQL they
are one statement (``ROTATE_ONCE``, ``REDEEM_ONCE``:
data-modifying ``WITH`` queries), run outside a transaction block, so a grant is two round trips.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any, cast

from authlib.oauth2.rfc6749 import grants
from authlib.oauth2.rfc6749.errors import InvalidGrantError, InvalidRequestError
from sqlalchemy import (
    Connection,
    Engine,
    Row,
    String,
    Table,
    and_,
    bindparam,
    case,
    exists,
    insert,
    or_,
    select,
    update,
)

from providers.contract import Identity as UpstreamIdentity

from .. import audit, policy
from ..crypto import token_hash
from ..db import (
    DriverRow,
    DriverStatement,
    UTCDateTime,
    driver_statement,
    first_rows,
    insert_every_column,
    utcnow,
)
from ..models import AuthorizationCode, Client, Grant, Identity, RefreshToken, User
from .errors import InvalidTargetError
from .rfc8707 import resolve_resource

CLIENT_AUTH_METHODS = ["none", "client_secret_basic", "client_secret_post"]
MAX_PRESENTED = 512
"""Longest code or refresh token looked up (the broker's are 43 characters)."""


@dataclass(frozen=True)
class IdentityRow:
    """The identity a grant was made for, as stored: what the rules and claims read."""

    id: int
    provider: str
    snapshot: Mapping[str, Any]
    last_login_at: dt.datetime
    last_recheck_at: dt.datetime | None


@dataclass(frozen=True)
class GrantRow:
    """A grant as the token endpoint reads it, with its user's standing and its identity."""

    id: str
    user_id: str
    client_id: str
    resource: str
    scope: str
    auth_time: dt.datetime
    revoked_at: dt.datetime | None
    user_disabled_at: dt.datetime | None
    identity: IdentityRow | None

    @property
    def live(self) -> bool:
        """Neither revoked nor of a disabled user."""
        return self.revoked_at is None and self.user_disabled_at is None


@dataclass
class GrantUser:
    """The resource owner as Authlib passes it around: the grant a token belongs to (a model row
    at the authorization endpoint, a :class:`GrantRow` at the token endpoint)."""

    grant: Grant | GrantRow

    def get_user_id(self) -> str:
        return self.grant.user_id


@dataclass(frozen=True)
class CodeCredential:
    code_hash: str
    redirect_uri: str
    scope: str
    resource: str
    code_challenge: str
    code_challenge_method: str
    grant: GrantRow

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope


@dataclass
class RefreshCredential:
    token_hash: str
    parent_hash: str | None
    scope: str
    expires_at: dt.datetime
    grant: GrantRow
    # Set when this is a parallel refresh inside the grace window: the successor handed out again.
    grace_successor: str | None = None
    # The scopes the user is entitled to now (the grant's, narrowed by the current rules).
    entitled: list[str] | None = None

    def check_client(self, client: Any) -> bool:
        return bool(self.grant.client_id == client.get_client_id())

    def get_scope(self) -> str:
        return self.scope


class RecheckFirst(Exception):
    """The grant's identity is due for its upstream re-check (``broker.recheck``): the token
    request is rolled back, the upstream asked outside any transaction, and the request run
    again on what it said. ``due`` is what the re-check needs."""

    def __init__(self, due: object) -> None:
        super().__init__("upstream re-check due")
        self.due = due


RecheckDue = Callable[[GrantRow], object | None]
"""Whether a grant's identity is due for its upstream re-check: what to run, or ``None``."""


# -- statements -------------------------------------------------------------------------------


def _table(model: Any) -> Table:
    table: Table = model.__table__
    return table


_tokens = _table(RefreshToken)
_successors = _tokens.alias("successor")
_codes = _table(AuthorizationCode)
_grants = _table(Grant)
_users = _table(User)
_identities = _table(Identity)
_clients = _table(Client)

_GRANT_COLUMNS = (
    _grants.c.id.label("grant_id"),
    _grants.c.user_id,
    _grants.c.client_id,
    _grants.c.resource,
    _grants.c.scope.label("grant_scope"),
    _grants.c.auth_time,
    _grants.c.revoked_at,
    _users.c.disabled_at,
    _identities.c.id.label("identity_id"),
    _identities.c.provider,
    _identities.c.snapshot,
    _identities.c.last_login_at,
    _identities.c.last_recheck_at,
)
# The client's columns the token endpoint reads (client authentication, grant types, recording
# its use), labelled client_<attribute>; and what every other attribute of the copy holds: values
# that allow nothing (no redirect URI, response type, resource, provider, scope or registration
# token), should anything else ever read it.
_TOKEN_CLIENT = (
    "client_id",
    "kind",
    "token_endpoint_auth_method",
    "secret_hash",
    "grant_types",
    "expires_at",
    "last_used_at",
)
_CLIENT_COLUMNS = tuple(_clients.c[name].label(f"client_{name}") for name in _TOKEN_CLIENT)
_CLIENT_CLOSED: dict[str, Any] = {
    "name": "",
    "redirect_uris": [],
    "grant_types": [],
    "response_types": [],
    "application_type": None,
    "scope": None,
    "secret_expires_at": None,
    "allowed_providers": [],
    "allowed_resources": [],
    "trusted": False,
    "client_metadata": {},
    "registration_token_hash": None,
    "created_at": None,
}


def _with_grant(table: Any, client_id: Any) -> Any:
    return (
        table.join(_grants, _grants.c.id == table.c.grant_id)
        .join(_users, _users.c.id == _grants.c.user_id)
        .outerjoin(_identities, _identities.c.id == _grants.c.identity_id)
        .outerjoin(_clients, _clients.c.client_id == client_id)
    )


# Whether the successor exists and is unused (a grace re-issue hands out only such a one).
_SUCCESSOR_COLUMNS = (
    and_(_successors.c.token_hash.is_not(None), _successors.c.used_at.is_(None)).label(
        "successor_unused"
    ),
)
_REFRESH_READ = (
    select(
        _tokens.c.token_hash,
        _tokens.c.parent_hash,
        _tokens.c.successor_hash,
        _tokens.c.successor_sealed,
        _tokens.c.scope,
        _tokens.c.expires_at,
        _tokens.c.idle_expires_at,
        _tokens.c.used_at,
        *_SUCCESSOR_COLUMNS,
        *_GRANT_COLUMNS,
        *_CLIENT_COLUMNS,
    )
    .select_from(
        _with_grant(_tokens, _grants.c.client_id).outerjoin(
            _successors, _successors.c.token_hash == _tokens.c.successor_hash
        )
    )
    .where(_tokens.c.token_hash == bindparam("digest"))
)
# After a lost claim: the winner's successor, for the grace window.
_REFRESH_REREAD = (
    select(
        _tokens.c.token_hash,
        _tokens.c.successor_hash,
        _tokens.c.successor_sealed,
        _tokens.c.used_at,
        *_SUCCESSOR_COLUMNS,
    )
    .select_from(
        _tokens.outerjoin(_successors, _successors.c.token_hash == _tokens.c.successor_hash)
    )
    .where(_tokens.c.token_hash == bindparam("digest"))
)
# The rotation, one statement for two rows: the presented token (claimed only while unused, and
# linked to its successor, kept sealed for the grace window) and its parent, whose kept successor
# is the presented token, useless from now on. The presented token's hash among the returned
# ones says this request won the claim; a request that loses touches only the parent, as the
# winner did already.
_PRESENTED = _tokens.c.token_hash == bindparam("digest")
_ROTATE = (
    update(_tokens)
    .where(
        or_(
            and_(_PRESENTED, _tokens.c.used_at.is_(None)),
            _tokens.c.token_hash == bindparam("parent"),
        )
    )
    .values(
        used_at=case((_PRESENTED, bindparam("now", type_=UTCDateTime())), else_=_tokens.c.used_at),
        successor_hash=case((_PRESENTED, bindparam("successor")), else_=_tokens.c.successor_hash),
        successor_sealed=case((_PRESENTED, bindparam("sealed")), else_=None),
    )
    .returning(_tokens.c.token_hash)
)
# The columns a new refresh token sets (the others start NULL). No parameter of these
# statements is named after a column: an UPDATE given such a parameter would also set it.
_NEW_TOKEN = ("token_hash", "grant_id", "scope", "issued_at", "expires_at", "idle_expires_at")
_NEW_TOKEN_VALUES = (
    bindparam("successor", type_=String()),
    bindparam("new_grant", type_=String()),
    bindparam("new_scope", type_=String()),
    bindparam("now", type_=UTCDateTime()),
    bindparam("new_expires", type_=UTCDateTime()),
    bindparam("new_idle", type_=UTCDateTime()),
)
_GRANT_NARROW = (
    update(_grants).where(_grants.c.id == bindparam("grant")).values(scope=bindparam("narrowed"))
)
_CODE_READ = (
    select(
        _codes.c.code_hash,
        _codes.c.client_id.label("code_client_id"),
        _codes.c.redirect_uri,
        _codes.c.scope,
        _codes.c.resource.label("code_resource"),
        _codes.c.code_challenge,
        _codes.c.code_challenge_method,
        _codes.c.expires_at,
        _codes.c.used_at,
        *_GRANT_COLUMNS,
        *_CLIENT_COLUMNS,
    )
    .select_from(_with_grant(_codes, _codes.c.client_id))
    .where(_codes.c.code_hash == bindparam("digest"))
)
_CODE_INSERT = insert_every_column(_codes)
# The claim returns the code's hash when this request won it.
_CODE_CLAIM = (
    update(_codes)
    .where(
        _codes.c.code_hash == bindparam("digest"),
        _codes.c.used_at.is_(None),
        _codes.c.expires_at > bindparam("now", type_=UTCDateTime()),
    )
    .values(used_at=bindparam("now", type_=UTCDateTime()))
    .returning(_codes.c.code_hash)
)
# On SQLite, after a claim won: the new refresh token (a rotation's successor, its parent the
# presented token; a redemption's first) and the audit event, each its own INSERT.
_new_token_columns = dict(zip(_NEW_TOKEN, _NEW_TOKEN_VALUES, strict=True))
_SUCCESSOR_INSERT = insert(_tokens).values(**_new_token_columns, parent_hash=bindparam("digest"))
_FIRST_TOKEN_INSERT = insert(_tokens).values(_new_token_columns)

# On PostgreSQL each grant writes in one statement (data-modifying WITH queries), run outside
# any transaction block: the statement is atomic by itself, so a refresh or a redemption is two
# round trips (the read, then this) instead of six (BEGIN, the read, three writes, COMMIT). The
# statement returns the audit event's id, or no row when the claim was lost. SQLite has no
# DML in WITH and runs the same writes as separate statements in one transaction.
_claimed = _ROTATE.cte("claimed")
_successor_row = (
    insert(_tokens)
    .from_select(
        [*_NEW_TOKEN, "parent_hash"],
        select(*_NEW_TOKEN_VALUES, _claimed.c.token_hash).where(
            _claimed.c.token_hash == bindparam("digest")
        ),
    )
    .returning(_tokens.c.token_hash)
    .cte("successor_row")
)
_rotation_event = audit.insert_when(exists(select(_successor_row.c.token_hash))).cte("event")
ROTATE_ONCE = select(_rotation_event.c.id).add_cte(_claimed, _successor_row, _rotation_event)
_code_claimed = _CODE_CLAIM.cte("claimed")
_first_token = (
    insert(_tokens)
    .from_select(
        list(_NEW_TOKEN),
        select(*_NEW_TOKEN_VALUES).where(exists(select(_code_claimed.c.code_hash))),
    )
    .returning(_tokens.c.token_hash)
    .cte("token_row")
)
_redemption_event = audit.insert_when(exists(select(_code_claimed.c.code_hash))).cte("event")
REDEEM_ONCE = select(_redemption_event.c.id).add_cte(_code_claimed, _first_token, _redemption_event)
REDEEM_ONCE_WITHOUT_REFRESH = select(_redemption_event.c.id).add_cte(
    _code_claimed, _redemption_event
)


class HotStatements:
    """The token endpoint's statements, compiled once for the server's engine and run on the
    driver's cursor (:func:`broker.db.driver_statement`): the reads of a code or refresh token,
    and the writes. On PostgreSQL a grant writes in one statement (:attr:`one_statement`); on
    SQLite it sends the claim, the new refresh token and the audit event one by one, in the
    transaction the read began."""

    def __init__(self, engine: Engine) -> None:
        self.one_statement = engine.dialect.name != "sqlite"
        writes: tuple[tuple[Any, tuple[str, ...]], ...]
        if self.one_statement:
            events = ("event_details",)
            writes = (
                (ROTATE_ONCE, events),
                (REDEEM_ONCE, events),
                (REDEEM_ONCE_WITHOUT_REFRESH, events),
            )
        else:
            writes = tuple(
                (statement, ())
                for statement in (
                    _CODE_CLAIM,
                    _ROTATE,
                    _SUCCESSOR_INSERT,
                    _FIRST_TOKEN_INSERT,
                    audit.INSERT_RETURNING,
                )
            )
        self._by_statement = {
            id(statement): driver_statement(statement, engine, json_params=json)
            for statement, json in ((_REFRESH_READ, ()), (_CODE_READ, ()), *writes)
        }

    def of(self, statement: Any) -> DriverStatement:
        return self._by_statement[id(statement)]

    def rows(
        self, connection: Connection, statement: Any, params: Mapping[str, Any]
    ) -> list[DriverRow]:
        """Run one of the statements; its rows."""
        return self._by_statement[id(statement)].rows(connection, params)

    def write(self, connection: Connection, statement: Any, params: Mapping[str, Any]) -> Any:
        """Run one of PostgreSQL's one-statement writes; the audit event's id, or ``None`` when
        the claim was lost."""
        rows = self.rows(connection, statement, params)
        return rows[0].id if rows else None

    def event(self, connection: Connection, entry: Mapping[str, Any]) -> int:
        """Insert the audit event ``entry`` (:func:`broker.audit.values`) on SQLite; its id."""
        (row,) = self.rows(connection, audit.INSERT_RETURNING, entry)
        return int(row.id)


def _grant(row: DriverRow) -> GrantRow:
    identity = None
    if row.identity_id is not None:
        identity = IdentityRow(
            row.identity_id, row.provider, row.snapshot, row.last_login_at, row.last_recheck_at
        )
    return GrantRow(
        id=row.grant_id,
        user_id=row.user_id,
        client_id=row.client_id,
        resource=row.resource,
        scope=row.grant_scope,
        auth_time=row.auth_time,
        revoked_at=row.revoked_at,
        user_disabled_at=row.disabled_at,
        identity=identity,
    )


def _client(row: DriverRow) -> Client | None:
    """The client of the row, if it exists: a read-only copy of the columns the token endpoint
    reads (a model instance would cost an instrumented attribute set per column, and loading
    every column a JSON parse per list)."""
    values = row._mapping
    if values["client_client_id"] is None:
        return None
    read = {name: values[f"client_{name}"] for name in _TOKEN_CLIENT}
    return cast(Client, SimpleNamespace(**{**_CLIENT_CLOSED, **read}))


def _read_presented(grant: Any, field: str, statement: Any, client_id: str) -> Any:
    """The first statement of a token request: the code or refresh token in the form ``field``,
    joined with its grant and the client named by the row's ``client_id`` column, which is kept
    for client authentication."""
    presented = grant.request.form.get(field)
    if not presented or len(presented) > MAX_PRESENTED:
        return None
    server = grant.server
    state = server.state()
    params = {"digest": token_hash(presented)}
    rows = first_rows(state.rollback, server.hot.of(statement), params, state.connection)
    row = rows[0] if rows else None
    if row is not None:
        server.keep_client(row._mapping[client_id], _client(row), live_grant=row.revoked_at is None)
    return row


def _new_token(
    settings: Any,
    *,
    digest: str,
    grant: GrantRow,
    now: dt.datetime,
    family_expires: dt.datetime | None,
) -> dict[str, Any]:
    """The parameters of a new refresh token of ``grant``: its expiry (``refresh_ttl``, never
    past the family's absolute expiry) and idle expiry."""
    tokens = settings.tokens
    expires = now + dt.timedelta(seconds=tokens.refresh_ttl)
    if family_expires is not None:  # an absolute lifetime belongs to the family
        expires = min(expires, family_expires)
    return {
        "successor": digest,
        "new_grant": grant.id,
        "new_scope": grant.scope,
        "now": now,
        "new_expires": expires,
        "new_idle": min(expires, now + dt.timedelta(seconds=tokens.refresh_idle_ttl)),
    }


# -- the authorization code grant ----------------------------------------------------------------


class AuthorizationCodeGrant(grants.AuthorizationCodeGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = CLIENT_AUTH_METHODS
    AUTHORIZATION_CODE_LENGTH = 43

    @staticmethod
    def validate_authorization_redirect_uri(request: Any, client: Any) -> str:
        """RFC 6749 section 3.1.2.4: an unregistered redirect URI is an error shown to the user,
        never a redirect. The description is fixed: a request value never goes into an
        ``error_description`` (section 5.2 allows only printable ASCII there, and the value is
        the attacker's)."""
        redirect_uri = request.payload.redirect_uri
        if redirect_uri:
            if not client.check_redirect_uri(redirect_uri):
                raise InvalidRequestError("The redirect URI is not registered for this client.")
            return str(redirect_uri)
        default = client.get_default_redirect_uri()
        if not default:
            raise InvalidRequestError("The redirect_uri parameter is missing.")
        return str(default)

    def validate_authorization_request(self) -> str:
        redirect_uri: str = super().validate_authorization_request()
        request = self.request
        # RFC 8707 section 2: an unknown resource is invalid_target, sent back to the client.
        values = request.payload.datalist.get("resource", [])
        request.resource = resolve_resource(
            self.server.settings, values, redirect_uri=redirect_uri, state=request.payload.state
        )
        request.validated_redirect_uri = redirect_uri
        return redirect_uri

    def save_authorization_code(self, code: str, request: Any) -> None:
        state = self.server.state()
        grant_user: GrantUser = request.user
        data = request.payload.data
        now = utcnow()
        self.server.sql.rows(
            state.connection(),
            _CODE_INSERT,
            {
                "code_hash": token_hash(code),
                "grant_id": grant_user.grant.id,
                "client_id": request.client.get_client_id(),
                "redirect_uri": request.payload.redirect_uri or "",
                "scope": grant_user.grant.scope,
                "resource": grant_user.grant.resource,
                "code_challenge": data["code_challenge"],
                "code_challenge_method": data.get("code_challenge_method", "S256"),
                "created_at": now,
                "expires_at": now + dt.timedelta(seconds=self.server.settings.tokens.code_ttl),
                "used_at": None,
            },
        )

    def validate_token_request(self) -> None:
        self.presented = _read_presented(self, "code", _CODE_READ, "code_client_id")
        super().validate_token_request()
        code: CodeCredential = self.request.authorization_code
        _check_token_resource(self.request, code.resource)

    def query_authorization_code(self, code: str, client: Any) -> CodeCredential | None:
        """The code as read with the request's first statement. A code used before revokes its
        grant (RFC 6749 section 4.1.2); it is claimed (single use, OAuth 2.1 section 4.1.3)
        only once the whole request has been validated, PKCE included (:meth:`save_token`), so
        a request that fails never uses the code up."""
        row: DriverRow | None = self.presented
        if row is None or row.code_client_id != client.get_client_id():
            return None
        if row.used_at is not None:
            self.server.state().revoke_grant(row.grant_id, "code_replay")
            return None
        if row.expires_at <= utcnow():
            return None
        return CodeCredential(
            code_hash=row.code_hash,
            redirect_uri=row.redirect_uri,
            scope=row.scope,
            resource=row.code_resource,
            code_challenge=row.code_challenge,
            code_challenge_method=row.code_challenge_method,
            grant=_grant(row),
        )

    def delete_authorization_code(self, authorization_code: CodeCredential) -> None:
        """Nothing to do: the code was marked used atomically when it was redeemed."""

    def authenticate_user(self, authorization_code: CodeCredential) -> GrantUser | None:
        grant = authorization_code.grant
        return GrantUser(grant) if grant.live else None

    def save_token(self, token: dict[str, Any]) -> None:
        """The claim of the code, the first refresh token of the grant's family and the
        ``issue`` audit event, together. The conditional claim decides races between workers:
        exactly one redemption wins; one that loses (a parallel redemption of the same code)
        revokes the grant, as a replay does."""
        server = self.server
        state = server.state()
        server.record_client_use(self.request.client)
        code: CodeCredential = self.request.authorization_code
        grant = code.grant
        now = utcnow()
        plaintext = token.get("refresh_token")
        new = (
            _new_token(
                server.settings,
                digest=token_hash(plaintext),
                grant=grant,
                now=now,
                family_expires=None,
            )
            if plaintext
            else {"now": now}
        )
        entry = audit.values(
            "issue",
            "success",
            at=now,
            user_id=grant.user_id,
            client_id=grant.client_id,
            resource=grant.resource,
            address=state.address,
            details={"grant": grant.id, "scope": token.get("scope", "")},
        )
        connection = state.connection()
        claim = {"digest": code.code_hash, "now": now}
        hot = server.hot
        if not hot.one_statement:  # SQLite
            won = bool(hot.rows(connection, _CODE_CLAIM, claim))
            if won:
                if plaintext:
                    hot.rows(connection, _FIRST_TOKEN_INSERT, new)
                state.audited(entry, hot.event(connection, entry))
        else:
            statement = REDEEM_ONCE if plaintext else REDEEM_ONCE_WITHOUT_REFRESH
            event_id = hot.write(
                connection, statement, {**new, **claim, **audit.when_params(entry)}
            )
            won = event_id is not None
            if won:
                state.audited(entry, event_id)
        if not won:
            state.revoke_grant(grant.id, "code_replay")
            raise InvalidGrantError("Invalid 'code' in request.")


def _check_token_resource(request: Any, resource: str) -> None:
    """RFC 8707 section 2.2: a ``resource`` at the token endpoint must be the one the grant is for
    (one grant, one audience); a refresh may narrow scopes, never widen the audience."""
    values = request.payload.datalist.get("resource", [])
    if not values:
        return
    if len(values) > 1 or values[0].rstrip("/") != resource.rstrip("/"):
        raise InvalidTargetError("The resource does not match the authorization grant.")


# -- the refresh token grant ---------------------------------------------------------------------


class RefreshTokenGrant(grants.RefreshTokenGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = CLIENT_AUTH_METHODS
    INCLUDE_NEW_REFRESH_TOKEN = True

    def validate_token_request(self) -> None:
        self.presented = _read_presented(self, "refresh_token", _REFRESH_READ, "client_id")
        super().validate_token_request()
        credential: RefreshCredential = self.request.refresh_token
        _check_token_resource(self.request, credential.grant.resource)
        recheck: RecheckDue | None = self.server.state().recheck
        if recheck is not None and credential.grace_successor is None:
            due = recheck(credential.grant)
            if due is not None:
                raise RecheckFirst(due)
        self.redecide(credential)

    def authenticate_refresh_token(self, refresh_token: str) -> RefreshCredential | None:
        row: DriverRow | None = self.presented
        if row is None:
            return None
        grant = _grant(row)
        now = utcnow()
        if not grant.live or row.expires_at <= now:
            return None
        credential = RefreshCredential(
            row.token_hash, row.parent_hash, row.scope, row.expires_at, grant
        )
        if row.used_at is None:
            return credential if row.idle_expires_at > now else None
        credential.grace_successor = self._grace_successor(row, now)
        if credential.grace_successor is not None:
            return credential
        self.server.state().revoke_grant(grant.id, "refresh_token_reuse")
        return None

    def _grace_successor(self, row: Row[Any] | DriverRow, now: dt.datetime) -> str | None:
        """Within the grace window after ``row`` was used, its successor (while unused) is
        handed out again to a parallel refresh."""
        grace = dt.timedelta(seconds=self.server.settings.tokens.refresh_reuse_grace)
        if (
            now - row.used_at <= grace
            and row.successor_sealed
            and row.successor_hash
            and row.successor_unused
        ):
            plaintext: str = self.server.sealer.open_text(
                row.successor_sealed, successor_aad(row.token_hash)
            )
            return plaintext
        return None

    def redecide(self, credential: RefreshCredential) -> None:
        """Every refresh decides again (the user being disabled is checked with the grant):
        the resource must still be served, and the current rules, read against the stored
        identity, must still entitle the grant's required scopes. A narrowed entitlement
        narrows this and every later token of the grant; a lost one ends the grant
        (``invalid_grant``: the client must authorize again, and will be refused there too)."""
        server = self.server
        state = server.state()
        grant = credential.grant
        resource = server.settings.resource(grant.resource)
        reason = None
        if resource is None:
            reason = "resource_removed"
        elif grant.identity is None:
            reason = "identity_removed"
        else:
            upstream = UpstreamIdentity.from_snapshot(grant.identity.snapshot)
            decision = policy.decide(server.settings, resource, upstream)
            granted = grant.scope.split()
            entitled = [s for s in granted if s in decision.scopes]
            if decision.denied is not None:
                reason = "denied_by_policy"
            elif not set(resource.required_scopes) <= set(entitled) or (granted and not entitled):
                reason = "entitlement_lost"
            else:
                credential.entitled = entitled
                if entitled != granted:  # never widened again without consent
                    narrowed = " ".join(entitled)
                    state.connection().execute(
                        _GRANT_NARROW, {"grant": grant.id, "narrowed": narrowed}
                    )
                    credential.grant = replace(grant, scope=narrowed)
        if reason is not None:
            state.revoke_grant(grant.id, reason)
            raise InvalidGrantError("Access under this grant is no longer allowed.")

    def authenticate_user(self, refresh_token: RefreshCredential) -> GrantUser:
        return GrantUser(refresh_token.grant)

    def issue_token(self, user: GrantUser, refresh_token: RefreshCredential) -> dict[str, Any]:
        """RFC 6749 section 6: the requested ``scope`` MUST NOT include any scope not originally
        granted (Authlib's check answers ``invalid_scope`` before this runs), and "if omitted is
        treated as equal to the scope originally granted". A scope of only spaces is omitted, not
        an empty scope (a token without the resource's required scopes), and the granted scope
        is written once per scope, space-separated (section 3.3)."""
        asked = " ".join(dict.fromkeys((self.request.payload.scope or "").split()))
        scope = asked or refresh_token.get_scope()
        if refresh_token.entitled is not None:  # narrowed by the current rules
            scope = " ".join(s for s in scope.split() if s in refresh_token.entitled)
        rotate = refresh_token.grace_successor is None
        token: dict[str, Any] = self.generate_token(
            user=user, scope=scope, include_refresh_token=rotate
        )
        if not rotate:  # a parallel refresh within the grace window: the same successor
            token["refresh_token"] = refresh_token.grace_successor
        return token

    def save_token(self, token: dict[str, Any]) -> None:
        """Rotation (OAuth 2.1 section 4.3.1): the presented token is claimed and linked to its
        successor in one conditional update; the grandparent's kept successor (the presented
        token) is dropped, since a replay of the grandparent can no longer get anything; the
        successor is stored with the family's absolute expiry. A request that loses the claim
        to a parallel one gets the winner's successor within the grace window; otherwise the
        presented token was reused, and the grant is revoked."""
        server = self.server
        state = server.state()
        credential: RefreshCredential = self.request.refresh_token
        server.record_client_use(self.request.client)
        if credential.grace_successor is not None:
            return  # the successor handed out again already exists
        plaintext: str = token["refresh_token"]
        digest = token_hash(plaintext)
        now = utcnow()
        grant = credential.grant
        connection = state.connection()
        rotation = {
            "digest": credential.token_hash,
            "parent": credential.parent_hash,
            "sealed": server.sealer.seal_text(plaintext, successor_aad(credential.token_hash)),
            **_new_token(
                server.settings,
                digest=digest,
                grant=grant,
                now=now,
                family_expires=credential.expires_at,
            ),
        }
        entry = audit.values(
            "refresh",
            "success",
            at=now,
            user_id=grant.user_id,
            client_id=grant.client_id,
            resource=grant.resource,
            address=state.address,
            details={"grant": grant.id, "scope": token.get("scope", "")},
        )
        hot = server.hot
        if not hot.one_statement:  # SQLite
            rotated = hot.rows(connection, _ROTATE, rotation)
            won = any(row.token_hash == credential.token_hash for row in rotated)
            if won:
                hot.rows(connection, _SUCCESSOR_INSERT, rotation)
                state.audited(entry, hot.event(connection, entry))
        else:
            event_id = hot.write(connection, ROTATE_ONCE, {**rotation, **audit.when_params(entry)})
            won = event_id is not None
            if won:
                state.audited(entry, event_id)
        if not won:
            again = connection.execute(_REFRESH_REREAD, {"digest": credential.token_hash}).first()
            successor = self._grace_successor(again, now) if again is not None else None
            if successor is None:
                state.revoke_grant(grant.id, "refresh_token_reuse")
                raise InvalidGrantError()
            token["refresh_token"] = successor

    def revoke_old_credential(self, refresh_token: RefreshCredential) -> None:
        """Nothing to do: the old token was claimed and linked to its successor atomically."""


def successor_aad(parent_hash: str) -> str:
    return f"refresh_tokens:{parent_hash}:successor"


__all__ = [
    "AuthorizationCodeGrant",
    "CodeCredential",
    "GrantRow",
    "GrantUser",
    "IdentityRow",
    "InvalidGrantError",
    "RecheckFirst",
    "RefreshCredential",
    "RefreshTokenGrant",
]
