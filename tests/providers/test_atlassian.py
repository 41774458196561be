"""The ``atlassian`` provider (providers/atlassian.py on providers/_oauth2.py).

Every test talks real HTTP to the fake Atlassian of ``tests/fakes/atlassian.py`` (auth host and
API host, rotating refresh tokens, accessible-resources listing a site once per product). Each
negative test changes one thing from a valid login.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pluggy
import pytest
from pytest_httpserver import HTTPServer

import providers.atlassian
from providers import hookspecs
from providers.atlassian import AtlassianProvider
from providers.contract import (
    LoginResult,
    Provider,
    ProviderType,
    RecheckingProvider,
    RedirectLogin,
    RefreshingProvider,
    Requirements,
    RequirementsAware,
    UpstreamTokens,
)
from providers.errors import AccessDenied, ConfigError, LoginFailed, UpstreamUnavailable
from tests.fakes.atlassian import ACME, ACME_CONFLUENCE, GLOBEX, FakeAtlassian, Site
from tests.idp_server import REDIRECT_URI, new_login_request, upstream_login

ALICE = "557058:f1a2b3c4-0000-4a11-ce00-a11ce0000001"
BOB = "557058:b0b0b0b0-0000-4b0b-b000-b0b000000002"


@pytest.fixture(scope="module")
def server() -> Iterator[HTTPServer]:
    """One threaded server for the module (a slow answer must not hold up the next request)."""
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    yield server
    server.clear()
    server.stop()


@pytest.fixture
def fake(server: HTTPServer) -> Iterator[FakeAtlassian]:
    """A fresh fake Atlassian per test, under its own path prefix."""
    fake = FakeAtlassian(server, prefix=f"/atlassian-{secrets.token_hex(4)}")
    yield fake
    fake.close()
    server.check_handler_errors()  # a bug in the fake itself
    server.clear()


def make_provider(fake: FakeAtlassian, name: str = "atlassian", **config: Any) -> AtlassianProvider:
    """An ``atlassian`` provider pointed at the fake, from config as broker.yaml gives it."""
    return AtlassianProvider.from_config(name, fake.provider_config(**config), base_dir=".")


def offline(provider: AtlassianProvider) -> AtlassianProvider:
    provider.apply_requirements(Requirements(offline=True))
    return provider


def sign_in(provider: AtlassianProvider, http: httpx.Client) -> LoginResult:
    """The browser goes through the fake's /authorize; the broker redeems the callback."""
    return provider.handle_callback(upstream_login(provider, http).callback(), http)


def query_of(url: str) -> dict[str, str]:
    return {key: values[0] for key, values in parse_qs(urlsplit(url).query).items()}


def jira_myself(fake: FakeAtlassian, token: str, cloud_id: str) -> httpx.Response:
    url = f"{fake.api_url}/ex/jira/{cloud_id}/rest/api/3/myself"
    return httpx.get(url, headers={"Authorization": f"Bearer {token}"})


# -- registration and configuration ------------------------------------------------------------


def test_registered_through_the_plugin_hook() -> None:
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(providers.atlassian)
    pm.check_pending()
    registered = [kind for kinds in pm.hook.broker_register_providers() for kind in kinds]
    assert registered == [AtlassianProvider]
    assert isinstance(AtlassianProvider, ProviderType)
    provider = AtlassianProvider.from_config(
        "atlassian", {"client_id": "c", "client_secret": "s"}, base_dir="."
    )
    for capability in (Provider, RedirectLogin, RefreshingProvider, RecheckingProvider):
        assert isinstance(provider, capability)
    assert isinstance(provider, RequirementsAware)
    assert {"tenants", "sites"} <= provider.facts


def test_config_defaults() -> None:
    provider = AtlassianProvider.from_config(
        "jira", {"type": "atlassian", "client_id": "c", "client_secret": "s"}, base_dir="."
    )
    settings = provider.settings
    assert (provider.name, provider.display_name) == ("jira", "Atlassian")
    assert settings.scopes == ("read:me",)
    assert settings.authorization_endpoint == "https://auth.atlassian.com/authorize"
    assert settings.token_endpoint == "https://auth.atlassian.com/oauth/token"
    assert settings.api_url == "https://api.atlassian.com"
    assert settings.token_endpoint_auth_method == "client_secret_post"
    assert settings.pkce is False
    assert settings.timeout == 10
    assert settings.allowed_cloud_ids == frozenset()
    assert settings.allowed_sites == frozenset()


