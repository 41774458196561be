"""The ``google`` provider (providers/google.py on providers/_oidc.py).

Logins go through the real test IdP (``oidc-provider``) shaped like Google: claims in the ID
Token, Workspace accounts with an ``hd`` claim (dana at ``example.com``, erin at
``other.example``) beside accounts without one (alice, whose email is nonetheless
``@example.com``). Google's issuer itself, which no local server can be, is played by the
hand-written OP. Each negative test changes one thing from a valid login.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pluggy
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from pytest_httpserver import HTTPServer

import providers.google
from providers import hookspecs
from providers._oidc import ProviderMetadata
from providers.contract import (
    BASE_FACTS,
    Provider,
    ProviderType,
    RefreshingProvider,
    Requirements,
)
from providers.errors import AccessDenied, ConfigError, LoginFailed
from providers.google import GOOGLE_ISSUER, GoogleProvider
from tests.idp_server import (
    CLIENT_ID,
    CLIENT_SECRET,
    DEFAULT_CLIENTS,
    HOSTED_DOMAIN_ACCOUNTS,
    FakeOP,
    RunningIdP,
    UpstreamLogin,
    idp_or_skip,
    new_login_request,
)

Login = Callable[..., UpstreamLogin]

DANA_SUB = HOSTED_DOMAIN_ACCOUNTS["dana"]["sub"]


def make_provider(issuer: str | None, name: str = "google", **config: Any) -> GoogleProvider:
    """A ``google`` provider for the broker's test client, from config as broker.yaml gives it."""
    base = {"type": "google", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    if issuer is not None:
        base["issuer"] = issuer
    return GoogleProvider.from_config(name, {**base, **config}, base_dir=".")


def query_of(url: str) -> dict[str, str]:
    return {key: values[0] for key, values in parse_qs(urlsplit(url).query).items()}


def metadata_for(issuer: str) -> ProviderMetadata:
    return ProviderMetadata(
        issuer=issuer,
        authorization_endpoint=issuer + "/o/oauth2/v2/auth",
        token_endpoint=issuer + "/token",
        jwks_uri=issuer + "/certs",
        userinfo_endpoint=None,
        code_challenge_methods=("S256",),
        id_token_algorithms=("RS256",),
        iss_parameter_supported=False,
    )


# -- registration and configuration ------------------------------------------------------------


def test_registered_through_the_plugin_hook() -> None:
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(providers.google)
    pm.check_pending()
    registered = [kind for kinds in pm.hook.broker_register_providers() for kind in kinds]
    assert registered == [GoogleProvider]
    assert isinstance(GoogleProvider, ProviderType)
    provider = make_provider(None)
    assert isinstance(provider, Provider)
    assert isinstance(provider, RefreshingProvider)


def test_config_defaults() -> None:
    provider = make_provider(None)
    assert provider.display_name == "Google"
    assert provider.oidc.issuer == GOOGLE_ISSUER == "https://accounts.google.com"
    assert provider.oidc.expected_issuer == GOOGLE_ISSUER
    assert provider.oidc.discovery_url == (
        "https://accounts.google.com/.well-known/openid-configuration"
    )
    assert provider.settings.scopes == ("openid", "email", "profile")
    assert provider.oidc.fetch_userinfo is False  # the ID Token carries the claims
    assert provider.hosted_domains == ()
    assert provider.facts == BASE_FACTS | {"hosted_domain"}
    assert make_provider(None, fetch_userinfo=True).oidc.fetch_userinfo is True
    domains = make_provider(None, hosted_domains=["Example.COM", "example.com", "b.example"])
    assert domains.hosted_domains == ("example.com", "b.example")
    assert make_provider(None, hosted_domains="example.com").hosted_domains == ("example.com",)


def test_config_errors_name_every_key_path() -> None:
    with pytest.raises(ConfigError) as caught:
        GoogleProvider.from_config(
            "google",
            {
                "type": "google",
                "client_id": CLIENT_ID,
                "issuer": "http://accounts.google.com",
                "hosted_domains": ["example.com", "@example.com", "*.example.com", "intranet"],
                "scopes": ["openid", "email", "offline_access"],
                "fetch_userinfo": "yes",
                "foo": 1,
            },
            base_dir=".",
        )
    assert sorted(caught.value.problems) == sorted(
        [
            "issuer: must be an https URL (http allowed only for loopback hosts)",
            "hosted_domains[1]: must be a domain name (example.com)",
            "hosted_domains[2]: must be a domain name (example.com)",
            "hosted_domains[3]: must be a domain name (example.com)",
            "scopes: Google has no offline_access scope: the broker asks for a refresh token "
            "(access_type=offline) when a resource needs one",
            "fetch_userinfo: must be true or false",
            "client_secret: required",
            "foo: unknown key",
        ]
    )


def test_accepted_issuers_of_the_real_google() -> None:
    provider = make_provider(None)
    assert provider.accepted_issuers(metadata_for(GOOGLE_ISSUER)) == {
        "https://accounts.google.com",
        "accounts.google.com",
    }
    # Any other issuer (a test IdP, a proxy) is accepted in its one exact spelling only.
    other = "http://127.0.0.1:9/google"
    assert make_provider(other).accepted_issuers(metadata_for(other)) == {other}


# -- the authorization request -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("domains", "hint"),
    [([], None), (["example.com"], "example.com"), (["example.com", "b.example"], "*")],
)
def test_hd_hint(
    google_idp: RunningIdP, http: httpx.Client, domains: list[str], hint: str | None
) -> None:
    provider = make_provider(google_idp.issuer, hosted_domains=domains)
    params = query_of(provider.login_url(new_login_request(), http))
    assert params.get("hd") == hint


