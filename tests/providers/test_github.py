"""The ``github`` provider (providers/github.py on providers/_oauth2.py).

Every test logs in over real HTTP against a fake GitHub (``tests/fakes/github.py``) that answers
as github.com and GitHub Enterprise Server do, quirks included: form-encoded token answers unless
JSON is asked for, errors with HTTP 200, comma-separated scopes, ``Link`` pagination, membership
states and organisations that restrict OAuth Apps. Each negative test changes one thing from a
valid login.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

import httpx
import pluggy
import pytest

import providers.github
from providers import hookspecs
from providers._oauth2 import b64url
from providers.contract import (
    BASE_FACTS,
    Identity,
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
from providers.github import RESTRICTED_HINT, GitHubProvider
from tests.fakes.github import CLIENT_ID, CLIENT_SECRET, Email, FakeGitHub, GitHubUser
from tests.idp_server import REDIRECT_URI, UpstreamLogin, upstream_login


@pytest.fixture(scope="module")
def github_server() -> Iterator[FakeGitHub]:
    with FakeGitHub() as fake:
        yield fake


@pytest.fixture
def github(github_server: FakeGitHub) -> FakeGitHub:
    """The fake github.com (API at ``/``), fresh: sample users, no faults, no tokens."""
    github_server.reset()
    return github_server


def make_provider(fake: FakeGitHub, name: str = "github", **config: Any) -> GitHubProvider:
    return GitHubProvider.from_config(name, fake.provider_config(**config), base_dir=".")


def login(
    provider: GitHubProvider, http: httpx.Client, login_hint: str | None = None
) -> LoginResult:
    """The browser goes through the fake's authorize endpoint, the provider redeems the code."""
    trip = upstream_login(provider, http, login_hint)
    return provider.handle_callback(trip.callback(), http)


def query_of(url: str) -> dict[str, str]:
    return {key: values[0] for key, values in parse_qs(urlsplit(url).query).items()}


def config_problems(**config: Any) -> list[str]:
    base = {"type": "github", "client_id": "id", "client_secret": "secret", **config}
    with pytest.raises(ConfigError) as caught:
        GitHubProvider.from_config("github", base, base_dir=".")
    return sorted(caught.value.problems)


# -- registration and configuration ------------------------------------------------------------


def test_registered_through_the_plugin_hook() -> None:
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(providers.github)
    pm.check_pending()
    registered = [kind for kinds in pm.hook.broker_register_providers() for kind in kinds]
    assert registered == [GitHubProvider]
    assert isinstance(GitHubProvider, ProviderType)
    provider = GitHubProvider.from_config(
        "github", {"client_id": "id", "client_secret": "s"}, base_dir="."
    )
    for protocol in (Provider, RedirectLogin, RefreshingProvider, RecheckingProvider):
        assert isinstance(provider, protocol)
    assert isinstance(provider, RequirementsAware)
    assert provider.facts == BASE_FACTS | {"orgs", "teams"}


def test_config_defaults() -> None:
    provider = GitHubProvider.from_config(
        "gh", {"type": "github", "client_id": "id", "client_secret": "s"}, base_dir="."
    )
    settings = provider.settings
    assert provider.name == "gh"
    assert provider.display_name == "GitHub"
    assert settings.authorization_endpoint == "https://github.com/login/oauth/authorize"
    assert settings.token_endpoint == "https://github.com/login/oauth/access_token"
    assert provider.settings.api_url == "https://api.github.com"
    assert settings.scopes == ("read:user", "user:email")
    assert provider.scopes() == ("read:user", "user:email")
    assert settings.token_endpoint_auth_method == "client_secret_post"
    assert settings.pkce is True
    assert settings.timeout == 10
    assert settings.extra_authorize_params == {}
    assert provider.settings.allowed_orgs == ()
    assert provider.settings.allowed_teams == ()


