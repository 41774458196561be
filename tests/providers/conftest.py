"""Fixtures for the provider tests: the real test IdP (oidc-provider, see ``tests/idp_server.py``)
in its plain, Keycloak and Google-shaped layouts, a hand-written OP for what a certified one never
sends, and the broker's back-channel HTTP client."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from pytest_httpserver import HTTPServer

from providers.contract import RedirectLogin
from tests.idp_server import (
    DEFAULT_CLIENTS,
    HOSTED_DOMAIN_ACCOUNTS,
    FakeOP,
    RunningIdP,
    UpstreamLogin,
    idp_or_skip,
    upstream_login,
)


@pytest.fixture(scope="session")
def idp() -> Iterator[RunningIdP]:
    """The plain layout: issuer ``http://127.0.0.1:PORT``."""
    with idp_or_skip(DEFAULT_CLIENTS) as running:
        yield running


@pytest.fixture(scope="session", params=["/realms/test", "/auth/realms/test"])
def keycloak_idp(request: pytest.FixtureRequest) -> Iterator[RunningIdP]:
    """Keycloak's layouts (17+, and 16- with ``/auth``): routes under /protocol/openid-connect."""
    with idp_or_skip(DEFAULT_CLIENTS, prefix=request.param) as running:
        yield running


@pytest.fixture(scope="session")
def google_idp() -> Iterator[RunningIdP]:
    """Google's shape: claims (``hd`` included) in the ID Token, Workspace accounts dana
    (``example.com``) and erin (``other.example``)."""
    options = {"idTokenClaims": "all"}
    with idp_or_skip(DEFAULT_CLIENTS, accounts=HOSTED_DOMAIN_ACCOUNTS, options=options) as running:
        yield running


@pytest.fixture(scope="session")
def rotating_idp() -> Iterator[RunningIdP]:
    """An IdP that rotates the refresh token on every refresh (reuse revokes the grant)."""
    with idp_or_skip(DEFAULT_CLIENTS, rotate_refresh=True) as running:
        yield running


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    """The broker's back-channel HTTP client."""
    with httpx.Client() as client:
        yield client


@pytest.fixture
def login(http: httpx.Client) -> Callable[..., UpstreamLogin]:
    """``login(provider, login_hint=None)``: an upstream login through the real IdP."""

    def run(provider: RedirectLogin, login_hint: str | None = None) -> UpstreamLogin:
        return upstream_login(provider, http, login_hint)

    return run


@pytest.fixture(scope="session")
def rsa_keys() -> tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]:
    """The hand-written OP's signing key and another key it never publishes at first."""
    return (
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
    )


@pytest.fixture
def fake_op(
    httpserver: HTTPServer, rsa_keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]
) -> Iterator[FakeOP]:
    """A hand-written OP at ``/op`` (issuer ``http://localhost:PORT/op``)."""
    yield FakeOP(httpserver, rsa_keys)
    httpserver.clear()