def test_refresh_token_asked_only_when_needed(google_idp: RunningIdP, http: httpx.Client) -> None:
    provider = make_provider(google_idp.issuer)
    params = query_of(provider.login_url(new_login_request(), http))
    assert "access_type" not in params and "prompt" not in params
    assert params["scope"] == "openid email profile"

    provider.apply_requirements(Requirements(offline=True))
    params = query_of(provider.login_url(new_login_request(), http))
    assert (params["access_type"], params["prompt"]) == ("offline", "consent")
    assert params["scope"] == "openid email profile"  # Google has no offline_access scope


# -- logins through the Google-shaped IdP ------------------------------------------------------


def test_allowed_domain_passes(google_idp: RunningIdP, http: httpx.Client, login: Login) -> None:
    provider = make_provider(google_idp.issuer, hosted_domains=["example.com"])
    trip = login(provider, "dana")
    assert query_of(trip.url)["hd"] == "example.com"
    identity = provider.handle_callback(trip.callback(), http).identity
    assert identity.subject == DANA_SUB
    assert identity.name == "Dana Diaz"
    assert (identity.email, identity.email_verified) == ("dana@example.com", True)
    assert identity.hosted_domain == "example.com"
    assert identity.facts()["hosted_domain"] == {"example.com"}
    assert identity.raw == {"issuer": google_idp.issuer}


def test_without_hosted_domains_any_account_passes(
    google_idp: RunningIdP, http: httpx.Client, login: Login
) -> None:
    provider = make_provider(google_idp.issuer)
    identity = provider.handle_callback(login(provider, "alice").callback(), http).identity
    assert identity.subject == "7f3c9a52-alice"
    assert identity.hosted_domain is None
    assert identity.facts()["hosted_domain"] == frozenset()


def test_another_domain_refused(google_idp: RunningIdP, http: httpx.Client, login: Login) -> None:
    provider = make_provider(google_idp.issuer, hosted_domains=["example.com"])
    trip = login(provider, "erin")
    with pytest.raises(AccessDenied) as caught:
        provider.handle_callback(trip.callback(), http)
    assert caught.value.reason == "domain_not_allowed"
    assert caught.value.detail == "id_token has hd 'other.example', hosted_domains are example.com"
    assert caught.value.message


def test_hd_only_in_the_request_refused(
    google_idp: RunningIdP, http: httpx.Client, login: Login
) -> None:
    # alice has no hd (a consumer account), though her email ends in @example.com and the
    # login URL carried hd=example.com: neither the hint nor the email suffix counts.
    provider = make_provider(google_idp.issuer, hosted_domains=["example.com"])
    trip = login(provider, "alice")
    assert query_of(trip.url)["hd"] == "example.com"
    with pytest.raises(AccessDenied) as caught:
        provider.handle_callback(trip.callback(), http)
    assert caught.value.reason == "domain_not_allowed"
    assert caught.value.detail == "id_token has no hd claim, hosted_domains are example.com"