def test_config_base_urls_and_lists() -> None:
    provider = GitHubProvider.from_config(
        "github",
        {
            "client_id": "id",
            "client_secret": "s",
            "display_name": "Acme GitHub",
            "auth_url": "https://github.example.com/",
            "api_url": "https://api.github.example.com/",
            "allowed_orgs": ["Acme", "globex"],
            "allowed_teams": "Acme/Platform globex/research",
            "scopes": "read:user",
            "token_endpoint_auth_method": "client_secret_basic",
            "pkce": False,
            "timeout": 3,
        },
        base_dir=".",
    )
    assert provider.display_name == "Acme GitHub"
    assert provider.settings.token_endpoint == "https://github.example.com/login/oauth/access_token"
    assert provider.settings.api_url == "https://api.github.example.com"
    assert provider.settings.allowed_orgs == ("acme", "globex")
    assert provider.settings.allowed_teams == ("acme/platform", "globex/research")
    assert provider.settings.scopes == ("read:user",)
    assert provider.scopes() == ("read:user", "read:org")
    assert provider.settings.token_endpoint_auth_method == "client_secret_basic"
    assert provider.settings.pkce is False
    assert provider.settings.timeout == 3


def test_config_enterprise_url() -> None:
    provider = GitHubProvider.from_config(
        "ghes",
        {"client_id": "id", "client_secret": "s", "enterprise_url": "https://ghe.acme.com/"},
        base_dir=".",
    )
    assert provider.settings.authorization_endpoint == "https://ghe.acme.com/login/oauth/authorize"
    assert provider.settings.token_endpoint == "https://ghe.acme.com/login/oauth/access_token"
    assert provider.settings.api_url == "https://ghe.acme.com/api/v3"


def test_config_errors_name_every_key_path() -> None:
    assert config_problems(
        client_id=None,
        client_secret=7,
        auth_url="http://github.example.com",
        api_url="https://api.example.com/#x",
        allowed_orgs=["acme", "not/an-org"],
        allowed_teams=["acme", "acme/platform"],
        scopes=["read:user", 'bad"scope'],
        token_endpoint_auth_method="private_key_jwt",
        extra_authorize_params={"state": "fixed", "allow_signup": "false"},
        timeout=0,
        pkce="yes",
        display_name="",
        organisation="acme",
    ) == sorted(
        [
            "client_id: required",
            "client_secret: must be a non-empty string",
            "auth_url: must be an https URL (http allowed only for loopback hosts)",
            "api_url: must not have a fragment",
            "allowed_orgs[1]: must be an organisation login",
            "allowed_teams[0]: must be an org/team-slug",
            "scopes: contains invalid characters",
            "token_endpoint_auth_method: must be one of client_secret_basic, client_secret_post",
            "extra_authorize_params.state: is set by the broker",
            "timeout: must be more than 0 and at most 120",
            "pkce: must be true or false",
            "display_name: must be a non-empty string",
            "organisation: unknown key",
        ]
    )


def test_config_enterprise_url_excludes_auth_and_api_url() -> None:
    problem = "enterprise_url: cannot be combined with auth_url or api_url"
    ghes = "https://ghe.acme.com"
    assert config_problems(enterprise_url=ghes, auth_url=ghes) == [problem]
    assert config_problems(enterprise_url=ghes, api_url=ghes + "/api/v3") == [problem]
    assert config_problems(enterprise_url="ghe.acme.com") == [
        "enterprise_url: must be an https URL (http allowed only for loopback hosts)"
    ]
    assert config_problems(enterprise_url=ghes + "/?x=1") == [
        "enterprise_url: must not have a query"
    ]


def test_config_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError) as caught:
        GitHubProvider.from_config("github", ["client_id"], base_dir=".")  # type: ignore[arg-type]
    assert caught.value.problems[0].endswith("must be a mapping")


# -- the authorization request ------------------------------------------------------------------


def test_login_url_has_pkce_s256_and_state(github: FakeGitHub, http: httpx.Client) -> None:
    provider = make_provider(github, extra_authorize_params={"allow_signup": "false"})
    trip = upstream_login(provider, http)
    expected_challenge = b64url(hashlib.sha256(trip.request.code_verifier.encode()).digest())
    assert trip.url.startswith(f"{github.base_url}/login/oauth/authorize?")
    assert query_of(trip.url) == {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": REDIRECT_URI,
        "scope": "read:user user:email",
        "state": trip.request.state,
        "code_challenge": expected_challenge,
        "code_challenge_method": "S256",
        "allow_signup": "false",
    }
    assert trip.params["state"] == trip.request.state
    assert set(trip.params) == {"code", "state"}


