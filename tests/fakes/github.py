"""A fake GitHub (github.com, or GitHub Enterprise Server) on ``pytest-httpserver``.

It answers as GitHub's OAuth endpoints and REST API do, quirks included:

- ``GET /login/oauth/authorize`` signs in a user at once (the one named by GitHub's ``login``
  parameter, else the default user) and redirects to ``redirect_uri?code=...&state=...``. It
  remembers the PKCE ``code_challenge`` (S256 only) and refuses a ``redirect_uri`` outside the
  registered callback URL (GitHub allows a sub-path of it).
- ``POST /login/oauth/access_token`` answers form-encoded unless ``Accept: application/json`` is
  sent, and reports errors (``incorrect_client_credentials``, ``bad_verification_code``,
  ``redirect_uri_mismatch``, ``bad_refresh_token``...) with HTTP 200. Granted scopes are
  comma-separated. With ``expiring_tokens=True`` it behaves as a GitHub App: tokens last 8 hours,
  come with a refresh token that rotates on every refresh (a rotated one is refused), and
  ``scope`` is empty.
- The REST API (``/user``, ``/user/emails``, ``/user/orgs``, ``/user/teams``,
  ``/user/memberships/orgs/{org}``) is mounted at ``/`` (api.github.com's shape) or at
  ``/api/v3`` (``enterprise=True``, GHES's shape). Lists are paginated with ``Link`` headers and a
  small page size (2), so pagination is always exercised. An organisation in
  ``restricted_orgs`` restricts OAuth App access: its membership answers 403 and it is hidden
  from ``/user/orgs`` and ``/user/teams``. Pending memberships are not listed either.

Typical use::

    with FakeGitHub() as github:                       # alice, bob, carol, dave (sample_users)
        config = github.provider_config()              # the providers.<name> mapping
        provider = GitHubProvider.from_config("github", config, base_dir=".")
        github.users["alice"].orgs.pop("acme")         # alice leaves acme
        github.break_endpoint("emails", status=500)    # failure switches; github.heal()
"""

from __future__ import annotations

import base64
import copy
import functools
import hashlib
import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl, urlencode, urlsplit

from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

__all__ = [
    "CLIENT_ID",
    "CLIENT_SECRET",
    "Email",
    "FakeGitHub",
    "Fault",
    "GitHubUser",
    "sample_users",
]

CLIENT_ID = "Iv1.broker0test0client"
CLIENT_SECRET = "github-secret-5e0c1d7a"
API_VERSIONS = ("2022-11-28",)
ACCESS_TOKEN_TTL = 8 * 3600
REFRESH_TOKEN_TTL = 15_897_600  # about six months, as GitHub says
ENDPOINTS = ("authorize", "token", "user", "emails", "orgs", "teams", "membership")


@dataclass
class Email:
    """One entry of ``/user/emails``."""

    email: str
    primary: bool = False
    verified: bool = True
    visibility: str | None = None


@dataclass
class GitHubUser:
    """A GitHub account. ``orgs`` maps organisation logins (any case, as GitHub shows them) to the
    membership state (``active`` or ``pending``); ``teams`` are ``Org/team-slug`` strings."""

    id: int
    login: str
    name: str | None = None
    emails: list[Email] = field(default_factory=list)
    orgs: dict[str, str] = field(default_factory=dict)
    teams: list[str] = field(default_factory=list)


def sample_users() -> list[GitHubUser]:
    """The users a fresh :class:`FakeGitHub` has; ``alice`` is the default user.

    - alice: primary verified email on the second page of ``/user/emails``; active member of
      ``Acme`` and ``Globex``; teams ``Acme/platform``, ``Acme/sre``, ``Globex/research``.
    - bob: primary email unverified (a verified secondary); active in ``Acme``, no team.
    - carol: invited to ``Acme`` (membership ``pending``), team ``Acme/platform`` pending too.
    - dave: active member of ``Initech``, an organisation listed in ``restricted_orgs`` only when
      a test puts it there.
    """
    return [
        GitHubUser(
            id=1001,
            login="alice",
            name="Alice Anderson",
            emails=[
                Email("alice@old.example"),
                Email("alice@users.noreply.github.com"),
                Email("alice@example.com", primary=True, visibility="private"),
            ],
            orgs={"Acme": "active", "Globex": "active"},
            teams=["Acme/platform", "Acme/sre", "Globex/research"],
        ),
        GitHubUser(
            id=1002,
            login="bob",
            name="Bob Brown",
            emails=[
                Email("bob@example.com", primary=True, verified=False),
                Email("bob@other.example", verified=True),
            ],
            orgs={"Acme": "active"},
        ),
        GitHubUser(
            id=1003,
            login="carol",
            emails=[Email("carol@example.com", primary=True)],
            orgs={"Acme": "pending"},
            teams=["Acme/platform"],
        ),
        GitHubUser(
            id=1004,
            login="dave",
            name="Dave Davis",
            emails=[Email("dave@initech.example", primary=True)],
            orgs={"Initech": "active"},
            teams=["Initech/tps"],
        ),
    ]


