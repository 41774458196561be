"""Acme Identity as a sign-in method of the MCP identity broker (``type: acme``).

Acme Identity speaks plain OAuth 2.0, without an ID Token: :class:`providers.OAuth2Provider` runs
the authorization code flow with PKCE against ``{base_url}/oauth/authorize`` and
``{base_url}/oauth/token``; this module reads the user from ``{base_url}/api/me`` and declares
the fact ``clearance`` for the broker's rules.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar, Self

import httpx

from providers import (
    BASE_FACTS,
    ConfigReader,
    Identity,
    LoginFailed,
    OAuth2Provider,
    OAuth2Settings,
    ProviderType,
    UpstreamTokens,
    hookimpl,
)


class AcmeProvider(OAuth2Provider):
    """Sign-in with Acme Identity."""

    type_name: ClassVar[str] = "acme"
    default_display_name: ClassVar[str | None] = "Acme"
    default_scopes: ClassVar[tuple[str, ...]] = ("profile",)
    facts: frozenset[str] = BASE_FACTS | {"groups", "clearance"}

    def __init__(self, name: str, settings: OAuth2Settings, *, base_url: str) -> None:
        super().__init__(name, settings)
        self.base_url = base_url

    @classmethod
    def from_reader(cls, name: str, reader: ConfigReader) -> Self | None:
        base_url = (reader.url("base_url", required=True, allow_query=False) or "").rstrip("/")
        settings = cls.read_settings(
            name,
            reader,
            authorization_endpoint=f"{base_url}/oauth/authorize",
            token_endpoint=f"{base_url}/oauth/token",
        )
        return None if settings is None else cls(name, settings, base_url=base_url)

    def scopes(self) -> tuple[str, ...]:
        """Acme shows clearances only to the ``clearance`` scope: asked when a rule needs it."""
        scopes = self.settings.scopes
        if "clearance" in self.requirements.facts and "clearance" not in scopes:
            scopes = (*scopes, "clearance")
        return scopes

    def identify(
        self, http: httpx.Client, tokens: UpstreamTokens, *, nonce: str | None
    ) -> Identity:
        url = f"{self.base_url}/api/me"
        me = self.upstream.get_object(http, url, what="user", token=tokens.access_token)
        user_id = me.get("id")
        if isinstance(user_id, bool) or not isinstance(user_id, int | str) or user_id == "":
            raise LoginFailed("user_invalid", detail=f"GET {url}: no id")
        return Identity(
            provider=self.name,
            subject=str(user_id),
            username=_text(me.get("login")),
            name=_text(me.get("name")),
            email=_text(me.get("email")),
            email_verified=me.get("email_verified") is True,
            groups=_texts(me.get("groups")),
            extra_facts={"clearance": _texts(me.get("clearance"))},
        )


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _texts(value: object) -> tuple[str, ...]:
    return tuple(v for v in value if isinstance(v, str) and v) if isinstance(value, list) else ()


@hookimpl
def broker_register_providers() -> Iterable[ProviderType]:
    return [AcmeProvider]
