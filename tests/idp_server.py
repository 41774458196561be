"""Start and stop the test OpenID provider (``tests/idp/server.mjs``, panva's ``oidc-provider``).

The IdP is a real, certified OpenID Connect server in a Node process. ``start_idp`` runs it on a
free loopback port and yields where it listens; ``idp_or_skip`` turns a machine without Node (or
without ``npm install --prefix tests/idp``) into a pytest skip, or into a failure when
``BROKER_TEST_REQUIRE_ALL=1`` (CI). :class:`FakeOP` is a hand-written OP on pytest-httpserver for
what a certified OP never sends.
"""

from __future__ import annotations

import html
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urljoin, urlsplit

import httpx
import jwt
from werkzeug import Request, Response

from providers.contract import CallbackRequest, LoginRequest, LoginResult, RedirectLogin

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import rsa
    from pytest_httpserver import HTTPServer

IDP_DIR = Path(__file__).resolve().parent / "idp"
SERVER_SCRIPT = IDP_DIR / "server.mjs"
START_TIMEOUT = 45.0
"""Node loads oidc-provider in about a second, but a loaded 2-core machine has taken over 30."""
START_ATTEMPTS = 3
"""Starts tried before giving up: twice in one full run the IdP hung before listening for over
90 s (its log ends with oidc-provider's import), while the same start took a second before and
after; a start that does not listen is stopped, its Node diagnostic report (stacks) printed,
and the IdP started again."""

# The broker's client at the test IdP. The redirect_uri is never fetched (nothing listens on
# port 1): the browser stops when the IdP redirects there.
REDIRECT_URI = "http://127.0.0.1:1/cb"
CLIENT_ID = "broker"
CLIENT_SECRET = "broker-secret-3f9a1c0e"
POST_CLIENT_ID = "broker-post"
DEFAULT_CLIENTS: list[dict[str, Any]] = [
    {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "redirect_uris": [REDIRECT_URI]},
    {
        "client_id": POST_CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "redirect_uris": [REDIRECT_URI],
        "token_endpoint_auth_method": "client_secret_post",
    },
]

HOSTED_DOMAIN_ACCOUNTS: dict[str, dict[str, Any]] = {
    "dana": {
        "sub": "108234567890-dana",
        "name": "Dana Diaz",
        "email": "dana@example.com",
        "email_verified": True,
        "hd": "example.com",
    },
    "erin": {
        "sub": "108234567891-erin",
        "name": "Erin Evans",
        "email": "erin@other.example",
        "email_verified": True,
        "hd": "other.example",
    },
}
"""Google Workspace accounts (an ``hd`` claim) for ``start_idp(accounts=...)``; the built-in
alice, bob and carol have none, like consumer accounts."""


class IdPUnavailable(RuntimeError):
    """The test IdP cannot run on this machine (no ``node``, or its packages are not installed)."""


