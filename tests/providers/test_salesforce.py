"""The ``salesforce`` provider (providers/salesforce.py on providers/_oauth2.py).

Logins go over real HTTP to a fake Salesforce (``tests/fakes/salesforce.py``) that is the login
host at ``http://127.0.0.1:PORT`` and answers as Salesforce's web server flow does: signed
identity URL, ``instance_url``, identity URL answer. Each negative test changes one thing from a
valid login.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pluggy
import pytest
from pytest_httpserver import HTTPServer

import providers.salesforce
from providers import hookspecs
from providers._oauth2 import b64url
from providers.contract import (
    CallbackRequest,
    LoginResult,
    Provider,
    ProviderType,
    RedirectLogin,
    RefreshingProvider,
    Requirements,
    RequirementsAware,
    UpstreamTokens,
)
from providers.errors import AccessDenied, ConfigError, LoginFailed, UpstreamUnavailable
from providers.salesforce import SalesforceProvider
from tests.fakes.salesforce import ACME_ORG, CLIENT_ID, CLIENT_SECRET, OTHER_ORG, FakeSalesforce
from tests.idp_server import REDIRECT_URI, new_login_request, upstream_login

PROD, SANDBOX = "https://login.salesforce.com", "https://test.salesforce.com"
ProviderFor = Callable[..., SalesforceProvider]


def make_provider(name: str = "salesforce", **config: Any) -> SalesforceProvider:
    """A provider from config as broker.yaml gives it (production unless config says more)."""
    base = {"type": "salesforce", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    return SalesforceProvider.from_config(name, {**base, **config}, base_dir=".")


def config_problems(**config: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        make_provider(**config)
    return sorted(caught.value.problems)


def query_of(url: str) -> dict[str, str]:
    return {key: values[0] for key, values in parse_qs(urlsplit(url).query).items()}


@pytest.fixture(scope="module")
def sf_server() -> Iterator[HTTPServer]:
    """One loopback server for the module (threaded: a slow answer blocks no other test)."""
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    yield server
    server.clear()
    server.stop()


@pytest.fixture
def fake(sf_server: HTTPServer) -> Iterator[FakeSalesforce]:
    yield FakeSalesforce(sf_server)
    sf_server.clear()


@pytest.fixture
def provider_for(fake: FakeSalesforce) -> ProviderFor:
    """``provider_for(**config)``: a provider whose ``login_url`` is the fake."""

    def make(**config: Any) -> SalesforceProvider:
        return SalesforceProvider.from_config(
            "salesforce", fake.provider_config(**config), base_dir="."
        )

    return make


def log_in(provider: SalesforceProvider, http: httpx.Client, **changes: Any) -> LoginResult:
    """Through the fake's authorize endpoint to the callback, then the provider's callback."""
    return provider.handle_callback(upstream_login(provider, http).callback(**changes), http)


# -- registration and configuration ------------------------------------------------------------


def test_registered_through_the_plugin_hook() -> None:
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(providers.salesforce)
    pm.check_pending()
    registered = [kind for kinds in pm.hook.broker_register_providers() for kind in kinds]
    assert registered == [SalesforceProvider]
    assert isinstance(SalesforceProvider, ProviderType)
    provider = make_provider()
    for capability in (Provider, RedirectLogin, RefreshingProvider, RequirementsAware):
        assert isinstance(provider, capability)
    assert provider.facts >= {"tenants", "subject", "email"}


def test_config_defaults_are_production() -> None:
    provider = make_provider()
    settings = provider.settings
    assert provider.display_name == "Salesforce"
    assert provider.settings.login_host == PROD
    assert settings.authorization_endpoint == f"{PROD}/services/oauth2/authorize"
    assert settings.token_endpoint == f"{PROD}/services/oauth2/token"
    assert settings.scopes == ("id",)
    assert settings.token_endpoint_auth_method == "client_secret_post"
    assert settings.pkce is True
    assert settings.timeout == 10
    assert provider.settings.allowed_org_ids == frozenset()
    assert provider.settings.identity_origins == {PROD}
    assert make_provider(display_name="Acme CRM").display_name == "Acme CRM"


MY_DOMAIN = "https://acme.my.salesforce.com"
SANDBOX_MY_DOMAIN = "https://acme--uat.sandbox.my.salesforce.com"
DEV_ED = "https://acme-dev-ed.develop.my.salesforce.com"
SCRATCH = "https://a-b-1.scratch.my.salesforce.com"
SITE = "https://acme.my.site.com"


@pytest.mark.parametrize(
    ("config", "host", "identity_hosts"),
    [
        ({"sandbox": True}, SANDBOX, {SANDBOX}),
        ({"sandbox": False}, PROD, {PROD}),
        ({"my_domain": "Acme"}, MY_DOMAIN, {MY_DOMAIN, PROD}),
        (
            {"my_domain": "acme--uat", "sandbox": True},
            SANDBOX_MY_DOMAIN,
            {SANDBOX_MY_DOMAIN, SANDBOX},
        ),
        ({"login_url": SITE + "/"}, SITE, {SITE}),
        ({"login_url": DEV_ED}, DEV_ED, {DEV_ED, PROD}),
        ({"login_url": SCRATCH}, SCRATCH, {SCRATCH, SANDBOX}),
    ],
)
def test_login_hosts(config: dict[str, Any], host: str, identity_hosts: set[str]) -> None:
    provider = make_provider(**config)
    assert provider.settings.login_host == host
    assert provider.settings.token_endpoint == f"{host}/services/oauth2/token"
    assert provider.settings.identity_origins == identity_hosts
    request = new_login_request()
    url = provider.login_url(request, httpx.Client())
    assert url.startswith(f"{host}/services/oauth2/authorize?")
    params = query_of(url)
    assert (params["state"], params["code_challenge_method"]) == (request.state, "S256")


def test_config_errors_name_every_key_path() -> None:
    problems = config_problems(
        client_id=None,
        sandbox="yes",
        my_domain="acme.my.salesforce.com",
        scopes=["api", "refresh_token"],
        token_endpoint_auth_method="private_key_jwt",
        allowed_org_ids=["00D5g000004AcMe", "005xx000001Sv6e", "00D5g000004AcMeEAX1"],
        extra_authorize_params={"scope": "full"},
        timeout=0,
        instance_url="https://acme.my.salesforce.com",
    )
    assert problems == sorted(
        [
            "client_id: required",
            "sandbox: must be true or false",
            "my_domain: must be the name only (acme for acme.my.salesforce.com)",
            "allowed_org_ids[1]: must be a 15- or 18-character org id",
            "allowed_org_ids[2]: must be a 15- or 18-character org id",
            "token_endpoint_auth_method: must be one of client_secret_basic, client_secret_post",
            "extra_authorize_params.scope: is set by the broker",
            "timeout: must be more than 0 and at most 120",
            "instance_url: unknown key",
        ]
    )


def test_config_scopes_must_open_the_identity_url() -> None:
    assert config_problems(scopes="api refresh_token") == [
        "scopes: must contain id (the broker reads the identity URL)"
    ]
    for synonym in ("profile", "email", "full"):
        assert make_provider(scopes=["openid", synonym]).settings.scopes == ("openid", synonym)


@pytest.mark.parametrize(
    ("config", "problems"),
    [
        (
            {"login_url": "https://sso.acme.example", "sandbox": True},
            ["sandbox: cannot be combined with login_url"],
        ),
        (
            {"login_url": "https://sso.acme.example", "my_domain": "acme"},
            ["my_domain: cannot be combined with login_url"],
        ),
        (
            {"login_url": "http://sso.acme.example"},
            ["login_url: must be an https URL (http allowed only for loopback hosts)"],
        ),
        (
            {"login_url": "https://acme.my.salesforce.com/services/oauth2"},
            ["login_url: must be a host only, without a path"],
        ),
        (
            {"login_url": "https://acme.my.salesforce.com?x=1"},
            ["login_url: must not have a query"],
        ),
        (
            {"my_domain": "https://acme.my.salesforce.com"},
            ["my_domain: must be the name only (acme for acme.my.salesforce.com)"],
        ),
        (
            {"my_domain": "-acme"},
            ["my_domain: must be the name only (acme for acme.my.salesforce.com)"],
        ),
        (
            {"my_domain": "acme--uat"},
            ["my_domain: a sandbox My Domain is MYDOMAIN--SANDBOX, sandbox: true"],
        ),
        (
            {"my_domain": "acme", "sandbox": True},
            ["my_domain: a sandbox My Domain is MYDOMAIN--SANDBOX, sandbox: true"],
        ),
        ({"client_secret": ""}, ["client_secret: must be a non-empty string"]),
        ({"users_file": "x"}, ["users_file: unknown key"]),
    ],
)
def test_config_conflicts_and_errors(config: dict[str, Any], problems: list[str]) -> None:
    assert config_problems(**config) == problems


def test_org_ids_compare_on_their_first_15_characters() -> None:
    provider = make_provider(allowed_org_ids=[ACME_ORG[:15], OTHER_ORG])
    assert provider.settings.allowed_org_ids == {ACME_ORG[:15], OTHER_ORG[:15]}


# -- the authorization request -----------------------------------------------------------------


def test_login_url_has_state_and_pkce_s256(http: httpx.Client) -> None:
    provider = make_provider(my_domain="acme", extra_authorize_params={"prompt": "login"})
    request = new_login_request()
    url = provider.login_url(request, http)
    assert url.startswith("https://acme.my.salesforce.com/services/oauth2/authorize?")
    assert query_of(url) == {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": REDIRECT_URI,
        "scope": "id",
        "state": request.state,
        "code_challenge": b64url(hashlib.sha256(request.code_verifier.encode()).digest()),
        "code_challenge_method": "S256",
        "prompt": "login",
    }


def test_refresh_token_scope_only_when_the_token_must_outlive_the_login() -> None:
    provider = make_provider(scopes=["id", "api"])
    assert query_of(provider.login_url(new_login_request(), httpx.Client()))["scope"] == "id api"
    provider.apply_requirements(Requirements(offline=True))
    assert provider.scopes() == ("id", "api", "refresh_token")
    already = make_provider(scopes="id offline_access")
    already.apply_requirements(Requirements(offline=True))
    assert already.scopes() == ("id", "offline_access")


# -- logins through the fake -------------------------------------------------------------------


def test_alice_logs_in(fake: FakeSalesforce, provider_for: ProviderFor, http: httpx.Client) -> None:
    provider = provider_for(allowed_org_ids=[ACME_ORG])
    result = log_in(provider, http)
    alice = fake.users["alice"]

    identity = result.identity
    assert identity.provider == "salesforce"
    assert identity.subject == f"{ACME_ORG}/{alice.user_id}"
    assert identity.username == "alice@acme.example"
    assert identity.name == "Alice Archer"
    assert identity.email == "alice@acme.example"
    assert identity.email_verified is True
    assert identity.tenants == (ACME_ORG,)
    assert identity.facts()["tenants"] == {ACME_ORG}

    tokens = result.tokens
    assert tokens is not None and tokens.access_token.startswith(ACME_ORG[:15] + "!")
    assert tokens.refresh_token is None  # no refresh_token scope asked
    assert tokens.scope == "id"
    assert tokens.context == {
        "instance_url": "https://acme.my.salesforce.com",
        "organization_id": ACME_ORG,
        "user_id": alice.user_id,
        "identity_url": fake.identity_url("alice"),
    }
    # The identity URL was called once, with the token as a bearer token and asking for JSON.
    (identity_request,) = fake.requests_to("/id/")
    assert identity_request.headers["Authorization"] == f"Bearer {tokens.access_token}"
    assert identity_request.headers["Accept"] == "application/json"


def test_token_request_sends_secret_and_pkce_verifier(
    fake: FakeSalesforce, provider_for: ProviderFor, http: httpx.Client
) -> None:
    fake.require_pkce = True
    provider = provider_for()
    trip = upstream_login(provider, http)
    assert provider.handle_callback(trip.callback(), http).identity.username
    (token_request,) = fake.requests_to("/services/oauth2/token")
    form = token_request.form
    assert form["client_secret"] == CLIENT_SECRET
    assert form["code_verifier"] == trip.request.code_verifier
    assert "Authorization" not in token_request.headers


def test_client_secret_basic(
    fake: FakeSalesforce, provider_for: ProviderFor, http: httpx.Client
) -> None:
    provider = provider_for(token_endpoint_auth_method="client_secret_basic")
    assert log_in(provider, http).identity.username == "alice@acme.example"
    (token_request,) = fake.requests_to("/services/oauth2/token")
    assert "client_secret" not in token_request.form


def test_openid_scope_brings_an_id_token(
    fake: FakeSalesforce, provider_for: ProviderFor, http: httpx.Client
) -> None:
    result = log_in(provider_for(scopes=["openid", "id"]), http)
    assert result.tokens is not None and result.tokens.id_token


def test_unverified_and_absent_email_verified(
    fake: FakeSalesforce, provider_for: ProviderFor, http: httpx.Client
) -> None:
    fake.login_as = "bob"
    bob = log_in(provider_for(), http).identity
    assert (bob.email, bob.email_verified) == ("bob@acme.example", False)
    assert bob.facts()["email"] == frozenset()
    fake.login_as = "dave"  # an identity answer without email_verified
    dave = log_in(provider_for(), http).identity
    assert dave.email_verified is False
    assert dave.tenants == (OTHER_ORG,)


def test_org_allowed_by_its_15_character_id(
    fake: FakeSalesforce, provider_for: ProviderFor, http: httpx.Client
) -> None:
    provider = provider_for(allowed_org_ids=[OTHER_ORG, ACME_ORG[:15]])
    assert log_in(provider, http).identity.tenants == (ACME_ORG,)


def test_refresh_keeps_the_context_and_checks_the_signature(
    fake: FakeSalesforce, provider_for: ProviderFor, http: httpx.Client
) -> None:
    provider = provider_for(scopes=["id", "api"])
    provider.apply_requirements(Requirements(offline=True))
    tokens = log_in(provider, http).tokens
    assert tokens is not None and tokens.refresh_token
    assert tokens.scope == "id api refresh_token"

    refreshed = provider.refresh(tokens, http)
    assert refreshed.access_token != tokens.access_token
    assert refreshed.refresh_token == tokens.refresh_token  # Salesforce sends none: kept
    assert refreshed.context == tokens.context

    fake.instance_url = "https://acme2.my.salesforce.com"  # the org moved: the answer says so
    moved = provider.refresh(tokens, http)
    assert moved.context == {**tokens.context, "instance_url": "https://acme2.my.salesforce.com"}

    fake.token_overrides = {"id": None, "instance_url": None}  # an answer without them
    assert provider.refresh(moved, http).context == moved.context

    fake.token_overrides = {}
    fake.bad_signature = True
    with pytest.raises(LoginFailed) as caught:
        provider.refresh(tokens, http)
    assert caught.value.reason == "signature_invalid"


def test_refresh_for_another_user_refused(
    fake: FakeSalesforce, provider_for: ProviderFor, http: httpx.Client
) -> None:
    provider = provider_for()
    provider.apply_requirements(Requirements(offline=True))
    tokens = log_in(provider, http).tokens
    assert tokens is not None and tokens.refresh_token
    fake.refresh_tokens[tokens.refresh_token].user = "bob"
    with pytest.raises(LoginFailed) as caught:
        provider.refresh(tokens, http)
    assert caught.value.reason == "identity_changed"


def test_refresh_without_refresh_token(provider_for: ProviderFor, http: httpx.Client) -> None:
    with pytest.raises(LoginFailed) as caught:
        provider_for().refresh(UpstreamTokens(access_token="a"), http)
    assert caught.value.reason == "no_refresh_token"


# -- refusals ----------------------------------------------------------------------------------


def test_identity_url_on_another_name_of_the_same_server_refused(
    fake: FakeSalesforce, provider_for: ProviderFor, http: httpx.Client
) -> None:
    fake.identity_origin = f"http://localhost:{fake.server.port}"
    with pytest.raises(LoginFailed) as caught:
        log_in(provider_for(), http)
    assert caught.value.reason == "identity_url_host"
    assert caught.value.detail.endswith(
        f"identity URL on localhost:{fake.server.port}, not on 127.0.0.1:{fake.server.port}"
    )
    assert fake.requests_to("/id/") == []  # the token never went there


def test_identity_url_on_another_server_refused(
    fake: FakeSalesforce, provider_for: ProviderFor, http: httpx.Client
) -> None:
    other = HTTPServer(host="127.0.0.1", port=0)
    other.expect_request("/id/", method="GET").respond_with_json({"user_id": "x"})
    other.start()
    try:
        fake.identity_origin = f"http://127.0.0.1:{other.port}"
        with pytest.raises(LoginFailed) as caught:
            log_in(provider_for(), http)
        assert other.log == []
    finally:
        other.clear()
        other.stop()
    assert caught.value.reason == "identity_url_host"
    assert f"127.0.0.1:{other.port}" in caught.value.detail


def test_identity_hosts_of_a_my_domain() -> None:
    """A My Domain's identity URLs may be on the My Domain or on the general login host of its
    kind (what Salesforce answers), nothing else; checked before any request is sent."""
    ids = f"/id/{ACME_ORG}/0055g00000AlIcEAAA"
    production = make_provider(my_domain="acme")
    sandbox = make_provider(my_domain="acme--uat", sandbox=True)
    for host in (PROD, "https://acme.my.salesforce.com"):
        assert production.check_identity_url(host + ids, "token")[1] == ACME_ORG
    for host in (SANDBOX, "https://acme--uat.sandbox.my.salesforce.com"):
        assert sandbox.check_identity_url(host + ids, "token")[1] == ACME_ORG
    refused = [
        (production, SANDBOX),
        (production, "https://other.my.salesforce.com"),
        (production, "https://acme.my.salesforce.com.evil.example"),
        (sandbox, PROD),
        (sandbox, "https://acme.my.salesforce.com"),
        (make_provider(), "https://acme.my.salesforce.com"),
        (make_provider(sandbox=True), PROD),
    ]
    for provider, host in refused:
        with pytest.raises(LoginFailed) as caught:
            provider.check_identity_url(host + ids, "token")
        assert caught.value.reason == "identity_url_host", host


@pytest.mark.parametrize(
    "path",
    [
        f"/id/{ACME_ORG}",
        f"/id/{ACME_ORG}/0055g00000AlIcEAAA/extra",
        f"/id/005xx000001Sv6eAAC/{ACME_ORG}",
        f"/services/oauth2/userinfo/{ACME_ORG}/0055g00000AlIcEAAA",
    ],
)
def test_identity_url_shape_refused(
    fake: FakeSalesforce, provider_for: ProviderFor, http: httpx.Client, path: str
) -> None:
    fake.token_overrides = {"id": fake.base_url + path}  # signed, on the right host
    with pytest.raises(LoginFailed) as caught:
        log_in(provider_for(), http)
    assert caught.value.reason == "identity_url_invalid"
    assert fake.requests_to("/id/") == []


def test_bad_signature_refused(
    fake: FakeSalesforce, provider_for: ProviderFor, http: httpx.Client
) -> None:
    fake.bad_signature = True
    with pytest.raises(LoginFailed) as caught:
        log_in(provider_for(), http)
    assert caught.value.reason == "signature_invalid"
    assert fake.requests_to("/id/") == []


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"signature": None}, "signature_missing"),
        ({"issued_at": None}, "signature_missing"),
        ({"signature": "not base64!"}, "signature_invalid"),
        ({"id": None}, "identity_url_invalid"),
        ({"instance_url": None}, "instance_url_invalid"),
        ({"instance_url": "http://acme.my.salesforce.com"}, "instance_url_invalid"),
        ({"token_type": "mac"}, "token_error"),
    ],
)
def test_token_answer_defects_refused(
    fake: FakeSalesforce,
    provider_for: ProviderFor,
    http: httpx.Client,
    override: dict[str, Any],
    reason: str,
) -> None:
    fake.token_overrides = override
    with pytest.raises(LoginFailed) as caught:
        log_in(provider_for(), http)
    assert caught.value.reason == reason
    assert fake.requests_to("/id/") == []


def test_org_not_allowed(
    fake: FakeSalesforce, provider_for: ProviderFor, http: httpx.Client
) -> None:
    provider = provider_for(allowed_org_ids=[OTHER_ORG])
    with pytest.raises(AccessDenied) as caught:
        log_in(provider, http)
    assert caught.value.reason == "org_not_allowed"
    assert ACME_ORG in caught.value.detail
    assert caught.value.message == "Your Salesforce organisation is not allowed to sign in here."


def test_inactive_user_refused(
    fake: FakeSalesforce, provider_for: ProviderFor, http: httpx.Client
) -> None:
    fake.login_as = "carol"
    with pytest.raises(AccessDenied) as caught:
        log_in(provider_for(), http)
    assert caught.value.reason == "user_inactive"


@pytest.mark.parametrize(
    "override",
    [{"user_id": "0055g00000BoBbYAAA"}, {"organization_id": OTHER_ORG}, {"user_id": None}],
)
def test_identity_answer_for_another_user_refused(
    fake: FakeSalesforce, provider_for: ProviderFor, http: httpx.Client, override: dict[str, Any]
) -> None:
    fake.identity_overrides = override
    with pytest.raises(LoginFailed) as caught:
        log_in(provider_for(), http)
    assert caught.value.reason == "identity_mismatch"


def test_identity_refused_with_the_token(
    fake: FakeSalesforce, provider_for: ProviderFor, http: httpx.Client
) -> None:
    fake.failures["identity"] = 403
    with pytest.raises(LoginFailed) as caught:
        log_in(provider_for(), http)
    assert caught.value.reason == "identity_failed"
    assert "maintenance" not in str(caught.value)


def test_wrong_code_verifier_refused(
    fake: FakeSalesforce, provider_for: ProviderFor, http: httpx.Client
) -> None:
    with pytest.raises(LoginFailed) as caught:
        log_in(provider_for(), http, code_verifier="x" * 64)
    assert (caught.value.reason, caught.value.detail.rsplit(" ", 1)[-1]) == (
        "token_error",
        "error=invalid_grant",
    )


def test_upstream_error_keeps_only_the_code(
    fake: FakeSalesforce, provider_for: ProviderFor, http: httpx.Client
) -> None:
    provider = provider_for(scopes=["id", "chatter_api"])  # not selected in the Connected App
    with pytest.raises(LoginFailed) as caught:
        log_in(provider, http)
    assert (caught.value.reason, caught.value.detail) == (
        "upstream_error",
        "upstream said invalid_scope",
    )
    assert "bad" not in str(caught.value)


# -- upstream failures -------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["token", "identity"])
@pytest.mark.parametrize("status", [500, 503, 429])
def test_server_errors_are_temporary(
    fake: FakeSalesforce, provider_for: ProviderFor, http: httpx.Client, endpoint: str, status: int
) -> None:
    fake.failures[endpoint] = status
    with pytest.raises(UpstreamUnavailable) as caught:
        log_in(provider_for(), http)
    where = (
        f"token POST {fake.base_url}/services/oauth2/token"
        if endpoint == "token"
        else f"identity GET {fake.identity_url('alice')}"
    )
    assert str(caught.value) == f"{where}: answered HTTP {status}"


@pytest.mark.parametrize("endpoint", ["token", "identity"])
def test_timeouts_are_temporary(
    fake: FakeSalesforce, provider_for: ProviderFor, http: httpx.Client, endpoint: str
) -> None:
    fake.delays[endpoint] = 0.5
    with pytest.raises(UpstreamUnavailable) as caught:
        log_in(provider_for(timeout=0.1), http)
    method_url = "POST" if endpoint == "token" else "GET"
    assert str(caught.value).startswith(f"{endpoint} {method_url} {fake.base_url}/")
    assert "timed out after 0.1s" in str(caught.value)


def test_unreachable_login_host_is_temporary(http: httpx.Client) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = make_provider(login_url=f"http://127.0.0.1:{port}", timeout=2)
    callback = CallbackRequest(
        params={"code": "c"}, nonce="n", code_verifier="v" * 43, redirect_uri=REDIRECT_URI
    )
    with pytest.raises(UpstreamUnavailable) as caught:
        provider.handle_callback(callback, http)
    assert str(caught.value).startswith(f"token POST http://127.0.0.1:{port}/services/oauth2/token")


@pytest.mark.parametrize(
    ("endpoint", "reason"), [("token", "token_error"), ("identity", "identity_invalid")]
)
def test_malformed_json_fails_the_login(
    fake: FakeSalesforce, provider_for: ProviderFor, http: httpx.Client, endpoint: str, reason: str
) -> None:
    fake.malformed.add(endpoint)
    with pytest.raises(LoginFailed) as caught:
        log_in(provider_for(), http)
    assert caught.value.reason == reason
    assert "not json" not in str(caught.value)
    assert caught.value.detail.endswith("HTTP 200, not JSON")


def test_identity_answer_not_an_object_fails_the_login(
    fake: FakeSalesforce, provider_for: ProviderFor, http: httpx.Client
) -> None:
    fake.identity_answer = ["not", "an", "object"]
    with pytest.raises(LoginFailed) as caught:
        log_in(provider_for(), http)
    assert caught.value.reason == "identity_invalid"
    assert caught.value.detail.endswith("not a JSON object")


def test_fake_on_its_own_server(http: httpx.Client) -> None:
    with FakeSalesforce.start() as fake:
        provider = SalesforceProvider.from_config(
            "crm", fake.provider_config(display_name="CRM"), base_dir="."
        )
        identity = log_in(provider, http).identity
    assert (identity.provider, identity.username) == ("crm", "alice@acme.example")
