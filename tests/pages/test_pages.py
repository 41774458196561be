"""The sign-in pages in a real browser: headless Chromium (Debian's package) driven by Playwright.

A broker is served over real HTTP on a free loopback port, its issuer equal to the served URL. The
client's redirect target and a page from another origin (for the framing check) are served by a
second small server. Covers the consent and login pages, the way back to the client (``code``,
``state``, ``iss``), deny, the straight-through second authorization, the error pages, the security
headers, framing refused for real, the cookies, and the stylesheet under the CSP. Screenshots go to
``tests/artifacts/`` (gitignored).
"""

from __future__ import annotations

import html
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import pytest
from flask import Flask
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Page,
    Request,
    Response,
    Route,
    sync_playwright,
)

from tests.conftest import PASSWORDS
from tests.support import (
    RESOURCE,
    authorize_params,
    free_port,
    pkce,
    query,
    redeem,
    serve_wsgi,
    sign_in_local,
    unavailable,
)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CLIENT_NAME = "Browser test client"
SCOPES = "demo:read demo:write"

# The browser suite runs on SQLite only, except one happy path that also runs on PostgreSQL.
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


# -- servers ---------------------------------------------------------------------------------


# Requests the outside server saw: (path, query string, Referer header or None).
OUTSIDE_SEEN: list[tuple[str, str, str | None]] = []


def _outside_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """Another origin: the client's redirect target (``/callback``) and a page that frames the
    URLs given as ``src`` parameters (``/frame?src=...&src=...``), nothing else."""
    path = environ.get("PATH_INFO", "")
    OUTSIDE_SEEN.append((path, environ.get("QUERY_STRING", ""), environ.get("HTTP_REFERER")))
    if path == "/callback":
        body = '<!doctype html><title>Callback</title><p id="done">Callback received</p>'
    elif path == "/frame":
        sources = parse_qs(environ.get("QUERY_STRING", "")).get("src", [])
        frames = "".join(
            f'<iframe id="f{i}" src="{html.escape(src)}" width="600" height="300"></iframe>'
            for i, src in enumerate(sources)
        )
        body = f"<!doctype html><title>Framing page</title>{frames}"
    else:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found"]
    data = body.encode()
    start_response("200 OK", [("Content-Type", "text/html"), ("Content-Length", str(len(data)))])
    return [data]


@pytest.fixture(scope="module")
def outside() -> Iterator[str]:
    with serve_wsgi(_outside_app, free_port()) as url:
        yield url


@dataclass
class Broker:
    url: str  # the issuer, byte for byte
    app: Flask
    client_id: str
    redirect_uri: str  # a loopback port of its own, on the registered http://127.0.0.1/callback

    def authorize_url(self, **extra: str) -> tuple[str, dict[str, str], str]:
        """An authorization request URL, its parameters and the PKCE verifier."""
        verifier, challenge = pkce()
        settings = {"client_id": self.client_id, "redirect_uri": self.redirect_uri, "scope": SCOPES}
        settings.update(extra)
        params = authorize_params(settings.pop("client_id"), challenge, **settings)
        return f"{self.url}/authorize?{urlencode(params)}", params, verifier


@pytest.fixture
def broker_settings() -> dict[str, Any]:
    """Extra broker settings; a test overrides this by parametrizing ``broker_settings``."""
    return {}


@pytest.fixture
def client_name() -> str:
    """The registered client's name; overridable like ``broker_settings``."""
    return CLIENT_NAME


@pytest.fixture
def broker(
    make_app: Callable[..., Flask],
    outside: str,
    broker_settings: dict[str, Any],
    client_name: str,
) -> Iterator[Broker]:
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    app = make_app(issuer=issuer, **broker_settings)
    registration = app.test_client().post(
        "/register",
        json={
            "client_name": client_name,
            "redirect_uris": ["http://127.0.0.1/callback"],
            "token_endpoint_auth_method": "none",
            "grant_types": ["authorization_code", "refresh_token"],
            "application_type": "native",
        },
    )
    assert registration.status_code == 201, registration.json
    assert registration.json is not None
    with serve_wsgi(app, port) as url:
        assert url == issuer
        yield Broker(url, app, registration.json["client_id"], f"{outside}/callback")


