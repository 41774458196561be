"""``broker login``: an access token for one MCP server, for people and scripts.

The native-app authorization code flow (RFC 8252) run by Authlib's OAuth 2.0 client:

- RFC 8414 section 3: the endpoints come from the broker's metadata, and its ``issuer`` MUST be
  identical to the issuer it was fetched for (section 3.3).
- RFC 8252 section 7.3: the redirect URI is ``http://127.0.0.1:<port>/callback`` on a loopback
  listener with a port the operating system picks; the broker accepts any port for a registered
  loopback URI, so the client registers ``http://127.0.0.1/callback`` once.
- RFC 7636: PKCE with S256 (section 4.2), the only method the broker accepts.
- RFC 6749 section 10.12: ``state`` binds the response to this request; the listener refuses a
  response with any other state and keeps waiting for the right one.
- RFC 9207 section 2.4: an ``iss`` parameter that differs from the issuer is refused, and so is a
  response without one when the metadata says the broker sends it.
- RFC 8707 section 2: ``resource`` on the authorization, token and refresh requests.
- RFC 7591: without ``--client-id``, a public client (``token_endpoint_auth_method: none``) is
  registered and remembered in the token file, so later runs reuse it.

Everything but the token (or ``--json``'s token response) goes to standard error, so
``TOKEN=$(broker login --resource ...)`` works. See docs/login.md.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import html
import json
import os
import secrets
import sys
import tempfile
import threading
import webbrowser
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import click
import httpx2
from authlib.common.security import generate_token
from authlib.integrations.httpx_client import OAuth2Client, OAuthError

from .config import ENV_CONFIG

CALLBACK_PATH = "/callback"
REGISTERED_REDIRECT_URI = f"http://127.0.0.1{CALLBACK_PATH}"
CLIENT_NAME = "broker login"
HTTP_TIMEOUT = 30.0


class LoginFailed(Exception):
    """The login cannot go on; the message is the one line the user sees."""


def oauth_error_line(error: Any, description: Any) -> str:
    """``error: description`` from an OAuth error response, printable and short."""
    code = _printable(error, 80) or "error"
    text = _printable(description, 300)
    return f"{code}: {text}" if text else code


def _seconds(count: float) -> str:
    return f"{count:g} second" + ("" if count == 1 else "s")


def _printable(value: Any, limit: int) -> str:
    # Error responses arrive through a redirect anyone can forge: no terminal control sequences.
    text = "".join(c for c in str(value or "") if c.isprintable())
    return text[:limit]


# -- the broker ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuthorizationServer:
    """The broker as its RFC 8414 metadata describes it."""

    issuer: str
    metadata: dict[str, Any]

    def endpoint(self, name: str) -> str:
        value = self.metadata.get(name)
        if not isinstance(value, str) or not value:
            raise LoginFailed(f"the broker's metadata has no {name}")
        return value

    @property
    def sends_iss(self) -> bool:
        return self.metadata.get("authorization_response_iss_parameter_supported") is True


def metadata_url(issuer: str) -> str:
    """RFC 8414 section 3.1: the well-known name goes between the host and the issuer's path."""
    parts = urlsplit(issuer)
    return f"{parts.scheme}://{parts.netloc}/.well-known/oauth-authorization-server{parts.path}"


def discover(client: OAuth2Client, issuer: str) -> AuthorizationServer:
    """Fetch and check the broker's metadata (RFC 8414 section 3.3, RFC 7636 section 4.2)."""
    url = metadata_url(issuer)
    with _http_errors(f"cannot fetch the broker's metadata from {url}"):
        response = client.request("GET", url, withhold_token=True)
    if response.status_code != 200:
        raise LoginFailed(f"{url} answered HTTP {response.status_code}, not the broker's metadata")
    try:
        metadata = response.json()
    except ValueError:
        metadata = None
    if not isinstance(metadata, dict):
        raise LoginFailed(f"{url} did not answer a JSON object")
    if metadata.get("issuer") != issuer:
        raise LoginFailed(
            f"the metadata at {url} names the issuer {_printable(metadata.get('issuer'), 200)!r},"
            f" not {issuer} (RFC 8414 section 3.3)"
        )
    if "S256" not in (metadata.get("code_challenge_methods_supported") or ()):
        raise LoginFailed("the broker does not list PKCE S256 in code_challenge_methods_supported")
    return AuthorizationServer(issuer, metadata)