def test_config_normalises_urls_and_sites() -> None:
    provider = AtlassianProvider.from_config(
        "atlassian",
        {
            "client_id": "c",
            "client_secret": "s",
            "display_name": "Acme Jira",
            "scopes": "read:me read:jira-work",
            "auth_url": "https://auth.example.com/",
            "api_url": "https://api.example.com/",
            "allowed_cloud_ids": [ACME.id],
            "allowed_sites": ["https://ACME.Atlassian.net/", "https://globex.atlassian.net"],
        },
        base_dir=".",
    )
    settings = provider.settings
    assert provider.display_name == "Acme Jira"
    assert settings.scopes == ("read:me", "read:jira-work")
    assert settings.authorization_endpoint == "https://auth.example.com/authorize"
    assert settings.token_endpoint == "https://auth.example.com/oauth/token"
    assert settings.api_url == "https://api.example.com"
    assert settings.allowed_cloud_ids == {ACME.id}
    assert settings.allowed_sites == {"https://acme.atlassian.net", "https://globex.atlassian.net"}


def test_config_errors_name_every_key_path() -> None:
    with pytest.raises(ConfigError) as caught:
        AtlassianProvider.from_config(
            "atlassian",
            {
                "type": "atlassian",
                "client_secret": "s",
                "scopes": ["read:jira-work"],
                "auth_url": "http://auth.atlassian.com",
                "api_url": "https://api.atlassian.com/?x=1",
                "allowed_cloud_ids": [""],
                "allowed_sites": ["https://acme.atlassian.net/wiki", "ftp://x", 3],
                "extra_authorize_params": {"prompt": "none", "audience": "x", "state": "s"},
                "token_endpoint_auth_method": "private_key_jwt",
                "timeout": 0,
                "pkce": "yes",
                "token_endpoint": "https://auth.atlassian.com/oauth/token",
            },
            base_dir=".",
        )
    url_error = "must be an https URL (http allowed only for loopback hosts)"
    assert sorted(caught.value.problems) == sorted(
        [
            f"auth_url: {url_error}",
            "api_url: must not have a query",
            "allowed_cloud_ids: must be a list of strings",
            "allowed_sites: must be a list of strings",
            "extra_authorize_params.audience: is set by the provider",
            "extra_authorize_params.prompt: is set by the provider",
            "extra_authorize_params.state: is set by the broker",
            "client_id: required",
            "scopes: must contain read:me (the User identity API)",
            "token_endpoint_auth_method: must be one of client_secret_basic, client_secret_post",
            "timeout: must be more than 0 and at most 120",
            "pkce: must be true or false",
            "token_endpoint: unknown key",
        ]
    )


def test_config_site_urls_checked_one_by_one() -> None:
    with pytest.raises(ConfigError) as caught:
        AtlassianProvider.from_config(
            "atlassian",
            {
                "client_id": "c",
                "client_secret": "s",
                "allowed_sites": ["https://acme.atlassian.net", "https://x.atlassian.net/wiki"],
            },
            base_dir=".",
        )
    assert caught.value.problems == ["allowed_sites[1]: must be a site URL without a path"]


# -- the login URL -----------------------------------------------------------------------------


def test_login_url_carries_audience_prompt_and_state(
    fake: FakeAtlassian, http: httpx.Client
) -> None:
    provider = make_provider(fake, extra_authorize_params={"ui_locales": "fr"})
    request = new_login_request()
    url = provider.login_url(request, http)
    assert url.startswith(fake.auth_url + "/authorize?")
    assert query_of(url) == {
        "response_type": "code",
        "client_id": fake.client_id,
        "redirect_uri": REDIRECT_URI,
        "scope": "read:me read:jira-user",
        "state": request.state,
        "audience": "api.atlassian.com",
        "prompt": "consent",
        "ui_locales": "fr",
    }  # no code_challenge: 3LO does not check PKCE


