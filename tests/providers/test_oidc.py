"""The ``oidc`` provider (providers/oidc.py on providers/_oidc.py).

Most tests log in through a real, certified OpenID provider (``oidc-provider`` in Node, see
``tests/idp``) over real HTTP. A few use a hand-written OP on pytest-httpserver
(``tests.idp_server.FakeOP``) for what a certified OP never does (HS256 or unsigned ID Tokens,
foreign audiences, a lying UserInfo). Each negative test changes one thing from a valid login.
Keycloak's and Google's specifics are in ``test_keycloak.py`` and ``test_google.py``.
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pluggy
import pytest
from pytest_httpserver import HTTPServer

import providers.oidc
from providers import hookspecs
from providers._oauth2 import b64url
from providers.contract import (
    BASE_FACTS,
    CallbackRequest,
    LoginResult,
    Provider,
    ProviderType,
    RefreshingProvider,
    UpstreamTokens,
)
from providers.errors import AccessDenied, ConfigError, LoginFailed, UpstreamUnavailable
from providers.oidc import OIDCProvider
from tests.idp_server import (
    CLIENT_ID,
    CLIENT_SECRET,
    DEFAULT_CLIENTS,
    POST_CLIENT_ID,
    REDIRECT_URI,
    FakeOP,
    RunningIdP,
    UpstreamLogin,
    browse_to_redirect_uri,
    idp_or_skip,
    new_login_request,
    submit_sign_in,
)

Login = Callable[..., UpstreamLogin]

ALICE_SUB = "7f3c9a52-alice"


def make_provider(issuer: str, name: str = "corp", **config: Any) -> OIDCProvider:
    """An ``oidc`` provider for the broker's test client, from config as broker.yaml gives it."""
    base = {
        "type": "oidc",
        "issuer": issuer,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
    }
    return OIDCProvider.from_config(name, {**base, **config}, base_dir=".")


def query_of(url: str) -> dict[str, str]:
    return {key: values[0] for key, values in parse_qs(urlsplit(url).query).items()}


# -- registration and configuration ------------------------------------------------------------


def test_registered_through_the_plugin_hook() -> None:
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(providers.oidc)
    pm.check_pending()
    registered = [kind for kinds in pm.hook.broker_register_providers() for kind in kinds]
    assert registered == [OIDCProvider]
    assert isinstance(OIDCProvider, ProviderType)
    provider = make_provider("https://idp.example.com")
    assert isinstance(provider, Provider)
    assert isinstance(provider, RefreshingProvider)


def test_config_defaults() -> None:
    provider = make_provider("https://idp.example.com/tenant/")
    settings, oidc = provider.settings, provider.oidc
    assert provider.name == "corp"
    assert provider.display_name == "Corp"
    assert settings.scopes == ("openid", "email", "profile")
    assert oidc.issuer == "https://idp.example.com/tenant/"
    assert oidc.discovery_url == "https://idp.example.com/tenant/.well-known/openid-configuration"
    assert oidc.expected_issuer == "https://idp.example.com/tenant/"
    assert settings.token_endpoint_auth_method == "client_secret_basic"
    assert oidc.groups_claim == "groups"
    assert settings.timeout == 10
    assert settings.pkce is True
    assert oidc.allowed_algorithms is None
    assert oidc.fetch_userinfo is True
    assert provider.facts == BASE_FACTS | {"groups"}
    assert make_provider("https://idp.example.com", name="oidc").display_name == "Single sign-on"
    assert make_provider("http://127.0.0.1:8080", display_name="Acme").display_name == "Acme"


def test_config_errors_name_every_key_path() -> None:
    with pytest.raises(ConfigError) as caught:
        OIDCProvider.from_config(
            "corp",
            {
                "type": "oidc",
                "issuer": "http://idp.example.com",
                "client_secret": "s",
                "scopes": ["email", "profile"],
                "token_endpoint_auth_method": "private_key_jwt",
                "timeout": 0,
                "allowed_algorithms": ["none", "HS256", "RS256"],
                "extra_authorize_params": {"state": "fixed", "access_type": "offline"},
                "expected_issuer": "https://idp.example.com/#x",
                "foo": 1,
            },
            base_dir=".",
        )
    assert sorted(caught.value.problems) == sorted(
        [
            "issuer: must be an https URL (http allowed only for loopback hosts)",
            "client_id: required",
            "scopes: must contain openid",
            "token_endpoint_auth_method: must be one of client_secret_basic, client_secret_post",
            "timeout: must be more than 0 and at most 120",
            "allowed_algorithms: none is never allowed",
            "allowed_algorithms: HS256: symmetric algorithms not allowed",
            "extra_authorize_params.state: is set by the broker",
            "expected_issuer: must not have a fragment",
            "foo: unknown key",
        ]
    )


