"""The ``atlassian`` provider: Atlassian Cloud accounts through OAuth 2.0 "3LO" (not OIDC).

See ``docs/providers/atlassian.md``. The account is ``GET /me`` (scope ``read:me``); the sites the
token reaches are ``GET /oauth/token/accessible-resources``: their cloud ids become ``tenants``,
their URLs ``sites``. There is no organisation claim: ``allowed_cloud_ids`` and
``allowed_sites`` restrict sign-in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, ClassVar, Self
from urllib.parse import urlsplit

import httpx

from ._config import ConfigReader, check_url
from ._http import UpstreamAPI, origin
from ._oauth2 import OAuth2Provider, OAuth2Settings, RecheckByToken, optional_str
from .contract import BASE_FACTS, Identity, ProviderType, UpstreamTokens
from .errors import AccessDenied, LoginFailed
from .hookspecs import hookimpl

__all__ = ["AtlassianProvider", "AtlassianSettings", "broker_register_providers"]

AUTH_URL, API_URL = "https://auth.atlassian.com", "https://api.atlassian.com"
Resource = dict[str, str]  # {"id": cloud id, "name": ..., "url": site URL as site_key() gives it}


def site_key(url: str) -> str:
    """A site URL as compared and shown: scheme and host lower-cased, no trailing ``/``."""
    return origin(url) + urlsplit(url).path.rstrip("/")


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
    token_path: ClassVar[str] = "/oauth/token"
    # Mandatory in every authorization request (without them /authorize answers an error).
    fixed_authorize_params = {"audience": "api.atlassian.com", "prompt": "consent"}
    # offline_access (a refresh token) only when the upstream token must outlive the login:
    # each refresh token is one more rotating credential to guard.
    offline_scopes: ClassVar[tuple[str, ...]] = ("offline_access",)
    settings_class = AtlassianSettings
    facts = BASE_FACTS | {"tenants", "sites"}
    settings: AtlassianSettings

    @classmethod
    def from_reader(cls, name: str, reader: ConfigReader) -> Self | None:
        auth_url = reader.base_url("auth_url", AUTH_URL)
        api_url = reader.base_url("api_url", API_URL)
        cloud_ids = reader.string_list("allowed_cloud_ids", ())
        sites = reader.url_list("allowed_sites")
        for index, url in enumerate(sites):
            if urlsplit(url).path:
                reader.problem(f"allowed_sites[{index}]", "must be a site URL without a path")
        settings = cls.read_settings_under(name, reader, auth_url)
        if reader.has("scopes") and "read:me" not in reader.scopes("scopes", ()):
            reader.problem("scopes", "must contain read:me (the User identity API)")
        return cls.build(
            name,
            reader,
            settings,
            api_url=api_url,
            allowed_cloud_ids=frozenset(cloud_ids),
            allowed_sites=frozenset(map(site_key, sites)),
        )

    @cached_property
    def api(self) -> UpstreamAPI:
        """The API gateway (``api_url``): ``/me``, the sites, the product APIs (``/ex/...``)."""
        return self.upstream.api(self.settings.api_url)

    def identify(
        self, http: httpx.Client, tokens: UpstreamTokens, *, nonce: str | None
    ) -> Identity:
        """The account (``/me``) and every site the token reaches (unrestricted)."""
        me = self.api.get_object(http, "/me", what="me", token=tokens.access_token)
        subject = optional_str(me.get("account_id"))
        if subject is None:
            raise LoginFailed("me_invalid", f"{self.api.where('me', '/me')}: no account_id")
        # email_verified: only the API's own JSON true counts (the documented example lacks it).
        identity = self.identity_from(me, subject, username="nickname")
        return with_resources(identity, self.accessible_resources(http, tokens.access_token))

    def accessible_resources(self, http: httpx.Client, token: str) -> list[Resource]:
        """The sites the token reaches; any malformed entry fails the whole answer."""
        what, path = "accessible_resources", "/oauth/token/accessible-resources"
        resources = []
        for item in self.api.get_list(http, path, what=what, token=token):
            cloud_id, site = optional_str(item.get("id")), optional_str(item.get("url"))
            if cloud_id is None or site is None or check_url(site, allow_query=False):
                where = self.api.where(what, path)
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