def test_read_org_only_when_orgs_or_teams_are_needed(github: FakeGitHub) -> None:
    assert "read:org" not in make_provider(github).scopes()
    assert make_provider(github, allowed_orgs=["acme"]).scopes()[-1] == "read:org"
    assert make_provider(github, allowed_teams=["acme/sre"]).scopes()[-1] == "read:org"
    provider = make_provider(github)
    provider.apply_requirements(Requirements(facts=frozenset({"email", "username"})))
    assert "read:org" not in provider.scopes()
    provider.apply_requirements(Requirements(facts=frozenset({"teams"})))
    assert provider.scopes() == ("read:user", "user:email", "read:org")
    configured = make_provider(github, scopes=["read:user", "read:org"], allowed_orgs=["acme"])
    assert configured.scopes() == ("read:user", "read:org")


def test_login_hint_names_the_github_account(github: FakeGitHub, http: httpx.Client) -> None:
    provider = make_provider(github)
    trip = upstream_login(provider, http, login_hint="bob")
    assert query_of(trip.url)["login"] == "bob"
    assert provider.handle_callback(trip.callback(), http).identity.username == "bob"


# -- logins -------------------------------------------------------------------------------------


def test_alice_logs_in(github: FakeGitHub, http: httpx.Client) -> None:
    result = login(make_provider(github), http)
    assert result.identity == Identity(
        provider="github",
        subject="1001",
        username="alice",
        name="Alice Anderson",
        email="alice@example.com",  # primary and verified, on the second page of /user/emails
        email_verified=True,
        raw={"id": 1001, "login": "alice", "memberships": {}},
    )
    assert result.identity.facts()["email_domain"] == {"example.com"}
    assert len(github.requests("/user/emails")) == 2
    assert github.requests("/user/orgs") == github.requests("/user/teams") == []

    tokens = result.tokens
    assert tokens is not None
    assert tokens.access_token.startswith("gho_")
    assert tokens.refresh_token is None  # OAuth App tokens never expire
    assert tokens.expires_at is None
    assert tokens.scope == "read:user user:email"  # GitHub said "read:user,user:email"
    assert tokens.context == {"api_url": github.api_url, "host": f"127.0.0.1:{github.server.port}"}


def test_api_requests_name_the_version_and_media_type(
    github: FakeGitHub, http: httpx.Client
) -> None:
    result = login(make_provider(github), http)
    assert result.tokens is not None
    for request in github.requests("/user") + github.requests("/user/emails"):
        assert request.headers["Accept"] == "application/vnd.github+json"
        assert request.headers["X-GitHub-Api-Version"] == "2022-11-28"
        assert request.headers["Authorization"] == f"Bearer {result.tokens.access_token}"


def test_subject_is_the_numeric_id_not_the_login(github: FakeGitHub, http: httpx.Client) -> None:
    provider = make_provider(github)
    before = login(provider, http).identity
    github.users["alice"].login = "alice-renamed"
    github.users["alice-renamed"] = github.users.pop("alice")
    github.default_login = "alice-renamed"
    after = login(provider, http).identity
    assert (before.subject, after.subject) == ("1001", "1001")
    assert after.username == "alice-renamed"


def test_orgs_and_teams_when_rules_read_them(github: FakeGitHub, http: httpx.Client) -> None:
    provider = make_provider(github)
    provider.apply_requirements(Requirements(facts=frozenset({"orgs", "teams"})))
    result = login(provider, http)
    identity = result.identity
    assert identity.orgs == ("acme", "globex")  # lower-cased logins
    assert identity.teams == ("acme/platform", "acme/sre", "globex/research")  # across 2 pages
    assert len(github.requests("/user/teams")) == 2
    assert result.tokens is not None and result.tokens.scope == "read:user user:email read:org"
    assert github.requests("/user/memberships/orgs/acme") == []  # no restriction to check


