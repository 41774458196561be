"""Fixtures for the provider tests: the real test IdP (oidc-provider, see ``tests/idp_server.py``)
in its plain and Keycloak layouts, and the broker's back-channel HTTP client."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest

from providers.contract import Provider
from tests.idp_server import DEFAULT_CLIENTS, RunningIdP, UpstreamLogin, idp_or_skip, upstream_login


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

    def run(provider: Provider, login_hint: str | None = None) -> UpstreamLogin:
        return upstream_login(provider, http, login_hint)

    return run
