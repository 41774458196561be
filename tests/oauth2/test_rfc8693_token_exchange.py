"""RFC 8693 token exchange at ``/token``: an MCP server's confidential client trades the user's
broker access token for the user's upstream (Atlassian) token, over real HTTP to a live broker
that signed the user in through the Atlassian fake, on SQLite and PostgreSQL.

Each refusal changes one thing from the valid exchange of ``test_exchange_hands_out_the_current
_upstream_token``. The helpers here (a live broker with the grant registered, the MCP server's
static client, sign-ins) are shared with ``tests/test_upstream_refresh.py`` and
``tests/e2e/test_upstream_exchange.py``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import jwt
import pytest
from flask import Flask
from sqlalchemy import delete, select, text, update

from broker.crypto import hash_password
from broker.db import Base, utcnow
from broker.models import AuditEvent, Client, Identity, UpstreamToken, User
from broker.oauth2.rfc8693 import (
    ACCESS_TOKEN_TYPE,
    TOKEN_EXCHANGE,
    TokenExchangeGrant,
    register_token_exchange,
)
from broker.oauth2.rfc9068 import AccessTokenClaims, issue_access_token
from broker.upstream import sealed_aad
from tests.fakes.atlassian import ACME, FakeAtlassian
from tests.support import (
    OTHER_RESOURCE,
    RESOURCE,
    authorize_params,
    form_value,
    free_port,
    pkce,
    query,
    serve_wsgi,
)

REDIRECT = "http://127.0.0.1:5555/callback"
MCP_CLIENT = "jira-mcp"
MCP_SECRET = "jira-mcp-secret-2f9c41d0b7e34a5c"
PASSWORDS = {"alice": "alice-password", "bob": "bob-password"}


# -- shared helpers -------------------------------------------------------------------------------


def exchange_resources(
    resource: str = RESOURCE, other: str = OTHER_RESOURCE
) -> list[dict[str, Any]]:
    """Two MCP servers: ``resource`` may obtain Atlassian tokens, ``other`` none."""
    return [
        {
            "uri": resource,
            "name": "Jira tools",
            "scopes": {"demo:read": "Read Jira issues"},
            "required_scopes": ["demo:read"],
            "upstream_tokens": ["atlassian"],
        },
        {
            "uri": other,
            "name": "Other tools",
            "scopes": {"demo:read": "Read other data"},
            "required_scopes": ["demo:read"],
        },
    ]


def ensure_token_exchange(app: Flask, **options: float) -> None:
    """Register the grant as the application will (``register_token_exchange``), unless the
    application already does."""
    broker = app.extensions["broker"]
    if any(cls is TokenExchangeGrant for cls, _ in broker.server._token_grants):
        return
    register_token_exchange(broker.server, broker.providers, broker.http, **options)


def add_static_client(
    app: Flask,
    client_id: str = MCP_CLIENT,
    secret: str | None = MCP_SECRET,
    *,
    resources: list[str] | None = None,
    auth_method: str = "client_secret_basic",
    grant_types: list[str] | None = None,
    kind: str = "static",
) -> None:
    """The MCP server's client of the broker, as ``broker clients add`` writes it: static,
    confidential, bound to its one resource, allowed the token exchange grant."""
    with app.extensions["broker"].db.session() as session:
        session.add(
            Client(
                client_id=client_id,
                kind=kind,
                name=f"MCP server {client_id}",
                redirect_uris=[],
                grant_types=grant_types if grant_types is not None else [TOKEN_EXCHANGE],
                response_types=[],
                token_endpoint_auth_method=auth_method,
                secret_hash=hash_password(secret) if secret else None,
                allowed_resources=resources if resources is not None else [RESOURCE],
            )
        )


def jira_myself(fake: FakeAtlassian, access_token: str, cloud_id: str = ACME.id) -> httpx.Response:
    return httpx.get(
        f"{fake.api_url}/ex/jira/{cloud_id}/rest/api/3/myself",
        headers={"Authorization": f"Bearer {access_token}"},
        timeout=10,
    )


def sign_in(
    base: str,
    provider: str = "atlassian",
    resource: str = RESOURCE,
    *,
    username: str = "alice",
) -> dict[str, Any]:
    """Play an MCP client and its user: register, authorize, approve with ``provider``, sign in
    (the Atlassian fake signs its default user in at once; ``local`` takes the form), redeem the
    code. Returns the token response."""
    with httpx.Client(follow_redirects=False, timeout=30) as http:
        client = http.post(
            f"{base}/register",
            json={"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none"},
        ).json()
        verifier, challenge = pkce()
        params = authorize_params(client["client_id"], challenge, resource=resource)
        started = http.get(f"{base}/authorize", params=params)
        assert started.status_code == 302, started.text[:500]
        consent = http.get(urljoin(base, started.headers["location"]))
        login = form_value(consent.text, "login")
        response = http.post(
            f"{base}/consent",
            data={
                "login": login,
                "csrf": form_value(consent.text, "csrf"),
                "action": "approve",
                "provider": provider,
            },
        )
        if provider == "local":
            url = urljoin(base, response.headers["location"])
            form = http.get(url)
            response = http.post(
                url.split("?")[0],
                data={
                    "login": login,
                    "csrf": form_value(form.text, "csrf"),
                    "username": username,
                    "password": PASSWORDS[username],
                },
            )
        for _ in range(10):
            assert response.is_redirect, (response.status_code, response.text[:500])
            location = urljoin(str(response.url), response.headers["location"])
            if location.startswith(REDIRECT):
                break
            response = http.get(location)
        else:
            raise AssertionError("the sign-in never came back to the client")
        token = http.post(
            f"{base}/token",
            data={
                "grant_type": "authorization_code",
                "code": query(location)["code"],
                "client_id": client["client_id"],
                "redirect_uri": REDIRECT,
                "code_verifier": verifier,
                "resource": resource,
            },
        )
        assert token.status_code == 200, token.text
        return {**token.json(), "client_id": client["client_id"]}


def exchange_form(subject_token: str, /, **overrides: str | list[str] | None) -> dict[str, Any]:
    form: dict[str, Any] = {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": subject_token,
        "subject_token_type": ACCESS_TOKEN_TYPE,
        "audience": "atlassian",
    }
    form.update(overrides)
    return {k: v for k, v in form.items() if v is not None}


@dataclass
class ExchangeStack:
    """A live broker (threaded WSGI on a free port) with the Atlassian fake upstream, the token
    exchange grant registered and the MCP server's static client."""

    app: Flask
    base: str
    fake: FakeAtlassian
    signed_in: list[dict[str, Any]] = field(default_factory=list)

    @property
    def broker(self) -> Any:
        return self.app.extensions["broker"]

    def sign_in(self, provider: str = "atlassian", resource: str = RESOURCE, **kw: Any) -> str:
        """A new sign-in; returns the broker access token."""
        tokens = sign_in(self.base, provider, resource, **kw)
        self.signed_in.append(tokens)
        return str(tokens["access_token"])

    def exchange(
        self,
        subject_token: str,
        /,
        *,
        auth: tuple[str, str] | None = (MCP_CLIENT, MCP_SECRET),
        base: str | None = None,
        **form: Any,
    ) -> httpx.Response:
        return httpx.post(
            f"{base or self.base}/token",
            data=exchange_form(subject_token, **form),
            auth=auth,
            timeout=30,
        )

    def upstream_row(self) -> UpstreamToken | None:
        with self.broker.db.session() as session:
            row: UpstreamToken | None = session.scalars(select(UpstreamToken)).first()
            if row is not None:
                session.expunge(row)
            return row

    def stored_refresh_token(self) -> str:
        row = self.upstream_row()
        assert row is not None and row.refresh_token_sealed is not None
        return str(
            self.broker.sealer.open_text(
                row.refresh_token_sealed, sealed_aad(row.identity_id, "refresh")
            )
        )

    def dump(self) -> str:
        chunks = []
        with self.broker.db.session() as session:
            for table in Base.metadata.sorted_tables:
                for row in session.execute(text(f"SELECT * FROM {table.name}")):
                    chunks.append(repr(tuple(row)))
        return "\n".join(chunks)

    def audit(self, type_: str = "exchange") -> list[AuditEvent]:
        with self.broker.db.session() as session:
            rows = list(session.scalars(select(AuditEvent).where(AuditEvent.type == type_)))
            session.expunge_all()
            return rows


