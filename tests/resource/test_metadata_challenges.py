"""RFC 9728 metadata, RFC 6750 challenges, and the WSGI middleware that serves and applies them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pytest
from werkzeug.test import Client

from broker.resource import (
    BrokerTokenVerifier,
    ProtectedResource,
    ResourceMetadata,
    bearer_challenge,
    insufficient_scope_challenge,
    invalid_token_challenge,
    missing_token_challenge,
)
from broker.resource.wsgi import bearer_token

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

    from conftest import FakeBroker

ISSUER = "http://127.0.0.1:8000"
RESOURCE = "http://127.0.0.1:8001/mcp"

_PARAM = re.compile(r'\s*([a-z_]+)="((?:[^"\\]|\\.)*)"\s*(?:,|$)')


def parse_challenge(value: str) -> dict[str, str]:
    """A strict reading of one `Bearer` challenge (RFC 9110 section 11.6.1 auth-params)."""
    scheme, _, rest = value.partition(" ")
    assert scheme == "Bearer"
    params: dict[str, str] = {}
    position = 0
    while position < len(rest):
        match = _PARAM.match(rest, position)
        assert match, f"unparsable challenge at {rest[position:]!r}"
        params[match.group(1)] = re.sub(r"\\(.)", r"\1", match.group(2))
        position = match.end()
    return params


# -- protected resource metadata ------------------------------------------------------------------


def test_metadata_document() -> None:
    metadata = ResourceMetadata.for_broker(
        RESOURCE, ISSUER, scopes_supported=["mcp:read", "mcp:write"], resource_name="Files"
    )
    assert metadata.document() == {
        "resource": RESOURCE,
        "authorization_servers": [ISSUER],
        "scopes_supported": ["mcp:read", "mcp:write"],
        "bearer_methods_supported": ["header"],
        "resource_name": "Files",
    }
    assert json.loads(metadata.json_bytes()) == metadata.document()


def test_metadata_keeps_strings_exactly() -> None:
    metadata = ResourceMetadata.for_broker("https://MCP.example.com:443/mcp/", "https://b.example")
    document = metadata.document()
    assert document["resource"] == "https://MCP.example.com:443/mcp/"
    assert document["authorization_servers"] == ["https://b.example"]
    assert "scopes_supported" not in document


@pytest.mark.parametrize(
    ("resource", "paths", "url"),
    [
        (
            "http://127.0.0.1:8001/mcp",
            ("/.well-known/oauth-protected-resource/mcp", "/.well-known/oauth-protected-resource"),
            "http://127.0.0.1:8001/.well-known/oauth-protected-resource/mcp",
        ),
        (
            "https://h.example/tenant/a/mcp/",
            (
                "/.well-known/oauth-protected-resource/tenant/a/mcp/",
                "/.well-known/oauth-protected-resource",
            ),
            "https://h.example/.well-known/oauth-protected-resource/tenant/a/mcp/",
        ),
        (
            "https://h.example",
            ("/.well-known/oauth-protected-resource",),
            "https://h.example/.well-known/oauth-protected-resource",
        ),
        (
            "https://h.example/",
            ("/.well-known/oauth-protected-resource",),
            "https://h.example/.well-known/oauth-protected-resource",
        ),
    ],
)
def test_well_known_paths(resource: str, paths: tuple[str, ...], url: str) -> None:
    metadata = ResourceMetadata.for_broker(resource, ISSUER)
    assert metadata.well_known_paths == paths
    assert metadata.metadata_url == url


def test_bare_path_can_be_left_out() -> None:
    metadata = ResourceMetadata.for_broker(RESOURCE, ISSUER, serve_bare_path=False)
    assert metadata.well_known_paths == ("/.well-known/oauth-protected-resource/mcp",)


@pytest.mark.parametrize(
    "resource",
    ["/mcp", "mcp.example.com/mcp", "ftp://h.example/mcp", "https://h/mcp#x", "https://h/mcp?a=1"],
)
def test_metadata_refuses_bad_resource_identifiers(resource: str) -> None:
    with pytest.raises(ValueError):
        ResourceMetadata.for_broker(resource, ISSUER)


@pytest.mark.parametrize(
    "options",
    [
        {"authorization_servers": ()},
        {"authorization_servers": ISSUER},
        {"authorization_servers": ("not a url",)},
        {"authorization_servers": (ISSUER,), "scopes_supported": ("offline_access",)},
        {"authorization_servers": (ISSUER,), "scopes_supported": ("two words",)},
        {"authorization_servers": (ISSUER,), "scopes_supported": ('quo"te',)},
    ],
)
def test_metadata_refuses_bad_fields(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ResourceMetadata(resource=RESOURCE, **options)


# -- challenges -----------------------------------------------------------------------------------

METADATA_URL = "http://127.0.0.1:8001/.well-known/oauth-protected-resource/mcp"


def test_missing_token_challenge() -> None:
    value = missing_token_challenge(METADATA_URL, ["mcp:read", "mcp:write"])
    assert value == f'Bearer resource_metadata="{METADATA_URL}", scope="mcp:read mcp:write"'
    assert missing_token_challenge(METADATA_URL) == f'Bearer resource_metadata="{METADATA_URL}"'


def test_invalid_token_challenge() -> None:
    params = parse_challenge(invalid_token_challenge(METADATA_URL, ["mcp:read"]))
    assert params == {
        "error": "invalid_token",
        "error_description": "The access token is invalid or expired",
        "resource_metadata": METADATA_URL,
        "scope": "mcp:read",
    }


def test_insufficient_scope_challenge() -> None:
    value = insufficient_scope_challenge(METADATA_URL, ["mcp:read", "mcp:admin"])
    assert value.startswith('Bearer error="insufficient_scope", ')
    params = parse_challenge(value)
    assert params["scope"] == "mcp:read mcp:admin"
    assert params["resource_metadata"] == METADATA_URL


def test_quoted_values_are_escaped() -> None:
    value = bearer_challenge(resource_metadata='https://h/a"b\\c')
    assert value == 'Bearer resource_metadata="https://h/a\\"b\\\\c"'
    assert parse_challenge(value) == {"resource_metadata": 'https://h/a"b\\c'}
    assert bearer_challenge() == "Bearer"


@pytest.mark.parametrize(
    "options",
    [
        {"resource_metadata": "https://h/\r\nSet-Cookie: a=b"},
        {"resource_metadata": "https://h/é"},
        {"error": 'bad"code'},
        {"error": ""},
        {"error_description": "back\\slash"},
        {"scope": ["a b"]},
        {"scope": ['q"']},
    ],
)
def test_challenges_refuse_what_cannot_be_sent(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        bearer_challenge(**options)


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (None, None),
        ("", None),
        ("Basic dXNlcjpwYXNz", None),
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        ("bearer abc", "abc"),
        ("BEARER   abc  ", "abc"),
        ("Bearer", ""),
    ],
)
def test_bearer_token_extraction(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


# -- the WSGI middleware --------------------------------------------------------------------------


def inner_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    token = environ["broker.token"]
    body = json.dumps({"sub": token.subject, "scopes": list(token.scopes)}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


@pytest.fixture
def protected(broker: FakeBroker, verifier: BrokerTokenVerifier) -> Client:
    metadata = ResourceMetadata.for_broker(
        broker.audience, broker.issuer, scopes_supported=["mcp:read", "mcp:write", "mcp:admin"]
    )
    return Client(ProtectedResource(inner_app, verifier, metadata, required_scopes=["mcp:read"]))


@pytest.mark.parametrize(
    "path", ["/.well-known/oauth-protected-resource/mcp", "/.well-known/oauth-protected-resource"]
)
def test_middleware_serves_metadata_at_both_paths(
    protected: Client, broker: FakeBroker, path: str
) -> None:
    response = protected.get(path)
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert response.mimetype == "application/json"
    document = response.get_json()
    assert document["resource"] == broker.audience
    assert document["authorization_servers"] == [broker.issuer]
    assert document["bearer_methods_supported"] == ["header"]
    assert broker.jwks_requests == 0  # public: no token, no key needed


def test_middleware_metadata_methods(protected: Client) -> None:
    path = "/.well-known/oauth-protected-resource/mcp"
    preflight = protected.options(
        path, headers={"Origin": "http://localhost:6274", "Access-Control-Request-Method": "GET"}
    )
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "*"
    head = protected.head(path)
    assert head.status_code == 200
    assert head.data == b""
    assert protected.post(path).status_code == 405


def test_middleware_401_without_token(protected: Client, broker: FakeBroker) -> None:
    response = protected.post("/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "initialize"})
    assert response.status_code == 401
    assert response.headers["Cache-Control"] == "no-store"
    params = parse_challenge(response.headers["WWW-Authenticate"])
    assert params == {
        "resource_metadata": "http://127.0.0.1:8001/.well-known/oauth-protected-resource/mcp",
        "scope": "mcp:read",
    }
    assert response.get_json()["error"] == "unauthorized"
    assert broker.jwks_requests == 0


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Basic dXNlcjpwYXNz"},  # another scheme is no bearer token
        {},
    ],
)
def test_middleware_other_schemes_and_query_tokens_are_no_token(
    protected: Client, broker: FakeBroker, headers: dict[str, str]
) -> None:
    # OAuth 2.1 section 5.2: never from the query string, even a valid token.
    response = protected.get("/mcp", query_string={"access_token": broker.sign()}, headers=headers)
    assert response.status_code == 401
    assert "error" not in parse_challenge(response.headers["WWW-Authenticate"])


@pytest.mark.parametrize("token", ["not a token", "abc.def.ghi", "", "a,b"])
def test_middleware_401_with_bad_token(protected: Client, token: str) -> None:
    response = protected.get("/mcp", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
    params = parse_challenge(response.headers["WWW-Authenticate"])
    assert params["error"] == "invalid_token"
    assert params["resource_metadata"].endswith("/.well-known/oauth-protected-resource/mcp")
    assert response.get_json()["error"] == "invalid_token"


def test_middleware_401_with_token_for_another_resource(
    protected: Client, broker: FakeBroker
) -> None:
    token = broker.sign(aud="http://127.0.0.1:8002/mcp")
    response = protected.get("/mcp", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
    assert parse_challenge(response.headers["WWW-Authenticate"])["error"] == "invalid_token"


def test_middleware_403_insufficient_scope(protected: Client, broker: FakeBroker) -> None:
    token = broker.sign(scope="mcp:write")
    response = protected.get("/mcp", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 403
    params = parse_challenge(response.headers["WWW-Authenticate"])
    assert params["error"] == "insufficient_scope"
    assert params["scope"] == "mcp:read"
    assert params["resource_metadata"].endswith("/.well-known/oauth-protected-resource/mcp")
    assert response.get_json()["error"] == "insufficient_scope"


def test_middleware_passes_the_verified_token_on(protected: Client, broker: FakeBroker) -> None:
    token = broker.sign(sub="user-7", scope="mcp:read mcp:admin")
    response = protected.post("/mcp", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    assert response.get_json() == {"sub": "user-7", "scopes": ["mcp:read", "mcp:admin"]}


def test_middleware_503_when_the_jwks_is_unavailable(protected: Client, broker: FakeBroker) -> None:
    broker.failing = True
    response = protected.get("/mcp", headers={"Authorization": f"Bearer {broker.sign()}"})
    assert response.status_code == 503
    assert "WWW-Authenticate" not in response.headers
    assert response.headers["Retry-After"]


def test_middleware_requires_matching_audience_and_resource(
    broker: FakeBroker, verifier: BrokerTokenVerifier
) -> None:
    metadata = ResourceMetadata.for_broker("http://127.0.0.1:8002/mcp", broker.issuer)
    with pytest.raises(ValueError):
        ProtectedResource(inner_app, verifier, metadata)