def test_unverified_primary_email_gives_no_email_fact(
    github: FakeGitHub, http: httpx.Client
) -> None:
    identity = login(make_provider(github), http, login_hint="bob").identity
    assert identity.email == "bob@example.com"  # bob@other.example is verified, but not primary
    assert identity.email_verified is False
    assert identity.facts()["email"] == frozenset()


def test_no_email_without_the_email_scope(github: FakeGitHub, http: httpx.Client) -> None:
    identity = login(make_provider(github, scopes=["read:user"]), http).identity
    assert identity.email is None
    assert github.requests("/user/emails") == []


# -- restrictions -------------------------------------------------------------------------------


def test_allowed_org_active_member_passes(github: FakeGitHub, http: httpx.Client) -> None:
    identity = login(make_provider(github, allowed_orgs=["ACME"]), http).identity
    assert identity.orgs == ("acme", "globex")
    assert identity.raw["memberships"] == {"acme": "active"}
    assert len(github.requests("/user/memberships/orgs/acme")) == 1


def test_allowed_org_pending_member_refused(github: FakeGitHub, http: httpx.Client) -> None:
    provider = make_provider(github, allowed_orgs=["acme"])
    with pytest.raises(AccessDenied) as caught:
        login(provider, http, login_hint="carol")
    assert caught.value.reason == "org_not_allowed"
    assert "acme: membership pending, not active" in caught.value.detail


def test_allowed_org_non_member_refused(github: FakeGitHub, http: httpx.Client) -> None:
    provider = make_provider(github, allowed_orgs=["globex"])
    with pytest.raises(AccessDenied) as caught:
        login(provider, http, login_hint="bob")
    assert caught.value.reason == "org_not_allowed"
    assert "globex: not a member (HTTP 404" in caught.value.detail


def test_org_restricting_oauth_apps_refused_with_a_hint(
    github: FakeGitHub, http: httpx.Client
) -> None:
    provider = make_provider(github, allowed_orgs=["initech"])
    assert login(provider, http, login_hint="dave").identity.orgs == ("initech",)
    github.restricted_orgs.add("Initech")
    with pytest.raises(AccessDenied) as caught:
        login(provider, http, login_hint="dave")
    assert caught.value.reason == "org_not_allowed"
    assert f"initech: not a member (HTTP 403; {RESTRICTED_HINT})" in caught.value.detail
    assert "OAuth App access restrictions" not in caught.value.detail  # GitHub's text stays out


def test_allowed_team_passes(github: FakeGitHub, http: httpx.Client) -> None:
    identity = login(make_provider(github, allowed_teams=["acme/platform"]), http).identity
    assert "acme/platform" in identity.teams


def test_not_in_an_allowed_team_refused(github: FakeGitHub, http: httpx.Client) -> None:
    provider = make_provider(github, allowed_teams=["acme/platform"])
    with pytest.raises(AccessDenied) as caught:
        login(provider, http, login_hint="bob")  # an active member of acme, but in no team
    assert caught.value.reason == "team_not_allowed"
    assert "acme: active member, in no allowed team" in caught.value.detail
    with pytest.raises(AccessDenied) as caught:
        login(provider, http, login_hint="carol")  # in the team, but the invitation is pending
    assert caught.value.reason == "team_not_allowed"


def test_allowed_org_or_allowed_team(github: FakeGitHub, http: httpx.Client) -> None:
    """With both lists, an active member of an allowed org passes, and so does a member of an
    allowed team (an allowed team implies its org)."""
    provider = make_provider(github, allowed_orgs=["acme"], allowed_teams=["globex/research"])
    assert login(provider, http, login_hint="bob").identity.username == "bob"  # by org
    other = make_provider(github, allowed_orgs=["initech"], allowed_teams=["globex/research"])
    assert login(other, http).identity.username == "alice"  # by team
    with pytest.raises(AccessDenied) as caught:
        login(other, http, login_hint="bob")
    assert caught.value.reason == "org_not_allowed"


# -- GitHub Enterprise Server -------------------------------------------------------------------


