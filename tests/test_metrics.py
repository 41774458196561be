"""/metrics in one process (the development server's case): what real requests add to it,
the three ways to serve it, and the ``metrics`` configuration. Across gunicorn workers:
tests/e2e/test_metrics_gunicorn.py."""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from pytest_httpserver import HTTPServer

from broker import metrics
from broker.config import ConfigError, MetricsSettings, parse
from providers._http import UpstreamHTTP
from providers.errors import UpstreamUnavailable
from tests.oauth2.test_cimd import DocumentHost, local_document, start_host
from tests.support import (
    RESOURCE,
    authorize_params,
    free_port,
    pkce,
    query,
    redeem,
    serve_wsgi,
    sign_in_local,
)

TOKEN = "m" * 40
BASE: dict[str, Any] = {
    "issuer": "https://sso.example.com",
    "secret_key": "k" * 40,
    "providers": {"local": {"users_file": "users.yaml"}},
    "resources": [{"uri": "https://mcp.example.com/jira", "scopes": {"jira:read": "Read"}}],
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """Metrics do not depend on the database: SQLite only."""
    return f"sqlite:///{tmp_path / 'broker.db'}"


@pytest.fixture
def public_app(make_app: Callable[..., Flask]) -> Flask:
    return make_app(metrics={"public": True})


def scrape(client: FlaskClient, **headers: str) -> Samples:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == metrics.CONTENT_TYPE_LATEST
    return parse_samples(response.text)


def parse_samples(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


def register(client: FlaskClient, **body: Any) -> Any:
    return client.post(
        "/register",
        json={"redirect_uris": ["http://127.0.0.1:5555/callback"], **body},
    )


def test_a_sign_in_its_tokens_a_refusal_and_registrations_are_counted(public_app: Flask) -> None:
    client = public_app.test_client()
    before = scrape(client)

    registered = register(client, grant_types=["authorization_code", "refresh_token"])
    assert registered.status_code == 201
    client_id = registered.json["client_id"]
    assert register(client, redirect_uris=["javascript:alert(1)"]).status_code == 400

    verifier, challenge = pkce()
    signed_in = sign_in_local(client, authorize_params(client_id, challenge))
    assert signed_in.status_code == 302 and "code" in query(signed_in.headers["Location"])
    tokens = redeem(client, client_id, query(signed_in.headers["Location"])["code"], verifier)
    assert tokens.status_code == 200, tokens.text
    refreshed = client.post(
        "/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": tokens.json["refresh_token"],
            "client_id": client_id,
        },
    )
    assert refreshed.status_code == 200, refreshed.text

    _, challenge = pkce()
    wrong = sign_in_local(client, authorize_params(client_id, challenge), password="nope")
    assert wrong.status_code == 400
    refused = client.post("/token", data={"grant_type": "password", "client_id": client_id})
    assert refused.json["error"] == "unsupported_grant_type"
    _, challenge = pkce()
    plain = client.get(
        "/authorize",
        query_string=authorize_params(client_id, challenge, code_challenge_method="plain"),
    )
    assert plain.status_code == 302 and query(plain.headers["Location"])["error"]
    assert client.get("/health").status_code == 200

    response = client.get("/metrics")
    after = parse_samples(response.text)
    counted = {
        ("broker_registrations_total", ("outcome", "success")): 1,
        ("broker_registrations_total", ("outcome", "invalid_redirect_uri")): 1,
        ("broker_sign_ins_total", ("provider", "local"), ("outcome", "success")): 1,
        ("broker_sign_ins_total", ("provider", "local"), ("outcome", "failed")): 1,
        (
            "broker_tokens_issued_total",
            ("grant_type", "authorization_code"),
            ("resource", RESOURCE),
        ): 1,
        ("broker_tokens_issued_total", ("grant_type", "refresh_token"), ("resource", RESOURCE)): 1,
        (
            "broker_oauth_errors_total",
            ("endpoint", "oauth.token"),
            ("error", "unsupported_grant_type"),
        ): 1,
        (
            "broker_oauth_errors_total",
            ("endpoint", "oauth.register"),
            ("error", "invalid_redirect_uri"),
        ): 1,
        (
            "broker_oauth_errors_total",
            ("endpoint", "oauth.authorize"),
            ("error", "invalid_request"),
        ): 1,
        ("broker_request_duration_seconds_count", ("endpoint", "health.health")): 1,
        ("broker_request_duration_seconds_count", ("endpoint", "oauth.token")): 3,
        ("broker_request_duration_seconds_count", ("endpoint", "oauth.register")): 2,
    }
    for (name, *labels), expected in counted.items():
        assert delta(before, after, name, **dict(labels)) == expected, (name, labels)
    # Bounded labels only: never a client, a user or a token.
    assert client_id not in response.text and "alice" not in response.text
    assert tokens.json["refresh_token"] not in response.text


def test_a_token_whose_write_fails_is_not_counted(
    public_app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token is counted once its request commits: a refresh whose rotation cannot be
    written (the database is locked) answers 503 and issued nothing."""
    from sqlalchemy.exc import OperationalError

    from broker.oauth2 import rfc6749

    client = public_app.test_client()
    client_id = register(client).json["client_id"]
    verifier, challenge = pkce()
    signed_in = sign_in_local(client, authorize_params(client_id, challenge))
    tokens = redeem(client, client_id, query(signed_in.headers["Location"])["code"], verifier)
    before = scrape(client)
    rows = rfc6749.HotStatements.rows

    def locked(self: Any, connection: Any, statement: Any, params: Any) -> Any:
        if statement is rfc6749._ROTATE:
            raise OperationalError("UPDATE refresh_tokens", None, Exception("database is locked"))
        return rows(self, connection, statement, params)

    monkeypatch.setattr(rfc6749.HotStatements, "rows", locked)
    data = {
        "grant_type": "refresh_token",
        "refresh_token": tokens.json["refresh_token"],
        "client_id": client_id,
    }
    assert client.post("/token", data=data).status_code == 503
    name, labels = "broker_tokens_issued_total", {"grant_type": "refresh_token"}
    assert delta(before, scrape(client), name, **labels, resource=RESOURCE) == 0
    monkeypatch.undo()
    assert client.post("/token", data=data).status_code == 200
    assert delta(before, scrape(client), name, **labels, resource=RESOURCE) == 1


def test_a_sign_in_the_rules_refuse_is_counted_as_denied(make_app: Callable[..., Flask]) -> None:
    app = make_app(
        metrics={"public": True},
        rules=[
            {"deny": "No contractors", "when": {"groups": ["contractors"]}},
            {"grant": ["demo:read"], "when": {"groups": ["staff"]}},
        ],
    )
    client = app.test_client()
    before = scrape(client)
    client_id = register(client).json["client_id"]
    _, challenge = pkce()
    page = sign_in_local(client, authorize_params(client_id, challenge), username="carol")
    assert page.status_code == 403
    after = scrape(client)
    assert delta(before, after, "broker_sign_ins_total", provider="local", outcome="denied") == 1
    assert delta(before, after, "broker_sign_ins_total", provider="local", outcome="success") == 0


def test_upstream_requests_are_timed_by_provider(public_app: Flask, httpserver: HTTPServer) -> None:
    """Through the providers' HTTP helper and the broker's client, over real HTTP: an answered
    request and one that got no answer; a request no provider tagged is not an upstream's."""
    httpserver.expect_request("/user").respond_with_json({"login": "octocat"})
    http = public_app.extensions["broker"].http
    client = public_app.test_client()
    before = scrape(client)
    upstream = UpstreamHTTP("github", timeout=5)
    assert upstream.send(http, "GET", httpserver.url_for("/user"), what="user").status_code == 200
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/user"
    with pytest.raises(UpstreamUnavailable):
        upstream.send(http, "GET", closed, what="user")
    assert http.get(httpserver.url_for("/user")).status_code == 200
    after = scrape(client)
    name = "broker_upstream_request_duration_seconds_count"
    assert delta(before, after, name, provider="github", outcome="answered") == 1
    assert delta(before, after, name, provider="github", outcome="failed") == 1
    assert not [key for key in after if key[0] == name and ("provider", "other") in key[1]]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def document_host(ca: trustme.CA) -> Iterator[DocumentHost]:
    server = start_host(ca)
    host = DocumentHost(server)
    server.expect_request(re.compile(".*")).respond_with_handler(host.dispatch)
    try:
        yield host
    finally:
        server.clear()
        server.stop()


def test_client_metadata_document_fetches_by_outcome(
    make_app: Callable[..., Flask], ca: trustme.CA, document_host: DocumentHost, tmp_path: Path
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    app = make_app(
        metrics={"public": True},
        client_metadata_documents={"allow_hosts": ["localhost"], "ca_file": str(ca_file)},
    )
    client = app.test_client()
    before = scrape(client)
    url = document_host.serve(doc=local_document(document_host.url()))
    _, challenge = pkce()
    found = client.get("/authorize", query_string=authorize_params(url, challenge))
    assert found.status_code == 302 and found.headers["Location"].startswith("/consent")
    forbidden = "https://127.0.0.1/client.json"  # a loopback address not allowed for tests
    refused = client.get("/authorize", query_string=authorize_params(forbidden, challenge))
    assert refused.status_code == 400
    after = scrape(client)
    name = "broker_client_metadata_fetches_total"
    assert delta(before, after, name, outcome="success") == 1
    assert delta(before, after, name, outcome="forbidden_address") == 1
    assert url not in client.get("/metrics").text


# -- the three ways to serve /metrics (and off) ----------------------------------------------


def test_off_by_default_like_any_unknown_path(app: Flask) -> None:
    assert app.extensions["broker"].settings.metrics.mode == "off"
    client = app.test_client()
    response = client.get("/metrics")
    assert response.status_code == 404
    assert response.text == client.get("/no-such-page").text


def test_bearer_token_mode(make_app: Callable[..., Flask]) -> None:
    client = make_app(metrics={"bearer_token": TOKEN}).test_client()
    missing = client.get("/metrics")
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="metrics"'
    assert "broker_" not in missing.text
    for header in (f"Bearer {TOKEN[:-1]}x", f"Bearer {TOKEN}{TOKEN}", "Bearer é" + TOKEN[2:]):
        wrong = client.get("/metrics", headers={"Authorization": header})
        assert wrong.status_code == 401
        assert wrong.headers["WWW-Authenticate"].startswith("Bearer ")
        assert 'error="invalid_token"' in wrong.headers["WWW-Authenticate"]
    basic = client.get("/metrics", headers={"Authorization": f"Basic {TOKEN}"})
    assert basic.status_code == 401 and "error=" not in basic.headers["WWW-Authenticate"]
    samples = scrape(client, Authorization=f"Bearer {TOKEN}")
    assert any(name == "broker_request_duration_seconds_count" for name, _ in samples)
    assert scrape(client, Authorization=f"bearer {TOKEN}")  # the scheme is case-insensitive


def test_bind_mode_is_not_served_on_the_main_port(
    make_app: Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="broker.views.metrics"):
        app = make_app(metrics={"bind": "127.0.0.1:9100"})
    assert app.extensions["broker"].settings.metrics.bind == ("127.0.0.1", 9100)
    # Outside gunicorn nothing serves that listener: said at start-up.
    assert "broker.gunicorn_conf" in caplog.text
    client = app.test_client()
    assert client.get("/metrics").status_code == 404
    assert client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404


def test_public_mode(public_app: Flask) -> None:
    response = public_app.test_client().get("/metrics")
    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"
    assert "# TYPE broker_sign_ins_total counter" in response.text


def test_labels_stay_bounded() -> None:
    """What the call sites pass is mapped onto fixed sets: nothing else becomes a series."""
    before = parse_samples(metrics.exposition().decode())
    metrics.token_issued("urn:example:made-up", None)
    metrics.oauth_error(None, "made_up_error")
    metrics.registration("made_up_error")
    metrics.client_metadata_fetch("https://evil.example/x")
    after = parse_samples(metrics.exposition().decode())
    name = "broker_tokens_issued_total"
    assert delta(before, after, name, grant_type="other", resource="other") == 1
    assert delta(before, after, "broker_oauth_errors_total", endpoint="none", error="other") == 1
    assert delta(before, after, "broker_registrations_total", outcome="other") == 1
    assert delta(before, after, "broker_client_metadata_fetches_total", outcome="other") == 1
    with pytest.raises(AssertionError):
        metrics.sign_in("local", "made_up")


# -- configuration ---------------------------------------------------------------------------


def settings(value: Any, env: dict[str, str] | None = None) -> MetricsSettings:
    return parse({**BASE, "metrics": value}, env=env or {}).metrics


def problems(value: Any, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse({**BASE, "metrics": value}, env=env or {})
    return info.value.problems


def test_metrics_settings() -> None:
    assert parse(BASE, env={}).metrics == MetricsSettings()
    for off in (None, False, "off", {}, {"public": False}):
        assert settings(off).mode == "off"
    token = settings({"bearer_token": "${METRICS_TOKEN}"}, {"METRICS_TOKEN": TOKEN})
    assert token.mode == "bearer_token" and token.bearer_token == TOKEN and token.on_main_port
    assert TOKEN not in repr(token)
    bound = settings({"bind": "0.0.0.0:9100"})
    assert bound.mode == "bind" and bound.bind == ("0.0.0.0", 9100) and not bound.on_main_port
    assert settings({"bind": "[::1]:9100"}).bind == ("::1", 9100)
    assert settings({"bind": "metrics.internal:9100"}).bind == ("metrics.internal", 9100)
    public = settings({"public": True})
    assert public.mode == "public" and public.on_main_port


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (True, "metrics: must be a mapping (bearer_token, bind or public) or off"),
        ({"token": TOKEN}, "metrics.token: unknown key"),
        ({"bearer_token": "short"}, "metrics.bearer_token: must be at least 32 characters"),
        ({"bearer_token": "has space " + TOKEN}, "metrics.bearer_token: letters, digits"),
        ({"bearer_token": ""}, "metrics.bearer_token: required"),
        ({"bearer_token": 12}, "metrics.bearer_token: must be at least 32 characters"),
        ({"bind": 9100}, "metrics.bind: must be host:port"),
        ({"bind": ""}, "metrics.bind: must be host:port"),
        ({"bind": "127.0.0.1"}, "metrics.bind: must be host:port"),
        ({"bind": "127.0.0.1:0"}, "metrics.bind: must be host:port"),
        ({"bind": "127.0.0.1:70000"}, "metrics.bind: must be host:port"),
        ({"bind": "::1:9100"}, "metrics.bind: must be host:port"),
        ({"bind": "[1::2::3]:9100"}, "metrics.bind: 1::2::3 is not an IPv6 address"),
        ({"public": "maybe"}, "metrics.public: must be true or false"),
        (
            {"bearer_token": TOKEN, "bind": "127.0.0.1:9100"},
            "metrics: choose one of bearer_token, bind or public (not bearer_token and bind)",
        ),
        (
            {"bind": "127.0.0.1:9100", "public": True},
            "metrics: choose one of bearer_token, bind or public (not bind and public)",
        ),
    ],
)
def test_bad_metrics_settings_name_the_key(value: Any, problem: str) -> None:
    found = problems(value)
    assert any(p.startswith(problem) for p in found), found


def test_an_unset_token_variable_names_the_key() -> None:
    assert "metrics.bearer_token: environment variable METRICS_TOKEN is not set" in problems(
        {"bearer_token": "${METRICS_TOKEN}"}
    )


def test_a_scrape_over_http(public_app: Flask) -> None:
    """The real WSGI path (what Prometheus sees), not only the test client."""
    with serve_wsgi(public_app, free_port()) as url:
        response = httpx.get(f"{url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == metrics.CONTENT_TYPE_LATEST
    assert parse_samples(response.text)
