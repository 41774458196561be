"""A fake Atlassian Cloud: the OAuth 2.0 (3LO) auth host and the API host, over real HTTP.

It answers as Atlassian's documentation describes (``developer.atlassian.com/cloud/jira/platform/
oauth-2-3lo-apps``), quirks included:

- ``GET {auth_url}/authorize`` requires ``audience=api.atlassian.com`` and ``prompt=consent``
  (an error page, HTTP 400, otherwise: Atlassian shows its own page, it does not redirect), then
  signs in :attr:`FakeAtlassian.default_user` at once and redirects to
  ``redirect_uri?code=...&state=...`` (``error=access_denied`` when :attr:`consent` is false).
  A ``code_challenge`` is accepted and ignored, as Atlassian does (3LO has no PKCE).
- ``POST {auth_url}/oauth/token`` takes a JSON or form body, client credentials in the body (or
  HTTP Basic); a wrong client is HTTP 401 ``access_denied``, a bad code or refresh token HTTP 403
  ``invalid_grant``. A refresh token comes only with ``offline_access``. Refresh tokens ROTATE:
  each refresh disables the one used and returns a new pair; reusing a disabled one later than
  ``reuse_leeway`` seconds (Atlassian: 10 minutes; here 0 by default, so any reuse) revokes the
  whole family, access tokens included. :attr:`refresh_calls` counts refresh-grant requests.
- ``GET {api_url}/me`` (needs ``read:me``), ``GET {api_url}/oauth/token/accessible-resources``
  (one entry per site *and product*: a site with Jira and Confluence is listed twice, same ``id``)
  and a Jira-shaped ``GET {api_url}/ex/jira/{cloudId}/rest/api/3/myself`` (HTTP 401 for a bad or
  expired token or without ``read:jira-user``, 404 for a cloud id the user cannot reach).
- Faults per endpoint (``authorize``, ``token``, ``me``, ``accessible_resources``, ``jira``):
  :meth:`fail` (an HTTP status), :meth:`delay` (seconds, for timeouts), :meth:`malform` (a body).

Use::

    with FakeAtlassian.running() as fake:            # its own threaded HTTPServer
        provider = AtlassianProvider.from_config("atlassian", fake.provider_config(), base_dir=".")

or ``FakeAtlassian(httpserver)`` on pytest-httpserver's shared server (call :meth:`close` after).
Both hosts live on one server, under ``{prefix}/auth`` and ``{prefix}/api``, so a provider that
mixes the two base URLs up fails.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlencode

from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

__all__ = [
    "ACME",
    "ACME_CONFLUENCE",
    "CLIENT_ID",
    "CLIENT_SECRET",
    "GLOBEX",
    "AtlassianAccount",
    "FakeAtlassian",
    "Site",
]

CLIENT_ID = "broker-3lo-client"
CLIENT_SECRET = "broker-3lo-secret-7d41c2"
ENDPOINTS = ("authorize", "token", "me", "accessible_resources", "jira")
JIRA_USER_SCOPES = frozenset({"read:jira-user", "read:user:jira"})
CODE_LIFETIME = 600


@dataclass
class Site:
    """One entry of ``accessible-resources``: a site (cloud id) for one product's scopes."""

    id: str
    name: str
    url: str
    scopes: list[str] = field(default_factory=lambda: ["read:jira-work", "read:jira-user"])
    avatar_url: str = "https://site-admin-avatar-cdn.prod.public.atl-paas.net/avatars/240/flag.png"

    def resource(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "url": self.url,
            "scopes": list(self.scopes),
            "avatarUrl": self.avatar_url,
        }


ACME = Site("1324a887-45db-1bf4-1e99-ef0ff456d421", "acme", "https://acme.atlassian.net")
ACME_CONFLUENCE = Site(
    ACME.id, ACME.name, ACME.url, scopes=["read:confluence-content.all", "search:confluence"]
)
GLOBEX = Site("8594f221-9797-5f78-1fa4-485e198d7cd0", "globex", "https://globex.atlassian.net")


