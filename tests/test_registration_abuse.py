"""Dynamic client registration under abuse (RFC 7591, RFC 8252, RFC 6585): a table of hostile
registrations, each refused with the right error and nothing stored; the real clients'
registrations still accepted; the per-address limit; oversized bodies (413 and the connection
closed); registration switched off."""

from __future__ import annotations

import io
import json
import secrets
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from broker import create_app
from broker.config import parse
from broker.db import Base, Database
from broker.migrate import upgrade
from broker.models import Client
from tests.conftest import POSTGRES_URL, postgres_available
from tests.support import RESOURCE, free_port, serve_wsgi, unavailable

VALID: dict[str, Any] = {
    "client_name": "Example client",
    "redirect_uris": ["http://127.0.0.1/callback"],
    "token_endpoint_auth_method": "none",
    "application_type": "native",
}


def with_(**changes: Any) -> dict[str, Any]:
    """The valid registration with one thing changed (``None`` removes a field)."""
    body = {**VALID, **changes}
    return {k: v for k, v in body.items() if v is not None}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def shared(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, users_file: Path
) -> Iterator[Flask]:
    """One app per database for the whole table (each case counts rows before and after)."""
    import psycopg

    tmp = tmp_path_factory.mktemp("abuse")
    schema = None
    if request.param == "sqlite":
        url = f"sqlite:///{tmp / 'broker.db'}"
    else:
        if not postgres_available():
            unavailable(f"PostgreSQL is not reachable at {POSTGRES_URL}")
        schema = "t_" + secrets.token_hex(6)
        with psycopg.connect(POSTGRES_URL.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        url = f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    settings = parse(
        {
            "issuer": "http://127.0.0.1:8000",
            "secret_key": "abuse-secret-" + "x" * 40,
            "database_url": url,
            "instance_path": str(tmp / "instance"),
            "providers": {"local": {"users_file": str(users_file)}},
            "resources": [{"uri": RESOURCE, "scopes": {"demo:read": "Read"}}],
        },
        env={},
        base_dir=str(tmp),
        testing=True,
    )
    database = Database(url)
    upgrade(database.engine)
    database.dispose()
    app = create_app(settings)
    try:
        yield app
    finally:
        app.extensions["broker"].db.dispose()
        app.extensions["broker"].http.close()
        if schema is not None:
            with psycopg.connect(POSTGRES_URL.replace("+psycopg", ""), autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")


def stored(app: Flask) -> dict[str, int]:
    """Rows in every table but the rate-limit counters (which count requests, by design)."""
    with app.extensions["broker"].db.read() as session:
        return {
            table.name: int(session.execute(select(func.count()).select_from(table)).scalar_one())
            for table in Base.metadata.sorted_tables
            if table.name != "rate_limit_counters"
        }


def assert_refused(app: Flask, response: Any, status: int, error: str) -> None:
    assert response.status_code == status, response.text
    assert response.is_json and response.json["error"] == error
    description = response.json.get("error_description", "")
    assert description and "\n" not in description and description.isascii()
    assert response.headers["Cache-Control"] == "no-store"


HOSTILE_REDIRECT_URIS = [
    "javascript:alert(1)",
    "JavaScript:alert(1)",
    "data:text/html,<script>alert(1)</script>",
    "vbscript:msgbox(1)",
    "file:///etc/passwd",
    "https://app.example.com/cb#fragment",
    "https://app.example.com/cb#",
    "https://user@app.example.com/cb",  # userinfo
    "https://app.example.com@evil.example/cb",  # userinfo that looks like a host
    "https://evil.example\\@app.example.com/cb",  # a backslash: userinfo to some parsers
    "https://app.example.com%40evil.example/cb",  # an encoded @ in the host
    "http://user@127.0.0.1/callback",  # userinfo on loopback
    "http:evil@127.0.0.1/callback",  # userinfo without slashes (browsers still read it)
    "http://app.example.com/cb",  # http off loopback
    "http://localhost.evil.example/cb",
    "http://127.0.0.1.nip.io/cb",
    "https://app.example.com/c b",  # a space
    "https://app.example.com/c\tb",  # a tab, which browsers drop
    "https://app.example.com/caf\u00e9",  # not ASCII
    "https:///cb",  # no host
    "https://[::1/cb",  # a broken IPv6 literal
    "http://127.0.0.1:99999/cb",  # a bad port
    "myapp://callback",  # a private-use scheme that is no reverse domain name
    "myapp:/callback",
    "com.example+app:/cb",  # "+" is no domain name character
    "com.-example.app:/cb",
    "com..example:/cb",
    "com.example.app://user@host/cb",  # userinfo in a private-use URI
    "not a uri",
    "",
    "/relative/callback",
    "x" * 2049,
]


@pytest.mark.parametrize("uri", HOSTILE_REDIRECT_URIS)
def test_hostile_redirect_uris(shared: Flask, uri: str) -> None:
    app, client = shared, shared.test_client()
    before = stored(app)
    response = client.post("/register", json=with_(redirect_uris=[uri]))
    assert_refused(app, response, 400, "invalid_redirect_uri")
    assert stored(app) == before


def test_one_hostile_uri_among_good_ones_refuses_the_whole_registration(shared: Flask) -> None:
    app, client = shared, shared.test_client()
    before = stored(app)
    uris = ["http://127.0.0.1/callback", "https://app.example.com@evil.example/cb"]
    response = client.post("/register", json=with_(redirect_uris=uris))
    assert_refused(app, response, 400, "invalid_redirect_uri")
    assert stored(app) == before


@pytest.mark.parametrize(
    "uri",
    [
        "com.example.app:/oauth2redirect/example-provider",  # RFC 8252 section 7.1's example
        "com.example.app://callback",  # two slashes, as many SDKs write it
        "io.github.some-user.tool:/cb",
        "cursor://anysphere.cursor-mcp/oauth/callback",  # Cursor (a known client's scheme)
        "vscode://vscode.github-authentication/did-authenticate",
        "vscode-insiders://vscode.github-authentication/did-authenticate",
    ],
)
def test_private_use_schemes_that_are_accepted(shared: Flask, uri: str) -> None:
    client = shared.test_client()
    response = client.post("/register", json=with_(redirect_uris=[uri]))
    assert response.status_code == 201, response.json
    assert response.json["redirect_uris"] == [uri]


def test_private_use_schemes_are_for_native_clients_only(shared: Flask) -> None:
    app, client = shared, shared.test_client()
    before = stored(app)
    response = client.post(
        "/register",
        json=with_(redirect_uris=["com.example.app:/cb"], application_type="web"),
    )
    assert_refused(app, response, 400, "invalid_redirect_uri")
    assert stored(app) == before


HOSTILE_METADATA = [
    # Display URLs: https only.
    *(
        with_(**{field: value})
        for field in ("client_uri", "logo_uri", "policy_uri", "tos_uri")
        for value in (
            "http://app.example.com/",
            "javascript:alert(1)",
            "data:image/png;base64,AAAA",
            "https://user@app.example.com/",
            "https:///nohost",
            "//app.example.com/",
            42,
            ["https://app.example.com/"],
        )
    ),
    # Names.
    with_(client_name=""),
    with_(client_name="   "),
    with_(client_name="\t\n"),
    with_(client_name="x" * 201),
    with_(client_name="Evil\u202etxt.exe"),  # a bidirectional override
    with_(client_name="a\x00b"),
    # Wrong JSON types.
    with_(client_name=12),
    with_(client_name=["Example"]),
    with_(client_name={"en": "Example"}),
    with_(application_type="desktop"),
    with_(application_type=1),
    with_(token_endpoint_auth_method="private_key_jwt"),
    with_(token_endpoint_auth_method=["none"]),
    {**VALID, "token_endpoint_auth_method": None},  # JSON null
    with_(grant_types="authorization_code"),
    with_(grant_types=[1, 2]),
    with_(grant_types=["client_credentials"]),
    with_(response_types="code"),
    with_(response_types=["token"]),
    with_(scope=["demo:read"]),
    with_(scope=7),
    with_(extra={"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}}),
]


@pytest.mark.parametrize("body", HOSTILE_METADATA)
def test_hostile_metadata(shared: Flask, body: dict[str, Any]) -> None:
    app, client = shared, shared.test_client()
    before = stored(app)
    response = client.post("/register", json=body)
    assert_refused(app, response, 400, "invalid_client_metadata")
    assert stored(app) == before


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (with_(redirect_uris=None), "invalid_redirect_uri"),
        (with_(redirect_uris=[]), "invalid_redirect_uri"),
        (with_(redirect_uris="http://127.0.0.1/callback"), "invalid_redirect_uri"),
        (with_(redirect_uris=[None]), "invalid_redirect_uri"),
        (with_(redirect_uris=[["http://127.0.0.1/callback"]]), "invalid_redirect_uri"),
        (
            with_(redirect_uris=[f"https://a{i}.example/cb" for i in range(21)]),
            "invalid_redirect_uri",
        ),
    ],
)
def test_hostile_redirect_uri_lists(shared: Flask, body: dict[str, Any], error: str) -> None:
    app, client = shared, shared.test_client()
    before = stored(app)
    assert_refused(app, client.post("/register", json=body), 400, error)
    assert stored(app) == before


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        (json.dumps([VALID]), "application/json"),  # not an object
        ("null", "application/json"),
        ('"text"', "application/json"),
        ("{", "application/json"),  # not JSON
        (b"\xff\xfe{}", "application/json"),
        ("[" * 5000 + "]" * 5000, "application/json"),  # deeper than the JSON parser goes
        (json.dumps(VALID), "text/plain"),  # not declared as JSON
        ("redirect_uris=http://127.0.0.1/callback", "application/x-www-form-urlencoded"),
        ("", "application/json"),
    ],
)
def test_bodies_that_are_no_json_object(shared: Flask, data: Any, content_type: str) -> None:
    app, client = shared, shared.test_client()
    before = stored(app)
    response = client.post("/register", data=data, content_type=content_type)
    assert_refused(app, response, 400, "invalid_client_metadata")
    assert stored(app) == before


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE", "PATCH"])
def test_other_methods_get_405(shared: Flask, method: str) -> None:
    app, client = shared, shared.test_client()
    before = stored(app)
    response = client.open("/register", method=method)
    assert response.status_code == 405
    assert set(response.headers["Allow"].split(", ")) >= {"POST", "OPTIONS"}
    if method != "HEAD":
        assert response.json["error"] == "invalid_request"
    assert stored(app) == before