@contextlib.contextmanager
def exchange_stack(
    make_app: Callable[..., Flask],
    users_file: Path,
    *,
    fake_options: dict[str, Any] | None = None,
    service_options: dict[str, float] | None = None,
    **overrides: Any,
) -> Iterator[ExchangeStack]:
    """An :class:`ExchangeStack` with the ``local`` provider (the suite's users) beside
    ``atlassian``; ``overrides`` go to the broker's settings."""
    with FakeAtlassian.running(**(fake_options or {})) as fake:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        settings: dict[str, Any] = {
            "issuer": base,
            "providers": {
                "local": {"users_file": str(users_file)},
                "atlassian": fake.provider_config(),
            },
            "resources": exchange_resources(),
            **overrides,
        }
        app = make_app(**settings)
        ensure_token_exchange(app, **(service_options or {}))
        add_static_client(app)
        with serve_wsgi(app, port):
            yield ExchangeStack(app, base, fake)


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def stack(make_app: Callable[..., Flask], users_file: Path) -> Iterator[ExchangeStack]:
    with exchange_stack(make_app, users_file) as running:
        yield running


def assert_error(response: httpx.Response, error: str, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error, body
    assert response.headers["cache-control"] == "no-store"
    assert "access_token" not in body
    return dict(body)


# -- the exchange ---------------------------------------------------------------------------------


def test_exchange_hands_out_the_current_upstream_token(stack: ExchangeStack) -> None:
    subject = stack.sign_in()
    response = stack.exchange(subject)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["pragma"] == "no-cache"
    body = response.json()
    assert body["issued_token_type"] == ACCESS_TOKEN_TYPE
    assert body["token_type"] == "Bearer"
    assert 0 < body["expires_in"] <= 3600
    assert set(body["scope"].split()) == {"read:me", "read:jira-user", "offline_access"}
    assert "refresh_token" not in body  # never issued, and the upstream one never leaves
    upstream = body["upstream"]
    assert upstream["provider"] == "atlassian"
    assert upstream["context"]["cloud_ids"] == [ACME.id, "8594f221-9797-5f78-1fa4-485e198d7cd0"]
    assert upstream["context"]["api_url"] == stack.fake.api_url
    assert {site["url"] for site in upstream["context"]["sites"]} == {
        "https://acme.atlassian.net",
        "https://globex.atlassian.net",
    }
    assert abs(upstream["expires_at"] - (time.time() + body["expires_in"])) <= 5
    # It is the user's Atlassian token: Jira answers with her account.
    me = jira_myself(stack.fake, body["access_token"])
    assert me.status_code == 200, me.text
    assert me.json()["accountId"] == stack.fake.users["alice"].account_id
    # ... and the broker's token is not one: no passthrough possible.
    assert jira_myself(stack.fake, subject).status_code == 401
    assert stack.fake.refresh_calls == 0  # fresh: nothing refreshed
    (event,) = stack.audit()
    assert (event.outcome, event.provider, event.client_id, event.resource) == (
        "success",
        "atlassian",
        MCP_CLIENT,
        RESOURCE,
    )
    assert event.user_id == jwt.decode(subject, options={"verify_signature": False})["sub"]
    assert event.details["subject_client"] == stack.signed_in[0]["client_id"]
    # The database holds neither upstream token in the clear.
    dump = stack.dump()
    assert body["access_token"] not in dump
    assert stack.stored_refresh_token() not in dump


def test_client_secret_post_is_accepted(stack: ExchangeStack) -> None:
    add_static_client(
        stack.app, "post-client", "post-secret-0123456789", auth_method="client_secret_post"
    )
    subject = stack.sign_in()
    response = stack.exchange(
        subject, auth=None, client_id="post-client", client_secret="post-secret-0123456789"
    )
    assert response.status_code == 200, response.text


def test_the_same_token_is_handed_out_while_fresh(stack: ExchangeStack) -> None:
    subject = stack.sign_in()
    first, second = stack.exchange(subject), stack.exchange(subject)
    assert first.json()["access_token"] == second.json()["access_token"]
    assert stack.fake.refresh_calls == 0


# -- refusals: the client -------------------------------------------------------------------------


def test_a_public_client_cannot_authenticate(stack: ExchangeStack) -> None:
    add_static_client(stack.app, "public-mcp", None, auth_method="none")
    subject = stack.sign_in()
    response = stack.exchange(subject, auth=None, client_id="public-mcp")
    assert_error(response, "invalid_client", 401)


def test_a_wrong_client_secret(stack: ExchangeStack) -> None:
    subject = stack.sign_in()
    response = stack.exchange(subject, auth=(MCP_CLIENT, "not-the-secret"))
    assert_error(response, "invalid_client", 401)
    assert "www-authenticate" in response.headers


def test_a_client_without_the_grant_type(stack: ExchangeStack) -> None:
    add_static_client(stack.app, "no-grant", "no-grant-secret-0123", grant_types=["refresh_token"])
    subject = stack.sign_in()
    response = stack.exchange(subject, auth=("no-grant", "no-grant-secret-0123"))
    assert_error(response, "unauthorized_client")


def test_a_dynamically_registered_client_is_not_an_mcp_server(stack: ExchangeStack) -> None:
    add_static_client(stack.app, "mcp_dcr", "dcr-secret-0123456789", kind="dcr")
    subject = stack.sign_in()
    response = stack.exchange(subject, auth=("mcp_dcr", "dcr-secret-0123456789"))
    assert_error(response, "unauthorized_client")


@pytest.mark.parametrize(
    "resources", [[], [RESOURCE, OTHER_RESOURCE], ["https://gone.example/mcp"]]
)
def test_a_client_not_bound_to_one_resource(stack: ExchangeStack, resources: list[str]) -> None:
    add_static_client(stack.app, "unbound", "unbound-secret-0123", resources=resources)
    subject = stack.sign_in()
    response = stack.exchange(subject, auth=("unbound", "unbound-secret-0123"))
    assert_error(response, "unauthorized_client")


# -- refusals: the subject token ------------------------------------------------------------------


def test_another_resources_token(stack: ExchangeStack) -> None:
    other = stack.sign_in(resource=OTHER_RESOURCE)
    assert_error(stack.exchange(other), "invalid_request")


def test_a_resource_not_allowed_that_provider(stack: ExchangeStack) -> None:
    add_static_client(stack.app, "other-mcp", "other-secret-0123456", resources=[OTHER_RESOURCE])
    other = stack.sign_in(resource=OTHER_RESOURCE)
    response = stack.exchange(other, auth=("other-mcp", "other-secret-0123456"))
    assert_error(response, "invalid_target")


def _mint(stack: ExchangeStack, subject: str, *, now: int) -> str:
    """The subject token signed again with the broker's key, issued at ``now``."""
    claims = jwt.decode(subject, options={"verify_signature": False})
    with stack.broker.db.session() as session:
        key = stack.broker.keys.active(session)
    token, _ = issue_access_token(
        key,
        AccessTokenClaims(
            issuer=stack.base,
            subject=claims["sub"],
            audience=claims["aud"],
            client_id=claims["client_id"],
            scope=claims["scope"],
            auth_time=claims["auth_time"],
            lifetime=claims["exp"] - claims["iat"],
        ),
        now=now,
    )
    return token


def test_an_expired_subject_token(stack: ExchangeStack) -> None:
    subject = stack.sign_in()
    assert stack.exchange(_mint(stack, subject, now=int(time.time()))).status_code == 200
    expired = _mint(stack, subject, now=int(time.time()) - 7200)
    assert_error(stack.exchange(expired), "invalid_request")


def test_a_revoked_subject_token(stack: ExchangeStack) -> None:
    subject = stack.sign_in()
    revoked = httpx.post(
        f"{stack.base}/revoke",
        data={"token": subject, "client_id": stack.signed_in[0]["client_id"]},
    )
    assert revoked.status_code == 200
    assert_error(stack.exchange(subject), "invalid_request")


def test_a_disabled_user(stack: ExchangeStack) -> None:
    subject = stack.sign_in()
    with stack.broker.db.session() as session:
        session.execute(update(User).values(disabled_at=utcnow()))
    assert_error(stack.exchange(subject), "invalid_request")


def test_a_token_signed_by_another_key(stack: ExchangeStack) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    subject = stack.sign_in()
    header = jwt.get_unverified_header(subject)
    claims = jwt.decode(subject, options={"verify_signature": False})
    forged = jwt.encode(
        claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256", headers=header
    )
    assert_error(stack.exchange(forged), "invalid_request")


def test_a_user_without_that_identity(stack: ExchangeStack) -> None:
    """Signed in with the local provider: a valid token, but no Atlassian token to hand out."""
    subject = stack.sign_in("local")
    body = assert_error(stack.exchange(subject), "invalid_grant")
    assert "sign in with atlassian again" in body["error_description"]


def test_a_user_whose_upstream_token_is_gone(stack: ExchangeStack) -> None:
    subject = stack.sign_in()
    with stack.broker.db.session() as session:
        session.execute(delete(UpstreamToken))
        assert session.scalars(select(Identity)).first() is not None
    body = assert_error(stack.exchange(subject), "invalid_grant")
    assert "sign in with atlassian again" in body["error_description"]


# -- refusals: the request ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (
            {"subject_token_type": "urn:ietf:params:oauth:token-type:refresh_token"},
            "invalid_request",
        ),
        ({"subject_token_type": "urn:ietf:params:oauth:token-type:jwt"}, "invalid_request"),
        ({"subject_token_type": None}, "invalid_request"),
        ({"subject_token": None}, "invalid_request"),
        (
            {"requested_token_type": "urn:ietf:params:oauth:token-type:refresh_token"},
            "invalid_request",
        ),
        ({"actor_token": "someone", "actor_token_type": ACCESS_TOKEN_TYPE}, "invalid_request"),
        ({"audience": None}, "invalid_request"),
        ({"audience": "salesforce"}, "invalid_target"),  # not a provider of this broker
        ({"audience": "local"}, "invalid_target"),  # a provider, not allowed to this resource
        ({"audience": ["atlassian", "atlassian"]}, "invalid_target"),
        ({"resource": "https://api.atlassian.com"}, "invalid_target"),
    ],
)
def test_each_bad_parameter_gets_its_error(
    stack: ExchangeStack, change: dict[str, Any], error: str
) -> None:
    subject = stack.sign_in()
    assert_error(stack.exchange(subject, **change), error)
    assert stack.audit() == []
