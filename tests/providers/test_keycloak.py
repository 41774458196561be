"""The ``keycloak`` provider (providers/keycloak.py on providers/_oidc.py).

Logins go through the real test IdP (``oidc-provider``) in Keycloak's two URL layouts,
``/realms/test`` (Keycloak 17+) and ``/auth/realms/test`` (16 and older), with routes under
``/protocol/openid-connect/``; it serves ``realm_access``, ``resource_access`` and ``groups`` as
claims (with the ``groups`` scope) and opaque access tokens. Keycloak's own habit, roles in a JWT
access token signed with the realm keys, is played by the hand-written OP. Each negative test
changes one thing from a valid login.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pluggy
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from pytest_httpserver import HTTPServer

import providers.keycloak
from providers import hookspecs
from providers.contract import (
    BASE_FACTS,
    Identity,
    Provider,
    ProviderType,
    RecheckingProvider,
    RefreshingProvider,
    Requirements,
    UpstreamTokens,
)
from providers.errors import ConfigError, LoginFailed
from providers.keycloak import KeycloakProvider
from providers.oidc import OIDCProvider
from tests.idp_server import (
    CLIENT_ID,
    CLIENT_SECRET,
    FAKE_KEYCLOAK_ROUTES,
    FakeOP,
    RunningIdP,
    UpstreamLogin,
    new_login_request,
)

Login = Callable[..., UpstreamLogin]

ALICE_SUB = "7f3c9a52-alice"
SCOPES = ["openid", "email", "profile", "groups"]
"""The test IdP releases ``realm_access``, ``resource_access`` and ``groups`` with ``groups``."""


def make_provider(server_url: str, name: str = "staff", **config: Any) -> KeycloakProvider:
    """A ``keycloak`` provider for realm ``test``, from config as broker.yaml gives it."""
    base = {
        "type": "keycloak",
        "server_url": server_url,
        "realm": "test",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
    }
    return KeycloakProvider.from_config(name, {**base, **config}, base_dir=".")


def layout(idp: RunningIdP) -> tuple[str, str]:
    """(server_url, relative_path) of a Keycloak-layout test IdP."""
    server_url, _, realm = idp.issuer.rpartition("/realms/")
    assert realm == "test"
    origin = f"http://127.0.0.1:{idp.port}"
    return origin, server_url.removeprefix(origin)


def query_of(url: str) -> dict[str, str]:
    return {key: values[0] for key, values in parse_qs(urlsplit(url).query).items()}


# -- registration and configuration ------------------------------------------------------------


def test_registered_through_the_plugin_hook() -> None:
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(providers.keycloak)
    pm.check_pending()
    registered = [kind for kinds in pm.hook.broker_register_providers() for kind in kinds]
    assert registered == [KeycloakProvider]
    assert isinstance(KeycloakProvider, ProviderType)
    provider = make_provider("https://kc.example.com")
    assert isinstance(provider, Provider)
    assert isinstance(provider, RefreshingProvider)


def test_config_defaults() -> None:
    provider = make_provider("https://kc.example.com/")
    assert provider.display_name == "Keycloak"
    assert provider.settings.scopes == ("openid", "email", "profile")
    assert provider.oidc.groups_claim == "groups"
    assert provider.oidc.fetch_userinfo is True
    assert provider.facts == BASE_FACTS | {"groups", "roles", "client_roles"}
    # Without relative_path both layouts are probed, Keycloak 17+ first.
    assert provider.discovery_candidates() == [
        (
            "https://kc.example.com/realms/test/.well-known/openid-configuration",
            "https://kc.example.com/realms/test",
        ),
        (
            "https://kc.example.com/auth/realms/test/.well-known/openid-configuration",
            "https://kc.example.com/auth/realms/test",
        ),
    ]
    assert make_provider("https://kc.example.com", display_name="Staff").display_name == "Staff"


@pytest.mark.parametrize(
    ("config", "realm_base"),
    [
        ({"relative_path": ""}, "https://kc.example.com/realms/test"),
        ({"relative_path": "/"}, "https://kc.example.com/realms/test"),
        ({"relative_path": "/auth"}, "https://kc.example.com/auth/realms/test"),
        ({"relative_path": "/id/kc/"}, "https://kc.example.com/id/kc/realms/test"),
        ({"realm": "staff team"}, "https://kc.example.com/realms/staff%20team"),
    ],
)
def test_realm_base(config: dict[str, Any], realm_base: str) -> None:
    provider = make_provider("https://kc.example.com", **config)
    if "relative_path" in config:
        assert provider.realm_bases == (realm_base,)
    else:
        assert provider.realm_bases[0] == realm_base
    assert provider.discovery_candidates()[0] == (
        realm_base + "/.well-known/openid-configuration",
        realm_base,
    )


def test_expected_issuer_is_required_of_every_layout() -> None:
    provider = make_provider(
        "https://keycloak.internal:8443", expected_issuer="https://kc.acme.com/realms/test"
    )
    assert [issuer for _, issuer in provider.discovery_candidates()] == [
        "https://kc.acme.com/realms/test",
        "https://kc.acme.com/realms/test",
    ]


def test_config_errors_name_every_key_path() -> None:
    with pytest.raises(ConfigError) as caught:
        KeycloakProvider.from_config(
            "staff",
            {
                "type": "keycloak",
                "server_url": "https://kc.example.com/?tenant=1",
                "realm": "staff/admin",
                "relative_path": "auth",
                "issuer": "https://kc.example.com/realms/staff",
                "discovery_url": "https://kc.example.com/realms/staff/.well-known/x",
                "client_secret": "s",
                "foo": 1,
            },
            base_dir=".",
        )
    derived = "derived from server_url, realm and relative_path (expected_issuer behind a proxy)"
    assert sorted(caught.value.problems) == sorted(
        [
            "server_url: must not have a query",
            "realm: must be a realm name (no /, no surrounding spaces)",
            'relative_path: must be "" or a path such as /auth',
            f"issuer: not a keycloak key: the issuer is {derived}",
            f"discovery_url: not a keycloak key: the issuer is {derived}",
            "client_id: required",
            "foo: unknown key",
        ]
    )


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({"server_url": None}, "server_url: required"),
        ({"realm": None}, "realm: required"),
        ({"realm": ""}, "realm: must be a non-empty string"),
        ({"realm": ".."}, "realm: must be a realm name (no /, no surrounding spaces)"),
        (
            {"server_url": "https://kc.example.com/realms/test"},
            "server_url: must be the server's URL, without /realms/<realm>",
        ),
        (
            {"server_url": "http://kc.example.com"},
            "server_url: must be an https URL (http allowed only for loopback hosts)",
        ),
        ({"relative_path": "/auth/../admin"}, 'relative_path: must be "" or a path such as /auth'),
        ({"relative_path": 1}, 'relative_path: must be "" or a path such as /auth'),
        ({"scopes": ["email"]}, "scopes: must contain openid"),
    ],
)
def test_config_error(config: dict[str, Any], problem: str) -> None:
    settings = {
        "server_url": "https://kc.example.com",
        "realm": "test",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
    }
    settings.update(config)
    with pytest.raises(ConfigError) as caught:
        KeycloakProvider.from_config(
            "staff",
            {key: value for key, value in settings.items() if value is not None},
            base_dir=".",
        )
    assert caught.value.problems == [problem]


# -- logins through the real IdP in Keycloak's layouts -----------------------------------------


def test_login_with_relative_path(
    keycloak_idp: RunningIdP, http: httpx.Client, login: Login
) -> None:
    server_url, relative_path = layout(keycloak_idp)
    issuer = keycloak_idp.issuer
    provider = make_provider(server_url, relative_path=relative_path, scopes=SCOPES)
    assert provider.realm_bases == (issuer,)
    metadata = provider.metadata(http)
    assert metadata.issuer == issuer
    assert metadata.authorization_endpoint == issuer + "/protocol/openid-connect/auth"
    assert metadata.token_endpoint == issuer + "/protocol/openid-connect/token"
    assert metadata.userinfo_endpoint == issuer + "/protocol/openid-connect/userinfo"
    assert metadata.jwks_uri == issuer + "/protocol/openid-connect/certs"

    trip = login(provider)
    assert trip.url.startswith(issuer + "/protocol/openid-connect/auth?")
    result = provider.handle_callback(trip.callback(), http)
    identity = result.identity
    assert identity.subject == ALICE_SUB
    assert identity.username == "alice"
    assert identity.email == "alice@example.com" and identity.email_verified
    assert identity.raw == {"issuer": issuer}
    assert identity.roles == ("mcp-user",)
    assert identity.extra_facts == {"client_roles": ("broker/admin", "broker/viewer")}
    assert identity.groups == ("staff", "platform")
    facts = identity.facts()
    assert facts["roles"] == {"mcp-user"}
    assert facts["client_roles"] == {"broker/admin", "broker/viewer"}
    assert facts["groups"] == {"staff", "platform"}
    assert result.tokens is not None
    assert result.tokens.context == {"issuer": issuer}


def test_probing_finds_the_layout(
    keycloak_idp: RunningIdP, http: httpx.Client, login: Login
) -> None:
    server_url, _ = layout(keycloak_idp)
    provider = make_provider(server_url, scopes=SCOPES)
    assert len(provider.realm_bases) == 2
    result = provider.handle_callback(login(provider).callback(), http)
    assert provider.metadata(http).issuer == keycloak_idp.issuer
    assert result.identity.raw == {"issuer": keycloak_idp.issuer}
    assert result.identity.roles == ("mcp-user",)
    # The issuer of the layout found, not the first one tried.
    assert result.tokens is not None
    assert result.tokens.context == {"issuer": keycloak_idp.issuer}


def test_relative_path_of_the_other_layout_refused(
    keycloak_idp: RunningIdP, http: httpx.Client
) -> None:
    server_url, relative_path = layout(keycloak_idp)
    other = "" if relative_path == "/auth" else "/auth"
    provider = make_provider(server_url, relative_path=other)
    with pytest.raises(LoginFailed) as caught:
        provider.login_url(new_login_request(), http)
    assert caught.value.reason == "discovery_failed"
    assert caught.value.detail.endswith("answered HTTP 404")


@pytest.mark.parametrize("probing", [False, True], ids=["relative_path", "probing"])
def test_expected_issuer_behind_a_proxy(
    keycloak_idp: RunningIdP, http: httpx.Client, login: Login, probing: bool
) -> None:
    # Reached at one URL (a back channel), Keycloak names the issuer of its hostname setting.
    server_url, relative_path = layout(keycloak_idp)
    back_channel = server_url.replace("127.0.0.1", "localhost")
    paths = {} if probing else {"relative_path": relative_path}
    provider = make_provider(back_channel, expected_issuer=keycloak_idp.issuer, **paths)
    assert provider.realm_bases[0].startswith("http://localhost:")
    result = provider.handle_callback(login(provider).callback(), http)
    assert result.identity.raw == {"issuer": keycloak_idp.issuer}
    assert result.tokens is not None
    assert result.tokens.context == {"issuer": keycloak_idp.issuer}


@pytest.mark.parametrize("change", ["back_channel_without_expected_issuer", "expected_issuer"])
def test_issuer_mismatch_refused_naming_both(
    keycloak_idp: RunningIdP, http: httpx.Client, change: str
) -> None:
    server_url, relative_path = layout(keycloak_idp)
    if change == "expected_issuer":
        expected = "https://kc.acme.com" + relative_path + "/realms/test"
        provider = make_provider(server_url, relative_path=relative_path, expected_issuer=expected)
    else:
        back_channel = server_url.replace("127.0.0.1", "localhost")
        provider = make_provider(back_channel, relative_path=relative_path)
        expected = provider.realm_bases[0]
    with pytest.raises(LoginFailed) as caught:
        provider.login_url(new_login_request(), http)
    assert caught.value.reason == "issuer_mismatch"
    assert f"names issuer {keycloak_idp.issuer!r}, expected {expected!r}" in caught.value.detail


@pytest.mark.parametrize(
    ("user", "roles", "client_roles", "groups"),
    [
        ("bob", ("mcp-user",), (), ("staff",)),
        ("carol", (), (), ("contractors",)),
    ],
)
def test_roles_and_groups_of_other_users(
    keycloak_idp: RunningIdP,
    http: httpx.Client,
    login: Login,
    user: str,
    roles: tuple[str, ...],
    client_roles: tuple[str, ...],
    groups: tuple[str, ...],
) -> None:
    provider = make_provider(layout(keycloak_idp)[0], scopes=SCOPES)
    identity = provider.handle_callback(login(provider, user).callback(), http).identity
    assert (identity.roles, identity.extra_facts, identity.groups) == (
        roles,
        {"client_roles": client_roles},
        groups,
    )


def test_no_roles_without_the_claims(
    keycloak_idp: RunningIdP, http: httpx.Client, login: Login
) -> None:
    provider = make_provider(layout(keycloak_idp)[0])  # no groups scope: no such claims
    identity = provider.handle_callback(login(provider).callback(), http).identity
    assert (identity.roles, identity.extra_facts, identity.groups) == (
        (),
        {"client_roles": ()},
        (),
    )
    assert identity.facts()["client_roles"] == frozenset()


def test_offline_access_and_refresh(
    keycloak_idp: RunningIdP, http: httpx.Client, login: Login
) -> None:
    provider = make_provider(layout(keycloak_idp)[0])
    assert "offline_access" not in query_of(provider.login_url(new_login_request(), http))["scope"]
    provider.apply_requirements(Requirements(offline=True))
    trip = login(provider)
    params = query_of(trip.url)
    assert params["scope"].split() == ["openid", "email", "profile", "offline_access"]
    assert params["prompt"] == "consent"
    tokens = provider.handle_callback(trip.callback(), http).tokens
    assert tokens is not None and tokens.refresh_token
    refreshed = provider.refresh(tokens, http)
    assert refreshed.access_token != tokens.access_token
    assert refreshed.refresh_token == tokens.refresh_token
    assert refreshed.context == {"issuer": keycloak_idp.issuer}


def test_generic_oidc_provider_at_a_keycloak_realm(
    keycloak_idp: RunningIdP, http: httpx.Client, login: Login
) -> None:
    # The generic provider signs in at a Keycloak realm too; roles are this plugin's business.
    issuer = keycloak_idp.issuer
    config = {"issuer": issuer, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    provider = OIDCProvider.from_config("corp", {**config, "scopes": SCOPES}, base_dir=".")
    metadata = provider.metadata(http)
    assert metadata.token_endpoint == issuer + "/protocol/openid-connect/token"
    result = provider.handle_callback(login(provider).callback(), http)
    assert result.identity.subject == ALICE_SUB
    assert result.identity.raw == {"issuer": issuer}
    assert result.identity.groups == ("staff", "platform")
    assert (result.identity.roles, result.identity.extra_facts) == ((), {})


# -- Keycloak's JWT access tokens, from a hand-written realm -----------------------------------

ACCESS_TOKEN_CLAIMS: dict[str, Any] = {
    "typ": "Bearer",
    "azp": CLIENT_ID,
    "aud": "account",
    "nonce": None,
    "scope": "openid email profile",
    "realm_access": {"roles": ["default-roles-test", "offline_access", "mcp-admin"]},
    "resource_access": {
        "broker": {"roles": ["deployer"]},
        "account": {"roles": ["manage-account", "view-profile"]},
    },
    "groups": ["/staff", "/staff/platform"],
}
"""What Keycloak's access token carries (its ID Token and UserInfo carry no roles)."""