@dataclass
class RunningIdP:
    """A running test IdP: ``issuer`` is exact (what discovery and ID Tokens say)."""

    issuer: str
    port: int
    discovery_url: str
    process: subprocess.Popen[bytes] = field(repr=False)
    log_path: str = field(repr=False)

    def stop(self) -> None:
        """Stop the server (idempotent)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def log_text(self) -> str:
        """What the server wrote to stderr so far (for failure messages)."""
        return Path(self.log_path).read_text("utf-8", "replace")


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        raise IdPUnavailable("the test IdP needs Node.js: `node` is not on PATH")
    if not (IDP_DIR / "node_modules" / "oidc-provider").is_dir():
        raise IdPUnavailable(
            f"the test IdP's packages are not installed: run `npm ci --prefix {IDP_DIR}`"
        )
    return node


@contextmanager
def start_idp(
    clients: list[dict[str, Any]],
    *,
    prefix: str = "",
    accounts: Mapping[str, Mapping[str, Any]] | None = None,
    rotate_refresh: bool = False,
    options: Mapping[str, Any] | None = None,
) -> Iterator[RunningIdP]:
    """Run the test IdP for the duration of the ``with`` block.

    ``clients`` are oidc-provider client metadata (``client_id``, ``client_secret``,
    ``redirect_uris``, optionally ``token_endpoint_auth_method``...). ``prefix`` is the issuer path
    (``/realms/test`` gives Keycloak's layout), ``accounts`` are merged over the built-in users
    (alice, bob, carol), ``rotate_refresh`` makes every refresh rotate the refresh token.
    ``options`` are further server.mjs options (``idTokenClaims``, ``ttl``, ``pkceRequired``...).
    Raises :class:`IdPUnavailable` when Node or the IdP's packages are missing, ``RuntimeError``
    when the server fails to start.
    """
    node = _node()
    server_options: dict[str, Any] = {
        "port": 0,
        "prefix": prefix,
        "clients": clients,
        "rotateRefreshToken": rotate_refresh,
        **(options or {}),
    }
    if accounts is not None:
        server_options["accounts"] = {name: dict(claims) for name, claims in accounts.items()}

    env = {key: value for key, value in os.environ.items() if key != "IDP_PORT"}
    with ExitStack() as stack:
        reports = stack.enter_context(tempfile.TemporaryDirectory(prefix="idp-report-"))
        command = [
            node,
            "--report-on-signal",
            "--report-signal=SIGUSR2",
            f"--report-directory={reports}",
            str(SERVER_SCRIPT),
            json.dumps(server_options),
        ]
        for attempt in range(1, START_ATTEMPTS + 1):
            stdout = stack.enter_context(tempfile.TemporaryFile())
            log = stack.enter_context(tempfile.NamedTemporaryFile(prefix="idp-", suffix=".log"))
            process = subprocess.Popen(
                command, cwd=IDP_DIR, stdin=subprocess.DEVNULL, stdout=stdout, stderr=log, env=env
            )
            idp = RunningIdP(
                issuer="", port=0, discovery_url="", process=process, log_path=log.name
            )
            stack.callback(idp.stop)
            try:
                info = _wait_for_listening(process, stdout, idp)
                break
            except _NotListening as exc:
                where = _stuck_at(process, Path(reports))
                idp.stop()
                if attempt == START_ATTEMPTS:
                    raise RuntimeError(f"{exc}\nstuck at: {where}") from None
                print(
                    f"tests/idp_server.py: the test IdP did not listen within {START_TIMEOUT:.0f} s"
                    f" (attempt {attempt} of {START_ATTEMPTS}), stuck at: {where}; "
                    "starting it again",
                    file=sys.stderr,
                    flush=True,
                )
        idp.issuer, idp.port, idp.discovery_url = (
            info["issuer"],
            int(info["port"]),
            info["discovery"],
        )
        yield idp


class _NotListening(RuntimeError):
    """The IdP is running but has not said where it listens."""


def _stuck_at(process: subprocess.Popen[bytes], reports: Path) -> str:
    """Where a running Node process is: the top of the JavaScript and native stacks of the
    diagnostic report it writes on SIGUSR2 (``--report-on-signal``)."""
    before = set(reports.glob("*.json"))
    try:
        process.send_signal(signal.SIGUSR2)
    except ProcessLookupError:
        return "(the process is gone)"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for path in set(reports.glob("*.json")) - before:
            try:
                report = json.loads(path.read_text("utf-8", "replace"))
            except ValueError:  # still being written
                continue
            js = report.get("javascriptStack", {}).get("stack", [])[:6]
            native = [frame.get("symbol", "?") for frame in report.get("nativeStack", [])]
            # The first frames are the report's own writing.
            own = [i for i, symbol in enumerate(native) if "report" in symbol.lower()]
            native = native[own[-1] + 1 :] if own else native
            return f"JavaScript {js or '(none)'}; native {native[:8]}"
        time.sleep(0.1)
    return "(no diagnostic report within 5 s)"


def _wait_for_listening(
    process: subprocess.Popen[bytes], stdout: IO[bytes], idp: RunningIdP
) -> dict[str, Any]:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        stdout.seek(0)
        line = stdout.readline()
        if line.endswith(b"\n"):
            info: dict[str, Any] = json.loads(line)
            return info
        if process.poll() is not None:
            break
        time.sleep(0.02)
    log_tail = idp.log_text()[-2000:]
    if process.poll() is not None:
        raise RuntimeError(f"the test IdP exited; its log:\n{log_tail}")
    raise _NotListening(
        f"the test IdP did not listen within {START_TIMEOUT}s; its log:\n{log_tail}"
    )


@contextmanager
def idp_or_skip(
    clients: list[dict[str, Any]],
    *,
    prefix: str = "",
    accounts: Mapping[str, Mapping[str, Any]] | None = None,
    rotate_refresh: bool = False,
    options: Mapping[str, Any] | None = None,
) -> Iterator[RunningIdP]:
    """:func:`start_idp` for pytest: skips when the IdP cannot run here, fails instead when the
    environment sets ``BROKER_TEST_REQUIRE_ALL=1``."""
    import pytest

    with ExitStack() as stack:
        try:
            idp = stack.enter_context(
                start_idp(
                    clients,
                    prefix=prefix,
                    accounts=accounts,
                    rotate_refresh=rotate_refresh,
                    options=options,
                )
            )
        except IdPUnavailable as exc:
            if os.environ.get("BROKER_TEST_REQUIRE_ALL") == "1":
                pytest.fail(f"test IdP required (BROKER_TEST_REQUIRE_ALL=1): {exc}")
            pytest.skip(str(exc))
        yield idp


def browse_to_redirect_uri(
    url: str, redirect_uri: str = REDIRECT_URI, *, sign_in: tuple[str, str] | None = None
) -> dict[str, str]:
    """Play the browser: GET ``url`` and follow redirects with cookies until the IdP sends us to
    ``redirect_uri`` (not fetched); return that redirect's query parameters. The test IdP's
    interaction route logs in and consents on its own, so there is no form to fill, unless it
    runs with ``signIn: "form"``: then ``sign_in`` (username, password) fills its form."""
    with httpx.Client(follow_redirects=False, timeout=10) as browser:
        for _ in range(20):
            response = browser.get(url)
            if response.status_code == 200 and sign_in is not None:
                response = submit_sign_in(browser, url, response.text, *sign_in)
            if response.status_code not in (301, 302, 303, 307, 308):
                raise AssertionError(
                    f"the IdP answered {response.status_code} at {url}: {response.text[:500]}"
                )
            url = urljoin(url, response.headers["location"])
            if url.startswith(redirect_uri):
                return dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))
    raise AssertionError("too many redirects before the redirect_uri")


SIGN_IN_ACTION = re.compile(r'<form method="post" action="([^"]+)"')


def submit_sign_in(
    browser: httpx.Client, page_url: str, page: str, username: str, password: str
) -> httpx.Response:
    """Post ``username`` and ``password`` to the test IdP's sign-in form (``signIn: "form"``)
    in ``page``, as a browser does."""
    action = SIGN_IN_ACTION.search(page)
    if action is None:
        raise AssertionError(f"no sign-in form at {page_url}: {page[:500]}")
    return browser.post(
        urljoin(page_url, html.unescape(action.group(1))),
        data={"username": username, "password": password},
    )


@dataclass(frozen=True)
class UpstreamLogin:
    """One browser trip through the upstream: what the broker sent and what came back."""

    request: LoginRequest
    url: str
    params: dict[str, str]

    def callback(self, **changes: Any) -> CallbackRequest:
        """The callback the broker would hand the provider; ``changes`` alter one field."""
        callback = CallbackRequest(
            params=self.params,
            nonce=self.request.nonce,
            code_verifier=self.request.code_verifier,
            redirect_uri=self.request.redirect_uri,
        )
        return replace(callback, **changes)


def new_login_request(login_hint: str | None = None) -> LoginRequest:
    """Fresh secrets, as the broker makes them for each login."""
    return LoginRequest(
        state=secrets.token_urlsafe(24),
        nonce=secrets.token_urlsafe(24),
        code_verifier=secrets.token_urlsafe(48),
        redirect_uri=REDIRECT_URI,
        login_hint=login_hint,
    )


def upstream_login(
    provider: RedirectLogin, http: httpx.Client, login_hint: str | None = None
) -> UpstreamLogin:
    """The broker asks ``provider`` for the login URL and the browser follows it through the IdP
    (login and consent happen on their own) to the redirect_uri."""
    request = new_login_request(login_hint)
    url = provider.login_url(request, http)
    assert isinstance(url, str)
    params = browse_to_redirect_uri(url)
    assert params.get("state") == request.state
    return UpstreamLogin(request=request, url=url, params=params)


# -- a hand-written OP, for what a certified one never sends ------------------------------------

FAKE_OP_ROUTES = {
    "authorization": "/authorize",
    "token": "/token",
    "jwks": "/jwks",
    "userinfo": "/userinfo",
}
FAKE_KEYCLOAK_ROUTES = {
    "authorization": "/protocol/openid-connect/auth",
    "token": "/protocol/openid-connect/token",
    "jwks": "/protocol/openid-connect/certs",
    "userinfo": "/protocol/openid-connect/userinfo",
}


class FakeOP:
    """Discovery, JWKS, token and UserInfo endpoints on pytest-httpserver, answering exactly what
    a test sets: HS256 or unsigned ID Tokens, foreign audiences, a lying UserInfo, Keycloak's JWT
    access tokens, Google's issuer.

    ``prefix`` is the path the endpoints live under (``routes`` below it); ``issuer`` is what
    discovery and tokens name (default: the URL of ``prefix``). The token endpoint answers both
    grants with ``access_token`` and ``id_token`` (plus ``token_extra``).
    """

    def __init__(
        self,
        server: HTTPServer,
        keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey],
        *,
        prefix: str = "/op",
        routes: Mapping[str, str] = FAKE_OP_ROUTES,
        issuer: str | None = None,
    ) -> None:
        self.server = server
        self.base = server.url_for(prefix)
        self.issuer = issuer or self.base
        self.key, self.other_key = keys
        self.jwks_answers: list[list[dict[str, Any]]] = [[self.jwk(self.key, "k1")]]
        self.jwks_requests = 0
        self.discovery: dict[str, Any] = {
            "issuer": self.issuer,
            "authorization_endpoint": self.base + routes["authorization"],
            "token_endpoint": self.base + routes["token"],
            "jwks_uri": self.base + routes["jwks"],
            "userinfo_endpoint": self.base + routes["userinfo"],
            "id_token_signing_alg_values_supported": ["RS256"],
        }
        self.id_token = ""
        self.access_token = "at-1"
        self.token_extra: dict[str, Any] = {}
        self.token_status = 200
        self.userinfo: dict[str, Any] = {"sub": "user-1"}
        self.userinfo_status = 200
        server.expect_request(f"{prefix}/.well-known/openid-configuration").respond_with_handler(
            lambda _request: json_response(self.discovery)
        )
        server.expect_request(prefix + routes["jwks"]).respond_with_handler(self._jwks)
        server.expect_request(prefix + routes["token"], method="POST").respond_with_handler(
            lambda _request: json_response(
                {
                    "access_token": self.access_token,
                    "token_type": "Bearer",
                    "id_token": self.id_token,
                    **self.token_extra,
                },
                self.token_status,
            )
        )
        server.expect_request(prefix + routes["userinfo"]).respond_with_handler(
            lambda _request: json_response(self.userinfo, self.userinfo_status)
        )

    @staticmethod
    def jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
        jwk: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
        return {**jwk, "kid": kid, "use": "sig"}

    def _jwks(self, _request: Request) -> Response:
        answer = self.jwks_answers[min(self.jwks_requests, len(self.jwks_answers) - 1)]
        self.jwks_requests += 1
        return json_response({"keys": answer})

    def sign(self, *, key: Any = None, kid: str = "k1", alg: str = "RS256", **claims: Any) -> str:
        """A JWT (an ID Token unless the claims say otherwise) for ``user-1``, issued to the
        broker's client; a claim given as ``None`` is left out."""
        now = int(time.time())
        payload = {
            "iss": self.issuer,
            "sub": "user-1",
            "aud": CLIENT_ID,
            "iat": now,
            "exp": now + 300,
            "nonce": "n-1",
            **claims,
        }
        payload = {name: value for name, value in payload.items() if value is not None}
        return jwt.encode(payload, key or self.key, algorithm=alg, headers={"kid": kid})

    def callback(self) -> CallbackRequest:
        """The callback of a login whose nonce was ``n-1``."""
        return CallbackRequest(
            params={"code": "c-1", "state": "s-1"},
            nonce="n-1",
            code_verifier="v" * 43,
            redirect_uri=REDIRECT_URI,
        )

    def redeem(self, provider: RedirectLogin, http: httpx.Client, id_token: str) -> LoginResult:
        """The token endpoint answers ``id_token``; ``provider`` handles the callback."""
        self.id_token = id_token
        return provider.handle_callback(self.callback(), http)


def json_response(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")
