"""The kit's token exchange client (RFC 8693) against a token endpoint over real HTTP: what it
sends, what it caches and for how long, and how each answer the broker can give becomes a
typed result or error."""

from __future__ import annotations

import base64
import json
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import anyio
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from broker.resource import (
    ExchangeRefused,
    ExchangeUnavailable,
    UpstreamToken,
    UpstreamTokenClient,
)
from broker.resource.exchange import ACCESS_TOKEN_TYPE, TOKEN_EXCHANGE
from tests.support import free_port

if TYPE_CHECKING:
    from conftest import FakeBroker

CLIENT_ID = "jira mcp:1"  # a space and a colon: RFC 6749 2.3.1 form-encodes before base64
CLIENT_SECRET = "s3cret/with+odd=chars"
CONTEXT = {"cloud_ids": ["c-1"], "api_url": "https://api.atlassian.com"}


class TokenEndpoint:
    """The broker's /token as the exchange client sees it; ``answer`` decides each reply."""

    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.requests: list[dict[str, Any]] = []
        self.answer: Any = self.grant
        self.issued = 0
        server.expect_request("/token", method="POST").respond_with_handler(self._handle)

    @property
    def url(self) -> str:
        return self.server.url_for("/token")

    def _handle(self, request: Request) -> Response:
        self.requests.append(
            {"form": dict(request.form), "authorization": request.headers.get("Authorization")}
        )
        result: Response = self.answer(request)
        return result

    def grant(self, request: Request, expires_in: int | None = 3600) -> Response:
        self.issued += 1
        body: dict[str, Any] = {
            "access_token": f"upstream-{self.issued}",
            "issued_token_type": ACCESS_TOKEN_TYPE,
            "token_type": "Bearer",
            "scope": "read:me read:jira-user",
            "upstream": {"provider": request.form.get("audience"), "context": CONTEXT},
        }
        if expires_in is not None:
            body["expires_in"] = expires_in
        return json_response(body)


def json_response(body: Any, status: int = 200) -> Response:
    return Response(
        json.dumps(body),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


@pytest.fixture
def endpoint(httpserver: HTTPServer) -> TokenEndpoint:
    return TokenEndpoint(httpserver)


@pytest.fixture
def client(endpoint: TokenEndpoint) -> UpstreamTokenClient:
    return UpstreamTokenClient(endpoint.url, CLIENT_ID, CLIENT_SECRET, timeout=5)


def test_the_exchange_request_and_its_result(
    client: UpstreamTokenClient, endpoint: TokenEndpoint, broker: FakeBroker
) -> None:
    subject = broker.sign()
    token = client.exchange(subject, "atlassian")
    assert isinstance(token, UpstreamToken)
    assert token.access_token == "upstream-1"
    assert token.provider == "atlassian"
    assert token.scope == ("read:me", "read:jira-user")
    assert dict(token.context) == CONTEXT
    assert token.expires_at is not None and abs(token.expires_at - (time.time() + 3600)) < 5
    assert "upstream-1" not in repr(token)  # the token never lands in a log by repr
    (sent,) = endpoint.requests
    assert sent["form"] == {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": subject,
        "subject_token_type": ACCESS_TOKEN_TYPE,
        "requested_token_type": ACCESS_TOKEN_TYPE,
        "audience": "atlassian",
    }
    scheme, _, credentials = sent["authorization"].partition(" ")
    assert scheme == "Basic"
    user, _, password = base64.b64decode(credentials).decode().partition(":")
    assert (unquote(user), unquote(password)) == (CLIENT_ID, CLIENT_SECRET)


def test_client_secret_post(endpoint: TokenEndpoint, broker: FakeBroker) -> None:
    client = UpstreamTokenClient(
        endpoint.url, CLIENT_ID, CLIENT_SECRET, auth_method="client_secret_post"
    )
    client.exchange(broker.sign(), "atlassian")
    (sent,) = endpoint.requests
    assert sent["authorization"] is None
    assert (sent["form"]["client_id"], sent["form"]["client_secret"]) == (CLIENT_ID, CLIENT_SECRET)


# -- the cache ------------------------------------------------------------------------------------


def test_one_upstream_token_serves_the_user_until_shortly_before_it_expires(
    client: UpstreamTokenClient, endpoint: TokenEndpoint, broker: FakeBroker
) -> None:
    subject = broker.sign(sub="user-1")
    first = client.exchange(subject, "atlassian")
    assert client.exchange(subject, "atlassian") is first
    assert client.cached(subject, "atlassian") is first
    assert len(endpoint.requests) == 1
    # Another provider is another token.
    client.exchange(subject, "github")
    assert len(endpoint.requests) == 2
    # A short-lived token is kept for half its life (the broker refreshes it then), and asked
    # for again after.
    endpoint.answer = lambda request: endpoint.grant(request, expires_in=30)
    subject_2 = broker.sign(sub="user-2")
    short = client.exchange(subject_2, "atlassian")
    assert client.cached(subject_2, "atlassian") is short
    endpoint.answer = lambda request: endpoint.grant(request, expires_in=1)
    subject_3 = broker.sign(sub="user-3")
    brief = client.exchange(subject_3, "atlassian")
    time.sleep(0.6)
    assert client.cached(subject_3, "atlassian") is None
    assert client.exchange(subject_3, "atlassian") is not brief
    assert len(endpoint.requests) == 5


def test_the_cache_is_per_user_and_only_for_tokens_the_broker_accepted(
    client: UpstreamTokenClient, endpoint: TokenEndpoint, broker: FakeBroker
) -> None:
    alice = broker.sign(sub="alice")
    token = client.exchange(alice, "atlassian")
    # Her next broker token (the MCP client refreshed) is exchanged once, then shares the entry.
    alice_again = broker.sign(sub="alice")
    assert client.cached(alice_again, "atlassian") is None
    newer = client.exchange(alice_again, "atlassian")
    assert client.exchange(alice, "atlassian") is newer
    assert newer is not token
    # A token claiming to be alice that the broker refuses gets nothing of hers.
    forged = broker.sign(sub="alice", kid="ec-2")
    endpoint.answer = lambda request: json_response(
        {"error": "invalid_request", "error_description": "The subject token is not valid."}, 400
    )
    assert client.cached(forged, "atlassian") is None
    with pytest.raises(ExchangeRefused):
        client.exchange(forged, "atlassian")
    with pytest.raises(ExchangeRefused):
        client.exchange(forged, "atlassian")  # refusals are never cached
    assert len(endpoint.requests) == 4


def test_a_mapping_lives_no_longer_than_its_subject_token(
    client: UpstreamTokenClient, endpoint: TokenEndpoint, broker: FakeBroker
) -> None:
    now = int(time.time())
    expired = broker.sign(sub="alice", exp=now - 1, iat=now - 60, nbf=now - 60)
    client.exchange(expired, "atlassian")
    assert client.cached(expired, "atlassian") is None


def test_forget_drops_the_users_token(
    client: UpstreamTokenClient, endpoint: TokenEndpoint, broker: FakeBroker
) -> None:
    subject = broker.sign()
    client.exchange(subject, "atlassian")
    client.forget(subject, "atlassian")
    assert client.cached(subject, "atlassian") is None
    client.exchange(subject, "atlassian")
    assert len(endpoint.requests) == 2


def test_a_token_without_expiry_is_kept_for_the_subject_tokens_life(
    client: UpstreamTokenClient, endpoint: TokenEndpoint, broker: FakeBroker
) -> None:
    endpoint.answer = lambda request: endpoint.grant(request, expires_in=None)
    subject = broker.sign()
    token = client.exchange(subject, "github")
    assert token.expires_at is None
    assert client.cached(subject, "github") is token


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error", "sign_in"),
    [
        (400, "invalid_grant", True),
        (400, "invalid_request", False),
        (400, "invalid_target", False),
        (400, "unauthorized_client", False),
        (401, "invalid_client", False),
    ],
)
def test_refusals_carry_the_oauth_error(
    client: UpstreamTokenClient,
    endpoint: TokenEndpoint,
    broker: FakeBroker,
    status: int,
    error: str,
    sign_in: bool,
) -> None:
    endpoint.answer = lambda request: json_response(
        {"error": error, "error_description": "Fixed text."}, status
    )
    subject = broker.sign()
    with pytest.raises(ExchangeRefused) as refused:
        client.exchange(subject, "atlassian")
    assert (refused.value.error, refused.value.status) == (error, status)
    assert refused.value.description == "Fixed text."
    assert refused.value.sign_in_required is sign_in
    assert subject not in str(refused.value)