def test_config_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError) as caught:
        OIDCProvider.from_config("corp", ["issuer"], base_dir=".")  # type: ignore[arg-type]
    assert caught.value.problems[0].endswith("must be a mapping")


# -- logins through the real IdP ---------------------------------------------------------------


def test_login_url_is_an_oidc_authentication_request(idp: RunningIdP, http: httpx.Client) -> None:
    provider = make_provider(idp.issuer, extra_authorize_params={"ui_locales": "fr"})
    request = new_login_request(login_hint="carol")
    params = query_of(provider.login_url(request, http))
    expected_challenge = b64url(hashlib.sha256(request.code_verifier.encode()).digest())
    assert params == {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": REDIRECT_URI,
        "scope": "openid email profile",
        "state": request.state,
        "nonce": request.nonce,
        "code_challenge": expected_challenge,
        "code_challenge_method": "S256",
        "login_hint": "carol",
        "ui_locales": "fr",
    }


def test_alice_logs_in(idp: RunningIdP, http: httpx.Client, login: Login) -> None:
    provider = make_provider(idp.issuer, scopes=["openid", "email", "profile", "groups"])
    trip = login(provider)
    assert trip.params["iss"] == idp.issuer  # RFC 9207, checked by the provider too
    before = int(time.time())
    result = provider.handle_callback(trip.callback(), http)

    identity = result.identity
    assert identity.provider == "corp"
    assert identity.subject == ALICE_SUB
    assert identity.username == "alice"
    assert identity.name == "Alice Anderson"
    assert identity.email == "alice@example.com"
    assert identity.email_verified is True
    assert identity.groups == ("staff", "platform")
    assert identity.raw == {"issuer": idp.issuer}
    # Keycloak's realm_access and resource_access claims (alice has both) are the keycloak
    # provider's business (test_keycloak.py): the generic provider leaves them alone.
    assert identity.roles == ()
    assert identity.extra_facts == {}
    assert identity.hosted_domain is None

    tokens = result.tokens
    assert tokens is not None
    assert tokens.access_token
    assert tokens.refresh_token is None  # no offline_access asked
    assert tokens.expires_at is not None and before + 3500 <= tokens.expires_at <= before + 3700
    assert tokens.scope is not None and set(tokens.scope.split()) >= {"openid", "email"}
    assert tokens.id_token is not None
    assert jwt.decode(tokens.id_token, options={"verify_signature": False})["sub"] == ALICE_SUB
    assert tokens.context == {"issuer": idp.issuer}


def test_bob_email_is_not_verified(idp: RunningIdP, http: httpx.Client, login: Login) -> None:
    provider = make_provider(idp.issuer)
    result = provider.handle_callback(login(provider, "bob").callback(), http)
    assert result.identity.email == "bob@example.com"
    assert result.identity.email_verified is False


def test_groups_come_only_with_the_groups_scope(
    idp: RunningIdP, http: httpx.Client, login: Login
) -> None:
    with_groups = make_provider(idp.issuer, scopes="openid groups")
    carol = with_groups.handle_callback(login(with_groups, "carol").callback(), http)
    assert carol.identity.groups == ("contractors",)
    without = make_provider(idp.issuer)
    carol = without.handle_callback(login(without, "carol").callback(), http)
    assert carol.identity.groups == ()


def test_id_token_claims_without_userinfo(http: httpx.Client, login: Login) -> None:
    with idp_or_skip(DEFAULT_CLIENTS, options={"idTokenClaims": "all"}) as idp:
        provider = make_provider(idp.issuer, scopes=["openid", "email"], fetch_userinfo=False)
        result = provider.handle_callback(login(provider).callback(), http)
    assert result.identity.email == "alice@example.com"
    assert result.identity.email_verified is True


def test_client_secret_post(idp: RunningIdP, http: httpx.Client, login: Login) -> None:
    provider = make_provider(
        idp.issuer, client_id=POST_CLIENT_ID, token_endpoint_auth_method="client_secret_post"
    )
    result = provider.handle_callback(login(provider).callback(), http)
    assert result.identity.subject == ALICE_SUB