# -- oversized bodies -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [16 * 1024 + 1, 64 * 1024 + 1, 1024 * 1024])
def test_an_oversized_body_gets_413_and_connection_close(shared: Flask, size: int) -> None:
    app, client = shared, shared.test_client()
    before = stored(app)
    padding = "y" * (size - len(json.dumps(with_(extra=""))))
    response = client.post("/register", json=with_(extra=padding))
    assert_refused(app, response, 413, "invalid_request")
    assert response.headers["Connection"] == "close"
    assert stored(app) == before


def test_an_oversized_chunked_body_gets_413(shared: Flask) -> None:
    app, client = shared, shared.test_client()
    """Without a Content-Length the body is cut off at the limit while it is read."""
    before = stored(app)
    body = json.dumps(with_(extra="y" * 20_000)).encode()
    response = client.post(
        "/register",
        input_stream=io.BytesIO(body),
        content_type="application/json",
        headers={"Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},  # as a server that de-chunks sets
    )
    assert_refused(app, response, 413, "invalid_request")
    assert stored(app) == before


def _http(sock: socket.socket, request: bytes) -> bytes:
    """Send ``request`` and read one response (headers and Content-Length body)."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def test_over_a_real_socket_the_connection_closes_and_the_next_one_works(
    make_app: Callable[..., Flask],
) -> None:
    """An oversized registration on a kept-alive connection: 413 with ``Connection: close``,
    the server closes the connection (the unread body is never taken for a request), and a
    registration on a new connection succeeds."""
    app = make_app()
    port = free_port()
    body = json.dumps(with_(extra="y" * 40_000)).encode()
    with serve_wsgi(app, port) as url:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            answer = _http(
                sock,
                b"POST /register HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n"
                b"Content-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body,
            )
            head = answer.split(b"\r\n\r\n", 1)[0].decode().lower()
            assert head.startswith("http/1.1 413")
            assert "connection: close" in head
            assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "invalid_request"
            # The client honours "close" and sends nothing more (RFC 9112 section 9.6); the
            # server then closes too, and the unread body was never taken for a request.
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(10)
            try:
                rest = sock.recv(65536)
            except ConnectionResetError:
                rest = b""
            assert rest == b""
        response = httpx.post(f"{url}/register", json=VALID, timeout=10)
        assert response.status_code == 201, response.text
    with app.extensions["broker"].db.read() as session:
        assert session.execute(select(func.count()).select_from(Client)).scalar_one() == 1


# -- the real clients (STANDARDS.md) still register -------------------------------------------

REAL_CLIENTS: dict[str, dict[str, Any]] = {
    "claude": {
        "client_name": "Claude",
        "redirect_uris": ["https://claude.ai/api/mcp/auth_callback"],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "client_secret_post",
        "scope": "demo:read demo:write",
    },
    "vscode": {
        "client_name": "Visual Studio Code",
        "redirect_uris": [
            "http://127.0.0.1/",
            "http://127.0.0.1:33418/",
            "https://vscode.dev/redirect",
            "https://insiders.vscode.dev/redirect",
        ],
        "grant_types": [
            "authorization_code",
            "refresh_token",
            "urn:ietf:params:oauth:grant-type:device_code",
        ],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
        "application_type": "native",
    },
    "cursor": {
        "client_name": "Cursor",
        "redirect_uris": [
            "http://127.0.0.1:5555/callback",
            "cursor://anysphere.cursor-mcp/oauth/callback",
            "https://cursor.com/oauth/callback",
        ],
        "token_endpoint_auth_method": "none",
    },
    "mcp-remote": {
        "client_name": "MCP CLI Proxy",
        "client_uri": "https://github.com/geelen/mcp-remote",
        "software_id": "2e6dc280-f3c3-4e01-99a7-8181dbd1d23d",
        "software_version": "0.1.18",
        "redirect_uris": ["http://localhost:12334/oauth/callback"],
        "token_endpoint_auth_method": "none",
        "grant_types": [
            "authorization_code",
            "refresh_token",
            "urn:ietf:params:oauth:grant-type:jwt-bearer",
        ],
    },
    "chatgpt": {
        "client_name": "ChatGPT",
        "redirect_uris": ["https://chatgpt.com/connector_platform_oauth_redirect"],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "client_secret_post",
    },
}


@pytest.mark.parametrize("name", sorted(REAL_CLIENTS))
def test_the_real_clients_still_register(app: Flask, client: FlaskClient, name: str) -> None:
    if name == "chatgpt":  # it probes with GET and HEAD first
        assert client.get("/register").status_code == 405
        assert client.head("/register").status_code == 405
    response = client.post("/register", json=REAL_CLIENTS[name])
    assert response.status_code == 201, response.json
    assert response.json["redirect_uris"] == REAL_CLIENTS[name]["redirect_uris"]
    if name == "mcp-remote":
        assert response.json["client_uri"] == "https://github.com/geelen/mcp-remote"
        assert response.json["software_version"] == "0.1.18"
    with app.extensions["broker"].db.read() as session:
        row = session.get(Client, response.json["client_id"])
        assert row is not None and row.kind == "dcr"
        if "client_secret" in response.json:
            # A fast salted HMAC (never argon2id) that never holds the secret itself.
            assert row.secret_hash is not None and row.secret_hash.startswith("hmac-sha256$")
            assert response.json["client_secret"] not in row.secret_hash


def test_a_name_is_trimmed_and_an_absent_one_is_allowed(client: FlaskClient) -> None:
    named = client.post("/register", json=with_(client_name="  Example client  "))
    assert named.status_code == 201 and named.json["client_name"] == "Example client"
    anonymous = client.post("/register", json=with_(client_name=None))
    assert anonymous.status_code == 201 and "client_name" not in anonymous.json


def test_empty_display_urls_are_ignored(client: FlaskClient) -> None:
    response = client.post("/register", json=with_(logo_uri="", client_uri=None))
    assert response.status_code == 201
    assert "logo_uri" not in response.json and "client_uri" not in response.json


# -- the per-address limit ----------------------------------------------------------------------


def test_registrations_are_limited_per_address(make_app: Callable[..., Flask]) -> None:
    app = make_app(rate_limits={"register": {"per_address": "3/minute"}})
    client = app.test_client()
    # Preflights and methods refused with 405 are not counted.
    assert client.options("/register").status_code == 204
    assert client.get("/register").status_code == 405
    statuses = [client.post("/register", json=VALID).status_code for _ in range(3)]
    assert statuses == [201, 201, 201]
    before = stored(app)
    refused = client.post("/register", json=VALID, headers={"Origin": "http://localhost:6274"})
    assert_refused(app, refused, 429, "too_many_requests")
    retry_after = int(refused.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    assert refused.json["error_description"] == (
        f"Rate limit exceeded (register: 3/minute per address); retry after {retry_after} seconds."
    )
    # A browser client (MCP Inspector) may read Retry-After.
    assert refused.headers["Access-Control-Allow-Origin"] == "*"
    assert "Retry-After" in refused.headers["Access-Control-Expose-Headers"]
    # Refused before anything is read or stored, however bad the body.
    assert client.post("/register", data="x" * 100_000).status_code == 429
    assert stored(app) == before
    # Another address is counted on its own.
    other = client.post("/register", json=VALID, environ_base={"REMOTE_ADDR": "192.0.2.77"})
    assert other.status_code == 201


def test_ipv6_addresses_are_counted_per_64(make_app: Callable[..., Flask]) -> None:
    app = make_app(rate_limits={"register": {"per_address": "2/minute"}})
    client = app.test_client()
    for host in ("2001:db8:5::1", "2001:db8:5::2"):
        assert (
            client.post("/register", json=VALID, environ_base={"REMOTE_ADDR": host}).status_code
            == 201
        )
    same_64 = client.post("/register", json=VALID, environ_base={"REMOTE_ADDR": "2001:db8:5::3"})
    assert same_64.status_code == 429
    other_64 = client.post("/register", json=VALID, environ_base={"REMOTE_ADDR": "2001:db8:6::1"})
    assert other_64.status_code == 201


# -- registration switched off ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "GET", "HEAD", "OPTIONS"])
def test_registration_switched_off_is_not_found(
    make_app: Callable[..., Flask], method: str
) -> None:
    app = make_app(registration_enabled=False)
    client = app.test_client()
    before = stored(app)
    response = client.open("/register", method=method, json=VALID if method == "POST" else None)
    assert response.status_code == 404
    if method != "HEAD":
        assert response.json == {
            "error": "not_found",
            "error_description": (
                "Dynamic client registration is turned off on this server: use a "
                "pre-registered client or a client ID metadata document."
            ),
        }
    assert stored(app) == before