@pytest.fixture
def fake_realm(
    httpserver: HTTPServer, rsa_keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]
) -> Iterator[FakeOP]:
    """Realm ``test`` of a Keycloak 17+ at ``http://localhost:PORT``."""
    yield FakeOP(httpserver, rsa_keys, prefix="/realms/test", routes=FAKE_KEYCLOAK_ROUTES)
    httpserver.clear()


def realm_login(fake_realm: FakeOP, http: httpx.Client, **config: Any) -> Identity:
    """A login at the hand-written realm; its ID Token carries no roles, as Keycloak's."""
    provider = make_provider(fake_realm.base.removesuffix("/realms/test"), **config)
    assert provider.realm_bases[0] == fake_realm.issuer
    return fake_realm.redeem(provider, http, fake_realm.sign(typ="ID", azp=CLIENT_ID)).identity


def test_roles_from_a_jwt_access_token(fake_realm: FakeOP, http: httpx.Client) -> None:
    fake_realm.access_token = fake_realm.sign(**ACCESS_TOKEN_CLAIMS)
    identity = realm_login(fake_realm, http)
    assert identity.subject == "user-1"
    assert identity.roles == ("default-roles-test", "offline_access", "mcp-admin")
    assert identity.extra_facts == {
        "client_roles": (
            "broker/deployer",
            "account/manage-account",
            "account/view-profile",
        )
    }
    assert identity.groups == ("/staff", "/staff/platform")