def test_wrong_client_secret_refused(idp: RunningIdP, http: httpx.Client, login: Login) -> None:
    provider = make_provider(idp.issuer, client_secret="not-the-secret")
    with pytest.raises(LoginFailed) as caught:
        provider.handle_callback(login(provider).callback(), http)
    assert caught.value.reason == "token_error"
    assert caught.value.detail.endswith("error=invalid_client")


@pytest.mark.parametrize("issuer_change", ["expected_issuer", "trailing_slash"])
def test_discovery_issuer_mismatch_refused(
    idp: RunningIdP, http: httpx.Client, issuer_change: str
) -> None:
    if issuer_change == "expected_issuer":
        provider = make_provider(idp.issuer, expected_issuer=idp.issuer + "/other")
    else:
        provider = make_provider(idp.issuer + "/")
    with pytest.raises(LoginFailed) as caught:
        provider.login_url(new_login_request(), http)
    assert caught.value.reason == "issuer_mismatch"


def test_expected_issuer_apart_from_the_back_channel_url(
    idp: RunningIdP, http: httpx.Client, login: Login
) -> None:
    # As with Keycloak behind a proxy: reached at one URL, its issuer is another.
    back_channel = idp.issuer.replace("127.0.0.1", "localhost")
    provider = make_provider(back_channel, expected_issuer=idp.issuer)
    result = provider.handle_callback(login(provider).callback(), http)
    assert result.identity.raw["issuer"] == idp.issuer


def test_wrong_nonce_refused(idp: RunningIdP, http: httpx.Client, login: Login) -> None:
    provider = make_provider(idp.issuer)
    trip = login(provider)
    with pytest.raises(LoginFailed) as caught:
        provider.handle_callback(trip.callback(nonce="another-login-s-nonce"), http)
    assert caught.value.reason == "nonce_mismatch"


def test_tampered_code_refused(idp: RunningIdP, http: httpx.Client, login: Login) -> None:
    provider = make_provider(idp.issuer)
    trip = login(provider)
    params = {**trip.params, "code": trip.params["code"][:-2] + "xy"}
    with pytest.raises(LoginFailed) as caught:
        provider.handle_callback(trip.callback(params=params), http)
    assert caught.value.reason == "token_error"
    assert caught.value.detail.endswith("error=invalid_grant")


def test_wrong_code_verifier_refused(idp: RunningIdP, http: httpx.Client, login: Login) -> None:
    provider = make_provider(idp.issuer)
    trip = login(provider)
    with pytest.raises(LoginFailed) as caught:
        provider.handle_callback(trip.callback(code_verifier="x" * 64), http)
    assert caught.value.reason == "token_error"
    assert caught.value.detail.endswith("error=invalid_grant")


def test_code_is_single_use(idp: RunningIdP, http: httpx.Client, login: Login) -> None:
    provider = make_provider(idp.issuer)
    trip = login(provider)
    provider.handle_callback(trip.callback(), http)
    with pytest.raises(LoginFailed) as caught:
        provider.handle_callback(trip.callback(), http)
    assert caught.value.reason == "token_error"


def test_missing_code_refused(idp: RunningIdP, http: httpx.Client, login: Login) -> None:
    provider = make_provider(idp.issuer)
    trip = login(provider)
    params = {key: value for key, value in trip.params.items() if key != "code"}
    with pytest.raises(LoginFailed) as caught:
        provider.handle_callback(trip.callback(params=params), http)
    assert caught.value.reason == "missing_code"


def test_upstream_access_denied(idp: RunningIdP, http: httpx.Client, login: Login) -> None:
    provider = make_provider(idp.issuer)
    trip = login(provider, "deny")
    assert trip.params["error"] == "access_denied"
    with pytest.raises(AccessDenied) as caught:
        provider.handle_callback(trip.callback(), http)
    assert caught.value.reason == "upstream_denied"
    assert "said no" not in str(caught.value)  # the upstream's error_description stays out