def test_pkce_when_asked(fake: FakeAtlassian, http: httpx.Client) -> None:
    provider = make_provider(fake, pkce=True)
    trip = upstream_login(provider, http)
    assert query_of(trip.url)["code_challenge_method"] == "S256"
    assert provider.handle_callback(trip.callback(), http).identity.subject == ALICE
    assert fake.token_requests[-1]["code_verifier"] == trip.request.code_verifier


def test_offline_access_only_when_required(fake: FakeAtlassian, http: httpx.Client) -> None:
    provider = make_provider(fake)
    assert "offline_access" not in query_of(provider.login_url(new_login_request(), http))["scope"]
    tokens = sign_in(provider, http).tokens
    assert tokens is not None and tokens.refresh_token is None

    offline(provider)
    scope = query_of(provider.login_url(new_login_request(), http))["scope"]
    assert scope.split() == ["read:me", "read:jira-user", "offline_access"]
    tokens = sign_in(provider, http).tokens
    assert tokens is not None and tokens.refresh_token
    assert "offline_access" in (tokens.scope or "").split()


def test_fake_authorize_requires_audience_and_prompt(
    fake: FakeAtlassian, http: httpx.Client
) -> None:
    url = make_provider(fake).login_url(new_login_request(), http)
    assert http.get(url).status_code == 302
    for dropped in ("audience", "prompt"):
        query = {key: value for key, value in query_of(url).items() if key != dropped}
        response = http.get(fake.auth_url + "/authorize", params=query)
        assert response.status_code == 400
        assert dropped in response.text


# -- logins ------------------------------------------------------------------------------------


def test_alice_logs_in(fake: FakeAtlassian, http: httpx.Client) -> None:
    provider = make_provider(fake)
    before = int(time.time())
    result = sign_in(provider, http)

    identity = result.identity
    assert identity.provider == "atlassian"
    assert identity.subject == ALICE
    assert identity.username == "alice"
    assert identity.name == "Alice Anderson"
    assert identity.email == "alice@acme.example"
    assert identity.email_verified is True
    # accessible-resources lists acme twice (Jira and Confluence, same cloud id): once here.
    assert identity.tenants == (ACME.id, GLOBEX.id)
    assert identity.sites == ("https://acme.atlassian.net", "https://globex.atlassian.net")
    facts = identity.facts()
    assert facts["tenants"] == {ACME.id, GLOBEX.id}
    assert facts["email_domain"] == {"acme.example"}

    tokens = result.tokens
    assert tokens is not None and tokens.access_token
    assert tokens.expires_at is not None and before + 3500 <= tokens.expires_at <= before + 3700
    assert tokens.scope == "read:me read:jira-user"
    assert tokens.context == {
        "cloud_ids": [ACME.id, GLOBEX.id],
        "sites": [
            {"id": ACME.id, "name": "acme", "url": "https://acme.atlassian.net"},
            {"id": GLOBEX.id, "name": "globex", "url": "https://globex.atlassian.net"},
        ],
        "api_url": fake.api_url,
    }
    sent = fake.token_requests[-1]
    assert (sent["grant_type"], sent["_auth"], sent["client_id"]) == (
        "authorization_code",
        "body",
        fake.client_id,
    )
    assert "code_verifier" not in sent


def test_bob_email_is_not_verified(fake: FakeAtlassian, http: httpx.Client) -> None:
    fake.default_user = "bob"
    identity = sign_in(make_provider(fake), http).identity
    assert (identity.subject, identity.email) == (BOB, "bob@example.com")
    assert identity.email_verified is False
    assert identity.facts()["email"] == frozenset()
    assert identity.tenants == (GLOBEX.id,)


def test_email_without_verified_flag_is_not_verified(
    fake: FakeAtlassian, http: httpx.Client
) -> None:
    fake.malform("me", '{"account_id": "acc-1", "email": "x@example.com", "name": "X"}')
    identity = sign_in(make_provider(fake), http).identity
    assert (identity.subject, identity.email, identity.email_verified) == (
        "acc-1",
        "x@example.com",
        False,
    )


def test_client_secret_basic(fake: FakeAtlassian, http: httpx.Client) -> None:
    provider = make_provider(fake, token_endpoint_auth_method="client_secret_basic")
    assert sign_in(provider, http).identity.subject == ALICE
    assert fake.token_requests[-1]["_auth"] == "basic"


