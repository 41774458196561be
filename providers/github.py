"""The ``github`` provider type: github.com or GitHub Enterprise Server, over OAuth 2.0.

See ``docs/providers/github.md``. GitHub has no ID Token: the identity comes from its REST API
(``/user``, ``/user/emails``, ``/user/orgs``, ``/user/teams``, ``/user/memberships/orgs/{org}``).
The OAuth 2.0 flow is :mod:`providers._oauth2`'s; this module holds only GitHub's specifics.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Self
from urllib.parse import quote, urlsplit

import httpx

from ._config import ConfigReader, sanitize_code
from ._oauth2 import OAuth2Provider, OAuth2Settings, RecheckByToken, optional_str
from .contract import BASE_FACTS, Identity, LoginRequest, ProviderType, UpstreamTokens
from .errors import AccessDenied, LoginFailed
from .hookspecs import hookimpl

__all__ = ["GitHubProvider", "broker_register_providers"]

API_HEADERS = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28"}
MAX_PAGES = 10
ORG_LOGIN = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,38})$")
TEAM_SLUG = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,38})/[a-z0-9._-]{1,100}$")
RESTRICTED_HINT = "the organisation may restrict OAuth App access; an owner must approve the app"


class GitHubProvider(RecheckByToken, OAuth2Provider):
    """Sign-in with GitHub (``type: github``); an OAuth App or a GitHub App's user tokens."""

    type_name: ClassVar[str] = "github"
    default_display_name: ClassVar[str | None] = "GitHub"
    default_scopes: ClassVar[tuple[str, ...]] = ("read:user", "user:email")
    default_auth_method: ClassVar[str] = "client_secret_post"
    facts: frozenset[str] = BASE_FACTS | {"orgs", "teams"}

    def __init__(
        self,
        name: str,
        settings: OAuth2Settings,
        *,
        api_url: str,
        allowed_orgs: tuple[str, ...] = (),
        allowed_teams: tuple[str, ...] = (),
    ) -> None:
        super().__init__(name, settings)
        self.api_url = api_url
        self.allowed_orgs = allowed_orgs
        self.allowed_teams = allowed_teams
        self.checked_orgs = tuple(
            dict.fromkeys(allowed_orgs + tuple(t.split("/")[0] for t in allowed_teams))
        )

    @classmethod
    def from_reader(cls, name: str, reader: ConfigReader) -> Self | None:
        enterprise = reader.url("enterprise_url", allow_query=False)
        auth = reader.url("auth_url", allow_query=False)
        api = reader.url("api_url", allow_query=False)
        if reader.has("enterprise_url") and (reader.has("auth_url") or reader.has("api_url")):
            reader.problem("enterprise_url", "cannot be combined with auth_url or api_url")
        if enterprise:
            auth, api = enterprise.rstrip("/"), enterprise.rstrip("/") + "/api/v3"
        auth = (auth or "https://github.com").rstrip("/")
        orgs = _logins(reader, "allowed_orgs", ORG_LOGIN, "an organisation login")
        teams = _logins(reader, "allowed_teams", TEAM_SLUG, "an org/team-slug")
        settings = cls.read_settings(
            name,
            reader,
            authorization_endpoint=f"{auth}/login/oauth/authorize",
            token_endpoint=f"{auth}/login/oauth/access_token",
        )
        if settings is None:
            return None
        api_url = (api or "https://api.github.com").rstrip("/")
        return cls(name, settings, api_url=api_url, allowed_orgs=orgs, allowed_teams=teams)

    def scopes(self) -> tuple[str, ...]:
        """``read:org`` is asked for only when restrictions or rules need orgs or teams."""
        wanted = (
            self.allowed_orgs or self.allowed_teams or {"orgs", "teams"} & self.requirements.facts
        )
        scopes = self.settings.scopes
        return (*scopes, "read:org") if wanted and "read:org" not in scopes else scopes

    def authorize_params(self, request: LoginRequest, http: httpx.Client) -> dict[str, str]:
        return {"login": request.login_hint} if request.login_hint else {}

    def granted_scope(self, body: Mapping[str, Any]) -> str | None:
        scope = body.get("scope")  # comma-separated at GitHub
        return " ".join(scope.replace(",", " ").split()) or None if isinstance(scope, str) else None

    def token_context(
        self, body: Mapping[str, Any], previous: UpstreamTokens | None
    ) -> Mapping[str, Any]:
        return {
            "api_url": self.api_url,
            "host": urlsplit(self.settings.authorization_endpoint).netloc,
        }

    def identify(
        self, http: httpx.Client, tokens: UpstreamTokens, *, nonce: str | None
    ) -> Identity:
        token = tokens.access_token
        response = self._api(http, "/user", "user", token)
        user = self.upstream.json_object(response, what="user", reason="user_invalid")
        user_id, login = user.get("id"), user.get("login")
        if isinstance(user_id, bool) or not isinstance(user_id, int) or not optional_str(login):
            raise LoginFailed("user_invalid", detail=f"GET {self.api_url}/user: no id or login")
        email, verified = None, False  # the primary email, verified or not (rules see only a
        if {"user", "user:email"} & set(self.scopes()):  # verified one: Identity.facts)
            for entry in self._pages(http, "/user/emails", "emails", token):
                if entry.get("primary") is True:
                    email = optional_str(entry.get("email"))
                    verified = email is not None and entry.get("verified") is True
        orgs, teams, memberships = set[str](), set[str](), dict[str, str]()
        if "read:org" in self.scopes():
            orgs = {
                name for name in map(_login, self._pages(http, "/user/orgs", "orgs", token)) if name
            }
            for team in self._pages(http, "/user/teams", "teams", token):
                org_name, slug = _login(team.get("organization")), optional_str(team.get("slug"))
                if org_name and slug:
                    teams.add(f"{org_name}/{slug.lower()}")
            for org_login in self.checked_orgs:  # the membership is authoritative
                memberships[org_login] = self._membership(http, org_login, token)
                (orgs.add if memberships[org_login] == "active" else orgs.discard)(org_login)
        return Identity(
            provider=self.name,
            subject=str(user_id),
            username=login,
            name=optional_str(user.get("name")),
            email=email,
            email_verified=verified,
            orgs=tuple(sorted(orgs)),
            teams=tuple(sorted(teams)),
            raw={"id": user_id, "login": login, "memberships": memberships},
        )

    def check_restrictions(self, identity: Identity) -> None:
        """Pass an active member of an allowed org, or a member of an allowed team."""
        if not (self.allowed_orgs or self.allowed_teams):
            return
        if {*self.allowed_orgs} & {*identity.orgs} or {*self.allowed_teams} & {*identity.teams}:
            return
        states = identity.raw.get("memberships") or {}
        seen = "; ".join(f"{org}: {_describe(state)}" for org, state in sorted(states.items()))
        reason = "org_not_allowed" if self.allowed_orgs else "team_not_allowed"
        raise AccessDenied(
            reason, detail=f"user {identity.subject} is in no allowed org or team ({seen})"
        )

    # -- GitHub's REST API ---------------------------------------------------------------------

    def _api(
        self, http: httpx.Client, path: str, what: str, token: str, ok: tuple[int, ...] = (200,)
    ) -> httpx.Response:
        url = f"{self.api_url}{path}"
        return self.upstream.get_json(http, url, what=what, token=token, headers=API_HEADERS, ok=ok)

    def _pages(self, http: httpx.Client, path: str, what: str, token: str) -> list[dict[str, Any]]:
        url = f"{self.api_url}{path}?per_page=100"
        return self.upstream.get_pages(
            http, url, what=what, token=token, headers=API_HEADERS, max_pages=MAX_PAGES
        )

    def _membership(self, http: httpx.Client, org: str, token: str) -> str:
        """``state`` of the user's membership in ``org``; ``hidden`` (403) or ``none`` (404)."""
        path = f"/user/memberships/orgs/{quote(org, safe='')}"
        response = self._api(http, path, "membership", token, ok=(200, 403, 404))
        if response.status_code != 200:
            return "hidden" if response.status_code == 403 else "none"
        body = self.upstream.json_object(response, what="membership", reason="membership_invalid")
        return sanitize_code(body.get("state"))


def _logins(reader: ConfigReader, key: str, pattern: re.Pattern[str], what: str) -> tuple[str, ...]:
    values = tuple(value.lower() for value in reader.string_list(key, ()))
    for index, value in enumerate(values):
        if not pattern.match(value):
            reader.problem(f"{key}[{index}]", f"must be {what}")
    return values


def _login(value: object) -> str | None:
    """The lower-cased ``login`` of a GitHub user or organisation object."""
    login = value.get("login") if isinstance(value, dict) else None
    return login.lower() if isinstance(login, str) and login else None


def _describe(state: object) -> str:
    if state in ("hidden", "none"):  # GitHub hides restricted orgs with 403, sometimes 404
        return f"not a member (HTTP {403 if state == 'hidden' else 404}; {RESTRICTED_HINT})"
    if state == "active":  # only a team's org: an allowed org's active member passes
        return "active member, in no allowed team"
    return f"membership {state}, not active"


@hookimpl
def broker_register_providers() -> Iterable[ProviderType]:
    return [GitHubProvider]