def test_enterprise_server_layout(http: httpx.Client) -> None:
    with FakeGitHub(enterprise=True) as ghes:
        config = ghes.provider_config(allowed_orgs=["acme"])
        assert config["enterprise_url"] == ghes.base_url and "api_url" not in config
        provider = GitHubProvider.from_config("ghes", config, base_dir=".")
        result = login(provider, http)
        assert result.identity.subject == "1001"
        assert result.identity.email == "alice@example.com"
        assert result.tokens is not None
        assert result.tokens.context["api_url"] == f"{ghes.base_url}/api/v3"
        assert len(ghes.requests("/api/v3/user")) == 1
        assert len(ghes.requests("/api/v3/user/memberships/orgs/acme")) == 1
        assert ghes.requests("/login/oauth/access_token")


# -- the token endpoint's quirks ----------------------------------------------------------------


def test_token_endpoint_answers_form_encoded_unless_json_is_asked(
    github: FakeGitHub, http: httpx.Client
) -> None:
    form = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    token_url = f"{github.base_url}/login/oauth/access_token"
    plain = http.post(token_url, data={**form, "code": github.issue_code("alice")})
    assert plain.status_code == 200
    assert plain.headers["content-type"].startswith("application/x-www-form-urlencoded")
    answer = dict(parse_qsl(plain.text))
    assert answer["token_type"] == "bearer" and answer["scope"] == "read:user"

    login(make_provider(github), http)
    sent = github.requests("/login/oauth/access_token")[-1]
    assert sent.headers["Accept"] == "application/json"
    assert sent.form["client_id"] == CLIENT_ID  # client_secret_post, as GitHub documents
    assert sent.form["code_verifier"]


def test_wrong_client_secret_is_an_http_200_error(github: FakeGitHub, http: httpx.Client) -> None:
    provider = make_provider(github, client_secret="wrong")
    with pytest.raises(LoginFailed) as caught:
        login(provider, http)
    assert caught.value.reason == "token_error"
    assert "HTTP 200, error=incorrect_client_credentials" in caught.value.detail
    assert "GitHub says" not in str(caught.value)  # error_description stays out


def trip_and_provider(
    github: FakeGitHub, http: httpx.Client
) -> tuple[GitHubProvider, UpstreamLogin]:
    provider = make_provider(github)
    return provider, upstream_login(provider, http)


def test_tampered_code_refused(github: FakeGitHub, http: httpx.Client) -> None:
    provider, trip = trip_and_provider(github, http)
    with pytest.raises(LoginFailed) as caught:
        provider.handle_callback(trip.callback(params={**trip.params, "code": "nope"}), http)
    assert caught.value.reason == "token_error"
    assert "error=bad_verification_code" in caught.value.detail


def test_wrong_code_verifier_refused(github: FakeGitHub, http: httpx.Client) -> None:
    provider, trip = trip_and_provider(github, http)
    with pytest.raises(LoginFailed) as caught:
        provider.handle_callback(trip.callback(code_verifier="x" * 43), http)
    assert "error=bad_verification_code" in caught.value.detail


def test_code_is_single_use(github: FakeGitHub, http: httpx.Client) -> None:
    provider, trip = trip_and_provider(github, http)
    provider.handle_callback(trip.callback(), http)
    with pytest.raises(LoginFailed) as caught:
        provider.handle_callback(trip.callback(), http)
    assert "error=bad_verification_code" in caught.value.detail


def test_redirect_uri_mismatch_refused(github: FakeGitHub, http: httpx.Client) -> None:
    provider, trip = trip_and_provider(github, http)
    with pytest.raises(LoginFailed) as caught:
        provider.handle_callback(trip.callback(redirect_uri="http://127.0.0.1:1/other"), http)
    assert "error=redirect_uri_mismatch" in caught.value.detail


def test_user_denying_the_app(github: FakeGitHub, http: httpx.Client) -> None:
    provider, trip = trip_and_provider(github, http)
    denied = {"error": "access_denied", "error_description": "The user has denied your app."}
    with pytest.raises(AccessDenied) as caught:
        provider.handle_callback(
            trip.callback(params={**denied, "state": trip.params["state"]}), http
        )
    assert caught.value.reason == "upstream_denied"