# -- the browser -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One Chromium per module; never one that Playwright would download."""
    if not os.access(CHROMIUM, os.X_OK):
        unavailable(f"Chromium is not installed at {CHROMIUM} (Debian package `chromium`)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    """A fresh profile per test: no cookies from another test."""
    context = browser.new_context(
        locale="en-US", viewport={"width": 720, "height": 900}, color_scheme="light"
    )
    context.set_default_timeout(10_000)
    try:
        yield context
    finally:
        context.close()


@dataclass
class Tab:
    page: Page
    console: list[str] = field(default_factory=list)
    # Every document request of the top-level frame, redirects included, in order.
    navigations: list[str] = field(default_factory=list)

    def csp_messages(self) -> list[str]:
        return [m for m in self.console if "Content Security Policy" in m]


@pytest.fixture
def tab(context: BrowserContext) -> Tab:
    page = context.new_page()
    tab = Tab(page)

    def on_request(request: Request) -> None:
        if request.is_navigation_request() and request.frame == page.main_frame:
            tab.navigations.append(request.url)

    page.on(
        "console",
        lambda message: tab.console.append(
            f"{message.type}: {message.text} @ {message.location.get('url', '')}"
        ),
    )
    page.on("pageerror", lambda error: tab.console.append(f"pageerror: {error}"))
    page.on("request", on_request)
    return tab


# -- steps a user takes ----------------------------------------------------------------------


def open_consent(tab: Tab, broker: Broker, **extra: str) -> tuple[dict[str, str], str, Response]:
    url, params, verifier = broker.authorize_url(**extra)
    response = tab.page.goto(url)
    assert response is not None
    assert response.status == 200, response.status
    assert tab.page.url.startswith(f"{broker.url}/consent?login="), tab.page.url
    return params, verifier, response


def approve_local(tab: Tab, broker: Broker) -> Response:
    """Click "Allow and sign in with ..." (the local provider); returns the login page response."""
    with tab.page.expect_response(
        lambda r: r.url.startswith(f"{broker.url}/login/local") and r.request.method == "GET"
    ) as info:
        tab.page.click("#approve-local")
    tab.page.wait_for_selector("#username")
    return info.value


def sign_in(tab: Tab, username: str = "alice", password: str | None = None) -> Response:
    """Fill and submit the login form; returns the response to the POST."""
    tab.page.fill("#username", username)
    tab.page.fill("#password", PASSWORDS[username] if password is None else password)
    with tab.page.expect_response(
        lambda r: "/login/local" in r.url and r.request.method == "POST"
    ) as info:
        tab.page.click("#sign-in")
    return info.value


def wait_for_client(tab: Tab, broker: Broker) -> dict[str, str]:
    """Wait until the browser is back at the client's redirect URI; its query parameters."""
    tab.page.wait_for_url(lambda url: url.startswith(f"{broker.redirect_uri}?"))
    assert tab.page.inner_text("#done") == "Callback received"
    return query(tab.page.url)


def screenshot(tab: Tab, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    tab.page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def assert_page_headers(response: Response, what: str) -> None:
    headers = response.all_headers()
    assert headers.get("content-type", "").startswith("text/html"), (what, headers)
    assert "frame-ancestors 'none'" in headers.get("content-security-policy", ""), (what, headers)
    assert headers.get("x-frame-options") == "DENY", (what, headers)
    assert "no-store" in headers.get("cache-control", ""), (what, headers)
    assert headers.get("referrer-policy") == "no-referrer", (what, headers)
    assert headers.get("x-content-type-options") == "nosniff", (what, headers)
    assert "access-control-allow-origin" not in headers, (what, headers)  # no CORS on pages


def assert_styled(tab: Tab, what: str) -> None:
    """The stylesheet loaded and applies (a blocked or missing sheet leaves the card unstyled)."""
    radius = tab.page.eval_on_selector("main.card", "e => getComputedStyle(e).borderTopLeftRadius")
    background = tab.page.eval_on_selector("body", "e => getComputedStyle(e).backgroundColor")
    assert (radius, background) == ("12px", "rgb(244, 245, 247)"), (what, radius, background)


# -- 1. the happy path -----------------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_consent_then_login_returns_to_the_client_with_code_state_and_iss(
    broker: Broker, tab: Tab, outside: str, request: pytest.FixtureRequest
) -> None:
    database = request.node.callspec.params["database_url"]
    params, verifier, _ = open_consent(tab, broker)
    page = tab.page

    assert page.title() == f"Allow {CLIENT_NAME}?"
    assert page.inner_text("#client-name") == CLIENT_NAME
    assert page.inner_text("#redirect-host") == outside.removeprefix("http://")
    assert page.inner_text("#resource-name") == "Demo tools"
    assert page.inner_text("#resource-uri") == RESOURCE
    assert page.inner_text("#client-kind") == "Registered automatically by the application"
    assert page.locator("#scopes li").all_inner_texts() == [
        "demo:read Read demo data",
        "demo:write Change demo data",
    ]
    assert page.locator("#localhost-warning").is_visible()
    assert "localhost" in page.inner_text("#localhost-warning")
    button = page.locator("#approve-local")
    assert button.inner_text() == "Allow and sign in with Username and password"
    assert page.locator("#deny").is_visible()
    screenshot(tab, f"consent-{database}.png")

    approve_local(tab, broker)
    assert page.title() == "Sign in"
    assert page.inner_text("main .muted") == "Username and password"
    screenshot(tab, f"login-{database}.png")

    sign_in(tab)
    result = wait_for_client(tab, broker)
    assert set(result) == {"code", "state", "iss"}, result
    assert result["state"] == params["state"]
    assert result["iss"] == broker.url  # RFC 9207, byte-identical to the issuer
    # Referrer-Policy: no-referrer holds across the redirect: the client learns no broker URL.
    seen = [r for r in OUTSIDE_SEEN if r[0] == "/callback" and params["state"] in r[1]]
    assert [referer for _, _, referer in seen] == [None], seen

    # The code the browser carried back is a real one.
    token = redeem(
        broker.app.test_client(),
        broker.client_id,
        result["code"],
        verifier,
        redirect_uri=broker.redirect_uri,
    )
    assert token.status_code == 200, token.json
    assert token.json is not None and token.json["scope"] == SCOPES
    # consent -> login, never off to anywhere else before the client's redirect URI
    assert [u.split("?")[0] for u in tab.navigations] == [
        f"{broker.url}/authorize",
        f"{broker.url}/consent",
        f"{broker.url}/consent",
        f"{broker.url}/login/local",
        f"{broker.url}/login/local",
        broker.redirect_uri,
    ]
    assert tab.csp_messages() == []


# -- 2. security headers and framing ---------------------------------------------------------


@SQLITE_ONLY
def test_consent_login_and_error_pages_carry_the_security_headers(broker: Broker, tab: Tab) -> None:
    _, _, consent = open_consent(tab, broker)
    assert_page_headers(consent, "consent page")
    login = approve_local(tab, broker)
    assert login.status == 200
    assert_page_headers(login, "login page")
    failed = sign_in(tab, password="wrong-password")
    assert failed.status == 400
    assert_page_headers(failed, "login page with an error")
    error = tab.page.goto(f"{broker.url}/authorize?client_id=nobody&response_type=code")
    assert error is not None and error.status == 400
    assert_page_headers(error, "error page")
    missing = tab.page.goto(f"{broker.url}/no-such-page")
    assert missing is not None and missing.status == 404
    assert_page_headers(missing, "404 page")


@SQLITE_ONLY
def test_another_origin_cannot_frame_the_pages(broker: Broker, tab: Tab, outside: str) -> None:
    open_consent(tab, broker)
    consent_url = tab.page.url
    error_url = f"{broker.url}/authorize?client_id=nobody&response_type=code"
    control_url = f"{outside}/callback"  # no framing protection: shows the check can see content
    targets = {consent_url, error_url, control_url}
    served: dict[str, int] = {}

    def on_response(response: Response) -> None:
        if response.url in targets:
            served.setdefault(response.url, response.status)

    tab.page.on("response", on_response)

    framing = f"{outside}/frame?" + urlencode(
        [("src", consent_url), ("src", error_url), ("src", control_url)]
    )
    tab.page.goto(framing)
    tab.page.wait_for_load_state("load")

    # The broker did answer inside the frames (the cookie went along, same site) ...
    assert served.get(consent_url) == 200, served
    assert served.get(error_url) == 400, served
    frames = []
    for i in range(3):
        handle = tab.page.query_selector(f"#f{i}")
        assert handle is not None
        frame = handle.content_frame()
        assert frame is not None
        frames.append(frame)
    # ... and the browser refused to show it.
    consent_frame, error_frame, control_frame = frames
    for frame in (consent_frame, error_frame):
        assert not frame.url.startswith(broker.url), frame.url
        assert frame.query_selector("main.card") is None
        assert frame.query_selector("#client-name") is None
        assert frame.query_selector("form") is None
    assert control_frame.inner_text("#done") == "Callback received"
    # Chromium's message names only the framing origin: one refusal per broker frame.
    refusals = [m for m in tab.console if "frame-ancestors 'none'" in m]
    assert len(refusals) == 2, tab.console
    screenshot(tab, "framing-refused.png")


# -- 3. cookies ------------------------------------------------------------------------------


@SQLITE_ONLY
def test_cookies_on_an_http_loopback_issuer_are_httponly_lax_and_not_host_prefixed(
    broker: Broker, context: BrowserContext, tab: Tab
) -> None:
    open_consent(tab, broker)
    cookies = {c["name"]: c for c in context.cookies(broker.url)}
    assert set(cookies) == {"broker_browser"}
    approve_local(tab, broker)
    sign_in(tab)
    wait_for_client(tab, broker)
    cookies = {c["name"]: c for c in context.cookies(broker.url)}
    assert set(cookies) == {"broker_browser", "broker_session"}
    for name, cookie in cookies.items():
        assert not name.startswith("__Host-")
        assert cookie.get("httpOnly") is True, cookie
        assert cookie.get("sameSite") == "Lax", cookie
        assert cookie.get("secure") is False, cookie  # plain http cannot have Secure
        assert cookie.get("path") == "/", cookie
        assert cookie.get("domain") == "127.0.0.1", cookie  # host-only: no Domain attribute
        assert "." in cookie.get("value", ""), cookie  # signed (value.signature)
    # HttpOnly for real: script on a broker page sees none of them.
    tab.page.goto(f"{broker.url}/no-such-page")
    assert tab.page.evaluate("document.cookie") == ""


def _set_cookies(response: Any) -> dict[str, list[str]]:
    """Set-Cookie headers by cookie name: the attributes, lower-cased, value left out."""
    found: dict[str, list[str]] = {}
    for header in response.headers.getlist("Set-Cookie"):
        first, *attributes = (part.strip() for part in header.split(";"))
        found[first.split("=", 1)[0]] = [a.lower() for a in attributes]
    return found


@SQLITE_ONLY
def test_cookies_on_an_https_issuer_are_host_prefixed_and_secure(
    make_app: Callable[..., Flask],
) -> None:
    """No browser: Chromium would not keep a Secure cookie from the plain-http test server."""
    app = make_app(issuer="https://sso.example.com")
    client = app.test_client()
    registration = client.post(
        "/register",
        json={
            "client_name": CLIENT_NAME,
            "redirect_uris": ["http://127.0.0.1/callback"],
            "token_endpoint_auth_method": "none",
            "application_type": "native",
        },
    )
    assert registration.status_code == 201, registration.json
    assert registration.json is not None
    _, challenge = pkce()
    response = client.get(
        "/authorize", query_string=authorize_params(registration.json["client_id"], challenge)
    )
    assert response.status_code == 302, response.text
    cookies = _set_cookies(response)
    assert set(cookies) == {"__Host-broker_browser"}, cookies
    attributes = cookies["__Host-broker_browser"]
    assert {"secure", "httponly", "samesite=lax", "path=/"} <= set(attributes), attributes
    assert not any(a.startswith("domain") for a in attributes), attributes

    # The session cookie after a login, through the same https-issuer broker.
    response = sign_in_local(client, authorize_params(registration.json["client_id"], pkce()[1]))
    assert response.status_code == 302, response.text
    cookies = _set_cookies(response)
    assert set(cookies) == {"__Host-broker_session"}, cookies
    attributes = cookies["__Host-broker_session"]
    assert {"secure", "httponly", "samesite=lax", "path=/"} <= set(attributes), attributes
    assert not any(a.startswith("domain") for a in attributes), attributes


# -- 4. deny ---------------------------------------------------------------------------------


@SQLITE_ONLY
def test_deny_returns_access_denied_with_state_and_iss(broker: Broker, tab: Tab) -> None:
    params, _, _ = open_consent(tab, broker)
    tab.page.click("#deny")
    result = wait_for_client(tab, broker)
    assert result.pop("error") == "access_denied"
    assert result.pop("state") == params["state"]
    assert result.pop("iss") == broker.url
    assert set(result) <= {"error_description"}, result
    assert not any("/login/" in u for u in tab.navigations), tab.navigations


# -- 5. the second authorization -------------------------------------------------------------


@SQLITE_ONLY
def test_second_authorization_in_the_same_browser_is_one_click(broker: Broker, tab: Tab) -> None:
    """The same browser approved the client before and has a broker session: no consent and no
    sign-in again, but this dynamically registered client at a loopback redirect URI gets the
    one-click confirmation every time (RFC 8252 section 8.6: any local program could use its
    client id)."""
    open_consent(tab, broker)
    approve_local(tab, broker)
    sign_in(tab)
    first = wait_for_client(tab, broker)

    tab.navigations.clear()
    url, params, verifier = broker.authorize_url()
    tab.page.goto(url)
    tab.page.wait_for_selector("#confirm")
    assert "You allowed this application before" in tab.page.inner_text("#confirm-reason")
    tab.page.screenshot(path=str(ARTIFACTS / "confirm.png"))
    tab.page.click("#confirm")
    second = wait_for_client(tab, broker)
    assert second["state"] == params["state"] and second["iss"] == broker.url
    assert second["code"] != first["code"]
    assert [u.split("?")[0] for u in tab.navigations] == [
        f"{broker.url}/authorize",
        f"{broker.url}/consent",  # the confirmation
        f"{broker.url}/consent",  # its Continue, answered with the redirect to the client
        broker.redirect_uri,
    ]
    token = redeem(
        broker.app.test_client(),
        broker.client_id,
        second["code"],
        verifier,
        redirect_uri=broker.redirect_uri,
    )
    assert token.status_code == 200, token.json


# -- 6. error pages --------------------------------------------------------------------------


@SQLITE_ONLY
def test_unknown_client_and_unregistered_redirect_uri_get_a_400_page_not_a_redirect(
    broker: Broker, tab: Tab, context: BrowserContext, outside: str
) -> None:
    left: list[str] = []

    def refuse(route: Route) -> None:
        left.append(route.request.url)
        route.abort()

    context.route(lambda url: not url.startswith(broker.url), refuse)
    port = outside.rsplit(":", 1)[1]
    cases = {
        "unknown client": (
            {"client_id": "no-such-client"},
            "The application is not registered with this server (unknown client_id).",
        ),
        "other path": (
            {"redirect_uri": f"{outside}/elsewhere"},
            "The redirect URI is not registered for this application.",
        ),
        "other host": (
            {"redirect_uri": "https://attacker.example/callback"},
            "The redirect URI is not registered for this application.",
        ),
        # localhost and 127.0.0.1 are not interchangeable
        "localhost": (
            {"redirect_uri": f"http://localhost:{port}/callback"},
            "The redirect URI is not registered for this application.",
        ),
    }
    for name, (extra, message) in cases.items():
        url, _, _ = broker.authorize_url(**extra)
        response = tab.page.goto(url)
        assert response is not None
        assert response.status == 400, name
        assert response.request.redirected_from is None, name
        assert response.all_headers()["content-type"].startswith("text/html"), name
        assert tab.page.url == url, name
        assert tab.page.title() == "Invalid request", name
        assert tab.page.inner_text("h1") == "Invalid request", name
        assert tab.page.inner_text("#message") == message, name
        assert_styled(tab, name)
    screenshot(tab, "error.png")
    assert left == []
    assert tab.csp_messages() == []


# -- 7. wrong password -----------------------------------------------------------------------


@SQLITE_ONLY
def test_wrong_password_shows_the_error_on_the_form_and_does_not_redirect(
    broker: Broker, tab: Tab
) -> None:
    params, _, _ = open_consent(tab, broker)
    approve_local(tab, broker)
    response = sign_in(tab, password="not-the-password")
    assert response.status == 400
    tab.page.wait_for_selector("#error")
    assert tab.page.inner_text("#error") == "Invalid username or password."
    assert tab.page.url.startswith(f"{broker.url}/login/local")
    assert tab.page.input_value("#username") == "alice"  # kept
    assert tab.page.input_value("#password") == ""  # never echoed back
    assert not any(u.startswith(broker.redirect_uri) for u in tab.navigations)
    assert_styled(tab, "login page with an error")
    screenshot(tab, "login-error.png")

    # The re-rendered form works: the right password goes through.
    sign_in(tab)
    result = wait_for_client(tab, broker)
    assert result["state"] == params["state"] and "code" in result


# -- 8. the stylesheet under the CSP ---------------------------------------------------------


@SQLITE_ONLY
def test_pages_render_with_the_stylesheet_and_no_csp_violation(broker: Broker, tab: Tab) -> None:
    sheets: list[tuple[int, str]] = []

    def on_response(response: Response) -> None:
        if response.url.endswith("/style.css"):
            sheets.append((response.status, response.headers.get("content-type", "")))

    tab.page.on("response", on_response)
    open_consent(tab, broker)
    assert_styled(tab, "consent page")
    tab.page.emulate_media(color_scheme="dark")
    screenshot(tab, "consent-dark.png")
    tab.page.emulate_media(color_scheme="light")
    approve_local(tab, broker)
    assert_styled(tab, "login page")
    tab.page.goto(f"{broker.url}/authorize?client_id=nobody")
    assert_styled(tab, "error page")
    # Loaded once, then revalidated from the cache (304 carries no Content-Type).
    assert sheets[0][0] == 200 and sheets[0][1].startswith("text/css"), sheets
    assert all(status in (200, 304) for status, _ in sheets[1:]), sheets
    assert tab.csp_messages() == [], tab.console
    # The only errors: the error page's own status 400, and /favicon.ico (the broker has none).
    errors = [m for m in tab.console if m.startswith(("error", "pageerror"))]
    assert all(
        "Failed to load resource" in m and m.endswith(("/favicon.ico", "?client_id=nobody"))
        for m in errors
    ), tab.console


# -- more: X-Frame-Options alone, the signed-in consent, the policy's denied page, CSRF, markup --


@SQLITE_ONLY
def test_x_frame_options_alone_also_refuses_framing(
    broker: Broker, tab: Tab, context: BrowserContext, outside: str
) -> None:
    """For browsers that ignore CSP frame-ancestors: the consent page, its CSP header removed on
    the way, is still refused in a frame because of ``X-Frame-Options: DENY``."""
    open_consent(tab, broker)
    consent_url = tab.page.url
    stripped: list[dict[str, str]] = []

    def strip_csp(route: Route) -> None:
        response = route.fetch()
        headers = {
            k: v for k, v in response.headers.items() if k.lower() != "content-security-policy"
        }
        stripped.append(headers)
        route.fulfill(response=response, headers=headers)

    context.route(consent_url, strip_csp)
    framing = f"{outside}/frame?" + urlencode(
        [("src", consent_url), ("src", f"{outside}/callback")]
    )
    tab.page.goto(framing)
    tab.page.wait_for_load_state("load")
    assert stripped and stripped[0].get("x-frame-options") == "DENY", stripped
    consent_frame = tab.page.query_selector("#f0")
    control_frame = tab.page.query_selector("#f1")
    assert consent_frame is not None and control_frame is not None
    frame = consent_frame.content_frame()
    control = control_frame.content_frame()
    assert frame is not None and control is not None
    assert frame.query_selector("#client-name") is None and frame.query_selector("form") is None
    assert control.inner_text("#done") == "Callback received"
    assert any("X-Frame-Options" in m for m in tab.console), tab.console


@SQLITE_ONLY
def test_signed_in_user_asked_again_sees_who_is_signed_in_and_allows_without_password(
    broker: Broker, tab: Tab
) -> None:
    open_consent(tab, broker)
    approve_local(tab, broker)
    sign_in(tab)
    wait_for_client(tab, broker)

    tab.navigations.clear()
    params, verifier, consent = open_consent(tab, broker, prompt="consent")
    assert_page_headers(consent, "consent page, signed in")
    assert tab.page.inner_text("#signed-in-as") == "alice@example.com"
    assert tab.page.inner_text("#approve-session") == "Allow"
    other = tab.page.locator("#approve-local")
    assert other.inner_text() == "Sign in with Username and password"
    assert "secondary" in (other.get_attribute("class") or "")
    assert_styled(tab, "consent page, signed in")
    screenshot(tab, "consent-signed-in.png")
    tab.page.click("#approve-session")
    result = wait_for_client(tab, broker)
    assert result["state"] == params["state"] and result["iss"] == broker.url
    assert not any("/login/" in u for u in tab.navigations), tab.navigations
    token = redeem(
        broker.app.test_client(),
        broker.client_id,
        result["code"],
        verifier,
        redirect_uri=broker.redirect_uri,
    )
    assert token.status_code == 200, token.json


CONTRACTORS_DENIED = "Contractors may not use the demo tools."


@SQLITE_ONLY
@pytest.mark.parametrize(
    "broker_settings",
    [{"rules": [{"deny": CONTRACTORS_DENIED, "when": {"groups": ["contractors"]}}]}],
)
def test_policy_denial_shows_the_reason_and_returns_to_the_client_with_access_denied(
    broker: Broker, tab: Tab
) -> None:
    params, _, _ = open_consent(tab, broker)
    approve_local(tab, broker)
    response = sign_in(tab, username="carol")
    assert response.status == 403
    assert_page_headers(response, "denied page")
    tab.page.wait_for_selector("#reason")
    assert tab.page.title() == "Access denied"
    assert tab.page.inner_text("#reason") == CONTRACTORS_DENIED
    link = tab.page.locator("#return")
    assert link.inner_text() == f"Return to {CLIENT_NAME}"
    assert_styled(tab, "denied page")
    screenshot(tab, "denied.png")
    assert not any(u.startswith(broker.redirect_uri) for u in tab.navigations)
    link.click()
    result = wait_for_client(tab, broker)
    assert result["error"] == "access_denied" and "code" not in result
    assert result["state"] == params["state"] and result["iss"] == broker.url


@SQLITE_ONLY
def test_consent_form_with_a_forged_csrf_token_is_refused_on_a_page(
    broker: Broker, tab: Tab
) -> None:
    open_consent(tab, broker)
    tab.page.eval_on_selector_all(
        "input[name=csrf]", "inputs => inputs.forEach(i => { i.value = 'f'.repeat(64); })"
    )
    with tab.page.expect_response(lambda r: r.request.method == "POST") as info:
        tab.page.click("#approve-local")
    assert info.value.status == 400
    assert_page_headers(info.value, "CSRF failure page")
    tab.page.wait_for_selector("#message")
    assert tab.page.title() == "Form expired"
    assert "CSRF" in tab.page.inner_text("#message")
    assert not any("/login/" in u or u.startswith(broker.redirect_uri) for u in tab.navigations)


MARKUP_NAME = '<img src=x id=injected onerror="document.title=1">Evil & Co'


@SQLITE_ONLY
@pytest.mark.parametrize("client_name", [MARKUP_NAME])
def test_client_name_is_shown_as_text_never_as_markup(broker: Broker, tab: Tab) -> None:
    open_consent(tab, broker)
    assert tab.page.inner_text("#client-name") == MARKUP_NAME
    assert tab.page.title() == f"Allow {MARKUP_NAME}?"
    assert tab.page.query_selector("#injected") is None
    assert tab.csp_messages() == [], tab.console


SPLIT_WORDS = """el => {
    // Words of the element's text whose letters do not all sit on one line.
    const text = el.firstChild;
    const split = [];
    for (const match of text.data.matchAll(/\\S+/g)) {
        const range = document.createRange();
        range.setStart(text, match.index);
        range.setEnd(text, match.index + match[0].length);
        const tops = new Set([...range.getClientRects()].map(r => Math.round(r.top)));
        if (tops.size > 1) split.push(match[0]);
    }
    return split;
}"""


@SQLITE_ONLY
def test_consent_facts_prose_wraps_between_words(broker: Broker, tab: Tab) -> None:
    open_consent(tab, broker)
    split: dict[int, list[str]] = {}
    for width in (320, 360, 400, 480, 720):
        tab.page.set_viewport_size({"width": width, "height": 900})
        words = tab.page.eval_on_selector("#client-kind", SPLIT_WORDS)
        if words:
            split[width] = words
    assert split == {}, f"words broken across lines, by viewport width: {split}"
