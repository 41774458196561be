"""The limits of /authorize, /token, /revoke and /introspect: per address before anything else,
per client once the client is authenticated (nobody spends another client's budget by naming
it); 429 with Retry-After and the OAuth error shape; in the config with their defaults."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from broker.config import DEFAULT_RATE_LIMITS, ConfigError, RateLimit
from tests.support import authorize_params, pkce

ON_BOTH = pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)


def confidential(client: FlaskClient) -> tuple[str, str]:
    registered = client.post(
        "/register",
        json={
            "redirect_uris": ["https://app.example.com/cb"],
            "token_endpoint_auth_method": "client_secret_basic",
            "grant_types": ["authorization_code", "refresh_token"],
        },
    ).json
    return registered["client_id"], registered["client_secret"]


def basic(client_id: str, secret: str) -> dict[str, str]:
    raw = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


def assert_limited(response: Any, name: str, per: str) -> None:
    assert response.status_code == 429, response.get_data(as_text=True)
    body = response.json
    assert body["error"] == "too_many_requests"
    assert f"({name}: " in body["error_description"] and per in body["error_description"]
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert response.headers["Cache-Control"] == "no-store" or name == "authorize"


ENDPOINTS: dict[str, Callable[[FlaskClient, str, str], Any]] = {
    "token": lambda c, cid, secret: c.post(
        "/token",
        data={"grant_type": "refresh_token", "refresh_token": "nope"},
        headers=basic(cid, secret),
    ),
    "revoke": lambda c, cid, secret: c.post(
        "/revoke", data={"token": "nope"}, headers=basic(cid, secret)
    ),
    "introspect": lambda c, cid, secret: c.post(
        "/introspect", data={"token": "nope"}, headers=basic(cid, secret)
    ),
}


@ON_BOTH
@pytest.mark.parametrize("name", list(ENDPOINTS))
def test_per_client_counts_authenticated_clients_only(
    make_app: Callable[..., Flask], name: str
) -> None:
    app = make_app(rate_limits={name: {"per_client": "3/minute", "per_address": "off"}})
    client = app.test_client()
    cid, secret = confidential(client)
    other, other_secret = confidential(client)
    send = ENDPOINTS[name]
    # Someone naming the client with a wrong secret spends nothing of its budget.
    for _ in range(5):
        assert send(client, cid, "wrong").status_code == 401
    answers = [send(client, cid, secret) for _ in range(4)]
    assert all(a.status_code != 429 for a in answers[:3]), [a.status_code for a in answers]
    assert_limited(answers[3], name, "per client")
    # Another client has a budget of its own.
    assert send(client, other, other_secret).status_code != 429


@ON_BOTH
@pytest.mark.parametrize("name", list(ENDPOINTS))
def test_per_address_comes_first(make_app: Callable[..., Flask], name: str) -> None:
    app = make_app(rate_limits={name: {"per_address": "2/minute", "per_client": "off"}})
    client = app.test_client()
    cid, secret = confidential(client)
    send = ENDPOINTS[name]
    statuses = [send(client, cid, "wrong").status_code for _ in range(3)]
    assert statuses[:2] == [401, 401]
    assert statuses[2] == 429
    assert_limited(send(client, cid, secret), name, "per address")
    # Another address is not limited.
    other = app.test_client()
    other.environ_base["REMOTE_ADDR"] = "192.0.2.44"
    assert send(other, cid, secret).status_code != 429


@ON_BOTH
def test_authorize_per_address_is_a_page_then_a_json_429(make_app: Callable[..., Flask]) -> None:
    app = make_app(rate_limits={"authorize": {"per_address": "2/minute"}})
    client = app.test_client()
    _, challenge = pkce()
    params = authorize_params("nobody", challenge)
    statuses = [client.get("/authorize", query_string=params).status_code for _ in range(3)]
    assert statuses == [400, 400, 429]
    refused = client.get("/authorize", query_string=params)
    assert refused.status_code == 429 and "Too many requests" in refused.get_data(as_text=True)
    assert refused.headers["Content-Type"].startswith("text/html")
    assert 1 <= int(refused.headers["Retry-After"]) <= 60


def test_defaults_and_config(make_settings: Callable[..., Any]) -> None:
    from broker.config import RATE_LIMIT_SUBJECTS

    assert DEFAULT_RATE_LIMITS["authorize"] == {"per_address": RateLimit(600, 60)}
    # The token path's limits are there to be turned on; off by default (a write per request).
    for name in ("token", "revoke", "introspect"):
        assert name not in DEFAULT_RATE_LIMITS
        assert RATE_LIMIT_SUBJECTS[name] == ("per_address", "per_client")
    settings = make_settings(rate_limits={"token": {"per_client": "10/second"}})
    assert settings.rate_limits["token"] == {"per_client": RateLimit(10, 1)}
    assert settings.rate_limits["register"] == DEFAULT_RATE_LIMITS["register"]


def test_a_bad_limit_names_its_key_path(make_settings: Callable[..., Any]) -> None:
    with pytest.raises(ConfigError) as raised:
        make_settings(rate_limits={"token": {"per_client": "lots", "per_host": "1/second"}})
    problems = "\n".join(raised.value.problems)
    assert "rate_limits.token.per_client: must be N/unit" in problems
    assert "rate_limits.token.per_host: unknown key (known: per_address, per_client)" in problems