# -- upstream failures --------------------------------------------------------------------------


def test_api_timeout_is_temporary(github: FakeGitHub, http: httpx.Client) -> None:
    github.break_endpoint("user", delay=1.0)
    with pytest.raises(UpstreamUnavailable) as caught:
        login(make_provider(github, timeout=0.2), http)
    assert f"user GET {github.api_url}/user: timed out after 0.2s" in str(caught.value)


@pytest.mark.parametrize(
    ("endpoint", "method", "path"),
    [
        ("token", "POST", "/login/oauth/access_token"),
        ("user", "GET", "/user"),
        ("emails", "GET", "/user/emails"),
        ("teams", "GET", "/user/teams"),
        ("membership", "GET", "/user/memberships/orgs/acme"),
    ],
)
def test_server_errors_are_temporary(
    github: FakeGitHub, http: httpx.Client, endpoint: str, method: str, path: str
) -> None:
    github.break_endpoint(endpoint, status=502)
    with pytest.raises(UpstreamUnavailable) as caught:
        login(make_provider(github, allowed_orgs=["acme"]), http)
    assert f"{method} {github.base_url}{path}: answered HTTP 502" in str(caught.value)


def test_rate_limit_is_temporary(github: FakeGitHub, http: httpx.Client) -> None:
    github.break_endpoint("emails", status=429)
    with pytest.raises(UpstreamUnavailable) as caught:
        login(make_provider(github), http)
    assert "answered HTTP 429" in str(caught.value)


@pytest.mark.parametrize(
    ("endpoint", "reason"),
    [
        ("token", "token_error"),
        ("user", "user_invalid"),
        ("emails", "emails_invalid"),
        ("orgs", "orgs_invalid"),
        ("membership", "membership_invalid"),
    ],
)
def test_malformed_json_fails_the_login(
    github: FakeGitHub, http: httpx.Client, endpoint: str, reason: str
) -> None:
    github.break_endpoint(endpoint, malformed=True)
    with pytest.raises(LoginFailed) as caught:
        login(make_provider(github, allowed_orgs=["acme"]), http)
    assert caught.value.reason == reason
    assert "not JSON" in caught.value.detail
    assert '"login"' not in str(caught.value)


def test_user_without_numeric_id_refused(github: FakeGitHub, http: httpx.Client) -> None:
    github.users["alice"].id = "1001"  # type: ignore[assignment]
    with pytest.raises(LoginFailed) as caught:
        login(make_provider(github), http)
    assert caught.value.reason == "user_invalid"


def test_api_refusal_fails_the_login(github: FakeGitHub, http: httpx.Client) -> None:
    github.break_endpoint("user", status=401)
    with pytest.raises(LoginFailed) as caught:
        login(make_provider(github), http)
    assert caught.value.reason == "user_failed"
    assert f"GET {github.api_url}/user: answered HTTP 401" in caught.value.detail


def test_next_page_on_another_host_refused(github: FakeGitHub, http: httpx.Client) -> None:
    github.next_link_base = "http://127.0.0.2:9"
    with pytest.raises(LoginFailed) as caught:
        login(make_provider(github), http)
    assert caught.value.reason == "emails_invalid"
    assert "next page on another host" in caught.value.detail


def test_pagination_is_bounded(github: FakeGitHub, http: httpx.Client) -> None:
    github.users["alice"].emails = [Email(f"a{n}@example.com") for n in range(21)]
    with pytest.raises(LoginFailed) as caught:
        login(make_provider(github), http)
    assert caught.value.detail.endswith("more than 10 pages")
    assert len(github.requests("/user/emails")) == 10


# -- GitHub App tokens: expiry and rotating refresh tokens ---------------------------------------


