"""A fake Salesforce login host on ``pytest-httpserver``: authorize, token, identity URLs.

It answers as Salesforce's web server flow does (see PROVIDERS.md): the token response carries
``instance_url``, the identity URL ``id`` (``{host}/id/{orgId}/{userId}``, 18-character ids),
``issued_at`` (milliseconds, a string) and ``signature`` (base64 HMAC-SHA256 of ``id`` +
``issued_at`` keyed with the client secret), a ``refresh_token`` only when the ``refresh_token``
(or ``offline_access``) scope was granted, and an ``id_token`` when ``openid`` was. Refresh answers
repeat ``instance_url``, ``id``, ``issued_at`` and ``signature`` but no new refresh token.

Usage::

    with FakeSalesforce.start() as fake:          # or FakeSalesforce(an_httpserver)
        config = fake.provider_config(allowed_org_ids=[fake.users["alice"].org_id])
        provider = SalesforceProvider.from_config("salesforce", config, base_dir=".")

The fake listens on ``127.0.0.1``; ``provider_config`` points ``login_url`` at it, so it is the
login host. ``identity_origin`` moves the identity URL elsewhere (``http://localhost:PORT``, the
same server under another name, or another server) to play an identity URL on a foreign host.
Switches, each for one endpoint name (``"token"`` or ``"identity"``): ``failures`` (an HTTP
status to answer), ``delays`` (seconds to wait first), ``malformed`` (answer a body that is not
JSON). And ``bad_signature`` (sign with another key), ``token_overrides`` (token answer fields
set or, with ``None``, removed before signing), ``identity_overrides`` (identity answer fields),
``identity_answer`` (a whole JSON answer instead), ``require_pkce``, ``login_as``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import jwt
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from tests.idp_server import REDIRECT_URI

CLIENT_ID = "3MVG9fakeBrokerConsumerKey"
CLIENT_SECRET = "fake-consumer-secret-9b1f2c"
INSTANCE_URL = "https://acme.my.salesforce.com"
CONNECTED_APP_SCOPES = frozenset({"id", "openid", "api", "refresh_token", "offline_access", "web"})
"""The scopes selected in the fake's Connected App; asking for another one is ``invalid_scope``."""


