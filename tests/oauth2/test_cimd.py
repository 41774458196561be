"""Client ID Metadata Documents (draft-ietf-oauth-client-id-metadata-document-02): the URL rules,
the special-use address filter, document validation, cache headers, fetches over real HTTPS from a
local server with a test CA, and the whole /authorize and token path through the app."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import trustme
from flask import Flask
from flask.testing import FlaskClient
from pytest_httpserver import HTTPServer
from sqlalchemy import select
from werkzeug.wrappers import Request, Response

from broker.config import CIMDSettings
from broker.db import utcnow
from broker.models import AuditEvent, Client
from broker.oauth2.cimd import (
    CIMDError,
    Deadline,
    DocumentFetcher,
    PinnedTransport,
    cache_lifetime,
    is_client_id_url,
    is_forbidden_address,
    validate_document,
)
from tests.support import authorize_params, pkce, query, redeem, sign_in_local

# -- the URL rules (section 3) ---------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://client.example.com/oauth/client-metadata.json",
        "https://claude.ai/oauth/claude-code-client-metadata",
        "https://vscode.dev/oauth/client-metadata.json",
        "https://client.example.com:8443/cimd",
        "https://client.example.com/a/b/",
        "https://192.0.2.10/cimd",  # refused later by the address filter, not by the URL rules
        "https://[2001:db8::1]/cimd",
        "https://client.example.com/%7Euser/cimd",
    ],
)
def test_client_id_urls(url: str) -> None:
    assert is_client_id_url(url)


@pytest.mark.parametrize(
    "value",
    [
        None,
        42,
        "",
        "mcp_Ab3dEf",  # a DCR client id
        "http://client.example.com/cimd",  # not https
        "HTTPS://client.example.com/cimd",  # compared as strings: the scheme is lower case
        "https://client.example.com",  # no path
        "https://client.example.com/",  # root path
        "https://user:pw@client.example.com/cimd",  # userinfo
        "https://user@client.example.com/cimd",
        "https://client.example.com/cimd#frag",  # fragment
        "https://client.example.com/cimd#",
        "https://client.example.com/cimd?name=x",  # query
        "https://client.example.com/cimd?",
        "https://client.example.com/a/../cimd",  # dot segments
        "https://client.example.com/a/./cimd",
        "https://client.example.com/a/%2e%2E/cimd",
        "https://client.example.com/..",
        "https://client.example.com:0/cimd",  # ports
        "https://client.example.com:65536/cimd",
        "https://client.example.com:/cimd",
        "https://client.example.com:0443/cimd",
        "https://client.example.com:https/cimd",
        "https://client .example.com/cimd",  # whitespace, control and non-ASCII
        "https://client.example.com/ci md",
        "https://client.example.com/cimd\n",
        "https://clïent.example.com/cimd",
        "https://client.example.com\\@evil.example/cimd",
        "https://client.example.com/100%/cimd",  # bad percent-encoding
        "https://client%2eexample.com/cimd",
        "https://127.1/cimd",  # non-canonical IPv4 spellings
        "https://0x7f.0.0.1/cimd",
        "https://2130706433/cimd",
        "https:///cimd",  # no host
        "https://-client.example.com/cimd",
        "https://[::1/cimd",
        "https://[fe80::1%25eth0]/cimd",
        "https://client.example.com/" + "a" * 2040,  # longer than 2048
    ],
)
def test_not_client_id_urls(value: Any) -> None:
    assert not is_client_id_url(value)


# -- special-use addresses (section 8.6) -----------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.255.0.1",
        "0.0.0.0",
        "0.1.2.3",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "100.64.0.1",  # CGNAT
        "100.127.255.254",
        "169.254.169.254",  # cloud metadata
        "192.0.0.8",
        "192.0.2.1",
        "198.18.0.1",
        "198.51.100.7",
        "203.0.113.9",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "::",
        "::1",
        "::127.0.0.1",  # IPv4-compatible
        "::ffff:127.0.0.1",  # IPv4-mapped
        "::ffff:10.0.0.1",
        "::ffff:8.8.8.8",  # mapped forms are refused even for a public address
        "::ffff:169.254.169.254",
        "fc00::1",
        "fd12:3456::1",
        "fe80::1",
        "fec0::1",
        "ff02::1",
        "2001:db8::1",
        "2001::1",  # Teredo
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",
        "2002:7f00:1::",  # 6to4 embedding 127.0.0.1
        "2002:a00:1::",  # 6to4 embedding 10.0.0.1
        "2002:808:808::",  # 6to4 is refused whatever it embeds
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "64:ff9b:1::808:808",  # local-use NAT64
        "100::1",
        "3fff::1",
        "5f00::1",
        "4000::1",  # outside global unicast
    ],
)
def test_special_use_addresses_are_refused(address: str) -> None:
    assert is_forbidden_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address",
    ["93.184.215.14", "8.8.8.8", "1.1.1.1", "2606:4700::6810:84e5", "64:ff9b::808:808"],
)
def test_public_addresses_are_allowed(address: str) -> None:
    assert not is_forbidden_address(ipaddress.ip_address(address))


# -- the document (section 4) ----------------------------------------------------------------

URL = "https://client.example.com/oauth/cimd.json"


def document(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "client_id": URL,
        "client_name": "Example MCP client",
        "redirect_uris": ["http://127.0.0.1/callback", "http://localhost/callback"],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
    }
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not None}


def refusal(doc: Any, url: str = URL) -> str:
    with pytest.raises(CIMDError) as info:
        validate_document(url, doc)
    return info.value.reason


def test_a_valid_document() -> None:
    metadata = validate_document(
        URL,
        document(
            grant_types=["authorization_code", "urn:ietf:params:oauth:grant-type:device_code"],
            software_id="example",
            logo_uri="http://insecure.example/logo.png",
            client_uri="https://client.example.com/",
            unknown_field={"ignored": True},
        ),
    )
    assert metadata["client_id"] == URL
    assert metadata["client_name"] == "Example MCP client"
    assert metadata["redirect_uris"] == ["http://127.0.0.1/callback", "http://localhost/callback"]
    assert metadata["grant_types"] == ["authorization_code", "refresh_token"]
    assert metadata["response_types"] == ["code"]
    assert metadata["token_endpoint_auth_method"] == "none"
    assert metadata["application_type"] == "native"  # loopback redirect URIs
    assert metadata["client_uri"] == "https://client.example.com/"
    assert "logo_uri" not in metadata  # only https URLs are kept
    assert "unknown_field" not in metadata


def test_application_type_follows_the_redirect_uris_unless_given() -> None:
    web = validate_document(URL, document(redirect_uris=["https://app.example.com/cb"]))
    assert web["application_type"] == "web"
    native = validate_document(URL, document(redirect_uris=["cursor://anysphere/cb"]))
    assert native["application_type"] == "native"
    given = validate_document(
        URL, document(redirect_uris=["https://app.example.com/cb"], application_type="native")
    )
    assert given["application_type"] == "native"
    # A private-use scheme is for native clients only (as in DCR).
    assert (
        refusal(document(redirect_uris=["cursor://anysphere/cb"], application_type="web"))
        == "invalid_redirect_uri"
    )


def test_token_endpoint_auth_method_defaults_to_none() -> None:
    metadata = validate_document(URL, document(token_endpoint_auth_method=None))
    assert metadata["token_endpoint_auth_method"] == "none"


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        ([], "invalid_document"),
        ("text", "invalid_document"),
        (document(client_id=None), "client_id_mismatch"),
        (document(client_id=URL + "/"), "client_id_mismatch"),
        (
            document(client_id="https://client.example.com:443/oauth/cimd.json"),
            "client_id_mismatch",
        ),
        (document(client_id="https://CLIENT.example.com/oauth/cimd.json"), "client_id_mismatch"),
        (document(client_name=None), "invalid_client_name"),
        (document(client_name=""), "invalid_client_name"),
        (document(client_name=["a"]), "invalid_client_name"),
        (document(client_name="x" * 201), "invalid_client_name"),
        (document(redirect_uris=None), "invalid_redirect_uri"),
        (document(redirect_uris=[]), "invalid_redirect_uri"),
        (document(redirect_uris="http://127.0.0.1/cb"), "invalid_redirect_uri"),
        (document(redirect_uris=["javascript:alert(1)"]), "invalid_redirect_uri"),
        (document(redirect_uris=["data:text/html,x"]), "invalid_redirect_uri"),
        (document(redirect_uris=["https://app.example.com/cb#x"]), "invalid_redirect_uri"),
        (document(redirect_uris=["http://app.example.com/cb"]), "invalid_redirect_uri"),
        (document(client_secret="s3cret"), "secret_present"),
        (document(client_secret_expires_at=0), "secret_present"),
        (
            document(jwks={"keys": [{"kty": "EC", "crv": "P-256", "x": "a", "y": "b", "d": "c"}]}),
            "secret_present",
        ),
        (document(token_endpoint_auth_method="client_secret_basic"), "unsupported_auth_method"),
        (document(token_endpoint_auth_method="client_secret_post"), "unsupported_auth_method"),
        (document(token_endpoint_auth_method="client_secret_jwt"), "unsupported_auth_method"),
        (document(token_endpoint_auth_method="private_key_jwt"), "unsupported_auth_method"),
        (document(grant_types=["client_credentials"]), "invalid_metadata"),
        (document(response_types=["token"]), "invalid_metadata"),
        (document(application_type="desktop"), "invalid_metadata"),
    ],
)
def test_invalid_documents(doc: Any, reason: str) -> None:
    assert refusal(doc) == reason


# -- caching (section 5.2) -------------------------------------------------------------------

NOW = dt.datetime(2026, 5, 1, 12, 0, 0, tzinfo=dt.UTC)


def http_date(when: dt.datetime) -> str:
    return when.strftime("%a, %d %b %Y %H:%M:%S GMT")


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({}, 300),  # nothing said: the minimum
        ({"Cache-Control": "max-age=3600"}, 3600),
        ({"cache-control": "public, max-age=7200"}, 7200),
        ({"Cache-Control": 'max-age="1200"'}, 1200),
        ({"Cache-Control": "max-age=10"}, 300),  # clamped up
        ({"Cache-Control": "max-age=999999999"}, 86400),  # clamped down
        ({"Cache-Control": "max-age=abc"}, 300),  # invalid: stale
        ({"Cache-Control": "no-store"}, 300),
        ({"Cache-Control": "no-cache, max-age=3600"}, 300),
        ({"Cache-Control": "max-age=3600", "Age": "600"}, 3000),
        ({"Cache-Control": "max-age=3600", "Expires": http_date(NOW)}, 3600),  # max-age wins
        ({"Expires": http_date(NOW + dt.timedelta(hours=2))}, 7200),
        (
            {
                "Expires": http_date(NOW + dt.timedelta(hours=3)),
                "Date": http_date(NOW + dt.timedelta(hours=1)),
            },
            7200,
        ),
        ({"Expires": "0"}, 300),  # invalid: already expired
        ({"Expires": http_date(NOW - dt.timedelta(days=1))}, 300),
    ],
)
def test_cache_lifetime(headers: dict[str, str], seconds: int) -> None:
    assert cache_lifetime(headers, minimum=300, maximum=86400, now=NOW) == seconds


def test_cache_lifetime_with_a_zero_minimum() -> None:
    assert cache_lifetime({"Cache-Control": "no-store"}, minimum=0, maximum=60) == 0
    assert (
        cache_lifetime(httpx.Headers({"Cache-Control": "max-age=30"}), minimum=0, maximum=60) == 30
    )


# -- fetching over real HTTPS (sections 5, 8.6, 8.7) ----------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@dataclass
class DocumentHost:
    """A local HTTPS server (certificate for ``localhost`` from a test CA) serving documents;
    ``handlers`` maps a path to a function producing the response."""

    server: HTTPServer
    handlers: dict[str, Callable[[Request], Response]] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return self.server.port

    def url(self, path: str = "/client.json") -> str:
        return f"https://localhost:{self.port}{path}"

    def serve(
        self,
        path: str = "/client.json",
        doc: Any = None,
        *,
        status: int = 200,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> str:
        url = self.url(path)
        data = body if body is not None else json.dumps(doc).encode()
        self.handlers[path] = lambda _request: Response(
            data, status=status, content_type=content_type, headers=headers or {}
        )
        return url

    def requests(self, path: str = "/client.json") -> int:
        return sum(1 for request, _ in self.server.log if request.path == path)

    def dispatch(self, request: Request) -> Response:
        handler = self.handlers.get(request.path)
        return handler(request) if handler else Response("not found", status=404)


def start_host(ca: trustme.CA, *names: str) -> HTTPServer:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(names or ("localhost",))).configure_cert(context)
    server = HTTPServer(host="127.0.0.1", port=0, ssl_context=context, threaded=True)
    server.start()
    return server


@pytest.fixture
def host(ca: trustme.CA) -> Iterator[DocumentHost]:
    server = start_host(ca)
    doc_host = DocumentHost(server)
    server.expect_request(re.compile(".*")).respond_with_handler(doc_host.dispatch)
    try:
        yield doc_host
    finally:
        server.clear()
        server.stop()


def fetcher(trusted_ca: str, *, testing: bool = True, **settings: Any) -> DocumentFetcher:
    values: dict[str, Any] = {"allow_hosts": ("localhost",), "ca_file": trusted_ca}
    values.update(settings)
    return DocumentFetcher(CIMDSettings(**values), testing=testing)


def fetch_refusal(fetch: DocumentFetcher, url: str) -> str:
    with pytest.raises(CIMDError) as info:
        fetch.fetch(url)
    return info.value.reason


def local_document(url: str, **changes: Any) -> dict[str, Any]:
    return document(client_id=url, **changes)


def test_fetch_a_good_document(host: DocumentHost, ca_file: str) -> None:
    url = host.url()
    host.serve(doc=local_document(url), headers={"Cache-Control": "max-age=1800"})
    fetched = fetcher(ca_file).fetch(url)
    assert fetched.document == local_document(url)
    assert fetched.lifetime == 1800
    request, _ = host.server.log[-1]
    assert request.headers["Host"] == f"localhost:{host.port}"
    assert request.headers["Accept"] == "application/json"
    assert "Cookie" not in request.headers and "Authorization" not in request.headers


def test_fetch_accepts_a_json_subtype(host: DocumentHost, ca_file: str) -> None:
    url = host.serve(doc=local_document(host.url()), content_type="application/cimd+json")
    assert fetcher(ca_file).fetch(url).document == local_document(url)


def test_fetch_does_not_follow_redirects(host: DocumentHost, ca_file: str) -> None:
    target = host.serve("/real.json", doc=local_document(host.url()))
    url = host.serve(status=302, headers={"Location": target}, body=b"")
    assert fetch_refusal(fetcher(ca_file), url) == "bad_status"
    assert host.requests("/real.json") == 0


@pytest.mark.parametrize("status", [201, 204, 304, 404, 500])
def test_fetch_accepts_only_200(host: DocumentHost, ca_file: str, status: int) -> None:
    url = host.serve(doc=local_document(host.url()), status=status)
    assert fetch_refusal(fetcher(ca_file), url) == "bad_status"


def test_fetch_refuses_a_large_document(host: DocumentHost, ca_file: str) -> None:
    url = host.serve(doc=local_document(host.url(), padding="x" * 6000))
    assert fetch_refusal(fetcher(ca_file), url) == "too_large"


def test_fetch_stops_reading_a_large_body_without_content_length(
    host: DocumentHost, ca_file: str
) -> None:
    def endless(_request: Request) -> Response:
        def chunks() -> Iterator[bytes]:
            yield b'{"padding": "'
            for _ in range(1000):
                yield b"x" * 1024

        return Response(chunks(), content_type="application/json")

    host.handlers["/client.json"] = endless
    assert fetch_refusal(fetcher(ca_file), host.url()) == "too_large"


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/html", b'{"client_id": "x"}'),
        ("text/plain", b'{"client_id": "x"}'),
        ("application/json", b"<html>not json</html>"),
        ("application/json", b'{"client_id": "a", "client_id": "b"}'),  # duplicate members
        ("application/json", b"\xff\xfe{}"),
        ("application/json", b"[" * 2000 + b"]" * 2000),
    ],
)
def test_fetch_refuses_what_is_not_json(
    host: DocumentHost, ca_file: str, content_type: str, body: bytes
) -> None:
    url = host.serve(content_type=content_type, body=body)
    assert fetch_refusal(fetcher(ca_file, max_bytes=8192), url) == "not_json"


def test_fetch_refuses_a_compressed_body(host: DocumentHost, ca_file: str) -> None:
    url = host.serve(body=b"\x1f\x8b...", headers={"Content-Encoding": "gzip"})
    assert fetch_refusal(fetcher(ca_file), url) == "bad_encoding"


def test_fetch_times_out_on_a_slow_server(host: DocumentHost, ca_file: str) -> None:
    def slow(_request: Request) -> Response:
        time.sleep(1.5)
        return Response("{}", content_type="application/json")

    host.handlers["/client.json"] = slow
    started = time.monotonic()
    assert fetch_refusal(fetcher(ca_file, timeout=0.5), host.url()) == "timeout"
    assert time.monotonic() - started < 1.4


def test_the_timeout_is_for_the_whole_fetch(host: DocumentHost, ca_file: str) -> None:
    """A server that drips the body, each piece well within the timeout, still times out."""

    def drip(_request: Request) -> Response:
        def chunks() -> Iterator[bytes]:
            for _ in range(8):
                yield b" "
                time.sleep(0.25)
            yield b"{}"

        return Response(chunks(), content_type="application/json")

    host.handlers["/client.json"] = drip
    started = time.monotonic()
    assert fetch_refusal(fetcher(ca_file, timeout=1.0), host.url()) == "timeout"
    assert time.monotonic() - started < 1.9


def test_tls_is_verified_for_the_host_name(ca: trustme.CA, ca_file: str) -> None:
    server = start_host(ca, "other.example")  # a certificate for another name
    server.expect_request("/client.json").respond_with_json({})
    try:
        url = f"https://localhost:{server.port}/client.json"
        assert fetch_refusal(fetcher(ca_file), url) == "fetch_failed"
        assert server.log == []
    finally:
        server.stop()


def test_an_untrusted_certificate_is_refused(host: DocumentHost, ca_file: str) -> None:
    url = host.serve(doc=local_document(host.url()))
    assert fetch_refusal(fetcher(ca_file, ca_file=None), url) == "fetch_failed"


def test_loopback_is_refused_without_the_allowance(host: DocumentHost, ca_file: str) -> None:
    url = host.serve(doc=local_document(host.url()))
    assert fetch_refusal(fetcher(ca_file, allow_hosts=()), url) == "forbidden_address"
    # The allowance is for the listed host only, and for loopback only.
    assert fetch_refusal(fetcher(ca_file, allow_hosts=("127.0.0.1",)), url) == "forbidden_address"
    numeric = f"https://127.0.0.1:{host.port}/client.json"
    assert fetch_refusal(fetcher(ca_file), numeric) == "forbidden_address"
    # Outside tests the allowance is ignored even when set.
    assert fetch_refusal(fetcher(ca_file, testing=False), url) == "forbidden_address"
    assert host.server.log == []  # refused before any connection


def test_the_fetcher_refuses_urls_before_any_connection(ca_file: str) -> None:
    fetch = fetcher(ca_file)
    assert fetch_refusal(fetch, "http://localhost/client.json") == "not_https"
    assert fetch_refusal(fetch, "https://localhost/a/../client.json") == "invalid_client_id_url"
    assert fetch_refusal(fetch, "https://no-such-host.invalid/client.json") == "resolve_failed"


def test_the_transport_connects_to_the_checked_address(ca: trustme.CA) -> None:
    """The host name is never resolved again: the connection goes to the pinned address, with
    TLS (SNI and certificate) and the Host header for the name."""
    server = start_host(ca, "pinned.test")
    server.expect_request("/client.json").respond_with_json({"ok": True})
    context = ssl.create_default_context()
    ca.configure_trust(context)
    pinned = [ipaddress.ip_address("127.0.0.1")]
    try:
        with httpx.Client(transport=PinnedTransport(context, pinned, Deadline(5))) as http:
            response = http.get(f"https://pinned.test:{server.port}/client.json")
        assert response.status_code == 200 and response.json() == {"ok": True}
        request, _ = server.log[-1]
        assert request.headers["Host"] == f"pinned.test:{server.port}"
    finally:
        server.stop()


# -- through the app -------------------------------------------------------------------------


@pytest.fixture
def cimd_app(make_app: Callable[..., Flask], ca_file: str) -> Flask:
    return make_app(
        client_metadata_documents={"allow_hosts": ["localhost"], "ca_file": ca_file, "cache_min": 0}
    )


def row(app: Flask, client_id: str) -> Client | None:
    with app.extensions["broker"].db.session() as session:
        return session.get(Client, client_id)


def audit(app: Flask, client_id: str) -> list[tuple[str, str | None, dict[str, Any]]]:
    with app.extensions["broker"].db.session() as session:
        events = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.type == "register", AuditEvent.client_id == client_id)
            .order_by(AuditEvent.id)
        ).all()
        return [(e.outcome, e.reason, e.details) for e in events]


def sign_in(client: FlaskClient, client_id: str) -> tuple[str, str]:
    verifier, challenge = pkce()
    response = sign_in_local(client, authorize_params(client_id, challenge))
    assert response.status_code == 302, response.text
    result = query(response.headers["Location"])
    assert "code" in result, result
    return result["code"], verifier


def test_authorize_fetches_the_document_and_shows_its_host(
    cimd_app: Flask, host: DocumentHost
) -> None:
    url = host.serve(doc=local_document(host.url()), headers={"Cache-Control": "max-age=600"})
    client = cimd_app.test_client()
    _, challenge = pkce()
    response = client.get("/authorize", query_string=authorize_params(url, challenge))
    assert response.status_code == 302 and response.headers["Location"].startswith("/consent")
    consent = client.get(response.headers["Location"])
    assert consent.status_code == 200
    assert f'id="client-host">localhost:{host.port}<' in consent.text
    assert 'id="client-name">Example MCP client<' in consent.text
    assert 'id="localhost-warning"' in consent.text  # every redirect URI is on loopback
    stored = row(cimd_app, url)
    assert stored is not None and stored.kind == "cimd" and stored.name == "Example MCP client"
    assert stored.token_endpoint_auth_method == "none" and stored.secret_hash is None
    assert stored.application_type == "native" and stored.response_types == ["code"]
    assert stored.expires_at is not None
    assert 590 <= (stored.expires_at - utcnow()).total_seconds() <= 600
    assert audit(cimd_app, url) == [
        (
            "success",
            "created",
            {
                "kind": "cimd",
                "client_name": "Example MCP client",
                "redirect_uris": ["http://127.0.0.1/callback", "http://localhost/callback"],
            },
        )
    ]
    # Cached: a second authorization request does not fetch again.
    client.get("/authorize", query_string=authorize_params(url, challenge))
    assert host.requests() == 1


@pytest.mark.parametrize(
    ("serve", "reason"),
    [
        ({"doc": {"client_id": "https://elsewhere.example/cimd", "client_name": "x"}}, None),
        ({"status": 404, "body": b"gone"}, "bad_status"),
        ({"content_type": "text/html", "body": b"<html></html>"}, "not_json"),
    ],
)
def test_a_bad_document_is_an_unknown_client(
    cimd_app: Flask, host: DocumentHost, serve: dict[str, Any], reason: str | None
) -> None:
    url = host.serve(**serve)
    reason = reason or "client_id_mismatch"
    _, challenge = pkce()
    response = cimd_app.test_client().get(
        "/authorize", query_string=authorize_params(url, challenge)
    )
    assert response.status_code == 400  # a page, never a redirect
    assert "Location" not in response.headers
    assert "could not be verified" in response.text
    assert reason not in response.text  # the reason is for the log only (no probing)
    assert row(cimd_app, url) is None
    assert audit(cimd_app, url) == [("failure", reason, {"kind": "cimd", "known": False})]


def test_an_unregistered_redirect_uri_is_refused(cimd_app: Flask, host: DocumentHost) -> None:
    url = host.serve(doc=local_document(host.url(), redirect_uris=["http://127.0.0.1/callback"]))
    _, challenge = pkce()
    params = authorize_params(url, challenge, redirect_uri="http://127.0.0.1:5555/other")
    response = cimd_app.test_client().get("/authorize", query_string=params)
    assert response.status_code == 400 and "Location" not in response.headers


def test_a_loopback_document_is_refused_without_the_allowance(
    make_app: Callable[..., Flask], host: DocumentHost
) -> None:
    app = make_app()
    url = host.serve(doc=local_document(host.url()))
    _, challenge = pkce()
    response = app.test_client().get("/authorize", query_string=authorize_params(url, challenge))
    assert response.status_code == 400 and "could not be verified" in response.text
    assert "forbidden_address" not in response.text
    assert host.server.log == []


def test_disabled_documents_are_unknown_clients(
    make_app: Callable[..., Flask], host: DocumentHost, ca_file: str
) -> None:
    app = make_app(
        client_metadata_documents={
            "enabled": False,
            "allow_hosts": ["localhost"],
            "ca_file": ca_file,
        }
    )
    url = host.serve(doc=local_document(host.url()))
    _, challenge = pkce()
    response = app.test_client().get("/authorize", query_string=authorize_params(url, challenge))
    assert response.status_code == 400 and "could not be verified" in response.text
    assert host.server.log == []


def test_tokens_keep_working_after_the_cache_expired(cimd_app: Flask, host: DocumentHost) -> None:
    url = host.serve(doc=local_document(host.url()), headers={"Cache-Control": "no-store"})
    client = cimd_app.test_client()
    code, verifier = sign_in(client, url)
    stored = row(cimd_app, url)
    assert stored is not None and stored.expires_at is not None
    assert stored.expires_at <= utcnow()  # no-store with cache_min 0: refetch every time
    token = redeem(client, url, code, verifier)
    assert token.status_code == 200, token.json
    assert token.json["token_type"] == "Bearer"

    # The host stops serving the document: new authorizations are refused, the row stays and
    # the grant keeps working at the token endpoint.
    host.serve(status=404, body=b"gone")
    _, challenge = pkce()
    refused = client.get("/authorize", query_string=authorize_params(url, challenge))
    assert refused.status_code == 400 and "could not be verified" in refused.text
    assert row(cimd_app, url) is not None
    refreshed = client.post(
        "/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": token.json["refresh_token"],
            "client_id": url,
        },
    )
    assert refreshed.status_code == 200, refreshed.json
    assert audit(cimd_app, url)[-1] == ("failure", "bad_status", {"kind": "cimd", "known": True})


def test_a_changed_document_updates_the_client_and_asks_again(
    cimd_app: Flask, host: DocumentHost
) -> None:
    # An https redirect: a loopback one would be confirmed every time (RFC 8252 section 8.6).
    web = "https://app.example.com/cb"
    url = host.serve(
        doc=local_document(host.url(), redirect_uris=[web]), headers={"Cache-Control": "no-store"}
    )
    client = cimd_app.test_client()
    _, challenge = pkce()
    signed = sign_in_local(client, authorize_params(url, challenge, redirect_uri=web))
    assert signed.status_code == 302 and "code=" in signed.headers["Location"], signed.text
    # Unchanged: the signed-in browser that approved the client goes straight through.
    params = authorize_params(url, challenge, redirect_uri=web)
    again = client.get("/authorize", query_string=params)
    assert again.status_code == 302 and "code=" in again.headers["Location"]

    uris = [web, "https://new.example.com/cb"]
    host.serve(doc=local_document(host.url(), redirect_uris=uris))
    changed = client.get("/authorize", query_string=params)
    assert changed.status_code == 302 and changed.headers["Location"].startswith("/consent")
    stored = row(cimd_app, url)
    assert stored is not None and stored.redirect_uris == uris
    assert [r for _, r, _ in audit(cimd_app, url)] == ["created", "updated"]
    assert host.requests() == 3


def test_a_static_client_with_an_https_id_is_not_fetched(
    cimd_app: Flask, host: DocumentHost
) -> None:
    url = host.url()
    with cimd_app.extensions["broker"].db.session() as session:
        session.add(
            Client(
                client_id=url,
                kind="static",
                name="Pre-registered",
                redirect_uris=["http://127.0.0.1/callback"],
                grant_types=["authorization_code", "refresh_token"],
                response_types=["code"],
                token_endpoint_auth_method="none",
            )
        )
    _, challenge = pkce()
    response = cimd_app.test_client().get(
        "/authorize", query_string=authorize_params(url, challenge)
    )
    assert response.status_code == 302 and response.headers["Location"].startswith("/consent")
    assert host.server.log == []


def test_concurrent_first_fetches_do_not_fail(
    cimd_app: Flask, host: DocumentHost, caplog: pytest.LogCaptureFixture
) -> None:
    """Another worker inserts the row while this one fetches: the insert conflict turns into an
    update (on PostgreSQL; SQLite serializes the two transactions)."""
    caplog.set_level(logging.INFO, logger="broker.oauth2.cimd")
    url = host.serve(doc=local_document(host.url()))
    b = cimd_app.extensions["broker"]
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            b.cimd.ensure_fresh(url)
        except BaseException as exc:
            errors.append(exc)

    session = b.db.sessions()
    try:
        with session.begin():
            session.add(
                Client(
                    client_id=url,
                    kind="cimd",
                    name="Inserted by another worker",
                    redirect_uris=["http://127.0.0.1/callback"],
                    grant_types=["authorization_code", "refresh_token"],
                    response_types=["code"],
                    token_endpoint_auth_method="none",
                    expires_at=utcnow() - dt.timedelta(seconds=1),
                )
            )
            session.flush()
            thread = threading.Thread(target=worker)
            thread.start()
            time.sleep(1.0)
    finally:
        session.close()
    thread.join(30)
    assert not thread.is_alive() and errors == []
    stored = row(cimd_app, url)
    assert stored is not None and stored.kind == "cimd"
    assert stored.name == "Example MCP client"
    if not b.db.is_sqlite:
        assert "stored concurrently" in caplog.text
