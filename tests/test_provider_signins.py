"""Sign-ins through the named providers, over real HTTP to their upstream fakes, in a live broker.

What the broker makes of each provider's answer: an identity whose facts the rules read, the
upstream token sealed with its context; a refusal by the provider's own restrictions, or by a
rule, is a page that says why with a link carrying ``access_denied`` to the client, and nothing
is stored; an upstream that fails is ``temporarily_unavailable`` at the client, and the log
names the provider, the URL and the cause.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin

import httpx
import pytest
from flask import Flask
from sqlalchemy import func, select

from broker.models import Consent, Grant, Identity, UpstreamToken, User
from tests.fakes.atlassian import FakeAtlassian
from tests.fakes.github import FakeGitHub
from tests.fakes.salesforce import FakeSalesforce
from tests.support import (
    authorize_params,
    form_value,
    free_port,
    pkce,
    query,
    serve_wsgi,
)

REDIRECT = "http://127.0.0.1:5555/callback"


@dataclass
class LiveBroker:
    app: Flask
    base: str
    # The last sign-in's client and PKCE verifier, to redeem its code.
    client_id: str = ""
    verifier: str = field(default="", repr=False)

    def count(self, model: Any) -> int:
        with self.app.extensions["broker"].db.session() as session:
            return int(session.execute(select(func.count()).select_from(model)).scalar_one())

    def stored(self) -> dict[str, int]:
        return {
            model.__name__: self.count(model)
            for model in (User, Identity, Grant, Consent, UpstreamToken)
        }

    def identity(self) -> Identity:
        with self.app.extensions["broker"].db.session() as session:
            row = session.scalars(select(Identity)).one()
            session.expunge(row)
            return row

    def sign_in(self, provider: str, **authorize: str) -> httpx.Response:
        """Register, authorize, approve with ``provider``, let the upstream sign in, and return
        the broker's answer to the callback."""
        with httpx.Client(follow_redirects=False, timeout=30) as http:
            client = http.post(
                f"{self.base}/register",
                json={"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none"},
            ).json()
            self.verifier, challenge = pkce()
            self.client_id = client["client_id"]
            params = authorize_params(client["client_id"], challenge, **authorize)
            started = http.get(f"{self.base}/authorize", params=params)
            consent = http.get(urljoin(self.base, started.headers["location"]))
            response = http.post(
                f"{self.base}/consent",
                data={
                    "login": form_value(consent.text, "login"),
                    "csrf": form_value(consent.text, "csrf"),
                    "action": "approve",
                    "provider": provider,
                },
            )
            for _ in range(10):
                assert response.is_redirect, (response.status_code, response.text[:500])
                url = urljoin(str(response.url), response.headers["location"])
                response = http.get(url)
                if url.startswith(f"{self.base}/callback/"):
                    return response
        raise AssertionError("the upstream never sent the browser back")


@pytest.fixture
def live_broker(make_app: Callable[..., Flask]) -> Iterator[Callable[..., LiveBroker]]:
    servers: list[Any] = []

    def start(port: int, **overrides: Any) -> LiveBroker:
        base = f"http://127.0.0.1:{port}"
        app = make_app(issuer=base, **overrides)
        server = serve_wsgi(app, port)
        server.__enter__()
        servers.append(server)
        return LiveBroker(app, base)

    yield start
    for server in reversed(servers):
        server.__exit__(None, None, None)


def assert_refused(broker: LiveBroker, response: httpx.Response, says: str) -> None:
    """A 403 page that explains, linking back to the client with ``access_denied`` and ``iss``;
    nothing stored."""
    assert response.status_code == 403, response.text[:500]
    assert "location" not in response.headers
    assert says in response.text
    link = form_link(response.text)
    assert link.startswith(REDIRECT)
    assert query(link)["error"] == "access_denied"
    assert query(link)["iss"] == broker.base
    assert broker.stored() == dict.fromkeys(broker.stored(), 0)


def form_link(html: str) -> str:
    import html as html_module
    import re

    match = re.search(r'id="return" href="([^"]*)"', html)
    assert match, html[:500]
    return html_module.unescape(match.group(1))


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 302
    location = response.headers["location"]
    assert location.startswith(REDIRECT)
    assert query(location)["error"] == "temporarily_unavailable"