def test_wrong_client_secret_refused(fake: FakeAtlassian, http: httpx.Client) -> None:
    provider = make_provider(fake, client_secret="not-the-secret")
    with pytest.raises(LoginFailed) as caught:
        sign_in(provider, http)
    assert caught.value.reason == "token_error"
    assert "HTTP 401" in caught.value.detail and "access_denied" in caught.value.detail


def test_code_is_single_use(fake: FakeAtlassian, http: httpx.Client) -> None:
    provider = make_provider(fake)
    trip = upstream_login(provider, http)
    provider.handle_callback(trip.callback(), http)
    with pytest.raises(LoginFailed) as caught:
        provider.handle_callback(trip.callback(), http)
    assert caught.value.reason == "token_error"
    assert "invalid_grant" in caught.value.detail


def test_user_refuses_consent(fake: FakeAtlassian, http: httpx.Client) -> None:
    fake.consent = False
    provider = make_provider(fake)
    trip = upstream_login(provider, http)
    assert trip.params["error"] == "access_denied"
    with pytest.raises(AccessDenied) as caught:
        provider.handle_callback(trip.callback(), http)
    assert caught.value.reason == "upstream_denied"


# -- site restrictions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "restriction",
    [
        {"allowed_cloud_ids": [ACME.id]},
        {"allowed_sites": ["https://ACME.atlassian.net/"]},
        {"allowed_cloud_ids": ["not-alice-s"], "allowed_sites": ["https://acme.atlassian.net"]},
    ],
)
def test_allowed_site_passes_and_only_it_is_kept(
    fake: FakeAtlassian, http: httpx.Client, restriction: dict[str, Any]
) -> None:
    result = sign_in(make_provider(fake, **restriction), http)
    assert result.identity.tenants == (ACME.id,)
    assert result.identity.sites == ("https://acme.atlassian.net",)
    assert result.tokens is not None
    assert result.tokens.context["cloud_ids"] == [ACME.id]
    assert result.tokens.context["sites"] == [
        {"id": ACME.id, "name": "acme", "url": "https://acme.atlassian.net"}
    ]


@pytest.mark.parametrize(
    "restriction",
    [
        {"allowed_cloud_ids": ["0ff1ce00-0000-0000-0000-000000000000"]},
        {"allowed_sites": ["https://initech.atlassian.net"]},
    ],
)
def test_no_allowed_site_refused(
    fake: FakeAtlassian, http: httpx.Client, restriction: dict[str, Any]
) -> None:
    provider = make_provider(fake, **restriction)
    with pytest.raises(AccessDenied) as caught:
        sign_in(provider, http)
    assert caught.value.reason == "site_not_allowed"
    assert "2 site(s)" in caught.value.detail


def test_user_without_any_site_refused_when_restricted(
    fake: FakeAtlassian, http: httpx.Client
) -> None:
    fake.users["alice"].sites = []
    assert sign_in(make_provider(fake), http).identity.tenants == ()
    with pytest.raises(AccessDenied):
        sign_in(make_provider(fake, allowed_cloud_ids=[ACME.id]), http)


# -- refresh -----------------------------------------------------------------------------------


def test_refresh_rotates_and_the_old_token_is_dead(fake: FakeAtlassian, http: httpx.Client) -> None:
    provider = offline(make_provider(fake))
    tokens = sign_in(provider, http).tokens
    assert tokens is not None and tokens.refresh_token

    rotated = provider.refresh(tokens, http)
    assert fake.refresh_calls == 1
    assert rotated.access_token != tokens.access_token
    assert rotated.refresh_token and rotated.refresh_token != tokens.refresh_token
    assert rotated.context == tokens.context
    assert not fake.refresh_token_active(tokens.refresh_token)
    assert fake.refresh_token_active(rotated.refresh_token)
    assert jira_myself(fake, rotated.access_token, ACME.id).status_code == 200

    with pytest.raises(LoginFailed) as caught:
        provider.refresh(tokens, http)  # reuse of the rotated one, outside the (zero) leeway...
    assert caught.value.reason == "token_error"
    assert "HTTP 403" in caught.value.detail and "invalid_grant" in caught.value.detail
    assert not fake.refresh_token_active(rotated.refresh_token)  # ...revoked the whole family
    with pytest.raises(LoginFailed):
        provider.refresh(rotated, http)
    assert jira_myself(fake, rotated.access_token, ACME.id).status_code == 401
    assert fake.refresh_calls == 3


