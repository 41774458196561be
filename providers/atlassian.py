"""The ``atlassian`` provider: Atlassian Cloud accounts through OAuth 2.0 "3LO" (not OIDC).

See ``docs/providers/atlassian.md``. The account is ``GET /me`` (scope ``read:me``); the sites the
token reaches are ``GET /oauth/token/accessible-resources``: their cloud ids become ``tenants``,
their URLs ``sites``. There is no organisation claim: ``allowed_cloud_ids`` and
``allowed_sites`` restrict sign-in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Self
from urllib.parse import urlsplit

import httpx

from ._config import ConfigReader, check_url
from ._oauth2 import OAuth2Provider, OAuth2Settings, RecheckByToken, optional_str
from .contract import (
    BASE_FACTS,
    Identity,
    LoginRequest,
    ProviderType,
    UpstreamTokens,
)
from .errors import AccessDenied, LoginFailed
from .hookspecs import hookimpl

__all__ = ["AtlassianProvider", "AtlassianSettings", "broker_register_providers"]

AUTH_URL, API_URL = "https://auth.atlassian.com", "https://api.atlassian.com"
# Required in every authorization request; extra_authorize_params may not change them.
FIXED_AUTHORIZE_PARAMS = {"audience": "api.atlassian.com", "prompt": "consent"}
Resource = dict[str, str]  # {"id": cloud id, "name": ..., "url": site URL as site_key() gives it}


def site_key(url: str) -> str:
    """A site URL as compared and shown: scheme and host lower-cased, no trailing ``/``."""
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path.rstrip('/')}"


@dataclass(frozen=True)
class AtlassianSettings(OAuth2Settings):
    """The OAuth 2.0 keys plus the API base URL and the sites allowed to sign in."""

    api_url: str = API_URL
    allowed_cloud_ids: frozenset[str] = frozenset()
    allowed_sites: frozenset[str] = frozenset()  # site_key() of each


class AtlassianProvider(RecheckByToken, OAuth2Provider):
    """Atlassian Cloud (``type: atlassian``); refreshing and rechecking."""

    type_name: ClassVar[str] = "atlassian"
    default_display_name: ClassVar[str | None] = "Atlassian"
    default_scopes: ClassVar[tuple[str, ...]] = ("read:me",)
    default_auth_method: ClassVar[str] = "client_secret_post"  # what the 3LO docs show
    # 3LO documents no PKCE: /authorize takes a code_challenge but the token endpoint never checks
    # a verifier (Atlassian OAUTH20-2491, ECO-283), so sending one would only look like protection.
    # The client secret and the broker's single-use state guard the code; `pkce: true` remains.
    default_pkce: ClassVar[bool] = False
    facts = BASE_FACTS | {"tenants", "sites"}
    settings: AtlassianSettings

    @classmethod
    def from_reader(cls, name: str, reader: ConfigReader) -> Self | None:
        auth_url = (reader.url("auth_url", allow_query=False) or AUTH_URL).rstrip("/")
        api_url = (reader.url("api_url", allow_query=False) or API_URL).rstrip("/")
        cloud_ids = reader.string_list("allowed_cloud_ids", ())
        sites = reader.url_list("allowed_sites")
        for index, url in enumerate(sites):
            if urlsplit(url).path:
                reader.problem(f"allowed_sites[{index}]", "must be a site URL without a path")
        extra = reader.raw("extra_authorize_params")
        for key in sorted(FIXED_AUTHORIZE_PARAMS):
            if isinstance(extra, Mapping) and key in extra:
                reader.problem(f"extra_authorize_params.{key}", "is set by the provider")
        settings = cls.read_settings(
            name,
            reader,
            authorization_endpoint=f"{auth_url}/authorize",
            token_endpoint=f"{auth_url}/oauth/token",
        )
        if reader.has("scopes") and "read:me" not in reader.scopes("scopes", ()):
            reader.problem("scopes", "must contain read:me (the User identity API)")
        if settings is None or reader.problems:
            return None
        atlassian = AtlassianSettings(
            **vars(settings),
            api_url=api_url,
            allowed_cloud_ids=frozenset(cloud_ids),
            allowed_sites=frozenset(map(site_key, sites)),
        )
        return cls(name, atlassian)

    def scopes(self) -> tuple[str, ...]:
        """``offline_access`` (a refresh token) only when the upstream token must outlive the
        login: each refresh token is one more rotating credential to guard."""
        scopes = self.settings.scopes
        if self.requirements.offline and "offline_access" not in scopes:
            scopes = (*scopes, "offline_access")
        return scopes

    def authorize_params(self, request: LoginRequest, http: httpx.Client) -> dict[str, str]:
        return dict(FIXED_AUTHORIZE_PARAMS)

    def identify(
        self, http: httpx.Client, tokens: UpstreamTokens, *, nonce: str | None
    ) -> Identity:
        """The account (``/me``) and every site the token reaches (unrestricted)."""
        url = f"{self.settings.api_url}/me"
        me = self.upstream.get_object(http, url, what="me", token=tokens.access_token)
        subject = optional_str(me.get("account_id"))
        if subject is None:
            where = self.upstream.where("me", "GET", url)
            raise LoginFailed("me_invalid", f"{where}: no account_id")
        identity = Identity(
            provider=self.name,
            subject=subject,
            username=optional_str(me.get("nickname")),
            name=optional_str(me.get("name")),
            email=optional_str(me.get("email")),
            # Only the API's own JSON true counts (the documented example lacks the field).
            email_verified=me.get("email_verified") is True,
        )
        return with_resources(identity, self.accessible_resources(http, tokens.access_token))

    def accessible_resources(self, http: httpx.Client, token: str) -> list[Resource]:
        """The sites the token reaches; any malformed entry fails the whole answer."""
        what = "accessible_resources"
        url = f"{self.settings.api_url}/oauth/token/accessible-resources"
        response = self.upstream.get_json(http, url, what=what, token=token)
        body = self.upstream.json(response, what=what, reason=f"{what}_invalid")
        where = self.upstream.where(what, "GET", url)
        resources = []
        for item in body if isinstance(body, list) else [None]:
            item = item if isinstance(item, dict) else {}
            cloud_id, site = optional_str(item.get("id")), optional_str(item.get("url"))
            if cloud_id is None or site is None or check_url(site, allow_query=False):
                raise LoginFailed(f"{what}_invalid", f"{where}: an entry without id or valid url")
            name = optional_str(item.get("name")) or ""
            resources.append({"id": cloud_id, "name": name, "url": site_key(site)})
        return resources

    def check_restrictions(self, identity: Identity) -> Identity:
        """``identity`` with only the allowed sites, so rules and MCP servers see no other one;
        :class:`AccessDenied` when none is left. Without either list, every site is allowed."""
        ids, sites = self.settings.allowed_cloud_ids, self.settings.allowed_sites
        if not ids and not sites:
            return identity
        resources: list[Resource] = list(identity.raw.get("resources", ()))
        allowed = [r for r in resources if r["id"] in ids or r["url"] in sites]
        if not allowed:
            detail = f"none of the user's {len(resources)} site(s) is allowed"
            raise AccessDenied("site_not_allowed", detail=detail)
        return with_resources(identity, allowed)

    def identity_context(self, identity: Identity) -> Mapping[str, Any]:
        """The (allowed) sites, for MCP servers; a refresh keeps the context."""
        return {
            "cloud_ids": list(identity.tenants),
            "sites": list(identity.raw["resources"]),
            "api_url": self.settings.api_url,
        }


def with_resources(identity: Identity, resources: list[Resource]) -> Identity:
    """``identity`` with these sites (deduplicated: Atlassian lists a site once per product)."""
    unique = list({(r["id"], r["url"]): r for r in resources}.values())
    tenants = tuple(dict.fromkeys(r["id"] for r in unique))
    sites = tuple(dict.fromkeys(r["url"] for r in unique))
    return replace(identity, tenants=tenants, sites=sites, raw={"resources": unique})


@hookimpl
def broker_register_providers() -> Iterable[ProviderType]:
    return [AtlassianProvider]