# -- GitHub --------------------------------------------------------------------------------------

RULES_ON_TEAMS = [
    {"grant": ["demo:read"], "when": {"orgs": ["acme"]}},
    {"grant": ["demo:write"], "when": {"teams": ["Acme/Platform"]}},
]


@pytest.fixture
def github() -> Iterator[FakeGitHub]:
    with FakeGitHub() as fake:
        yield fake


def test_github_identity_facts_reach_the_rules_and_the_token_context(
    live_broker: Callable[..., LiveBroker], github: FakeGitHub
) -> None:
    broker = live_broker(
        free_port(), providers={"github": github.provider_config()}, rules=RULES_ON_TEAMS
    )
    response = broker.sign_in("github", scope="demo:read demo:write")
    assert response.status_code == 302, response.text[:500]
    assert "code" in query(response.headers["location"])
    identity = broker.identity()
    assert identity.subject == "1001"
    assert identity.snapshot["teams"] == ["acme/platform", "acme/sre", "globex/research"]
    assert identity.snapshot["email"] == "alice@example.com"
    with broker.app.extensions["broker"].db.session() as session:
        grant = session.scalars(select(Grant)).one()
        assert set(grant.scope.split()) == {"demo:read", "demo:write"}
        token = session.get(UpstreamToken, identity.id)
        assert token is not None and token.context["api_url"] == github.api_url
    # read:org was asked for because the rules read orgs and teams.
    authorize = github.requests("/login/oauth/authorize")[-1]
    assert "read:org" in authorize.args["scope"].split()


def test_github_outside_the_allowed_orgs_is_refused_with_a_page(
    live_broker: Callable[..., LiveBroker], github: FakeGitHub
) -> None:
    github.default_login = "dave"  # Initech only
    broker = live_broker(
        free_port(), providers={"github": github.provider_config(allowed_orgs=["acme"])}
    )
    assert_refused(broker, broker.sign_in("github"), "not allowed to sign in here")


def test_github_pending_membership_is_not_membership(
    live_broker: Callable[..., LiveBroker], github: FakeGitHub, caplog: pytest.LogCaptureFixture
) -> None:
    github.default_login = "carol"  # invited to acme, not yet accepted
    broker = live_broker(
        free_port(), providers={"github": github.provider_config(allowed_orgs=["acme"])}
    )
    with caplog.at_level(logging.INFO, logger="broker"):
        response = broker.sign_in("github")
    assert_refused(broker, response, "not allowed to sign in here")
    assert any("github" in r.message and "pending" in r.message for r in caplog.records)


def test_github_unverified_email_where_a_rule_needs_email(
    live_broker: Callable[..., LiveBroker], github: FakeGitHub
) -> None:
    github.default_login = "bob"  # primary email not verified
    broker = live_broker(
        free_port(),
        providers={"github": github.provider_config()},
        rules=[{"grant": ["demo:read"], "when": {"email_domain": ["example.com"]}}],
    )
    assert_refused(broker, broker.sign_in("github"), "email address is not verified")


def test_github_failure_is_temporarily_unavailable_and_logged_with_url_and_cause(
    live_broker: Callable[..., LiveBroker], github: FakeGitHub, caplog: pytest.LogCaptureFixture
) -> None:
    github.break_endpoint("user", status=502)
    broker = live_broker(free_port(), providers={"github": github.provider_config()})
    with caplog.at_level(logging.WARNING, logger="broker"):
        response = broker.sign_in("github")
    assert_unavailable(response)
    lines = [r.getMessage() for r in caplog.records if "github" in r.getMessage()]
    assert any(f"GET {github.api_url}/user" in line and "HTTP 502" in line for line in lines)
    assert broker.stored()["Identity"] == 0


# -- Salesforce ----------------------------------------------------------------------------------


def test_salesforce_identity_and_instance_url(live_broker: Callable[..., LiveBroker]) -> None:
    port = free_port()
    with FakeSalesforce.start(
        redirect_uris=(f"http://127.0.0.1:{port}/callback/salesforce",)
    ) as fake:
        broker = live_broker(port, providers={"salesforce": fake.provider_config()})
        response = broker.sign_in("salesforce")
        assert response.status_code == 302, response.text[:500]
        identity = broker.identity()
        user = fake.users["alice"]
        assert identity.subject == f"{user.org_id}/{user.user_id}"
        assert identity.snapshot["tenants"] == [user.org_id]
        with broker.app.extensions["broker"].db.session() as session:
            token = session.get(UpstreamToken, identity.id)
            assert token is not None and token.context["instance_url"] == fake.instance_url