@pytest.fixture(scope="module")
def conform_idp() -> Iterator[RunningIdP]:
    """The Workspace accounts at an IdP that releases claims, ``hd`` too, only from UserInfo."""
    with idp_or_skip(DEFAULT_CLIENTS, accounts=HOSTED_DOMAIN_ACCOUNTS) as running:
        yield running


def test_hd_in_userinfo_but_not_in_the_id_token_refused(
    conform_idp: RunningIdP, http: httpx.Client, login: Login
) -> None:
    unrestricted = make_provider(conform_idp.issuer, fetch_userinfo=True)
    result = unrestricted.handle_callback(login(unrestricted, "dana").callback(), http)
    assert result.tokens is not None and result.tokens.id_token is not None
    assert "hd" not in jwt.decode(result.tokens.id_token, options={"verify_signature": False})
    userinfo = http.get(
        unrestricted.metadata(http).userinfo_endpoint or "",
        headers={"Authorization": f"Bearer {result.tokens.access_token}"},
    ).json()
    assert userinfo["hd"] == "example.com"
    assert result.identity.email == "dana@example.com"  # UserInfo claims were read...
    assert result.identity.hosted_domain is None  # ...but hd counts only from the ID Token

    provider = make_provider(
        conform_idp.issuer, fetch_userinfo=True, hosted_domains=["example.com"]
    )
    with pytest.raises(AccessDenied) as caught:
        provider.handle_callback(login(provider, "dana").callback(), http)
    assert caught.value.reason == "domain_not_allowed"


# -- Google's own issuer, from a hand-written OP -----------------------------------------------


@pytest.fixture
def fake_google(
    httpserver: HTTPServer, rsa_keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]
) -> Iterator[FakeOP]:
    """An OP whose discovery names ``https://accounts.google.com``, as Google's does."""
    yield FakeOP(httpserver, rsa_keys, prefix="/google", issuer=GOOGLE_ISSUER)
    httpserver.clear()


def google_at(fake_google: FakeOP, **config: Any) -> GoogleProvider:
    discovery = fake_google.base + "/.well-known/openid-configuration"
    return make_provider(None, discovery_url=discovery, **config)


@pytest.mark.parametrize("iss", ["https://accounts.google.com", "accounts.google.com"])
def test_both_spellings_of_google_s_issuer_accepted(
    fake_google: FakeOP, http: httpx.Client, iss: str
) -> None:
    provider = google_at(fake_google, hosted_domains=["example.com"])
    result = fake_google.redeem(provider, http, fake_google.sign(iss=iss, hd="example.com"))
    assert result.identity.hosted_domain == "example.com"
    # Users are keyed on the issuer, whichever spelling the token used.
    assert result.identity.raw == {"issuer": GOOGLE_ISSUER}


@pytest.mark.parametrize("iss", ["http://accounts.google.com", "https://accounts.google.com/"])
def test_other_spellings_of_google_s_issuer_refused(
    fake_google: FakeOP, http: httpx.Client, iss: str
) -> None:
    provider = google_at(fake_google, hosted_domains=["example.com"])
    with pytest.raises(LoginFailed) as caught:
        fake_google.redeem(provider, http, fake_google.sign(iss=iss, hd="example.com"))
    assert (caught.value.reason, caught.value.detail) == ("id_token_invalid", "InvalidIssuerError")


def test_refresh_keeps_the_refresh_token(fake_google: FakeOP, http: httpx.Client) -> None:
    provider = google_at(fake_google)
    provider.apply_requirements(Requirements(offline=True))
    fake_google.token_extra = {"refresh_token": "1//rt", "expires_in": 3599}
    tokens = fake_google.redeem(provider, http, fake_google.sign()).tokens
    assert tokens is not None and tokens.refresh_token == "1//rt"
    fake_google.token_extra = {"expires_in": 3599}  # Google's refresh answers carry none
    fake_google.access_token = "at-2"
    refreshed = provider.refresh(tokens, http)
    assert (refreshed.access_token, refreshed.refresh_token) == ("at-2", "1//rt")