def test_reuse_within_the_leeway_is_tolerated(http: httpx.Client) -> None:
    with FakeAtlassian.running(reuse_leeway=600) as fake:
        provider = offline(make_provider(fake))
        tokens = sign_in(provider, http).tokens
        assert tokens is not None
        first = provider.refresh(tokens, http)
        fake.advance(599)
        again = provider.refresh(tokens, http)  # a lost answer retried: still fine
        assert again.refresh_token != first.refresh_token
        fake.advance(2)
        with pytest.raises(LoginFailed):
            provider.refresh(tokens, http)
        with pytest.raises(LoginFailed):
            provider.refresh(again, http)


def test_refresh_without_refresh_token(fake: FakeAtlassian, http: httpx.Client) -> None:
    with pytest.raises(LoginFailed) as caught:
        make_provider(fake).refresh(UpstreamTokens(access_token="a"), http)
    assert caught.value.reason == "no_refresh_token"
    assert fake.refresh_calls == 0


# -- recheck -----------------------------------------------------------------------------------


def test_recheck_follows_the_sites(fake: FakeAtlassian, http: httpx.Client) -> None:
    provider = make_provider(fake, allowed_sites=["https://acme.atlassian.net"])
    result = sign_in(provider, http)
    assert result.tokens is not None
    assert provider.recheck(result.identity, result.tokens, http) == result.identity

    fake.users["alice"].email = "alice@new.example"
    assert provider.recheck(result.identity, result.tokens, http).email == "alice@new.example"

    fake.users["alice"].sites = [GLOBEX]  # acme removed the user (or uninstalled the app)
    with pytest.raises(AccessDenied) as caught:
        provider.recheck(result.identity, result.tokens, http)
    assert caught.value.reason == "site_not_allowed"


def test_recheck_unrestricted_sees_new_sites(fake: FakeAtlassian, http: httpx.Client) -> None:
    provider = make_provider(fake)
    result = sign_in(provider, http)
    assert result.tokens is not None
    initech = Site(
        "5e1f0000-1111-2222-3333-444455556666", "initech", "https://initech.atlassian.net"
    )
    fake.users["alice"].sites = [ACME_CONFLUENCE, initech]
    identity = provider.recheck(result.identity, result.tokens, http)
    assert identity.tenants == (ACME.id, initech.id)


def test_recheck_needs_a_token(fake: FakeAtlassian, http: httpx.Client) -> None:
    provider = make_provider(fake)
    identity = sign_in(provider, http).identity
    with pytest.raises(LoginFailed) as caught:
        provider.recheck(identity, None, http)
    assert caught.value.reason == "no_upstream_token"


def test_recheck_with_another_account_s_token_refused(
    fake: FakeAtlassian, http: httpx.Client
) -> None:
    provider = make_provider(fake)
    alice = sign_in(provider, http)
    fake.default_user = "bob"
    bob = sign_in(provider, http)
    assert bob.tokens is not None
    with pytest.raises(LoginFailed) as caught:
        provider.recheck(alice.identity, bob.tokens, http)
    assert caught.value.reason == "subject_mismatch"


def test_recheck_with_an_expired_token_fails(fake: FakeAtlassian, http: httpx.Client) -> None:
    provider = make_provider(fake)
    result = sign_in(provider, http)
    fake.advance(3601)
    with pytest.raises(LoginFailed) as caught:
        provider.recheck(result.identity, result.tokens, http)
    assert caught.value.reason == "me_failed"


# -- upstream failures -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "where"),
    [
        ("token", "token POST {auth}/oauth/token"),
        ("me", "me GET {api}/me"),
        ("accessible_resources", "accessible_resources GET {api}/oauth/token/accessible-resources"),
    ],
)
@pytest.mark.parametrize("status", [500, 503, 429])
def test_server_errors_are_temporary(
    fake: FakeAtlassian, http: httpx.Client, endpoint: str, where: str, status: int
) -> None:
    provider = make_provider(fake)
    trip = upstream_login(provider, http)
    fake.fail(endpoint, status)
    with pytest.raises(UpstreamUnavailable) as caught:
        provider.handle_callback(trip.callback(), http)
    message = str(caught.value)
    assert (
        message == f"{where.format(auth=fake.auth_url, api=fake.api_url)}: answered HTTP {status}"
    )
    assert "secret detail" not in message


