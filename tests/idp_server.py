"""Start and stop the test OpenID provider (``tests/idp/server.mjs``, panva's ``oidc-provider``).

The IdP is a real, certified OpenID Connect server in a Node process. ``start_idp`` runs it on a
free loopback port and yields where it listens; ``idp_or_skip`` turns a machine without Node (or
without ``npm install --prefix tests/idp``) into a pytest skip, or into a failure when
``BROKER_TEST_REQUIRE_ALL=1`` (CI).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl, urljoin, urlsplit

import httpx

from providers.contract import CallbackRequest, LoginRequest, Provider

IDP_DIR = Path(__file__).resolve().parent / "idp"
SERVER_SCRIPT = IDP_DIR / "server.mjs"
START_TIMEOUT = 30.0

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
        stdout = stack.enter_context(tempfile.TemporaryFile())
        log = stack.enter_context(tempfile.NamedTemporaryFile(prefix="idp-", suffix=".log"))
        process = subprocess.Popen(
            [node, str(SERVER_SCRIPT), json.dumps(server_options)],
            cwd=IDP_DIR,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=log,
            env=env,
        )
        idp = RunningIdP(issuer="", port=0, discovery_url="", process=process, log_path=log.name)
        stack.callback(idp.stop)
        info = _wait_for_listening(process, stdout, idp)
        idp.issuer, idp.port, idp.discovery_url = (
            info["issuer"],
            int(info["port"]),
            info["discovery"],
        )
        yield idp


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
    reason = "exited" if process.poll() is not None else f"did not listen within {START_TIMEOUT}s"
    log_tail = idp.log_text()[-2000:]
    raise RuntimeError(f"the test IdP {reason}; its log:\n{log_tail}")


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


def browse_to_redirect_uri(url: str, redirect_uri: str = REDIRECT_URI) -> dict[str, str]:
    """Play the browser: GET ``url`` and follow redirects with cookies until the IdP sends us to
    ``redirect_uri`` (not fetched); return that redirect's query parameters. The test IdP's
    interaction route logs in and consents on its own, so there is no form to fill."""
    with httpx.Client(follow_redirects=False, timeout=10) as browser:
        for _ in range(20):
            response = browser.get(url)
            if response.status_code not in (301, 302, 303, 307, 308):
                raise AssertionError(
                    f"the IdP answered {response.status_code} at {url}: {response.text[:500]}"
                )
            url = urljoin(url, response.headers["location"])
            if url.startswith(redirect_uri):
                return dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))
    raise AssertionError("too many redirects before the redirect_uri")


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
    provider: Provider, http: httpx.Client, login_hint: str | None = None
) -> UpstreamLogin:
    """The broker asks ``provider`` for the login URL and the browser follows it through the IdP
    (login and consent happen on their own) to the redirect_uri."""
    request = new_login_request(login_hint)
    url = provider.login_url(request, http)
    assert isinstance(url, str)
    params = browse_to_redirect_uri(url)
    assert params.get("state") == request.state
    return UpstreamLogin(request=request, url=url, params=params)