def register_client(client: OAuth2Client, server: AuthorizationServer) -> str:
    """RFC 7591 section 3.1: register a public native client with the loopback redirect URI."""
    if not server.metadata.get("registration_endpoint"):
        raise LoginFailed("the broker does not offer dynamic client registration; pass --client-id")
    url = server.endpoint("registration_endpoint")
    body = {
        "client_name": CLIENT_NAME,
        "redirect_uris": [REGISTERED_REDIRECT_URI],
        "token_endpoint_auth_method": "none",
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "application_type": "native",
    }
    with _http_errors("cannot register a client with the broker"):
        response = client.request("POST", url, json=body, withhold_token=True)
    answer = _json_object(response)
    if response.status_code not in (200, 201) or not isinstance(answer.get("client_id"), str):
        if "error" in answer:
            raise LoginFailed(
                "registration refused: "
                + oauth_error_line(answer["error"], answer.get("error_description"))
            )
        raise LoginFailed(f"registration failed: the broker answered HTTP {response.status_code}")
    return str(answer["client_id"])


def client_is_known(client: OAuth2Client, server: AuthorizationServer, redirect_uri: str) -> bool:
    """Whether the broker knows the client and this redirect URI, asked before a browser is
    involved: an authorization request without PKCE is refused with a redirect to a validated
    redirect URI, but with an HTTP 400 page for an unknown client or redirect URI (RFC 6749
    section 4.1.2.1), which would leave the user at that page and this command waiting."""
    url = server.endpoint("authorization_endpoint")
    params = {"response_type": "code", "client_id": client.client_id, "redirect_uri": redirect_uri}
    with _http_errors("cannot reach the broker's authorization endpoint"):
        response = client.request("GET", url, params=params, withhold_token=True)
    return int(response.status_code) != 400


@contextlib.contextmanager
def _http_errors(doing: str) -> Iterator[None]:
    try:
        yield
    except httpx2.HTTPStatusError as exc:
        raise LoginFailed(f"{doing}: HTTP {exc.response.status_code}") from None
    except httpx2.HTTPError as exc:
        raise LoginFailed(f"{doing}: {_printable(exc, 300) or type(exc).__name__}") from None


def _json_object(response: Any) -> dict[str, Any]:
    try:
        value = response.json()
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# -- the loopback listener ----------------------------------------------------------------------

PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>{title}</title></head>
<body>
<h1>{title}</h1>
<p>{message}</p>
</body>
</html>
"""
PAGE_HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}


@dataclass(frozen=True)
class Answer:
    status: int
    title: str
    message: str
    settles: bool = False
    """This answer ends the login: the waiting command goes on once the page is sent (before,
    it could exit while the browser still waited for the page)."""


class LoopbackReceiver:
    """The RFC 8252 section 7.3 loopback redirect: an HTTP listener on 127.0.0.1 on an ephemeral
    port that waits for the one authorization response carrying this login's ``state``."""

    def __init__(self, issuer: str, *, iss_required: bool) -> None:
        self.issuer = issuer
        self.iss_required = iss_required
        self.state = generate_token(43)
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._outcome: str | LoginFailed | None = None
        self._server = _CallbackServer(self)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def redirect_uri(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{CALLBACK_PATH}"

    def __enter__(self) -> LoopbackReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def wait(self, timeout: float) -> str:
        """The authorization code, or :class:`LoginFailed` (a refusal, a timeout)."""
        if not self._done.wait(timeout):
            raise LoginFailed(
                f"timed out: no sign-in response within {_seconds(timeout)} (--timeout)"
            )
        outcome = self._outcome
        if isinstance(outcome, LoginFailed):
            raise outcome
        assert outcome is not None
        return outcome

    def answer(self, target: str) -> Answer:
        """What the listener answers to a request for ``target`` (a path and query)."""
        parts = urlsplit(target)
        if parts.path != CALLBACK_PATH:
            return Answer(404, "Not found", "This address only receives the broker's sign-in.")
        params = parse_qs(parts.query, keep_blank_values=True)
        state = params.get("state", [""])
        # RFC 6749 section 10.12: only the response to this very request is accepted.
        if len(state) != 1 or not secrets.compare_digest(
            state[0].encode("utf-8", "replace"), self.state.encode()
        ):
            click.echo(
                "broker login: refused a response with a wrong or missing state "
                "at the loopback listener",
                err=True,
            )
            return Answer(
                400, "Sign-in refused", "This response does not belong to the sign-in in progress."
            )
        if any(len(values) > 1 for values in params.values()):
            # RFC 6749 section 3.1: parameters MUST NOT be included more than once.
            outcome: str | LoginFailed = LoginFailed(
                "the authorization response repeats a parameter; refused"
            )
        else:
            outcome = self._judge({name: values[0] for name, values in params.items()})
        with self._lock:
            if self._outcome is not None:
                return Answer(
                    409, "Already done", "This sign-in is already over; you can close this window."
                )
            self._outcome = outcome
        if isinstance(outcome, LoginFailed):
            return Answer(
                200,
                "Sign-in did not complete",
                "The terminal says why. You can close this window.",
                settles=True,
            )
        return Answer(
            200, "Signed in", "You can close this window and return to the terminal.", settles=True
        )

    def settle(self) -> None:
        """The page of the answer that ended the login is sent: :meth:`wait` returns."""
        self._done.set()

    def _judge(self, params: dict[str, str]) -> str | LoginFailed:
        """The code, or why the response is refused (RFC 9207 section 2.4 first: errors too)."""
        iss = params.get("iss")
        if iss is not None and iss != self.issuer:
            return LoginFailed(
                f"the authorization response names the issuer {_printable(iss, 200)!r}, "
                f"not {self.issuer} (RFC 9207); refused"
            )
        if iss is None and self.iss_required:
            return LoginFailed(
                "the authorization response has no iss although the broker's metadata "
                "promises it (RFC 9207); refused"
            )
        if "error" in params:
            return LoginFailed(oauth_error_line(params["error"], params.get("error_description")))
        code = params.get("code")
        if not code:
            return LoginFailed("the authorization response has neither a code nor an error")
        return code


class _CallbackServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, receiver: LoopbackReceiver) -> None:
        super().__init__(("127.0.0.1", 0), _CallbackHandler)
        self.receiver = receiver