@pytest.mark.parametrize(
    ("endpoint", "where"),
    [("token", "token POST {auth}/oauth/token"), ("me", "me GET {api}/me")],
)
def test_timeouts_are_temporary(
    fake: FakeAtlassian, http: httpx.Client, endpoint: str, where: str
) -> None:
    provider = make_provider(fake, timeout=0.3)
    trip = upstream_login(provider, http)
    fake.delay(endpoint, 10)
    with pytest.raises(UpstreamUnavailable) as caught:
        provider.handle_callback(trip.callback(), http)
    assert str(caught.value).startswith(
        f"{where.format(auth=fake.auth_url, api=fake.api_url)}: timed out after 0.3s"
    )


def test_refresh_server_error_is_temporary(fake: FakeAtlassian, http: httpx.Client) -> None:
    provider = offline(make_provider(fake))
    tokens = sign_in(provider, http).tokens
    assert tokens is not None
    fake.fail("token", 502)
    with pytest.raises(UpstreamUnavailable):
        provider.refresh(tokens, http)
    fake.reset_faults()
    assert provider.refresh(tokens, http).refresh_token  # the refresh token survived the outage


@pytest.mark.parametrize(
    ("endpoint", "body", "reason"),
    [
        ("token", "{not json", "token_error"),
        ("token", '{"access_token": "a"}', "token_error"),  # no token_type
        ("me", "{not json", "me_invalid"),
        ("me", "[]", "me_invalid"),
        ("me", '{"email": "ceo@acme.example", "email_verified": true}', "me_invalid"),
        ("accessible_resources", "<html>", "accessible_resources_invalid"),
        ("accessible_resources", '{"id": "x"}', "accessible_resources_invalid"),
        ("accessible_resources", '["x"]', "accessible_resources_invalid"),
        ("accessible_resources", '[{"id": "x", "name": "n"}]', "accessible_resources_invalid"),
        (
            "accessible_resources",
            '[{"id": "x", "name": "n", "url": "javascript:alert(1)"}]',
            "accessible_resources_invalid",
        ),
    ],
)
def test_malformed_answers_fail_the_login(
    fake: FakeAtlassian, http: httpx.Client, endpoint: str, body: str, reason: str
) -> None:
    provider = make_provider(fake)
    trip = upstream_login(provider, http)
    fake.malform(endpoint, body)
    with pytest.raises(LoginFailed) as caught:
        provider.handle_callback(trip.callback(), http)
    assert caught.value.reason == reason
    assert body not in str(caught.value)


def test_me_refusing_the_token_fails(fake: FakeAtlassian, http: httpx.Client) -> None:
    provider = make_provider(fake)
    trip = upstream_login(provider, http)
    fake.malform("token", '{"access_token": "at-unknown", "token_type": "Bearer"}')
    with pytest.raises(LoginFailed) as caught:
        provider.handle_callback(trip.callback(), http)
    assert (caught.value.reason, "HTTP 401" in caught.value.detail) == ("me_failed", True)


# -- the upstream token at work --------------------------------------------------------------


def test_jira_call_with_the_upstream_token(fake: FakeAtlassian, http: httpx.Client) -> None:
    result = sign_in(make_provider(fake), http)
    assert result.tokens is not None
    token = result.tokens.access_token
    for cloud_id in result.tokens.context["cloud_ids"]:
        response = jira_myself(fake, token, cloud_id)
        assert response.status_code == 200
        assert response.json()["accountId"] == ALICE
        assert response.json()["emailAddress"] == "alice@acme.example"
    assert jira_myself(fake, token, "0ff1ce00-not-alice-s").status_code == 404
    assert jira_myself(fake, token + "x", ACME.id).status_code == 401


def test_jira_call_needs_a_jira_scope(fake: FakeAtlassian, http: httpx.Client) -> None:
    result = sign_in(make_provider(fake, scopes=["read:me"]), http)
    assert result.tokens is not None
    response = jira_myself(fake, result.tokens.access_token, ACME.id)
    assert response.status_code == 401
    assert response.json()["message"] == "Unauthorized; scope does not match"