def test_access_token_without_aud(fake_realm: FakeOP, http: httpx.Client) -> None:
    fake_realm.access_token = fake_realm.sign(**{**ACCESS_TOKEN_CLAIMS, "aud": None})
    assert realm_login(fake_realm, http).roles == (
        "default-roles-test",
        "offline_access",
        "mcp-admin",
    )


def test_access_token_wins_over_id_token_claims(fake_realm: FakeOP, http: httpx.Client) -> None:
    fake_realm.access_token = fake_realm.sign(**ACCESS_TOKEN_CLAIMS)
    fake_realm.userinfo = {"sub": "user-1", "realm_access": {"roles": ["from-userinfo"]}}
    identity = realm_login(fake_realm, http)
    assert identity.roles == ("default-roles-test", "offline_access", "mcp-admin")


def test_opaque_access_token_leaves_the_userinfo_claims(
    fake_realm: FakeOP, http: httpx.Client
) -> None:
    fake_realm.userinfo = {
        "sub": "user-1",
        "realm_access": {"roles": ["from-userinfo"]},
        "resource_access": {"broker": {"roles": ["viewer"]}},
        "memberOf": ["ops"],
    }
    identity = realm_login(fake_realm, http, groups_claim="memberOf")
    assert identity.roles == ("from-userinfo",)
    assert identity.extra_facts == {"client_roles": ("broker/viewer",)}
    assert identity.groups == ("ops",)


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        ({"key": "other"}, "InvalidSignatureError"),
        ({"alg": "HS256"}, "algorithm HS256 not allowed"),
        ({"iss": "https://kc.example.com/realms/other"}, "InvalidIssuerError"),
        ({"azp": "another-client"}, "azp is another client"),
        ({"azp": None}, "MissingRequiredClaimError"),
        ({"sub": "user-2"}, "sub is not the ID Token's"),
        ({"typ": "Refresh"}, "typ is not Bearer"),
        ({"exp": int(time.time()) - 3600}, "expired"),
    ],
)
def test_jwt_access_token_refused(
    fake_realm: FakeOP, http: httpx.Client, change: dict[str, Any], detail: str
) -> None:
    claims = {**ACCESS_TOKEN_CLAIMS, **change}
    if claims.pop("key", None):
        claims["key"] = fake_realm.other_key
    if claims.get("alg") == "HS256":
        claims["key"] = "s" * 64
    fake_realm.access_token = fake_realm.sign(**claims)
    with pytest.raises(LoginFailed) as caught:
        realm_login(fake_realm, http)
    assert (caught.value.reason, caught.value.detail) == ("access_token_invalid", detail)