def test_upstream_error_keeps_only_the_code(
    idp: RunningIdP, http: httpx.Client, login: Login
) -> None:
    provider = make_provider(idp.issuer)
    trip = login(provider, "error:invalid_scope")
    assert trip.params["error_description"]
    with pytest.raises(LoginFailed) as caught:
        provider.handle_callback(trip.callback(), http)
    assert not isinstance(caught.value, AccessDenied)
    assert (caught.value.reason, caught.value.detail) == (
        "upstream_error",
        "upstream said invalid_scope",
    )
    assert str(caught.value) == "upstream said invalid_scope"


@pytest.mark.parametrize("code", ["server_error", "temporarily_unavailable"])
def test_upstream_trouble_is_temporary(
    idp: RunningIdP, http: httpx.Client, login: Login, code: str
) -> None:
    """RFC 6749 section 4.1.2.1: the upstream's own trouble is temporary, so the MCP client gets
    temporarily_unavailable and keeps its credentials."""
    provider = make_provider(idp.issuer)
    trip = login(provider, f"error:{code}")
    with pytest.raises(UpstreamUnavailable) as caught:
        provider.handle_callback(trip.callback(), http)
    assert str(caught.value) == f"authorization response: upstream said {code}"


def test_iss_parameter_mismatch_refused(idp: RunningIdP, http: httpx.Client, login: Login) -> None:
    provider = make_provider(idp.issuer)
    trip = login(provider)
    params = {**trip.params, "iss": "https://attacker.example"}
    with pytest.raises(LoginFailed) as caught:
        provider.handle_callback(trip.callback(params=params), http)
    assert caught.value.reason == "issuer_mismatch"


def test_iss_parameter_missing_refused_when_advertised(
    idp: RunningIdP, http: httpx.Client, login: Login
) -> None:
    provider = make_provider(idp.issuer)
    trip = login(provider)
    params = {key: value for key, value in trip.params.items() if key != "iss"}
    with pytest.raises(LoginFailed) as caught:
        provider.handle_callback(trip.callback(params=params), http)
    assert caught.value.reason == "issuer_missing"


def test_algorithm_outside_the_allowed_ones_refused(
    idp: RunningIdP, http: httpx.Client, login: Login
) -> None:
    provider = make_provider(idp.issuer, allowed_algorithms=["ES256"])
    with pytest.raises(LoginFailed) as caught:
        provider.handle_callback(login(provider).callback(), http)
    assert caught.value.reason == "id_token_invalid"


def test_unreachable_idp_is_temporary(http: httpx.Client) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = make_provider(f"http://127.0.0.1:{port}", timeout=2)
    with pytest.raises(UpstreamUnavailable):
        provider.login_url(new_login_request(), http)


def test_refresh_with_offline_access(idp: RunningIdP, http: httpx.Client, login: Login) -> None:
    provider = make_provider(idp.issuer, scopes=["openid", "email", "offline_access"])
    trip = login(provider)
    assert query_of(trip.url)["prompt"] == "consent"
    tokens = provider.handle_callback(trip.callback(), http).tokens
    assert tokens is not None and tokens.refresh_token
    assert "offline_access" in (tokens.scope or "").split()

    refreshed = provider.refresh(tokens, http)
    assert refreshed.access_token != tokens.access_token
    assert refreshed.refresh_token == tokens.refresh_token  # not rotated: kept
    assert refreshed.context == tokens.context
    assert refreshed.expires_at is not None

    # When the response carries no refresh token, the old one is kept.
    again = provider.refresh(refreshed, http)
    assert again.refresh_token == tokens.refresh_token


def test_refresh_rotation_and_reuse(
    rotating_idp: RunningIdP, http: httpx.Client, login: Login
) -> None:
    provider = make_provider(rotating_idp.issuer, scopes=["openid", "offline_access"])
    tokens = provider.handle_callback(login(provider).callback(), http).tokens
    assert tokens is not None and tokens.refresh_token
    rotated = provider.refresh(tokens, http)
    assert rotated.refresh_token and rotated.refresh_token != tokens.refresh_token
    with pytest.raises(LoginFailed) as caught:
        provider.refresh(tokens, http)  # reuse of a rotated token...
    assert caught.value.reason == "token_error"
    assert caught.value.detail.endswith("error=invalid_grant")
    with pytest.raises(LoginFailed):
        provider.refresh(rotated, http)  # ...revoked the whole family


def test_refresh_without_refresh_token(idp: RunningIdP, http: httpx.Client) -> None:
    provider = make_provider(idp.issuer)
    with pytest.raises(LoginFailed) as caught:
        provider.refresh(UpstreamTokens(access_token="a"), http)
    assert caught.value.reason == "no_refresh_token"


