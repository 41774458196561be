"""The ``github`` provider type: github.com or GitHub Enterprise Server, over OAuth 2.0.

See ``docs/providers/github.md``. GitHub has no ID Token: the identity comes from its REST API
(``/user``, ``/user/emails``, ``/user/orgs``, ``/user/teams``, ``/user/memberships/orgs/{org}``).
The OAuth 2.0 flow is :mod:`providers._oauth2`'s; this module holds only GitHub's specifics.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, Self
from urllib.parse import quote, urlsplit

import httpx

from ._config import ConfigReader, sanitize_code
from ._http import UpstreamAPI
from ._oauth2 import OAuth2Provider, OAuth2Settings, RecheckByToken, optional_str
from .contract import BASE_FACTS, Identity, ProviderType, UpstreamTokens
from .errors import LoginFailed
from .hookspecs import hookimpl

__all__ = ["GitHubProvider", "GitHubSettings", "broker_register_providers"]

API_HEADERS = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28"}
PAGE = {"per_page": "100"}  # the largest page GitHub serves
ORG_LOGIN = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,38})$")
TEAM_SLUG = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,38})/[a-z0-9._-]{1,100}$")
RESTRICTED_HINT = "the organisation may restrict OAuth App access; an owner must approve the app"


@dataclass(frozen=True)
class GitHubSettings(OAuth2Settings):
    """The OAuth 2.0 keys plus the REST API's base URL and the orgs and teams allowed in."""

    api_url: str = "https://api.github.com"
    allowed_orgs: tuple[str, ...] = ()  # lower-cased organisation logins
    allowed_teams: tuple[str, ...] = ()  # lower-cased org/team-slug


class GitHubProvider(RecheckByToken, OAuth2Provider):
    """Sign-in with GitHub (``type: github``); an OAuth App or a GitHub App's user tokens."""

    type_name: ClassVar[str] = "github"
    default_display_name: ClassVar[str | None] = "GitHub"
    default_scopes: ClassVar[tuple[str, ...]] = ("read:user", "user:email")
    default_auth_method: ClassVar[str] = "client_secret_post"
    authorization_path: ClassVar[str] = "/login/oauth/authorize"
    token_path: ClassVar[str] = "/login/oauth/access_token"
    login_hint_param: ClassVar[str | None] = "login"
    scope_delimiter: ClassVar[str] = ","  # the token response's "read:user,user:email"
    settings_class = GitHubSettings
    facts: frozenset[str] = BASE_FACTS | {"orgs", "teams"}
    settings: GitHubSettings

    @classmethod
    def from_reader(cls, name: str, reader: ConfigReader) -> Self | None:
        enterprise = reader.base_url("enterprise_url")
        auth = reader.base_url("auth_url", "https://github.com")
        api = reader.base_url("api_url", "https://api.github.com")
        if reader.has("enterprise_url") and (reader.has("auth_url") or reader.has("api_url")):
            reader.problem("enterprise_url", "cannot be combined with auth_url or api_url")
        if enterprise:
            auth, api = enterprise, f"{enterprise}/api/v3"
        orgs = reader.pattern_list("allowed_orgs", ORG_LOGIN, "an organisation login", lower=True)
        teams = reader.pattern_list("allowed_teams", TEAM_SLUG, "an org/team-slug", lower=True)
        settings = cls.read_settings_under(name, reader, auth)
        return cls.build(
            name, reader, settings, api_url=api, allowed_orgs=orgs, allowed_teams=teams
        )

    @cached_property
    def api(self) -> UpstreamAPI:
        """The REST API, with the media type and API version GitHub asks clients to send."""
        return self.upstream.api(self.settings.api_url, headers=API_HEADERS, page_params=PAGE)

    def scopes(self) -> tuple[str, ...]:
        """``read:org`` is asked for only when restrictions or rules need orgs or teams."""
        restricted = self.settings.allowed_orgs or self.settings.allowed_teams
        wanted = restricted or {"orgs", "teams"} & self.requirements.facts
        scopes = self.settings.scopes
        return (*scopes, "read:org") if wanted and "read:org" not in scopes else scopes

    def token_context(
        self, body: Mapping[str, Any], previous: UpstreamTokens | None
    ) -> Mapping[str, Any]:
        host = urlsplit(self.settings.authorization_endpoint).netloc
        return {"api_url": self.settings.api_url, "host": host}

    def identify(
        self, http: httpx.Client, tokens: UpstreamTokens, *, nonce: str | None
    ) -> Identity:
        token = tokens.access_token
        user = self.api.get_object(http, "/user", what="user", token=token)
        user_id, login = user.get("id"), user.get("login")
        if isinstance(user_id, bool) or not isinstance(user_id, int) or not optional_str(login):
            raise LoginFailed("user_invalid", detail=f"GET {self.api.url('/user')}: no id or login")
        email, verified = None, False  # the primary email, verified or not (rules see only a
        if {"user", "user:email"} & set(self.scopes()):  # verified one: Identity.facts)
            for entry in self.api.get_pages(http, "/user/emails", what="emails", token=token):
                if entry.get("primary") is True:
                    email = optional_str(entry.get("email"))
                    verified = email is not None and entry.get("verified") is True
        orgs, teams, memberships = set[str](), set[str](), dict[str, str]()
        if "read:org" in self.scopes():
            listed = self.api.get_pages(http, "/user/orgs", what="orgs", token=token)
            orgs = {name for name in map(_login, listed) if name}
            for team in self.api.get_pages(http, "/user/teams", what="teams", token=token):
                org_name, slug = _login(team.get("organization")), optional_str(team.get("slug"))
                if org_name and slug:
                    teams.add(f"{org_name}/{slug.lower()}")
            teams_orgs = [team.split("/")[0] for team in self.settings.allowed_teams]
            checked = dict.fromkeys((*self.settings.allowed_orgs, *teams_orgs))
            for org_login in checked:  # of allowed orgs and teams: the membership is authoritative
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
        states = identity.raw.get("memberships") or {}
        seen = "; ".join(f"{org}: {_describe(state)}" for org, state in sorted(states.items()))
        self.require_membership(
            self.settings.allowed_orgs + self.settings.allowed_teams,  # teams are org/slug
            identity.orgs + identity.teams,
            reason="org_not_allowed" if self.settings.allowed_orgs else "team_not_allowed",
            detail=f"user {identity.subject} is in no allowed org or team ({seen})",
        )

    def _membership(self, http: httpx.Client, org: str, token: str) -> str:
        """``state`` of the user's membership in ``org``; ``hidden`` (403) or ``none`` (404)."""
        path = f"/user/memberships/orgs/{quote(org, safe='')}"
        response = self.api.get(http, path, what="membership", token=token, ok=(200, 403, 404))
        if response.status_code != 200:
            return "hidden" if response.status_code == 403 else "none"
        body = self.upstream.json_object(response, what="membership", reason="membership_invalid")
        return sanitize_code(body.get("state"))


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
