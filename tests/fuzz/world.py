"""The world the fuzzer starts from: a broker with real clients, users who signed in, and fresh
valid requests for every endpoint (a real pending authorization, a real code, a real refresh
token...), so that mutations reach deep code and not only the first check.

Everything is done as clients and browsers do it, through the same transport the fuzzed requests
use (in-process WSGI, or a socket to gunicorn): registration, consent, the local login form, the
GitHub sign-in through its fake. Only the operator's static clients are written to the database,
as ``broker clients add`` or a client migration would.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from flask import Flask
from sqlalchemy import delete
from sqlalchemy.engine import Engine

from broker.models import RateLimitCounter
from broker.oauth2.rfc8693 import ACCESS_TOKEN_TYPE, TOKEN_EXCHANGE
from tests.fuzz.mutations import Template, basic_header
from tests.fuzz.verdict import Snapshot
from tests.fuzz.verdict import World as Checks
from tests.fuzz.wire import Answer, Pair, Wire, encode_pairs
from tests.support import OTHER_RESOURCE, RESOURCE, pkce, query

PUBLIC_REDIRECT = "https://app.example.com/cb"  # https: an approved session goes straight through
CONFIDENTIAL_REDIRECT = "https://conf.example.com/cb"
AGENT_SECRET = "agent-secret-" + "s" * 32
EXCHANGE_SECRET = "exchange-secret-" + "e" * 32
FORM = "application/x-www-form-urlencoded"
PASSWORD = "fuzz-password"
USERS = ("alice", "bob")


def resources() -> list[dict[str, Any]]:
    """The demo resource, and one whose MCP server may obtain the user's GitHub token (token
    exchange)."""
    return [
        {
            "uri": RESOURCE,
            "name": "Demo tools",
            "scopes": {"demo:read": "Read demo data", "demo:write": "Change demo data"},
            "required_scopes": ["demo:read"],
        },
        {
            "uri": OTHER_RESOURCE,
            "name": "GitHub tools",
            "scopes": {"other:read": "Read other data"},
            "upstream_tokens": ["github"],
        },
    ]


def settings_data(issuer: str, database_url: str, users_file: str, github: Any) -> dict[str, Any]:
    """``broker.yaml`` of the fuzzed broker. The configurable rate limits are off so that
    thousands of requests from one address reach the endpoints (429 is tested elsewhere)."""
    from broker.config import DEFAULT_RATE_LIMITS

    limits = {name: dict.fromkeys(pers, "off") for name, pers in DEFAULT_RATE_LIMITS.items()}
    return {
        "issuer": issuer,
        "secret_key": "fuzz-secret-" + "f" * 40,
        "database_url": database_url,
        "providers": {"local": {"users_file": users_file}, "github": github.provider_config()},
        "resources": resources(),
        "rate_limits": limits,
    }


def cheap_users_file(path: Any) -> None:
    """Local users whose argon2 hashes are cheap to check (the fuzzer submits many logins)."""
    import yaml
    from argon2 import PasswordHasher

    hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    users = {
        name: {
            "password_hash": hasher.hash(PASSWORD),
            "email": f"{name}@example.com",
            "groups": ["staff"],
        }
        for name in USERS
    }
    path.write_text(yaml.safe_dump({"users": users}))


class Browser:
    """A cookie-keeping user agent over the fuzzer's transport. The broker's pages are reached
    through ``send``; anything else (the GitHub fake) over plain HTTP."""

    def __init__(self, send: Callable[[Wire], Answer], issuer: str) -> None:
        self.send = send
        self.issuer = issuer
        self.cookies: dict[str, str] = {}

    def cookie_header(self) -> tuple[tuple[str, str], ...]:
        if not self.cookies:
            return ()
        return (("Cookie", "; ".join(f"{k}={v}" for k, v in self.cookies.items())),)

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Sequence[Pair] | None = None,
        form: Sequence[Pair] | None = None,
        json_body: Any = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> Answer:
        path, _, raw_query = path.partition("?")
        query_bytes = raw_query.encode() if raw_query else encode_pairs(params or [])
        body, content_type = b"", None
        if form is not None:
            body, content_type = encode_pairs(form), FORM
        elif json_body is not None:
            body, content_type = json.dumps(json_body).encode(), "application/json"
        all_headers = (*self.cookie_header(), *headers)
        if content_type:
            all_headers = (*all_headers, ("Content-Type", content_type))
        answer = self.send(Wire(method, path.encode(), query_bytes, all_headers, body))
        for value in answer.headers.getlist("Set-Cookie"):
            name, _, rest = value.partition("=")
            self.cookies[name.strip()] = rest.split(";", 1)[0]
        return answer

    def get(self, path: str, params: Sequence[Pair] | None = None) -> Answer:
        return self.request("GET", path, params=params)

    def post(self, path: str, form: Sequence[Pair], **kw: Any) -> Answer:
        return self.request("POST", path, form=form, **kw)

    def follow(self, answer: Answer, stop: str) -> Answer | str:
        """Follow redirects until one goes to ``stop`` (returned as the URL) or a page."""
        for _ in range(10):
            location = answer.location
            if not (300 <= answer.status < 400 and location):
                return answer
            if location.startswith(stop):
                return location
            if location.startswith(self.issuer):
                location = location[len(self.issuer) :]
            if location.startswith("/"):
                answer = self.get(location)
                continue
            with httpx.Client(follow_redirects=False, timeout=15) as http:
                outside = http.get(location)
            assert outside.is_redirect, (location, outside.status_code, outside.text[:300])
            answer = Answer(302, _headers(outside.headers))
        raise AssertionError("too many redirects")


def _headers(headers: httpx.Headers) -> Any:
    from werkzeug.datastructures import Headers

    return Headers(list(headers.multi_items()))


def form_field(html: str, name: str, last: bool = False) -> str:
    found = re.findall(rf'name="{name}" value="([^"]*)"', html)
    assert found, f"no {name} in page: {html[:500]}"
    return str(found[-1] if last else found[0])


@dataclass
class Client:
    client_id: str
    redirect_uri: str
    secret: str | None = None


@dataclass
class FuzzWorld:
    """Clients, signed-in browsers and factories of fresh valid requests (:class:`Template`)."""

    send: Callable[[Wire], Answer]
    issuer: str
    app: Flask  # for the operator's static clients and for database snapshots only
    github_base: str
    public: Client = field(init=False)
    confidential: Client = field(init=False)
    agent: Client = field(init=False)
    exchanger: Client = field(init=False)
    alice: Browser = field(init=False)  # signed in (local), approved the public client
    bob: Browser = field(init=False)  # signed in (local): the account page's user
    subject_token: str = field(init=False)  # alice's access token for the GitHub resource
    confidential_access: str = field(init=False)

    @property
    def engine(self) -> Engine:
        engine: Engine = self.app.extensions["broker"].db.engine
        return engine

    def checks(self) -> Checks:
        uris = {
            self.public.redirect_uri,
            "http://127.0.0.1/callback",
            self.confidential.redirect_uri,
        }
        return Checks(self.issuer, uris, (self.github_base + "/login/oauth/authorize",))

    def snapshot(self) -> Snapshot:
        return Snapshot.take(self.engine)

    def browser(self) -> Browser:
        return Browser(self.send, self.issuer)

    # -- setting up ------------------------------------------------------------------------

    def setup(self) -> FuzzWorld:
        from tests.oauth2.test_client_credentials import add_static_client as add_agent
        from tests.oauth2.test_rfc8693_token_exchange import add_static_client as add_exchanger

        anon = self.browser()
        public = anon.request(
            "POST",
            "/register",
            json_body={
                "client_name": "Fuzzed public client",
                "redirect_uris": [PUBLIC_REDIRECT, "http://127.0.0.1/callback"],
                "token_endpoint_auth_method": "none",
                "grant_types": ["authorization_code", "refresh_token"],
            },
        )
        assert public.status == 201, public.text
        self.public = Client(public.json()["client_id"], PUBLIC_REDIRECT)
        conf = anon.request(
            "POST",
            "/register",
            json_body={
                "client_name": "Fuzzed confidential client",
                "redirect_uris": [CONFIDENTIAL_REDIRECT],
                "token_endpoint_auth_method": "client_secret_basic",
            },
        ).json()
        self.confidential = Client(conf["client_id"], CONFIDENTIAL_REDIRECT, conf["client_secret"])
        agent_id = add_agent(self.app, client_id="fuzz-agent", secret=AGENT_SECRET)
        self.agent = Client(agent_id, "", AGENT_SECRET)
        add_exchanger(self.app, "fuzz-exchanger", EXCHANGE_SECRET, resources=[OTHER_RESOURCE])
        self.exchanger = Client("fuzz-exchanger", "", EXCHANGE_SECRET)

        self.alice = self.browser()
        self.sign_in(self.alice, self.public, "alice")
        self.sign_in(self.alice, self.confidential, "alice")
        self.confidential_access = self.tokens(self.confidential)["access_token"]
        self.bob = self.browser()
        self.sign_in(self.bob, self.public, "bob")
        # Alice's GitHub sign-in for the resource that may exchange her GitHub token.
        github_user = self.browser()
        code, verifier = self.sign_in(
            github_user, self.public, "github", resource=OTHER_RESOURCE, scope="other:read"
        )
        token = self.redeem(self.public, code, verifier, resource=OTHER_RESOURCE)
        self.subject_token = token["access_token"]
        return self

    def authorize_params(
        self, client: Client, challenge: str, **extra: str
    ) -> list[tuple[str, str]]:
        params = {
            "response_type": "code",
            "client_id": client.client_id,
            "redirect_uri": client.redirect_uri,
            "state": "st-" + secrets.token_urlsafe(8),
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "resource": RESOURCE,
            "scope": "demo:read",
        }
        params.update(extra)
        return list(params.items())

    def sign_in(self, browser: Browser, client: Client, who: str, **extra: str) -> tuple[str, str]:
        """Authorize ``client`` in ``browser`` through consent and sign-in (``who``: a local
        user, or ``github``); returns the code and its PKCE verifier."""
        verifier, challenge = pkce()
        answer = browser.get("/authorize", self.authorize_params(client, challenge, **extra))
        provider = "github" if who == "github" else "local"
        for _ in range(6):
            result = browser.follow(answer, client.redirect_uri)
            if isinstance(result, str):
                return query(result)["code"], verifier
            html = result.text
            assert result.status == 200, (result.status, html[:500])
            if 'name="password"' in html:
                path = "/login/local"
                answer = browser.post(
                    path,
                    [
                        ("login", form_field(html, "login")),
                        ("csrf", form_field(html, "csrf")),
                        ("username", who),
                        ("password", PASSWORD),
                    ],
                )
            else:
                answer = browser.post(
                    "/consent",
                    [
                        ("login", form_field(html, "login")),
                        ("csrf", form_field(html, "csrf")),
                        ("action", "approve"),
                        ("provider", provider),
                    ],
                )
        raise AssertionError("the sign-in did not come back to the client")

    def code(self, client: Client | None = None) -> tuple[str, str]:
        """A fresh code of a client alice approved: her session goes straight through."""
        client = client or self.public
        verifier, challenge = pkce()
        answer = self.alice.get("/authorize", self.authorize_params(client, challenge))
        location = answer.location or ""
        assert answer.status == 302 and location.startswith(client.redirect_uri), (
            answer.status,
            location,
            answer.text[:300],
        )
        return query(location)["code"], verifier

    def redeem(
        self, client: Client, code: str, verifier: str, resource: str = RESOURCE
    ) -> dict[str, Any]:
        form = [
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", client.redirect_uri),
            ("code_verifier", verifier),
            ("resource", resource),
        ]
        headers: tuple[tuple[str, str], ...] = ()
        if client.secret:
            headers = (("Authorization", basic_header(client.client_id, client.secret)),)
        else:
            form.append(("client_id", client.client_id))
        answer = self.browser().post("/token", form, headers=headers)
        assert answer.status == 200, answer.text
        token: dict[str, Any] = answer.json()
        return token

    def tokens(self, client: Client | None = None) -> dict[str, Any]:
        client = client or self.public
        return self.redeem(client, *self.code(client))

    def pending(self, browser: Browser) -> str:
        """A fresh pending authorization of the public client in ``browser`` (not signed in):
        its login id, after /authorize sent the browser to the consent page."""
        _, challenge = pkce()
        answer = browser.get("/authorize", self.authorize_params(self.public, challenge))
        location = answer.location or ""
        assert answer.status == 302 and location.startswith("/consent"), (answer.status, location)
        return query(location)["login"]

    def reset_throttle(self) -> None:
        """Failed logins of earlier examples would block the next ones (429 everywhere)."""
        with self.app.extensions["broker"].db.session() as session:
            session.execute(delete(RateLimitCounter))

    def artifacts(self) -> tuple[tuple[str, str], ...]:
        return (
            ("public_client", self.public.client_id),
            ("confidential_client", self.confidential.client_id),
            ("agent_client", self.agent.client_id),
            ("subject_token", self.subject_token),
            ("confidential_access", self.confidential_access),
            ("resource", RESOURCE),
            ("other_resource", OTHER_RESOURCE),
            ("redirect", self.public.redirect_uri),
            ("loopback_redirect", "http://127.0.0.1:5555/callback"),
        )

    # -- valid requests ----------------------------------------------------------------------

    def token_code(self, confidential: bool = False) -> Template:
        client = self.confidential if confidential else self.public
        code, verifier = self.code(client)
        fields: list[Pair] = [
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", client.redirect_uri),
            ("code_verifier", verifier),
            ("resource", RESOURCE),
        ]
        if not confidential:
            fields.insert(2, ("client_id", client.client_id))
        return Template(
            "token",
            "POST",
            "/token",
            tuple(fields),
            basic=(client.client_id, client.secret or "") if confidential else None,
            artifacts=self.artifacts(),
            spends=code,
        )

    def token_refresh(self) -> Template:
        token = self.tokens()
        return Template(
            "token",
            "POST",
            "/token",
            (
                ("grant_type", "refresh_token"),
                ("refresh_token", token["refresh_token"]),
                ("client_id", self.public.client_id),
                ("scope", "demo:read"),
                ("resource", RESOURCE),
            ),
            artifacts=(*self.artifacts(), ("access_token", token["access_token"])),
            spends=token["refresh_token"],
        )

    def token_client_credentials(self) -> Template:
        return Template(
            "token",
            "POST",
            "/token",
            (
                ("grant_type", "client_credentials"),
                ("resource", RESOURCE),
                ("scope", "demo:read"),
            ),
            basic=(self.agent.client_id, AGENT_SECRET),
            artifacts=self.artifacts(),
        )

    def token_exchange(self) -> Template:
        return Template(
            "token",
            "POST",
            "/token",
            (
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", self.subject_token),
                ("subject_token_type", ACCESS_TOKEN_TYPE),
                ("audience", "github"),
            ),
            basic=(self.exchanger.client_id, EXCHANGE_SECRET),
            artifacts=self.artifacts(),
        )

    def register(self, confidential: bool = False) -> Template:
        return Template(
            "register",
            "POST",
            "/register",
            body={
                "client_name": "Fuzzed registration",
                "redirect_uris": ["http://127.0.0.1/callback", "https://reg.example.com/cb"],
                "token_endpoint_auth_method": "client_secret_post" if confidential else "none",
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "application_type": "native",
                "scope": "demo:read",
                "client_uri": "https://reg.example.com/",
                "software_id": "fuzz",
            },
        )

    def revoke(self, public: bool = False) -> Template:
        if public:
            token = self.tokens()
            return Template(
                "revoke",
                "POST",
                "/revoke",
                (
                    ("token", token["refresh_token"]),
                    ("token_type_hint", "refresh_token"),
                    ("client_id", self.public.client_id),
                ),
                artifacts=(*self.artifacts(), ("access_token", token["access_token"])),
                spends=token["refresh_token"],
            )
        token = self.tokens(self.confidential)
        return Template(
            "revoke",
            "POST",
            "/revoke",
            (("token", token["refresh_token"]), ("token_type_hint", "refresh_token")),
            basic=(self.confidential.client_id, self.confidential.secret or ""),
            artifacts=(*self.artifacts(), ("access_token", token["access_token"])),
            spends=token["refresh_token"],
        )

    def introspect(self) -> Template:
        return Template(
            "introspect",
            "POST",
            "/introspect",
            (("token", self.confidential_access), ("token_type_hint", "access_token")),
            basic=(self.confidential.client_id, self.confidential.secret or ""),
            artifacts=self.artifacts(),
        )

    def document(self, endpoint: str, path: str) -> Template:
        """A GET of a document (metadata, JWKS, health, ready)."""
        return Template(endpoint, "GET", path, artifacts=self.artifacts())

    def authorize(self, signed_in: bool) -> Template:
        """``signed_in``: alice's browser, which goes straight through to a code; else a new
        browser, sent to the consent page."""
        _, challenge = pkce()
        cookies = self.alice.cookie_header() if signed_in else ()
        return Template(
            "authorize",
            "GET",
            "/authorize",
            tuple(self.authorize_params(self.public, challenge)),
            headers=cookies,
            artifacts=self.artifacts(),
        )

    def consent_page(self) -> Template:
        guest = self.browser()
        login = self.pending(guest)
        return Template(
            "consent",
            "GET",
            "/consent",
            (("login", login),),
            headers=guest.cookie_header(),
            artifacts=self.artifacts(),
        )

    def consent_form(self) -> Template:
        guest = self.browser()
        login = self.pending(guest)
        page = guest.get("/consent", [("login", login)])
        assert page.status == 200, page.text[:300]
        return Template(
            "consent",
            "POST",
            "/consent",
            (
                ("login", login),
                ("csrf", form_field(page.text, "csrf")),
                ("action", "approve"),
                ("provider", "local"),
            ),
            headers=guest.cookie_header(),
            artifacts=self.artifacts(),
            spends=login,
        )

    def _approved(self, provider: str) -> tuple[Browser, str, Answer]:
        guest = self.browser()
        login = self.pending(guest)
        page = guest.get("/consent", [("login", login)])
        approved = guest.post(
            "/consent",
            [
                ("login", login),
                ("csrf", form_field(page.text, "csrf")),
                ("action", "approve"),
                ("provider", provider),
            ],
        )
        assert approved.status == 302, approved.text[:300]
        return guest, login, approved

    def login_form(self, submit: bool) -> Template:
        guest, login, approved = self._approved("local")
        location = approved.location or ""
        if not submit:
            return Template(
                "login",
                "GET",
                "/login/local",
                (("login", login),),
                headers=guest.cookie_header(),
                artifacts=self.artifacts(),
            )
        form = guest.get(location)
        assert form.status == 200, form.text[:300]
        self.reset_throttle()
        return Template(
            "login",
            "POST",
            "/login/local",
            (
                ("login", login),
                ("csrf", form_field(form.text, "csrf")),
                ("username", "alice"),
                ("password", PASSWORD),
            ),
            headers=guest.cookie_header(),
            artifacts=self.artifacts(),
            spends=login,
        )

    def callback(self) -> Template:
        """The GitHub fake's redirect back to the broker, with its real code and state."""
        guest, _, approved = self._approved("github")
        location = approved.location or ""
        with httpx.Client(follow_redirects=False, timeout=15) as http:
            upstream = http.get(location)
        back = upstream.headers["location"]
        assert back.startswith(self.issuer + "/callback/github"), back
        params = query(back)
        return Template(
            "callback",
            "GET",
            "/callback/github",
            tuple((k, v) for k, v in params.items()),
            headers=guest.cookie_header(),
            artifacts=self.artifacts(),
            spends=params["state"],
        )

    def account_page(self) -> Template:
        return Template(
            "account",
            "GET",
            "/account",
            (),
            headers=self.bob.cookie_header(),
            artifacts=self.artifacts(),
        )

    def account_disconnect(self, everything: bool) -> Template:
        """Bob disconnects a fresh connection (or all of them): the page's form, as sent."""
        page = self.bob.get("/account")
        if 'name="grant"' in page.text:  # what earlier examples left: start from one grant
            self.bob.post("/account/disconnect-all", [("csrf", form_field(page.text, "csrf"))])
        self.sign_in(self.bob, self.public, "bob")  # disconnecting withdrew the consent
        page = self.bob.get("/account")
        csrf = form_field(page.text, "csrf")
        if everything:
            return Template(
                "account",
                "POST",
                "/account/disconnect-all",
                (("csrf", csrf),),
                headers=self.bob.cookie_header(),
                artifacts=self.artifacts(),
            )
        return Template(
            "account",
            "POST",
            "/account/disconnect",
            (("csrf", csrf), ("grant", form_field(page.text, "grant", last=True))),
            headers=self.bob.cookie_header(),
            artifacts=self.artifacts(),
        )
