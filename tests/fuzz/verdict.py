"""What every answer to a hostile request must satisfy, and the tools to check it.

- Never a 5xx (the fake upstream is healthy and the database is up, so nothing is temporary).
- No ERROR log record and no traceback (:class:`ErrorLog`).
- API endpoints (RFC 6749 section 5.2, RFC 7591 section 3.2.2, RFC 7009, RFC 7662): an error is
  JSON ``{"error": <a code the endpoint may answer>, "error_description"?: <printable ASCII
  without '"' and '\\'>}`` with the status that code goes with; ``invalid_client`` after Basic
  credentials is 401 with ``WWW-Authenticate``.
- Browser endpoints: an error is an HTML page, never a redirect; a page never carries a script the
  request smuggled in.
- A redirect goes to a page of the broker, to the upstream provider's sign-in, or to a redirect
  URI the client registered; there it carries ``iss`` (RFC 9207) and, for an error, an RFC 6749
  section 4.1.2.1 code with a well-formed description.
- A refused request leaves the database as it was (:class:`Snapshot`): no row of any table
  inserted, updated or deleted.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from sqlalchemy import text
from sqlalchemy.engine import Engine

from broker.db import Base
from broker.oauth2.clients import redirect_uri_matches
from tests.fuzz.wire import Answer, Wire

# The error codes each API endpoint may answer with (besides the generic ones below).
API_ERRORS: dict[str, frozenset[str]] = {
    "token": frozenset(
        {
            "invalid_request",
            "invalid_client",
            "invalid_grant",
            "unauthorized_client",
            "unsupported_grant_type",
            "invalid_scope",
            "invalid_target",  # RFC 8707
        }
    ),
    "register": frozenset({"invalid_request", "invalid_redirect_uri", "invalid_client_metadata"}),
    "revoke": frozenset({"invalid_request", "invalid_client", "unsupported_token_type"}),
    "introspect": frozenset({"invalid_request", "invalid_client"}),
    "metadata": frozenset(),
    "jwks": frozenset(),
    "health": frozenset(),
    "ready": frozenset(),
}
GENERIC_ERRORS = frozenset({"invalid_request", "not_found", "too_many_requests"})
# The status each code goes with (RFC 6749 section 5.2: 400, and 401 for invalid_client after an
# Authorization header; 404 for a path that is not there; 405 a method the endpoint refuses, 413
# a body over the limit, 429 a rate limit).
STATUSES: dict[str, frozenset[int]] = {
    "invalid_client": frozenset({400, 401}),
    "invalid_request": frozenset({400, 405, 413}),
    "not_found": frozenset({404}),
    "too_many_requests": frozenset({429}),
}
# RFC 6749 section 4.1.2.1 (and RFC 8707, OIDC prompt=none) errors sent back to the client.
AUTHORIZATION_ERRORS = frozenset(
    {
        "invalid_request",
        "unauthorized_client",
        "access_denied",
        "unsupported_response_type",
        "invalid_scope",
        "invalid_target",
        "login_required",
        "consent_required",
        "interaction_required",
    }
)
API_ENDPOINTS = frozenset(API_ERRORS)
BROWSER_ENDPOINTS = frozenset({"authorize", "consent", "login", "callback", "account"})
BROKER_PAGES = ("/consent", "/login/", "/account")


def description_ok(text: Any) -> bool:
    """RFC 6749 section 5.2: ``error_description`` is %x20-21 / %x23-5B / %x5D-7E."""
    return isinstance(text, str) and all(0x20 <= ord(c) <= 0x7E and c not in '"\\' for c in text)


def error_code_ok(code: Any) -> bool:
    """RFC 6749 section 5.2: ``error`` is %x20-21 / %x23-5B / %x5D-7E, in practice a snake_case
    code."""
    return isinstance(code, str) and bool(code) and all(c.islower() or c == "_" for c in code)


@dataclass
class World:
    """What the checks need to know of the world: the issuer, every redirect URI a client of
    the world registered, and where the upstream provider's sign-in lives."""

    issuer: str
    redirect_uris: set[str] = field(default_factory=set)
    upstream_prefixes: tuple[str, ...] = ()


class Violation(AssertionError):
    pass


def _fail(wire: Wire, answer: Answer, why: str) -> None:
    raise Violation(
        f"{why}\n--- request\n{wire.describe()}\n--- answer {answer.status}\n"
        + "".join(f"  {k}: {v[:300]}\n" for k, v in answer.headers.items())
        + f"  {answer.body[:800]!r}"
    )