@dataclass
class Fault:
    """How a broken endpoint answers: an HTTP ``status`` (with a JSON error body), after a
    ``delay`` in seconds, or a ``malformed`` (truncated JSON) body with HTTP 200."""

    status: int | None = None
    delay: float = 0.0
    malformed: bool = False


@dataclass
class _Grant:
    login: str
    scopes: tuple[str, ...]
    redirect_uri: str
    code_challenge: str | None


@dataclass
class _Token:
    login: str
    scopes: tuple[str, ...]
    expires_at: float | None


class FakeGitHub:
    """A fake GitHub over real HTTP on ``127.0.0.1``; use it as a context manager (or call
    :meth:`start` and :meth:`stop`).

    ``client_id``/``client_secret`` are the registered app's; ``callback_url`` its registered
    callback URL (``None``: any ``redirect_uri`` is accepted); ``users`` replace
    :func:`sample_users`; ``default_login`` is who signs in without a ``login`` parameter (the
    first user by default); ``enterprise`` mounts the API at ``/api/v3``; ``page_size`` caps every
    page; ``expiring_tokens`` plays a GitHub App (8-hour tokens, rotating refresh tokens).
    """

    def __init__(
        self,
        *,
        client_id: str = CLIENT_ID,
        client_secret: str = CLIENT_SECRET,
        callback_url: str | None = None,
        users: Iterable[GitHubUser] | None = None,
        default_login: str | None = None,
        enterprise: bool = False,
        page_size: int = 2,
        expiring_tokens: bool = False,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.callback_url = callback_url
        self.enterprise = enterprise
        self.page_size = page_size
        self.expiring_tokens = expiring_tokens
        self._initial_users = copy.deepcopy(list(sample_users() if users is None else users))
        self._default_login = default_login
        self._lock = threading.Lock()
        self.server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
        self.server.expect_request(re.compile(r"/.*")).respond_with_handler(self._dispatch)
        self.reset()

    def reset(self) -> None:
        """Back to the state after construction: the initial users, no restricted organisation,
        no fault, no code or token issued, an empty request log (the server keeps running)."""
        self.users: dict[str, GitHubUser] = {}
        for user in copy.deepcopy(self._initial_users):
            self.add_user(user)
        self.default_login = self._default_login or next(iter(self.users), None)
        self.restricted_orgs: set[str] = set()
        """Organisations (any case) that restrict OAuth App access."""
        self.next_link_base: str | None = None
        """When set, ``Link`` next URLs point there instead of at this server (another host)."""
        self.faults: dict[str, Fault] = {}
        self._codes: dict[str, _Grant] = {}
        self._tokens: dict[str, _Token] = {}
        self._refresh_tokens: dict[str, _Token] = {}
        self.server.clear_log()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> Self:
        self.server.start()
        return self

    def stop(self) -> None:
        """Stop the server; re-raise the first error a handler hit (a bug of the fake)."""
        if self.server.is_running():
            self.server.stop()
        self.server.check_handler_errors()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- what tests and the broker's config use ------------------------------------------------

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``: the login host (``github.com``, or the GHES host)."""
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def api_url(self) -> str:
        """Where the REST API is: ``base_url`` (api.github.com's shape) or ``base_url/api/v3``."""
        return self.base_url + ("/api/v3" if self.enterprise else "")

    def provider_config(self, **overrides: Any) -> dict[str, Any]:
        """The ``providers.<name>`` mapping of ``broker.yaml`` pointing at this fake: ``auth_url``
        and ``api_url``, or ``enterprise_url`` when ``enterprise``; ``overrides`` are added (a
        value of ``None`` removes a key)."""
        config: dict[str, Any] = {
            "type": "github",
            "client_id": self.client_id,
            "client_secret": self.client_secret,
        }
        if self.enterprise:
            config["enterprise_url"] = self.base_url
        else:
            config.update(auth_url=self.base_url, api_url=self.api_url)
        config.update(overrides)
        return {key: value for key, value in config.items() if value is not None}

    def add_user(self, user: GitHubUser) -> GitHubUser:
        """Add (or replace) a user, keyed by login."""
        self.users[user.login] = user
        return user

    def break_endpoint(
        self,
        endpoint: str,
        *,
        status: int | None = None,
        delay: float = 0.0,
        malformed: bool = False,
    ) -> None:
        """Make one endpoint (``authorize``, ``token``, ``user``, ``emails``, ``orgs``, ``teams``,
        ``membership``) fail until :meth:`heal`."""
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; one of {', '.join(ENDPOINTS)}")
        self.faults[endpoint] = Fault(status=status, delay=delay, malformed=malformed)

    def heal(self) -> None:
        self.faults.clear()

    def revoke_tokens(self) -> None:
        """The user revoked the OAuth App: every token issued so far is refused (401)."""
        with self._lock:
            self._tokens.clear()
            self._refresh_tokens.clear()

    def requests(self, path_suffix: str = "") -> list[Request]:
        """The requests received so far whose path ends with ``path_suffix``."""
        return [request for request, _ in self.server.log if request.path.endswith(path_suffix)]

    def issue_code(self, login: str, scopes: Iterable[str] = ("read:user",), **grant: Any) -> str:
        """An authorization code for ``login`` without the browser (``redirect_uri``,
        ``code_challenge`` may be given)."""
        code = secrets.token_hex(10)
        self._codes[code] = _Grant(
            login,
            tuple(scopes),
            grant.get("redirect_uri", ""),
            grant.get("code_challenge"),
        )
        return code

    def expire_access_tokens(self) -> None:
        """Every access token issued so far expires now (GitHub then answers 401)."""
        for token in self._tokens.values():
            token.expires_at = 0.0

    # -- the HTTP side -------------------------------------------------------------------------

    def _dispatch(self, request: Request) -> Response:
        path = request.path
        prefix = "/api/v3" if self.enterprise else ""
        routes: dict[str, tuple[str, Callable[[Request], Response]]] = {
            "/login/oauth/authorize": ("authorize", self._authorize),
            "/login/oauth/access_token": ("token", self._token),
            f"{prefix}/user": ("user", self._user),
            f"{prefix}/user/emails": ("emails", self._emails),
            f"{prefix}/user/orgs": ("orgs", self._orgs),
            f"{prefix}/user/teams": ("teams", self._teams),
        }
        match = re.fullmatch(rf"{re.escape(prefix)}/user/memberships/orgs/([^/]+)", path)
        if match:
            routes[path] = ("membership", functools.partial(self._membership, org=match[1]))
        if path not in routes:
            return _json({"message": "Not Found"}, 404)
        endpoint, handler = routes[path]
        fault = self.faults.get(endpoint)
        if fault is not None:
            if fault.delay:
                time.sleep(fault.delay)
            if fault.status is not None:
                return _json({"message": "Server Error"}, fault.status)
            if fault.malformed:
                return Response('{"login": "alice", ', 200, content_type="application/json")
        with self._lock:
            response: Response = handler(request)
        return response

    def _authorize(self, request: Request) -> Response:
        query = request.args
        if query.get("client_id") != self.client_id:
            return Response("<h1>404</h1>", 404, content_type="text/html")
        redirect_uri = query.get("redirect_uri") or self.callback_url or ""
        if not self._redirect_uri_ok(redirect_uri):
            return Response("The redirect_uri is not associated with this application.", 400)
        method = query.get("code_challenge_method", "S256")
        if query.get("code_challenge") and method != "S256":
            return Response("code_challenge_method must be S256", 400)
        login = query.get("login") or self.default_login
        if login not in self.users:
            return Response("<h1>Sign in to GitHub</h1>", 200, content_type="text/html")
        scopes = tuple(query.get("scope", "").replace(",", " ").split())
        code = self.issue_code(
            login, scopes, redirect_uri=redirect_uri, code_challenge=query.get("code_challenge")
        )
        params = {"code": code, **({"state": query["state"]} if "state" in query else {})}
        return Response(status=302, headers={"Location": _with_query(redirect_uri, params)})

    def _redirect_uri_ok(self, redirect_uri: str) -> bool:
        """GitHub's rule: same scheme, host and port as the callback URL, path under its path."""
        if self.callback_url is None:
            return bool(redirect_uri)
        given, registered = urlsplit(redirect_uri), urlsplit(self.callback_url)
        base = registered.path.rstrip("/")
        return given[:2] == registered[:2] and (
            given.path == registered.path or given.path.startswith(base + "/")
        )

    def _token(self, request: Request) -> Response:
        form = request.form
        client_id, client_secret = form.get("client_id"), form.get("client_secret")
        if request.authorization is not None and request.authorization.type == "basic":
            client_id = request.authorization.username
            client_secret = request.authorization.password
        if client_id != self.client_id or client_secret != self.client_secret:
            return _token_answer(request, _error("incorrect_client_credentials"))
        if form.get("grant_type") == "refresh_token":
            return _token_answer(request, self._refresh(form.get("refresh_token", "")))
        grant = self._codes.pop(form.get("code", ""), None)
        if grant is None:
            return _token_answer(request, _error("bad_verification_code"))
        if form.get("redirect_uri") and form["redirect_uri"] != grant.redirect_uri:
            return _token_answer(request, _error("redirect_uri_mismatch"))
        if grant.code_challenge is not None:
            verifier = form.get("code_verifier", "")
            digest = hashlib.sha256(verifier.encode()).digest()
            challenge = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
            if not verifier or not secrets.compare_digest(challenge, grant.code_challenge):
                return _token_answer(request, _error("bad_verification_code"))
        return _token_answer(request, self._issue(grant.login, grant.scopes))

    def _issue(self, login: str, scopes: tuple[str, ...]) -> dict[str, Any]:
        access = "gho_" + secrets.token_hex(16)
        body: dict[str, Any] = {"access_token": access, "token_type": "bearer"}
        if self.expiring_tokens:  # a GitHub App: permissions, not scopes
            refresh = "ghr_" + secrets.token_hex(32)
            self._tokens[access] = _Token(login, scopes, time.time() + ACCESS_TOKEN_TTL)
            self._refresh_tokens[refresh] = _Token(login, scopes, time.time() + REFRESH_TOKEN_TTL)
            body.update(
                expires_in=ACCESS_TOKEN_TTL,
                refresh_token=refresh,
                refresh_token_expires_in=REFRESH_TOKEN_TTL,
                scope="",
            )
        else:
            self._tokens[access] = _Token(login, scopes, None)
            body["scope"] = ",".join(scopes)
        return body

    def _refresh(self, refresh_token: str) -> dict[str, Any]:
        record = self._refresh_tokens.pop(refresh_token, None)  # rotated: single use
        if record is None or (record.expires_at or 0) < time.time():
            return _error("bad_refresh_token")
        return self._issue(record.login, record.scopes)

    def _caller(self, request: Request) -> tuple[GitHubUser, _Token] | Response:
        """The user behind the request's token (``Bearer`` or GitHub's older ``token``)."""
        version = request.headers.get("X-GitHub-Api-Version")
        if version is not None and version not in API_VERSIONS:
            return _json({"message": f"API version {version!r} is not supported."}, 400)
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        token = self._tokens.get(value) if scheme.lower() in ("bearer", "token") else None
        if token is None or (token.expires_at is not None and token.expires_at < time.time()):
            return _json({"message": "Bad credentials"}, 401)
        user = self.users.get(token.login)
        if user is None:
            return _json({"message": "Bad credentials"}, 401)
        return user, token

    def _scoped(self, token: _Token, *needed: str) -> bool:
        """GitHub App tokens carry permissions, not scopes: only OAuth App tokens are checked."""
        return self.expiring_tokens or any(scope in token.scopes for scope in needed)

    def _visible_orgs(self, user: GitHubUser) -> list[str]:
        restricted = {org.lower() for org in self.restricted_orgs}
        return [
            org
            for org, state in user.orgs.items()
            if state == "active" and org.lower() not in restricted
        ]

    def _user(self, request: Request) -> Response:
        caller = self._caller(request)
        if isinstance(caller, Response):
            return caller
        user, _ = caller
        public = next((e.email for e in user.emails if e.visibility == "public"), None)
        return _json(
            {
                "login": user.login,
                "id": user.id,
                "node_id": base64.b64encode(f"04:User{user.id}".encode()).decode(),
                "type": "User",
                "name": user.name,
                "email": public,
                "html_url": f"{self.base_url}/{user.login}",
            }
        )

    def _emails(self, request: Request) -> Response:
        caller = self._caller(request)
        if isinstance(caller, Response):
            return caller
        user, token = caller
        if not self._scoped(token, "user", "user:email"):
            return _json({"message": "Not Found"}, 404)
        items = [
            {
                "email": e.email,
                "primary": e.primary,
                "verified": e.verified,
                "visibility": e.visibility,
            }
            for e in user.emails
        ]
        return self._page(request, items)

    def _orgs(self, request: Request) -> Response:
        caller = self._caller(request)
        if isinstance(caller, Response):
            return caller
        user, token = caller
        orgs = self._visible_orgs(user) if self._scoped(token, "read:org", "user") else []
        return self._page(request, [_org(org, index) for index, org in enumerate(orgs)])

    def _teams(self, request: Request) -> Response:
        caller = self._caller(request)
        if isinstance(caller, Response):
            return caller
        user, token = caller
        if not self._scoped(token, "read:org", "user", "repo"):
            return _json({"message": "Resource not accessible by integration"}, 403)
        visible = {org.lower() for org in self._visible_orgs(user)}
        items = []
        for index, team in enumerate(user.teams):
            org, _, slug = team.partition("/")
            if org.lower() in visible:
                items.append(
                    {
                        "id": 500 + index,
                        "slug": slug,
                        "name": slug.title(),
                        "organization": _org(org),
                    }
                )
        return self._page(request, items)

    def _membership(self, request: Request, org: str) -> Response:
        caller = self._caller(request)
        if isinstance(caller, Response):
            return caller
        user, token = caller
        if not self._scoped(token, "read:org", "user"):
            return _json({"message": "Resource not accessible by integration"}, 403)
        if org.lower() in {o.lower() for o in self.restricted_orgs}:
            message = (
                f"Although you appear to have the correct authorization credentials, the `{org}` "
                "organization has enabled OAuth App access restrictions, meaning that data access "
                "to third-parties is limited."
            )
            return _json({"message": message}, 403)
        states = {name.lower(): (name, state) for name, state in user.orgs.items()}
        if org.lower() not in states:
            return _json({"message": "Not Found"}, 404)
        name, state = states[org.lower()]
        return _json(
            {
                "state": state,
                "role": "member",
                "organization": _org(name),
                "user": {"login": user.login, "id": user.id},
            }
        )

    def _page(self, request: Request, items: list[dict[str, Any]]) -> Response:
        """One page of ``items`` with GitHub's ``Link`` header (``next``, ``last``...)."""
        try:
            per_page = min(int(request.args.get("per_page", "30")), 100, self.page_size)
            page = max(int(request.args.get("page", "1")), 1)
        except ValueError:
            return _json({"message": "Invalid request."}, 422)
        last = max((len(items) + per_page - 1) // per_page, 1)
        base = (self.next_link_base or self.base_url) + request.path

        def link(number: int, rel: str) -> str:
            return f'<{base}?{urlencode({"per_page": per_page, "page": number})}>; rel="{rel}"'

        links = []
        if page < last:
            links += [link(page + 1, "next"), link(last, "last")]
        if page > 1:
            links += [link(1, "first"), link(page - 1, "prev")]
        response = _json(items[(page - 1) * per_page : page * per_page])
        if links:
            response.headers["Link"] = ", ".join(links)
        return response


def _org(login: str, index: int = 0) -> dict[str, Any]:
    return {"login": login, "id": 9000 + sum(map(ord, login)) + index, "description": None}


def _error(code: str) -> dict[str, str]:
    return {
        "error": code,
        "error_description": f"GitHub says {code.replace('_', ' ')}.",
        "error_uri": "https://docs.github.com/apps/troubleshooting-oauth-app-access-token-request-errors",
    }


def _token_answer(request: Request, body: Mapping[str, Any]) -> Response:
    """HTTP 200, always; JSON only when asked for, else form-encoded (GitHub's default)."""
    if "application/json" in request.headers.get("Accept", ""):
        return _json(dict(body))
    form = urlencode({key: str(value) for key, value in body.items()})
    return Response(form, 200, content_type="application/x-www-form-urlencoded; charset=utf-8")


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status, content_type="application/json; charset=utf-8")


def _with_query(url: str, params: Mapping[str, str]) -> str:
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return parts._replace(query=urlencode(query)).geturl()