# -- a hand-written OP for what a certified one never sends ------------------------------------


def redeem(fake_op: FakeOP, http: httpx.Client, id_token: str, **config: Any) -> LoginResult:
    """The hand-written OP answers ``id_token``; an ``oidc`` provider for it handles the
    callback."""
    return fake_op.redeem(make_provider(fake_op.issuer, **config), http, id_token)


def test_fake_op_valid_login(fake_op: FakeOP, http: httpx.Client) -> None:
    result = redeem(fake_op, http, fake_op.sign(aud=[CLIENT_ID, "other"], azp=CLIENT_ID))
    assert result.identity.subject == "user-1"
    assert result.identity.raw == {"issuer": fake_op.issuer}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"aud": "someone-else"}, "id_token_invalid"),
        ({"aud": [CLIENT_ID, "other"]}, "id_token_invalid"),  # several audiences, no azp
        ({"azp": "other"}, "id_token_invalid"),
        ({"iss": "https://attacker.example"}, "id_token_invalid"),
        ({"exp": int(time.time()) - 3600}, "id_token_invalid"),
        ({"iat": int(time.time()) + 3600}, "id_token_invalid"),
        ({"nonce": None}, "nonce_mismatch"),
        ({"nonce": "n-2"}, "nonce_mismatch"),
        ({"sub": None}, "id_token_invalid"),
        ({"at_hash": "AAAAAAAAAAAAAAAAAAAAAA"}, "id_token_invalid"),
    ],
)
def test_fake_op_id_token_claims_refused(
    fake_op: FakeOP, http: httpx.Client, change: dict[str, Any], reason: str
) -> None:
    token = fake_op.sign(**change)
    with pytest.raises(LoginFailed) as caught:
        redeem(fake_op, http, token)
    assert caught.value.reason == reason


def test_fake_op_at_hash_checked(fake_op: FakeOP, http: httpx.Client) -> None:
    digest = hashlib.sha256(b"at-1").digest()
    result = redeem(fake_op, http, fake_op.sign(at_hash=b64url(digest[:16])))
    assert result.identity.subject == "user-1"


def test_fake_op_symmetric_and_unsigned_tokens_refused(fake_op: FakeOP, http: httpx.Client) -> None:
    fake_op.discovery["id_token_signing_alg_values_supported"] = ["RS256", "HS256", "none"]
    secret = "s" * 64
    hs256 = fake_op.sign(key=secret, alg="HS256")
    with pytest.raises(LoginFailed) as caught:
        redeem(fake_op, http, hs256, client_secret=secret)
    assert caught.value.reason == "id_token_invalid"
    unsigned = _unsigned(fake_op.sign())
    with pytest.raises(LoginFailed) as caught:
        redeem(fake_op, http, unsigned)
    assert caught.value.reason == "id_token_invalid"


def _unsigned(token: str) -> str:
    header = b64url(b'{"alg":"none","kid":"k1"}')
    _, payload, _ = token.split(".")
    return f"{header}.{payload}."


def test_fake_op_signature_by_another_key_refused(fake_op: FakeOP, http: httpx.Client) -> None:
    with pytest.raises(LoginFailed) as caught:
        redeem(fake_op, http, fake_op.sign(key=fake_op.other_key))
    assert caught.value.reason == "id_token_invalid"


def test_fake_op_jwks_refetched_once_for_an_unknown_kid(
    fake_op: FakeOP, http: httpx.Client
) -> None:
    # The first JWKS answer is stale (a cache before the rotation), the next one has the new key.
    fake_op.jwks_answers = [
        [fake_op.jwk(fake_op.key, "k1")],
        [fake_op.jwk(fake_op.key, "k1"), fake_op.jwk(fake_op.other_key, "k2")],
    ]
    provider = make_provider(fake_op.issuer)
    callback = CallbackRequest(
        params={"code": "c-1"}, nonce="n-1", code_verifier="v" * 43, redirect_uri=REDIRECT_URI
    )
    fake_op.id_token = fake_op.sign(key=fake_op.other_key, kid="k2")
    assert provider.handle_callback(callback, http).identity.subject == "user-1"
    assert fake_op.jwks_requests == 2
    # An unknown kid right after does not make the broker fetch the JWKS again.
    fake_op.id_token = fake_op.sign(key=fake_op.other_key, kid="k3")
    with pytest.raises(LoginFailed) as caught:
        provider.handle_callback(callback, http)
    assert caught.value.detail == "no matching signing key"
    assert fake_op.jwks_requests == 2