# -- the re-check (RecheckingProvider) ----------------------------------------------------------


def test_recheck_reads_the_current_roles_and_userinfo(
    fake_realm: FakeOP, http: httpx.Client
) -> None:
    """UserInfo says who the user is now; a JWT access token's roles win, as at sign-in."""
    provider = make_provider(fake_realm.base.removesuffix("/realms/test"))
    fake_realm.access_token = fake_realm.sign(**ACCESS_TOKEN_CLAIMS)
    result = fake_realm.redeem(provider, http, fake_realm.sign(typ="ID", azp=CLIENT_ID))
    assert isinstance(provider, RecheckingProvider) and result.tokens is not None
    fake_realm.userinfo = {"sub": "user-1", "email": "new@example.com", "email_verified": True}
    fake_realm.access_token = fake_realm.sign(
        **{**ACCESS_TOKEN_CLAIMS, "realm_access": {"roles": ["default-roles-test"]}}
    )
    tokens = UpstreamTokens(access_token=fake_realm.access_token)
    current = provider.recheck(result.identity, tokens, http)
    assert current.subject == "user-1"
    assert current.email == "new@example.com"
    assert current.roles == ("default-roles-test",)
    assert current.raw == result.identity.raw


def test_recheck_refused_when_userinfo_refuses_the_token(
    fake_realm: FakeOP, http: httpx.Client
) -> None:
    provider = make_provider(fake_realm.base.removesuffix("/realms/test"))
    result = fake_realm.redeem(provider, http, fake_realm.sign(typ="ID", azp=CLIENT_ID))
    fake_realm.userinfo_status = 401  # the user was disabled: the session's token is dead
    fake_realm.userinfo = {"error": "invalid_token"}
    with pytest.raises(LoginFailed):
        provider.recheck(result.identity, UpstreamTokens(access_token="at"), http)
    with pytest.raises(LoginFailed, match="no upstream token"):
        provider.recheck(result.identity, None, http)


def test_recheck_of_another_subject_refused(fake_realm: FakeOP, http: httpx.Client) -> None:
    provider = make_provider(fake_realm.base.removesuffix("/realms/test"))
    result = fake_realm.redeem(provider, http, fake_realm.sign(typ="ID", azp=CLIENT_ID))
    fake_realm.userinfo = {"sub": "someone-else"}
    with pytest.raises(LoginFailed) as refused:
        provider.recheck(result.identity, UpstreamTokens(access_token="at"), http)
    assert refused.value.reason == "userinfo_subject_mismatch"


def test_recheck_without_userinfo_keeps_the_identity(
    fake_realm: FakeOP, http: httpx.Client
) -> None:
    """With fetch_userinfo off, the token refresh the broker ran first was the check."""
    provider = make_provider(fake_realm.base.removesuffix("/realms/test"), fetch_userinfo=False)
    result = fake_realm.redeem(provider, http, fake_realm.sign(typ="ID", azp=CLIENT_ID))
    fake_realm.userinfo_status = 500
    assert provider.recheck(result.identity, UpstreamTokens(access_token="at"), http) is (
        result.identity
    )