@dataclass
class AtlassianAccount:
    """A user: ``/me`` fields and the sites their grant reaches (edit ``sites`` at will)."""

    account_id: str
    email: str
    name: str
    nickname: str
    email_verified: bool = True
    sites: list[Site] = field(default_factory=list)
    account_status: str = "active"

    def me(self) -> dict[str, Any]:
        """``GET /me`` as Atlassian answers it (the documented fields, plus the live API's
        ``email_verified`` and ``last_updated``)."""
        return {
            "account_type": "atlassian",
            "account_id": self.account_id,
            "email": self.email,
            "email_verified": self.email_verified,
            "name": self.name,
            "picture": f"https://avatar-management.example/{self.account_id}.png",
            "account_status": self.account_status,
            "nickname": self.nickname,
            "zoneinfo": "Europe/Paris",
            "locale": "en-US",
            "extended_profile": {"job_title": "Engineer", "department": "Platform"},
            "last_updated": "2026-01-15T10:30:00.000Z",
        }

    def cloud_ids(self) -> set[str]:
        return {site.id for site in self.sites}


def default_users() -> dict[str, AtlassianAccount]:
    return {
        "alice": AtlassianAccount(
            account_id="557058:f1a2b3c4-0000-4a11-ce00-a11ce0000001",
            email="alice@acme.example",
            name="Alice Anderson",
            nickname="alice",
            sites=[ACME, ACME_CONFLUENCE, GLOBEX],
        ),
        "bob": AtlassianAccount(
            account_id="557058:b0b0b0b0-0000-4b0b-b000-b0b000000002",
            email="bob@example.com",
            name="Bob Brown",
            nickname="bob",
            email_verified=False,
            sites=[GLOBEX],
        ),
    }


@dataclass
class _Fault:
    status: int | None = None
    delay: float = 0.0
    body: str | None = None


@dataclass
class _Grant:
    """A token family: every access and refresh token descending from one authorization code."""

    account: str
    scope: str
    revoked: bool = False


@dataclass
class _RefreshToken:
    grant: _Grant
    used_at: float | None = None


@dataclass
class _AccessToken:
    grant: _Grant
    expires_at: float