def test_fake_op_userinfo_subject_must_match(fake_op: FakeOP, http: httpx.Client) -> None:
    fake_op.userinfo = {"sub": "somebody-else", "email": "ceo@example.com", "email_verified": True}
    with pytest.raises(LoginFailed) as caught:
        redeem(fake_op, http, fake_op.sign())
    assert caught.value.reason == "userinfo_subject_mismatch"


def test_fake_op_id_token_wins_over_userinfo(fake_op: FakeOP, http: httpx.Client) -> None:
    fake_op.userinfo = {"sub": "user-1", "email": "other@example.com", "name": "From UserInfo"}
    result = redeem(fake_op, http, fake_op.sign(email="user@example.com", email_verified=True))
    assert result.identity.email == "user@example.com"
    assert result.identity.email_verified is True
    assert result.identity.name == "From UserInfo"


def test_fake_op_refreshed_id_token_must_name_the_same_subject(
    fake_op: FakeOP, http: httpx.Client
) -> None:
    provider = make_provider(fake_op.issuer)
    fake_op.token_extra = {"refresh_token": "rt-1"}
    tokens = fake_op.redeem(provider, http, fake_op.sign()).tokens
    assert tokens is not None
    fake_op.id_token = fake_op.sign(nonce=None, iat=int(time.time()) - 1)
    assert provider.refresh(tokens, http).id_token == fake_op.id_token
    fake_op.id_token = fake_op.sign(nonce=None, sub="user-2")
    with pytest.raises(LoginFailed) as caught:
        provider.refresh(tokens, http)
    assert (caught.value.reason, caught.value.detail) == (
        "id_token_invalid",
        "refreshed id_token has another sub",
    )


def test_fake_op_discovery_server_error_is_temporary(
    httpserver: HTTPServer, http: httpx.Client
) -> None:
    httpserver.expect_request("/op/.well-known/openid-configuration").respond_with_data(
        "bad gateway", status=502
    )
    provider = make_provider(httpserver.url_for("/op"))
    with pytest.raises(UpstreamUnavailable):
        provider.login_url(new_login_request(), http)
    httpserver.clear()


def test_fake_op_token_endpoint_server_error_is_temporary(
    fake_op: FakeOP, http: httpx.Client
) -> None:
    fake_op.token_status = 503
    with pytest.raises(UpstreamUnavailable):
        redeem(fake_op, http, fake_op.sign())


def test_fake_op_userinfo_refusal_fails_the_login(fake_op: FakeOP, http: httpx.Client) -> None:
    fake_op.userinfo_status = 401
    with pytest.raises(LoginFailed) as caught:
        redeem(fake_op, http, fake_op.sign())
    assert caught.value.reason == "userinfo_failed"


def test_an_idp_with_a_sign_in_form(http: httpx.Client) -> None:
    """The test IdP as the login benchmark runs it (``signIn: "form"``): a sign-in page whose
    password is checked against a scrypt hash; a wrong one shows the page again with 401, and
    the right one signs the user in."""
    with idp_or_skip(DEFAULT_CLIENTS, options={"signIn": "form"}) as idp:
        provider = make_provider(idp.issuer)
        request = new_login_request()
        url = provider.login_url(request, http)
        assert isinstance(url, str)
        with httpx.Client(follow_redirects=True, timeout=10) as browser:
            page = browser.get(url)
            assert page.status_code == 200 and 'type="password"' in page.text
            wrong = submit_sign_in(browser, str(page.url), page.text, "alice", "not-her-password")
            assert wrong.status_code == 401 and "Wrong username or password" in wrong.text
            nobody = submit_sign_in(browser, str(page.url), page.text, "mallory", "x")
            assert nobody.status_code == 401
        # Without a password there is no way through: the form is where the browser stays.
        with pytest.raises(AssertionError, match="answered 200"):
            browse_to_redirect_uri(url)
        params = browse_to_redirect_uri(
            provider.login_url(request, http), sign_in=("alice", "alice-password")
        )
        assert params["state"] == request.state
        result = provider.handle_callback(
            UpstreamLogin(request=request, url=url, params=params).callback(), http
        )
        assert result.identity.subject == ALICE_SUB