def id18(id15: str) -> str:
    """The 18-character form of a 15-character Salesforce id (the case-insensitive checksum)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
    suffix = ""
    for chunk in range(3):
        part = id15[chunk * 5 : chunk * 5 + 5]
        suffix += alphabet[sum(1 << i for i, char in enumerate(part) if "A" <= char <= "Z")]
    return id15 + suffix


ACME_ORG = id18("00D5g000004AcMe")
OTHER_ORG = id18("00D8d000001OtHr")


@dataclass
class FakeUser:
    """A Salesforce user; ``email_verified=None`` leaves the field out of the identity answer."""

    org_id: str
    user_id: str
    username: str
    display_name: str
    email: str
    email_verified: bool | None = True
    active: bool = True


def default_users() -> dict[str, FakeUser]:
    """alice (the default login), bob (email not verified), carol (inactive), all in ACME_ORG;
    dave in OTHER_ORG, whose identity answer has no ``email_verified``."""

    def user(org: str, id15: str, name: str, login: str, **flags: Any) -> FakeUser:
        email = f"{login}@{'acme' if org == ACME_ORG else 'other'}.example"
        return FakeUser(org, id18(id15), email, name, email, **flags)

    return {
        "alice": user(ACME_ORG, "0055g00000AlIcE", "Alice Archer", "alice"),
        "bob": user(ACME_ORG, "0055g00000BoBbY", "Bob Baker", "bob", email_verified=False),
        "carol": user(ACME_ORG, "0055g00000CaRoL", "Carol Cole", "carol", active=False),
        "dave": user(OTHER_ORG, "0058d00000DaVeX", "Dave Dunn", "dave", email_verified=None),
    }


@dataclass
class Grant:
    """What an authorization code or a refresh token stands for."""

    user: str
    scopes: tuple[str, ...]
    redirect_uri: str = ""
    code_challenge: str | None = None


@dataclass
class FakeSalesforce:
    server: HTTPServer
    client_id: str = CLIENT_ID
    client_secret: str = CLIENT_SECRET
    redirect_uris: tuple[str, ...] = (REDIRECT_URI,)
    users: dict[str, FakeUser] = field(default_factory=dict)
    login_as: str = "alice"
    instance_url: str = INSTANCE_URL
    identity_origin: str | None = None
    require_pkce: bool = False
    bad_signature: bool = False
    failures: dict[str, int] = field(default_factory=dict)
    delays: dict[str, float] = field(default_factory=dict)
    malformed: set[str] = field(default_factory=set)
    token_overrides: dict[str, Any] = field(default_factory=dict)
    identity_overrides: dict[str, Any] = field(default_factory=dict)
    identity_answer: Any = None
    codes: dict[str, Grant] = field(default_factory=dict)
    refresh_tokens: dict[str, Grant] = field(default_factory=dict)
    access_tokens: dict[str, Grant] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.users = self.users or default_users()
        server = self.server
        server.expect_request("/services/oauth2/authorize", method="GET").respond_with_handler(
            self._authorize
        )
        server.expect_request("/services/oauth2/token", method="POST").respond_with_handler(
            self._token
        )
        server.expect_request(re.compile(r"^/id/"), method="GET").respond_with_handler(
            self._identity
        )

    @classmethod
    @contextmanager
    def start(cls, **options: Any) -> Iterator[FakeSalesforce]:
        """A fake on its own server on ``127.0.0.1``, for the duration of the ``with`` block."""
        server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
        server.start()
        try:
            yield cls(server, **options)
        finally:
            server.clear()
            server.stop()

    # -- what tests use ------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The login host: ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.server.port}"

    def provider_config(self, **overrides: Any) -> dict[str, Any]:
        """A ``providers.salesforce`` config mapping (as ``broker.yaml`` gives it) for the fake."""
        return {
            "type": "salesforce",
            "login_url": self.base_url,
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            **overrides,
        }

    def identity_url(self, name: str) -> str:
        user = self.users[name]
        return f"{self.identity_origin or self.base_url}/id/{user.org_id}/{user.user_id}"

    def sign(self, identity_url: str, issued_at: str, secret: str | None = None) -> str:
        key = (secret or self.client_secret).encode()
        digest = hmac.new(key, (identity_url + issued_at).encode(), hashlib.sha256).digest()
        return base64.b64encode(digest).decode()

    def requests_to(self, prefix: str) -> list[Request]:
        """The requests the fake received whose path starts with ``prefix``."""
        return [request for request, _ in self.server.log if request.path.startswith(prefix)]

    # -- the endpoints -------------------------------------------------------------------------

    def _switches(self, endpoint: str) -> Response | None:
        time.sleep(self.delays.get(endpoint, 0))
        if endpoint in self.failures:
            status = self.failures[endpoint]
            return Response("<html>Salesforce is down for maintenance</html>", status=status)
        if endpoint in self.malformed:
            return Response("<html>not json</html>", status=200, content_type="application/json")
        return None

    def _authorize(self, request: Request) -> Response:
        params = request.args
        if params.get("client_id") != self.client_id:
            return Response("error=invalid_client_id", status=400)
        if params.get("redirect_uri") not in self.redirect_uris:
            return Response("error=redirect_uri_mismatch", status=400)
        back = params["redirect_uri"]
        error = None
        scopes = tuple(params.get("scope", "").split())
        challenge = params.get("code_challenge")
        if params.get("response_type") != "code":
            error = "unsupported_response_type"
        elif not set(scopes) <= CONNECTED_APP_SCOPES:
            error = "invalid_scope"
        elif (challenge or self.require_pkce) and params.get("code_challenge_method") != "S256":
            error = "invalid_request"
        if error:
            query = {"error": error, "error_description": "something <b>bad</b> happened"}
        else:
            code = secrets.token_urlsafe(24)
            self.codes[code] = Grant(self.login_as, scopes, back, challenge)
            query = {"code": code}
        if "state" in params:
            query["state"] = params["state"]
        return Response(status=302, headers={"Location": f"{back}?{urlencode(query)}"})

    def _token(self, request: Request) -> Response:
        switched = self._switches("token")
        if switched is not None:
            return switched
        form = request.form
        client_id, secret = form.get("client_id"), form.get("client_secret")
        if request.authorization is not None:
            client_id = request.authorization.username
            secret = request.authorization.password
        if client_id != self.client_id or secret != self.client_secret:
            return _json({"error": "invalid_client", "error_description": "invalid"}, 400)
        grant: Grant | None = None
        refresh = form.get("grant_type") == "refresh_token"
        if form.get("grant_type") == "authorization_code":
            grant = self.codes.pop(form.get("code", ""), None)
            if grant is not None and grant.redirect_uri != form.get("redirect_uri"):
                grant = None
            if grant is not None and grant.code_challenge is not None:
                verifier = form.get("code_verifier", "").encode()
                digest = base64.urlsafe_b64encode(hashlib.sha256(verifier).digest())
                grant = grant if digest.rstrip(b"=").decode() == grant.code_challenge else None
        elif refresh:
            grant = self.refresh_tokens.get(form.get("refresh_token", ""))
        if grant is None:
            return _json({"error": "invalid_grant", "error_description": "expired code"}, 400)
        return _json(self._token_answer(grant, refresh))

    def _token_answer(self, grant: Grant, refresh: bool) -> dict[str, Any]:
        access_token = f"{self.users[grant.user].org_id[:15]}!{secrets.token_urlsafe(32)}"
        self.access_tokens[access_token] = grant
        body: dict[str, Any] = {
            "access_token": access_token,
            "instance_url": self.instance_url,
            "id": self.identity_url(grant.user),
            "token_type": "Bearer",
            "issued_at": str(int(time.time() * 1000)),
            "scope": " ".join(grant.scopes),
        }
        offline = {"refresh_token", "offline_access"} & set(grant.scopes)
        if offline and not refresh:
            body["refresh_token"] = secrets.token_urlsafe(32)
            self.refresh_tokens[body["refresh_token"]] = grant
        if "openid" in grant.scopes:
            claims = {"sub": body["id"], "aud": self.client_id, "iss": self.base_url}
            body["id_token"] = jwt.encode(claims, "k" * 32 + "fake-salesforce", algorithm="HS256")
        body.update(self.token_overrides)
        body = {key: value for key, value in body.items() if value is not None}
        if "signature" not in self.token_overrides and "id" in body and "issued_at" in body:
            secret = "not-the-client-secret" if self.bad_signature else None
            body["signature"] = self.sign(body["id"], body["issued_at"], secret)
        return body

    def _identity(self, request: Request) -> Response:
        switched = self._switches("identity")
        if switched is not None:
            return switched
        header = request.headers.get("Authorization", "")
        grant = self.access_tokens.get(header.removeprefix("Bearer "))
        if grant is None or request.path != f"/id/{_ids(self.users[grant.user])}":
            return Response("Bad_OAuth_Token", status=403)
        user = self.users[grant.user]
        body: dict[str, Any] = {
            "id": self.identity_url(grant.user),
            "asserted_user": True,
            "user_id": user.user_id,
            "organization_id": user.org_id,
            "username": user.username,
            "nick_name": user.username.split("@")[0],
            "display_name": user.display_name,
            "email": user.email,
            "first_name": user.display_name.split()[0],
            "last_name": user.display_name.split()[-1],
            "timezone": "Europe/Paris",
            "urls": {"rest": f"{self.instance_url}/services/data/v{{version}}/"},
            "active": user.active,
            "user_type": "STANDARD",
            "language": "en_US",
            "locale": "en_GB",
            "utcOffset": 3600000,
        }
        if user.email_verified is not None:
            body["email_verified"] = user.email_verified
        body.update(self.identity_overrides)
        return _json(body if self.identity_answer is None else self.identity_answer)


def _ids(user: FakeUser) -> str:
    return f"{user.org_id}/{user.user_id}"


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")