class _CallbackHandler(BaseHTTPRequestHandler):
    server: _CallbackServer
    timeout = 10  # a browser's idle pre-connection must not hold a thread forever

    def do_GET(self) -> None:
        answer = self.server.receiver.answer(self.path)
        body = PAGE.format(
            title=html.escape(answer.title), message=html.escape(answer.message)
        ).encode()
        try:
            self.send_response(answer.status)
            for name, value in PAGE_HEADERS.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        finally:
            if answer.settles:  # also when the browser went away meanwhile
                self.server.receiver.settle()

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: the request line holds the authorization code."""


# -- the token file -----------------------------------------------------------------------------


def read_token_file(path: Path) -> dict[str, Any] | None:
    """The stored tokens and client, ``None`` when the file does not exist."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise click.BadParameter(
            f"{path}: cannot read ({exc.strerror})", param_hint="--token-file"
        ) from None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path}: not a token file", param_hint="--token-file")
    if path.stat().st_mode & 0o077:
        try:
            path.chmod(0o600)
            done = "its mode is now 0600"
        except OSError as exc:
            done = f"cannot change its mode: {exc.strerror}"
        click.echo(f"broker login: {path} was readable by others; {done}", err=True)
    return data


def write_token_file(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` atomically with ``data``, never readable by anyone but the owner: the
    temporary file is created with mode 0600 in the same directory, then renamed over it."""
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise LoginFailed(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            os.fchmod(file.fileno(), 0o600)
            json.dump(data, file, indent=2)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise LoginFailed(f"cannot write {path}: {exc.strerror}") from None


def token_record(
    token: dict[str, Any], *, issuer: str, client_id: str, registration: str, resource: str
) -> dict[str, Any]:
    return {
        "access_token": token["access_token"],
        "refresh_token": token.get("refresh_token"),
        "token_type": token.get("token_type", "Bearer"),
        "expires_at": token.get("expires_at"),
        "resource": resource,
        "scope": token.get("scope", ""),
        "issuer": issuer,
        "client_id": client_id,
        "client_registration": registration,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


# -- the command --------------------------------------------------------------------------------


@click.command("login")
@click.option(
    "--resource",
    "resource",
    metavar="URI",
    help="The MCP server's canonical URI: the token's audience (with --refresh, default: the "
    "token file's).",
)
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    metavar="SCOPE",
    help="A scope to ask for (repeatable or space-separated; default: every scope you are "
    "entitled to).",
)
@click.option(
    "--issuer",
    metavar="URL",
    help=f"The broker's issuer (default: the issuer of --config/${ENV_CONFIG}, else the token "
    "file's; with --refresh, the token file's).",
)
@click.option(
    "--client-id",
    metavar="ID",
    help="A pre-registered public client whose redirect URIs include http://127.0.0.1/callback "
    "(default: register one, and remember it in --token-file).",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="PATH",
    help="Keep the tokens and the client in this JSON file (mode 0600).",
)
@click.option(
    "--refresh",
    is_flag=True,
    help="Refresh the token of --token-file with its refresh token (no browser).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the token response instead of the token."
)
@click.option("--no-browser", is_flag=True, help="Print the URL to open instead of opening it.")
@click.option(
    "--timeout",
    type=click.IntRange(min=1),
    default=300,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for the sign-in.",
)
@click.pass_context
def login(
    ctx: click.Context,
    resource: str | None,
    scopes: tuple[str, ...],
    issuer: str | None,
    client_id: str | None,
    token_file: Path | None,
    refresh: bool,
    as_json: bool,
    no_browser: bool,
    timeout: int,
) -> None:
    """Sign in through the browser and print an access token for one MCP server."""
    if token_file is not None and not token_file.parent.is_dir():
        raise click.BadParameter(
            f"{token_file.parent}: no such directory", param_hint="--token-file"
        )
    stored = read_token_file(token_file) if token_file is not None else None
    if refresh and stored is None:
        raise click.UsageError(
            "--refresh needs --token-file with a stored token"
            + (f" ({token_file} does not exist)" if token_file else "")
        )
    issuer = _issuer(ctx, issuer, stored, refresh)
    resource = resource or (stored.get("resource") if refresh and stored else None)
    if not resource:
        raise click.UsageError("Missing option '--resource'.")
    parts = urlsplit(resource)
    if not parts.scheme or not parts.netloc or parts.fragment:
        raise click.BadParameter(
            "an absolute URI without a fragment (RFC 8707 section 2)", param_hint="--resource"
        )
    scope = " ".join(dict.fromkeys(" ".join(scopes).split())) or None
    try:
        with OAuth2Client(
            scope=scope, code_challenge_method="S256", timeout=HTTP_TIMEOUT
        ) as client:
            server = discover(client, issuer)
            if refresh:
                assert stored is not None
                client.client_id = client_id or stored.get("client_id")
                registration = str(stored.get("client_registration") or "dynamic")
                token = _refresh(client, server, stored, token_file, resource)
            else:
                registration = _choose_client(client, server, client_id, stored)
                token = _sign_in(client, server, resource, no_browser, timeout)
        if not isinstance(token.get("access_token"), str) or not token["access_token"]:
            raise LoginFailed("the token response has no access_token")
    except LoginFailed as exc:
        click.echo(f"broker login: {exc}", err=True)
        sys.exit(1)
    if token_file is not None:
        record = token_record(
            token,
            issuer=issuer,
            client_id=str(client.client_id),
            registration=registration,
            resource=resource,
        )
        try:
            write_token_file(token_file, record)
        except LoginFailed as exc:
            click.echo(f"broker login: {exc}", err=True)
            sys.exit(1)
    click.echo(json.dumps(dict(token), indent=2) if as_json else token["access_token"])


def _issuer(
    ctx: click.Context, given: str | None, stored: dict[str, Any] | None, refresh: bool
) -> str:
    """--issuer, else (to refresh) the token file's, else the config's, else the token file's."""
    stored_issuer = stored.get("issuer") if stored else None
    issuer = given or (stored_issuer if refresh and isinstance(stored_issuer, str) else None)
    if issuer is None and (ctx.find_root().params.get("config") or os.environ.get(ENV_CONFIG)):
        from .cli import _settings

        issuer = str(_settings(ctx).issuer)
    if issuer is None and isinstance(stored_issuer, str):
        issuer = stored_issuer
    if not issuer:
        raise click.UsageError(
            f"name the broker with --issuer URL (or --config / ${ENV_CONFIG} with its config)"
        )
    issuer = issuer.rstrip("/")  # the broker's issuer never ends with a slash
    if refresh and stored_issuer != issuer:
        raise click.UsageError(f"the token file holds a token of {stored_issuer}, not of {issuer}")
    return issuer


def _choose_client(
    client: OAuth2Client,
    server: AuthorizationServer,
    client_id: str | None,
    stored: dict[str, Any] | None,
) -> str:
    """Set the client's id: --client-id, the token file's for this issuer, or a new
    registration; returns how it was registered ("pre-registered" or "dynamic")."""
    probe_uri = "http://127.0.0.1:1" + CALLBACK_PATH  # any port does (RFC 8252 section 7.3)
    if client_id:
        client.client_id = client_id
        if not client_is_known(client, server, probe_uri):
            raise LoginFailed(
                f"the broker does not know the client {client_id} with the redirect URI "
                f"{REGISTERED_REDIRECT_URI}"
            )
        return "pre-registered"
    if stored and stored.get("issuer") == server.issuer and stored.get("client_id"):
        client.client_id = str(stored["client_id"])
        registration = str(stored.get("client_registration") or "dynamic")
        if client_is_known(client, server, probe_uri):
            return registration
        if registration != "dynamic":
            raise LoginFailed(
                f"the broker no longer knows the client {client.client_id} of the token file"
            )
        click.echo(
            "broker login: the stored client registration has expired; registering again",
            err=True,
        )
    client.client_id = register_client(client, server)
    click.echo(f"broker login: registered the client {client.client_id}", err=True)
    return "dynamic"


def _sign_in(
    client: OAuth2Client, server: AuthorizationServer, resource: str, no_browser: bool, timeout: int
) -> dict[str, Any]:
    """The authorization code flow with PKCE through the user's browser."""
    verifier = generate_token(64)  # RFC 7636 section 4.1: 43 to 128 unreserved characters
    with LoopbackReceiver(server.issuer, iss_required=server.sends_iss) as receiver:
        url, _ = client.create_authorization_url(
            server.endpoint("authorization_endpoint"),
            state=receiver.state,
            code_verifier=verifier,
            redirect_uri=receiver.redirect_uri,
            resource=resource,
        )
        if no_browser:
            click.echo(f"Open this URL in a browser to sign in:\n\n  {url}\n", err=True)
        else:
            click.echo(
                f"Opening a browser to sign in. If none appears, open this URL:\n\n  {url}\n",
                err=True,
            )
            opened = False
            with _stdout_to_stderr(), contextlib.suppress(webbrowser.Error):
                opened = webbrowser.open(url)
            if not opened:
                click.echo("No browser could be started: open the URL yourself.", err=True)
        click.echo(f"Waiting up to {_seconds(timeout)} for the sign-in ...", err=True)
        code = receiver.wait(timeout)
        redirect_uri = receiver.redirect_uri
    with _http_errors("the token request failed"), _oauth_errors():
        token = client.fetch_token(
            server.endpoint("token_endpoint"),
            grant_type="authorization_code",
            code=code,
            code_verifier=verifier,
            redirect_uri=redirect_uri,
            resource=resource,
        )
    return dict(token)


def _refresh(
    client: OAuth2Client,
    server: AuthorizationServer,
    stored: dict[str, Any],
    token_file: Path | None,
    resource: str,
) -> dict[str, Any]:
    """RFC 6749 section 6 with ``resource`` (RFC 8707 section 2.2); the broker rotates the
    refresh token."""
    refresh_token = stored.get("refresh_token")
    if not isinstance(refresh_token, str) or not refresh_token:
        raise LoginFailed(f"{token_file} holds no refresh token; sign in again without --refresh")
    if not client.client_id:
        raise LoginFailed(f"{token_file} names no client_id; sign in again without --refresh")
    with _http_errors("the refresh request failed"), _oauth_errors():
        token = client.refresh_token(
            server.endpoint("token_endpoint"), refresh_token=refresh_token, resource=resource
        )
    return dict(token)


@contextlib.contextmanager
def _oauth_errors() -> Iterator[None]:
    try:
        yield
    except OAuthError as exc:
        raise LoginFailed(oauth_error_line(exc.error, exc.description)) from None
    except ValueError as exc:  # Authlib: a token response that is not a JSON object
        raise LoginFailed(_printable(exc, 300)) from None


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Browsers launched by :mod:`webbrowser` inherit standard output and some print to it
    ("Opening in existing browser session."), which would end up next to the token."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(2, 1)
    except (OSError, ValueError):
        yield
        return
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