def test_salesforce_identity_url_on_another_host_is_never_called(
    live_broker: Callable[..., LiveBroker], caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    with FakeSalesforce.start(
        redirect_uris=(f"http://127.0.0.1:{port}/callback/salesforce",)
    ) as fake:
        fake.identity_origin = f"http://localhost:{fake.server.port}"
        broker = live_broker(port, providers={"salesforce": fake.provider_config()})
        with caplog.at_level(logging.WARNING, logger="broker"):
            response = broker.sign_in("salesforce")
        assert_refused(broker, response, "could not be verified")
        assert fake.requests_to("/id/") == []
        assert any("identity_url_host" in r.getMessage() for r in caplog.records)


# -- Atlassian -----------------------------------------------------------------------------------


def test_atlassian_sites_become_facts_and_context(live_broker: Callable[..., LiveBroker]) -> None:
    with FakeAtlassian.running() as fake:
        allowed = fake.users["alice"].sites[0]
        broker = live_broker(
            free_port(),
            providers={"atlassian": fake.provider_config(allowed_cloud_ids=[allowed.id])},
            rules=[{"grant": ["demo:read"], "when": {"tenants": [allowed.id]}}],
        )
        response = broker.sign_in("atlassian")
        assert response.status_code == 302, response.text[:500]
        identity = broker.identity()
        assert identity.snapshot["tenants"] == [allowed.id]  # only the sanctioned site
        with broker.app.extensions["broker"].db.session() as session:
            token = session.get(UpstreamToken, identity.id)
            assert token is not None and token.context["cloud_ids"] == [allowed.id]


def test_atlassian_outside_the_allowed_cloud_ids_is_refused(
    live_broker: Callable[..., LiveBroker],
) -> None:
    with FakeAtlassian.running() as fake:
        broker = live_broker(
            free_port(),
            providers={"atlassian": fake.provider_config(allowed_cloud_ids=["not-a-site-of-hers"])},
        )
        assert_refused(broker, broker.sign_in("atlassian"), "not allowed to sign in here")


def test_atlassian_timeout_is_temporarily_unavailable(
    live_broker: Callable[..., LiveBroker], caplog: pytest.LogCaptureFixture
) -> None:
    with FakeAtlassian.running() as fake:
        fake.delay("me", 5)
        broker = live_broker(
            free_port(), providers={"atlassian": fake.provider_config(timeout=0.5)}
        )
        with caplog.at_level(logging.WARNING, logger="broker"):
            assert_unavailable(broker.sign_in("atlassian"))
        assert any(
            "atlassian" in r.getMessage() and "timed out" in r.getMessage() for r in caplog.records
        )


# -- Google and Keycloak, against the real OpenID provider of the tests --------------------------


def _idp_clients(port: int, name: str) -> list[dict[str, Any]]:
    return [
        {
            "client_id": "broker",
            "client_secret": SECRET,
            "redirect_uris": [f"http://127.0.0.1:{port}/callback/{name}"],
        }
    ]


SECRET = "broker-secret-0123456789"


@pytest.mark.parametrize(("user", "allowed"), [("dana", True), ("erin", False), ("alice", False)])
def test_google_hosted_domain_from_the_signed_id_token(
    live_broker: Callable[..., LiveBroker], user: str, allowed: bool
) -> None:
    """dana is in example.com; erin in other.example; alice has no hd at all (the hd request
    parameter the broker sends is only a hint)."""
    from tests.idp_server import HOSTED_DOMAIN_ACCOUNTS, idp_or_skip

    port = free_port()
    with idp_or_skip(
        _idp_clients(port, "google"),
        accounts=HOSTED_DOMAIN_ACCOUNTS,
        options={"idTokenClaims": "all"},
    ) as idp:
        config = {
            "issuer": idp.issuer,
            "client_id": "broker",
            "client_secret": SECRET,
            "hosted_domains": ["example.com"],
            "extra_authorize_params": {"login_hint": user},
        }
        broker = live_broker(port, providers={"google": config})
        response = broker.sign_in("google")
        if allowed:
            assert response.status_code == 302, response.text[:500]
            assert broker.identity().snapshot["hosted_domain"] == "example.com"
        else:
            assert_refused(broker, response, "does not belong to an organisation allowed here")


def test_keycloak_issuer_mismatch_is_a_failed_sign_in_logged_with_both_values(
    live_broker: Callable[..., LiveBroker], caplog: pytest.LogCaptureFixture
) -> None:
    from tests.idp_server import idp_or_skip

    port = free_port()
    with idp_or_skip(_idp_clients(port, "staff"), prefix="/realms/test") as idp:
        config = {
            "type": "keycloak",
            "server_url": f"http://127.0.0.1:{idp.port}",
            "realm": "test",
            "client_id": "broker",
            "client_secret": SECRET,
            "expected_issuer": "https://kc.example.com/realms/test",
        }
        broker = live_broker(port, providers={"staff": config})
        with httpx.Client(follow_redirects=False) as http:
            client = http.post(
                f"{broker.base}/register",
                json={"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none"},
            ).json()
            _, challenge = pkce()
            started = http.get(
                f"{broker.base}/authorize", params=authorize_params(client["client_id"], challenge)
            )
            consent = http.get(urljoin(broker.base, started.headers["location"]))
            with caplog.at_level(logging.WARNING, logger="broker"):
                response = http.post(
                    f"{broker.base}/consent",
                    data={
                        "login": form_value(consent.text, "login"),
                        "csrf": form_value(consent.text, "csrf"),
                        "action": "approve",
                        "provider": "staff",
                    },
                )
        # Discovery names another issuer: the sign-in cannot start, and the operator learns why.
        assert response.status_code == 502
        assert "location" not in response.headers
        lines = [r.getMessage() for r in caplog.records]
        assert any(
            "staff" in line and idp.issuer in line and "https://kc.example.com/realms/test" in line
            for line in lines
        ), lines


def test_a_missing_upstream_token_sends_the_browser_upstream_again(
    live_broker: Callable[..., LiveBroker],
) -> None:
    """A resource whose MCP server exchanges the user's upstream token: when the stored token
    is gone (its refresh was refused upstream), the remembered broker session does not go
    straight through; only the upstream sign-in can store a new token."""
    from tests.support import OTHER_RESOURCE, RESOURCE

    with FakeAtlassian.running() as fake:
        resources = [
            {
                "uri": RESOURCE,
                "scopes": {"demo:read": "Read"},
                "required_scopes": ["demo:read"],
                "upstream_tokens": ["atlassian"],
            },
            {"uri": OTHER_RESOURCE, "scopes": {"other:read": "Read"}},
        ]
        broker = live_broker(
            free_port(), providers={"atlassian": fake.provider_config()}, resources=resources
        )
        web = "https://app.example.com/cb"  # no per-request confirmation at https
        with httpx.Client(follow_redirects=False, timeout=30) as http:
            client = http.post(
                f"{broker.base}/register",
                json={"redirect_uris": [web], "token_endpoint_auth_method": "none"},
            ).json()

            def authorize() -> httpx.Response:
                _, challenge = pkce()
                params = authorize_params(client["client_id"], challenge, redirect_uri=web)
                return http.get(f"{broker.base}/authorize", params=params)

            consent = http.get(urljoin(broker.base, authorize().headers["location"]))
            approved = http.post(
                f"{broker.base}/consent",
                data={
                    "login": form_value(consent.text, "login"),
                    "csrf": form_value(consent.text, "csrf"),
                    "action": "approve",
                    "provider": "atlassian",
                },
            )
            response = approved
            while not str(response.url).startswith(f"{broker.base}/callback/"):
                response = http.get(urljoin(str(response.url), response.headers["location"]))
            assert response.status_code == 302 and "code=" in response.headers["location"]
            # With the session and the consent: straight through.
            straight = authorize()
            assert "code=" in straight.headers["location"]
            with broker.app.extensions["broker"].db.session() as session:
                session.query(UpstreamToken).delete()
            again = authorize()
            assert again.status_code == 302
            assert "code=" not in again.headers["location"]  # the consent page, then upstream
            assert urljoin(broker.base, again.headers["location"]).startswith(
                f"{broker.base}/consent"
            )