def test_refresh_rotates_github_app_tokens(http: httpx.Client) -> None:
    with FakeGitHub(expiring_tokens=True) as app:
        provider = GitHubProvider.from_config("github", app.provider_config(), base_dir=".")
        before = int(time.time())
        tokens = login(provider, http).tokens
        assert tokens is not None and tokens.refresh_token is not None
        assert tokens.expires_at is not None
        assert before + 8 * 3600 - 5 <= tokens.expires_at <= before + 8 * 3600 + 5
        assert tokens.scope == "read:user user:email"  # GitHub Apps answer scope=""

        app.expire_access_tokens()
        with pytest.raises(LoginFailed):
            provider.recheck(Identity("github", "1001"), tokens, http)
        refreshed = provider.refresh(tokens, http)
        assert refreshed.access_token != tokens.access_token
        assert refreshed.refresh_token not in (None, tokens.refresh_token)
        assert refreshed.context == tokens.context
        assert provider.recheck(Identity("github", "1001"), refreshed, http).username == "alice"

        with pytest.raises(LoginFailed) as caught:
            provider.refresh(tokens, http)  # the rotated refresh token is spent
        assert "error=bad_refresh_token" in caught.value.detail
        assert provider.refresh(refreshed, http).refresh_token != refreshed.refresh_token


def test_oauth_app_tokens_have_no_refresh(github: FakeGitHub, http: httpx.Client) -> None:
    tokens = login(make_provider(github), http).tokens
    assert tokens is not None
    with pytest.raises(LoginFailed) as caught:
        make_provider(github).refresh(tokens, http)
    assert caught.value.reason == "no_refresh_token"


# -- recheck ------------------------------------------------------------------------------------


def test_recheck_after_leaving_the_org(github: FakeGitHub, http: httpx.Client) -> None:
    provider = make_provider(github, allowed_orgs=["acme"])
    result = login(provider, http)
    assert result.tokens is not None
    again = provider.recheck(result.identity, result.tokens, http)
    assert again == result.identity
    github.users["alice"].orgs.pop("Acme")
    with pytest.raises(AccessDenied) as caught:
        provider.recheck(result.identity, result.tokens, http)
    assert caught.value.reason == "org_not_allowed"


def test_recheck_after_leaving_the_team(github: FakeGitHub, http: httpx.Client) -> None:
    provider = make_provider(github, allowed_teams=["acme/sre"])
    result = login(provider, http)
    assert result.tokens is not None
    github.users["alice"].teams.remove("Acme/sre")
    with pytest.raises(AccessDenied) as caught:
        provider.recheck(result.identity, result.tokens, http)
    assert caught.value.reason == "team_not_allowed"


def test_recheck_sees_profile_changes(github: FakeGitHub, http: httpx.Client) -> None:
    provider = make_provider(github)
    result = login(provider, http)
    assert result.tokens is not None
    github.users["alice"].name = "Alice Smith"
    assert provider.recheck(result.identity, result.tokens, http).name == "Alice Smith"


def test_recheck_needs_the_token(github: FakeGitHub, http: httpx.Client) -> None:
    provider = make_provider(github)
    identity = login(provider, http).identity
    with pytest.raises(LoginFailed) as caught:
        provider.recheck(identity, None, http)
    assert caught.value.reason == "no_upstream_token"


def test_recheck_refuses_a_token_of_another_user(github: FakeGitHub, http: httpx.Client) -> None:
    provider = make_provider(github)
    alice = login(provider, http).identity
    bob_tokens = login(provider, http, login_hint="bob").tokens
    assert bob_tokens is not None
    with pytest.raises(LoginFailed) as caught:
        provider.recheck(alice, bob_tokens, http)
    assert caught.value.reason == "subject_mismatch"


def test_fake_users_can_be_added(github: FakeGitHub, http: httpx.Client) -> None:
    github.add_user(GitHubUser(id=77, login="eve", emails=[Email("eve@example.com", primary=True)]))
    identity = login(make_provider(github), http, login_hint="eve").identity
    assert (identity.subject, identity.email, identity.name) == ("77", "eve@example.com", None)
    assert replace(identity, raw={}) == Identity(
        "github", "77", username="eve", email="eve@example.com", email_verified=True
    )


def test_identity_survives_a_snapshot(github: FakeGitHub, http: httpx.Client) -> None:
    result = login(make_provider(github, allowed_orgs=["acme"]), http)
    assert Identity.from_snapshot(result.identity.snapshot()) == result.identity
    assert isinstance(result.tokens, UpstreamTokens)