def check_answer(endpoint: str, wire: Wire, answer: Answer, world: World) -> None:
    """The shape rules of the module docstring for one answer (not the log, not the database)."""
    if answer.status >= 500:
        _fail(wire, answer, f"a {answer.status} answer")
    if not answer.from_app:
        # The HTTP server's own refusal (gunicorn: a request line or header it cannot parse).
        if not 400 <= answer.status < 500:
            _fail(wire, answer, "the server's own answer is not a 4xx")
        return
    path_changed = not _same_endpoint(endpoint, wire)
    if 300 <= answer.status < 400:
        check_redirect(wire, answer, world)
    elif answer.status >= 400:
        if endpoint in API_ENDPOINTS and not path_changed:
            check_json_error(endpoint, wire, answer)
        elif endpoint in BROWSER_ENDPOINTS and not path_changed:
            check_page(wire, answer)
        elif answer.mimetype == "application/json":
            check_json_error(endpoint, wire, answer, generic_only=True)
        else:
            check_page(wire, answer)
    if answer.mimetype == "text/html":
        _no_smuggled_script(wire, answer)
    api_success = answer.status < 300 and endpoint in API_ENDPOINTS and wire.method != "HEAD"
    if api_success and answer.body and answer.mimetype == "application/json":
        try:
            answer.json()
        except ValueError:
            _fail(wire, answer, "a success answer that is not JSON")


def _same_endpoint(endpoint: str, wire: Wire) -> bool:
    """Whether the request still names the endpoint's path (a path mutation makes it another
    route, or none)."""
    path = re.sub("/+", "/", wire.path.decode("latin-1"))  # Werkzeug merges slashes
    return path.rstrip("/") in ENDPOINT_PATHS.get(endpoint, ()) or (
        endpoint in ("login", "callback") and path.count("/") == 2 and "%" not in path
    )


ENDPOINT_PATHS: dict[str, tuple[str, ...]] = {
    "token": ("/token",),
    "register": ("/register",),
    "revoke": ("/revoke",),
    "introspect": ("/introspect",),
    "metadata": (
        "/.well-known/oauth-authorization-server",
        "/.well-known/openid-configuration",
    ),
    "jwks": ("/jwks.json",),
    "health": ("/health",),
    "ready": ("/ready",),
    "authorize": ("/authorize",),
    "consent": ("/consent",),
    "account": ("/account", "/account/disconnect", "/account/disconnect-all"),
}


def check_json_error(
    endpoint: str, wire: Wire, answer: Answer, *, generic_only: bool = False
) -> None:
    if wire.method == "HEAD":
        return  # no body to look at
    if answer.mimetype != "application/json":
        _fail(wire, answer, "an API error that is not JSON")
    try:
        body = answer.json()
    except ValueError:
        _fail(wire, answer, "an API error whose body is not JSON")
    if not isinstance(body, dict) or set(body) - {"error", "error_description", "error_uri"}:
        _fail(wire, answer, "an API error that is not {error, error_description?}")
    code = body.get("error")
    allowed = GENERIC_ERRORS | (frozenset() if generic_only else API_ERRORS.get(endpoint, set()))
    if not error_code_ok(code) or code not in allowed:
        _fail(wire, answer, f"error {code!r} is not one {endpoint} may answer")
    if answer.status not in STATUSES.get(code, frozenset({400})):
        _fail(wire, answer, f"error {code} with status {answer.status}")
    if "error_description" in body and not description_ok(body["error_description"]):
        _fail(wire, answer, "error_description outside printable ASCII, or with '\"' or '\\'")
    if answer.status == 401 and "WWW-Authenticate" not in answer.headers:
        _fail(wire, answer, "a 401 without WWW-Authenticate (RFC 6749 section 5.2)")
    authorization = wire.header("Authorization") or ""
    basic = authorization.lower().startswith("basic")
    if code == "invalid_client" and basic and answer.status != 401:
        _fail(wire, answer, "invalid_client after Basic credentials must be 401")


def check_page(wire: Wire, answer: Answer) -> None:
    if "Location" in answer.headers:
        _fail(wire, answer, "an error page with a Location header")
    if wire.method != "HEAD" and answer.mimetype != "text/html":
        _fail(wire, answer, "a browser endpoint's error that is not an HTML page")


def _no_smuggled_script(wire: Wire, answer: Answer) -> None:
    if b"<script" in answer.body.lower():
        _fail(wire, answer, "a page with a <script> element (the request's value unescaped?)")