@pytest.mark.parametrize(
    "answer",
    [
        json_response({"error": "temporarily_unavailable"}, 503),
        json_response({"error": "server_error"}, 500),
        Response("<h1>Bad gateway</h1>", status=502, content_type="text/html"),
        Response("slow down", status=429),
        Response("", status=302, headers={"Location": "https://elsewhere.example/token"}),
        json_response({"access_token": "x", "token_type": "Bearer"}),  # no issued_token_type
        json_response(
            {
                "access_token": "x",
                "token_type": "Bearer",
                "issued_token_type": ACCESS_TOKEN_TYPE,
                "upstream": {"provider": "github", "context": {}},  # not what was asked for
            }
        ),
        Response("not json", status=200, content_type="application/json"),
        Response("x" * 70_000, status=200, content_type="application/json"),
    ],
)
def test_a_broker_that_cannot_answer_is_unavailable(
    client: UpstreamTokenClient, endpoint: TokenEndpoint, broker: FakeBroker, answer: Response
) -> None:
    endpoint.answer = lambda request: answer
    with pytest.raises(ExchangeUnavailable):
        client.exchange(broker.sign(), "atlassian")


def test_an_unreachable_broker_is_unavailable(broker: FakeBroker) -> None:
    client = UpstreamTokenClient(
        f"http://127.0.0.1:{free_port()}/token", CLIENT_ID, CLIENT_SECRET, timeout=2
    )
    with pytest.raises(ExchangeUnavailable):
        client.exchange(broker.sign(), "atlassian")


def test_configuration_mistakes_fail_at_once() -> None:
    with pytest.raises(ValueError, match="http"):
        UpstreamTokenClient("ftp://broker.example/token", CLIENT_ID, CLIENT_SECRET)
    with pytest.raises(ValueError, match="client_secret"):
        UpstreamTokenClient("https://broker.example/token", CLIENT_ID, "")
    with pytest.raises(ValueError, match="auth_method"):
        UpstreamTokenClient("https://broker.example/token", CLIENT_ID, "x", auth_method="none")
    client = UpstreamTokenClient.for_broker("https://broker.example", CLIENT_ID, CLIENT_SECRET)
    assert client.token_endpoint == "https://broker.example/token"
    assert CLIENT_SECRET not in repr(client)


def test_the_sdk_helper_needs_an_authenticated_request(client: UpstreamTokenClient) -> None:
    from broker.resource.mcp import upstream_token

    async def outside_a_request() -> None:
        await upstream_token(client, "atlassian")

    with pytest.raises(RuntimeError, match="authenticated"):
        anyio.run(outside_a_request)