class FakeAtlassian:
    """The fake auth and API hosts on ``server``, under ``prefix``; see the module docstring."""

    def __init__(
        self,
        server: HTTPServer,
        *,
        prefix: str = "/atlassian",
        client_id: str = CLIENT_ID,
        client_secret: str = CLIENT_SECRET,
        access_token_ttl: int = 3600,
        reuse_leeway: float = 0.0,
        redirect_uris: list[str] | None = None,
    ) -> None:
        self.server = server
        self.prefix = prefix.rstrip("/")
        self.client_id = client_id
        self.client_secret = client_secret
        self.access_token_ttl = access_token_ttl
        self.reuse_leeway = reuse_leeway
        self.redirect_uris = redirect_uris  # None: any redirect_uri is registered
        self.users = default_users()
        self.default_user = "alice"
        self.consent = True
        self.app_scopes = {
            "read:me",
            "offline_access",
            "read:jira-work",
            "write:jira-work",
            "read:jira-user",
            "read:user:jira",
            "read:confluence-content.all",
        }
        self.refresh_calls = 0
        self.token_requests: list[dict[str, str]] = []
        """Token request bodies, without the client secret, plus ``_auth`` (body or basic)."""
        self.faults = {name: _Fault() for name in ENDPOINTS}
        self._offset = 0.0
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._codes: dict[str, dict[str, Any]] = {}
        self._refresh: dict[str, _RefreshToken] = {}
        self._access: dict[str, _AccessToken] = {}
        server.expect_request(re.compile("^" + re.escape(self.prefix) + "/")).respond_with_handler(
            self._dispatch
        )

    @classmethod
    @contextmanager
    def running(cls, **options: Any) -> Iterator[FakeAtlassian]:
        """A fake on its own threaded HTTPServer (a slow answer does not block the others)."""
        server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
        server.start()
        fake = cls(server, **options)
        try:
            yield fake
        finally:
            fake.close()
            server.clear()
            server.stop()

    def close(self) -> None:
        """Release answers held by :meth:`delay`."""
        self._released.set()

    # -- what a test reads and sets --------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return self.server.url_for(self.prefix)

    @property
    def auth_url(self) -> str:
        return self.base_url + "/auth"

    @property
    def api_url(self) -> str:
        return self.base_url + "/api"

    def provider_config(self, **overrides: Any) -> dict[str, Any]:
        """The ``providers.<name>`` mapping of an ``atlassian`` provider pointed at this fake."""
        return {
            "type": "atlassian",
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "auth_url": self.auth_url,
            "api_url": self.api_url,
            "scopes": ["read:me", "read:jira-user"],
            **overrides,
        }

    def fail(self, endpoint: str, status: int = 500) -> None:
        self.faults[endpoint].status = status

    def delay(self, endpoint: str, seconds: float) -> None:
        self.faults[endpoint].delay = seconds

    def malform(self, endpoint: str, body: str = "{not json") -> None:
        """Answer HTTP 200 with ``body`` (labelled JSON) instead."""
        self.faults[endpoint].body = body

    def reset_faults(self) -> None:
        self.faults = {name: _Fault() for name in ENDPOINTS}

    def advance(self, seconds: float) -> None:
        """Move the fake's clock on (access token expiry, the reuse leeway)."""
        self._offset += seconds

    def refresh_token_active(self, token: str) -> bool:
        """Whether ``token`` would still be accepted (not used, its family not revoked)."""
        with self._lock:
            record = self._refresh.get(token)
            return record is not None and record.used_at is None and not record.grant.revoked

    def now(self) -> float:
        return time.time() + self._offset

    # -- the HTTP side ----------------------------------------------------------------------------

    def _dispatch(self, request: Request) -> Response:
        path = request.path[len(self.prefix) :]
        routes: list[tuple[str, str, str, Any]] = [
            ("GET", "/auth/authorize", "authorize", self._authorize),
            ("POST", "/auth/oauth/token", "token", self._token),
            ("GET", "/api/me", "me", self._me),
            (
                "GET",
                "/api/oauth/token/accessible-resources",
                "accessible_resources",
                self._resources,
            ),
        ]
        jira = re.fullmatch(r"/api/ex/jira/([^/]+)/rest/api/3/myself", path)
        for method, route, endpoint, handler in routes:
            if path == route and request.method == method:
                return self._faulty(endpoint) or handler(request)
        if jira and request.method == "GET":
            return self._faulty("jira") or self._jira_myself(request, jira.group(1))
        return _json({"code": 404, "message": "Not Found"}, 404)

    def _faulty(self, endpoint: str) -> Response | None:
        fault = self.faults[endpoint]
        if fault.delay:
            self._released.wait(fault.delay)
        if fault.status is not None:
            return Response("upstream trouble <b>secret detail</b>", status=fault.status)
        if fault.body is not None:
            return Response(fault.body, status=200, content_type="application/json")
        return None

    def _authorize(self, request: Request) -> Response:
        query = request.args
        redirect_uri = query.get("redirect_uri", "")
        problems = [
            name
            for name, ok in [
                ("client_id", query.get("client_id") == self.client_id),
                ("redirect_uri", bool(redirect_uri) and self._registered(redirect_uri)),
                ("response_type", query.get("response_type") == "code"),
                ("audience", query.get("audience") == "api.atlassian.com"),
                ("prompt", query.get("prompt") == "consent"),
                ("scope", bool(query.get("scope"))),
            ]
            if not ok
        ]
        scopes = query.get("scope", "").split()
        unknown = [scope for scope in scopes if scope not in self.app_scopes]
        if problems or unknown:
            text = f"<h1>Something went wrong</h1><p>invalid: {', '.join(problems + unknown)}</p>"
            return Response(text, status=400, content_type="text/html")
        state = {"state": query["state"]} if "state" in query else {}
        if not self.consent:
            error = {"error": "access_denied", "error_description": "User did not authorize"}
            return _redirect(redirect_uri, {**error, **state})
        code = secrets.token_urlsafe(24)
        with self._lock:
            self._codes[code] = {
                "account": self.default_user,
                "redirect_uri": redirect_uri,
                "scope": " ".join(scopes),
                "expires_at": self.now() + CODE_LIFETIME,
            }
        return _redirect(redirect_uri, {"code": code, **state})

    def _registered(self, redirect_uri: str) -> bool:
        return self.redirect_uris is None or redirect_uri in self.redirect_uris

    def _token(self, request: Request) -> Response:
        if (request.mimetype or "") == "application/json":
            try:
                loaded = json.loads(request.get_data(as_text=True) or "null")
            except ValueError:
                return _json({"error": "invalid_request"}, 400)
            body = {str(k): str(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}
        else:
            body = {key: request.form[key] for key in request.form}
        client_id, client_secret, how = body.get("client_id"), body.get("client_secret"), "body"
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            decoded = base64.b64decode(header[6:]).decode()
            client_id, _, client_secret = (unquote(part) for part in decoded.partition(":"))
            how = "basic"
        self.token_requests.append(
            {**{k: v for k, v in body.items() if k != "client_secret"}, "_auth": how}
        )
        if client_id != self.client_id or client_secret != self.client_secret:
            return _json({"error": "access_denied", "error_description": "Unauthorized"}, 401)
        grant_type = body.get("grant_type")
        if grant_type == "authorization_code":
            return self._redeem_code(body)
        if grant_type == "refresh_token":
            with self._lock:
                self.refresh_calls += 1
            return self._redeem_refresh_token(body.get("refresh_token", ""))
        return _json({"error": "unsupported_grant_type"}, 400)

    def _redeem_code(self, body: dict[str, str]) -> Response:
        with self._lock:
            code = self._codes.pop(body.get("code", ""), None)
            if (
                code is None
                or code["expires_at"] < self.now()
                or code["redirect_uri"] != body.get("redirect_uri")
            ):
                return _invalid_grant("Invalid authorization code")
            return _json(self._issue(_Grant(account=code["account"], scope=code["scope"])))

    def _redeem_refresh_token(self, token: str) -> Response:
        with self._lock:
            record = self._refresh.get(token)
            if record is None or record.grant.revoked:
                return _invalid_grant("Unknown or invalid refresh token.")
            now = self.now()
            if record.used_at is not None and now - record.used_at > self.reuse_leeway:
                record.grant.revoked = True  # reuse outside the leeway: breach, revoke them all
                return _invalid_grant("Unknown or invalid refresh token.")
            if record.used_at is None:
                record.used_at = now
            return _json(self._issue(record.grant))

    def _issue(self, grant: _Grant) -> dict[str, Any]:
        access_token = "at-" + secrets.token_urlsafe(24)
        self._access[access_token] = _AccessToken(grant, self.now() + self.access_token_ttl)
        answer: dict[str, Any] = {
            "access_token": access_token,
            "expires_in": self.access_token_ttl,
            "token_type": "Bearer",
            "scope": grant.scope,
        }
        if "offline_access" in grant.scope.split():
            refresh_token = "rt-" + secrets.token_urlsafe(24)
            self._refresh[refresh_token] = _RefreshToken(grant)
            answer["refresh_token"] = refresh_token
        return answer

    def _bearer(self, request: Request) -> tuple[AtlassianAccount, set[str]] | None:
        header = request.headers.get("Authorization", "")
        with self._lock:
            record = self._access.get(header[7:]) if header.startswith("Bearer ") else None
            if record is None or record.grant.revoked or record.expires_at < self.now():
                return None
            account = self.users.get(record.grant.account)
            return (account, set(record.grant.scope.split())) if account else None

    def _me(self, request: Request) -> Response:
        bearer = self._bearer(request)
        if bearer is None:
            return _unauthorized()
        account, scopes = bearer
        if "read:me" not in scopes:
            return _json({"code": 403, "message": "Forbidden"}, 403)
        return _json(account.me())

    def _resources(self, request: Request) -> Response:
        bearer = self._bearer(request)
        if bearer is None:
            return _unauthorized()
        return _json([site.resource() for site in bearer[0].sites])

    def _jira_myself(self, request: Request, cloud_id: str) -> Response:
        bearer = self._bearer(request)
        if bearer is None:
            return _unauthorized()
        account, scopes = bearer
        if not scopes & JIRA_USER_SCOPES:
            return _unauthorized("Unauthorized; scope does not match")
        if cloud_id not in account.cloud_ids():
            return _json({"errorMessages": ["Site not found"], "errors": {}}, 404)
        return _json(
            {
                "self": f"{self.api_url}/ex/jira/{cloud_id}/rest/api/3/user?"
                + urlencode({"accountId": account.account_id}),
                "accountId": account.account_id,
                "accountType": "atlassian",
                "emailAddress": account.email,
                "displayName": account.name,
                "active": account.account_status == "active",
                "timeZone": "Europe/Paris",
                "locale": "en_US",
            }
        )


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


def _invalid_grant(description: str) -> Response:
    return _json({"error": "invalid_grant", "error_description": description}, 403)


def _unauthorized(message: str = "Unauthorized") -> Response:
    return _json({"code": 401, "message": message}, 401)


def _redirect(redirect_uri: str, params: dict[str, str]) -> Response:
    separator = "&" if "?" in redirect_uri else "?"
    return Response(status=302, headers={"Location": redirect_uri + separator + urlencode(params)})