def check_redirect(wire: Wire, answer: Answer, world: World) -> None:
    location = answer.location
    if not location:
        _fail(wire, answer, "a redirect without Location")
    assert location is not None
    if location.startswith("/") and not location.startswith("//") and "\\" not in location:
        if not location.startswith(BROKER_PAGES):
            _fail(wire, answer, "a redirect to a page of the broker that does not exist")
        return
    if location.startswith(world.upstream_prefixes):
        return
    base = location.split("?", 1)[0]
    if not any(redirect_uri_matches(r, base) for r in world.redirect_uris):
        _fail(wire, answer, "a redirect to a URI no client registered")
    params = dict(parse_qsl(urlsplit(location).query, keep_blank_values=True))
    if params.get("iss") != world.issuer:
        _fail(wire, answer, "an authorization response without iss (RFC 9207)")
    if "error" in params:
        if params["error"] not in AUTHORIZATION_ERRORS:
            _fail(wire, answer, f"authorization error {params['error']!r}")
        if "error_description" in params and not description_ok(params["error_description"]):
            _fail(wire, answer, "error_description outside printable ASCII, or with '\"' or '\\'")
    elif "code" not in params:
        _fail(wire, answer, "a redirect to the client with neither code nor error")


def refused(answer: Answer) -> bool:
    """The request was refused: an error status, or an error sent back to the client."""
    if answer.status >= 400:
        return True
    if 300 <= answer.status < 400 and answer.location and "?" in answer.location:
        return "error" in dict(parse_qsl(urlsplit(answer.location).query))
    return False


# -- the log -------------------------------------------------------------------------------------


class ErrorLog(logging.Handler):
    """Collects every record at ERROR or above, and every record carrying a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)

    @contextmanager
    def watching(self) -> Iterator[ErrorLog]:
        root = logging.getLogger()
        self.records.clear()
        root.addHandler(self)
        try:
            yield self
        finally:
            root.removeHandler(self)

    def check(self, wire: Wire, answer: Answer) -> None:
        if self.records:
            record = self.records[0]
            trace = self.format(record) if record.exc_info else record.getMessage()
            _fail(wire, answer, f"logged at {record.levelname}: {trace}")


# -- the database --------------------------------------------------------------------------------

TABLES = tuple(table.name for table in Base.metadata.sorted_tables)
JOURNAL = "fuzz_writes"


def install_journal(engine: Engine) -> None:
    """Test-only, in the fuzzed database: a trigger on every broker table journals each row
    inserted, updated or deleted (its table's name, in ``fuzz_writes``). Whether a request changed
    the database is then one indexed query, however large the tables grew: a digest of every
    row made each example cost more than the one before (the long profile was quadratic). Rolled
    back writes leave no journal row, as they leave no data."""
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql(
                f"CREATE TABLE {JOURNAL} (id INTEGER PRIMARY KEY AUTOINCREMENT, tbl TEXT NOT NULL)"
            )
            for table in TABLES:
                for event in ("INSERT", "UPDATE", "DELETE"):
                    conn.exec_driver_sql(
                        f"CREATE TRIGGER fuzz_{table}_{event.lower()} AFTER {event} ON {table} "
                        f"BEGIN INSERT INTO {JOURNAL} (tbl) VALUES ('{table}'); END"
                    )
            return
        conn.exec_driver_sql(
            f"CREATE TABLE {JOURNAL} (id BIGSERIAL PRIMARY KEY, tbl TEXT NOT NULL)"
        )
        conn.exec_driver_sql(
            "CREATE FUNCTION fuzz_write() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN INSERT INTO {JOURNAL} (tbl) VALUES (TG_TABLE_NAME); RETURN NULL; END $$"
        )
        for table in TABLES:
            conn.exec_driver_sql(
                f"CREATE TRIGGER fuzz_write AFTER INSERT OR UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION fuzz_write()"
            )


@dataclass(frozen=True)
class Snapshot:
    """Where the write journal stood (:func:`install_journal`); :meth:`changed` names the tables
    written since. Requests are sent one at a time, so no other transaction is in flight."""

    engine: Engine
    mark: int

    @classmethod
    def take(cls, engine: Engine) -> Snapshot:
        with engine.connect() as conn:
            mark = conn.execute(text(f"SELECT coalesce(max(id), 0) FROM {JOURNAL}")).scalar_one()
        return cls(engine, int(mark))

    def changed(self) -> list[str]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                text(f"SELECT DISTINCT tbl FROM {JOURNAL} WHERE id > :mark"), {"mark": self.mark}
            )
            return sorted(str(row[0]) for row in rows)


def check_database(
    wire: Wire, answer: Answer, before: Snapshot, allowed: Iterable[str] = ()
) -> None:
    changed = [t for t in before.changed() if t not in set(allowed)]
    if changed:
        _fail(wire, answer, f"a refused request changed the database: {', '.join(changed)}")
