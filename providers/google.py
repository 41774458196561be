"""The ``google`` provider type: Google accounts, optionally only those of Workspace domains.

See ``docs/providers/google.md``. OpenID Connect on :mod:`providers._oidc`, plus Google's
specifics (Google's OpenID Connect guide and reference):

- ID Tokens name the issuer ``https://accounts.google.com`` or, for legacy implementations,
  ``accounts.google.com``: both are accepted for the real Google issuer.
- ``hosted_domains`` is enforced on the ``hd`` claim of the signature-verified ID Token only.
  The ``hd`` request parameter merely tunes the account chooser ("don't rely on this UI
  optimization to control who can access your app"), UserInfo is not the signed token, and an
  email suffix says nothing about who administers the account.
- A refresh token comes with ``access_type=offline`` and ``prompt=consent`` (without the prompt
  Google issues one only at the first consent), never with an ``offline_access`` scope.
- Claims come from the ID Token, which carries ``email``, ``email_verified``, ``hd`` and the
  profile when ``email profile`` are asked; the throttled UserInfo only with ``fetch_userinfo``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any, ClassVar, Self

import httpx

from ._config import ConfigReader
from ._oauth2 import OAuth2Settings, optional_str
from ._oidc import OIDCSettings, OpenIDConnectProvider, ProviderMetadata
from .contract import BASE_FACTS, Identity, LoginRequest, ProviderType
from .hookspecs import hookimpl

__all__ = ["GOOGLE_ISSUER", "GoogleProvider", "broker_register_providers"]

GOOGLE_ISSUER = "https://accounts.google.com"
LEGACY_GOOGLE_ISSUER = "accounts.google.com"
_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")


class GoogleProvider(OpenIDConnectProvider):
    """Sign-in with Google (``type: google``), optionally restricted to Workspace domains."""

    type_name: ClassVar[str] = "google"
    default_display_name: ClassVar[str | None] = "Google"
    default_fetch_userinfo: ClassVar[bool] = False
    facts: frozenset[str] = BASE_FACTS | {"hosted_domain"}

    def __init__(
        self,
        name: str,
        settings: OAuth2Settings,
        oidc: OIDCSettings,
        *,
        hosted_domains: tuple[str, ...] = (),
    ) -> None:
        super().__init__(name, settings, oidc)
        self.hosted_domains = hosted_domains

    @classmethod
    def from_reader(cls, name: str, reader: ConfigReader) -> Self | None:
        issuer = reader.url("issuer", allow_query=False) or GOOGLE_ISSUER
        oidc = cls.read_oidc_settings(name, reader, issuer=issuer)
        hosted = reader.pattern_list(
            "hosted_domains", _DOMAIN, "a domain name (example.com)", lower=True
        )
        scopes = reader.raw("scopes")  # validated by read_settings; only peeked at here
        if isinstance(scopes, str):
            scopes = scopes.split()
        if isinstance(scopes, list | tuple) and "offline_access" in scopes:
            reader.problem(
                "scopes",
                "Google has no offline_access scope: the broker asks for a refresh token "
                "(access_type=offline) when a resource needs one",
            )
        settings = cls.read_settings(name, reader, authorization_endpoint="", token_endpoint="")
        if oidc is None or settings is None:
            return None
        return cls(name, settings, oidc, hosted_domains=hosted)

    def accepted_issuers(self, metadata: ProviderMetadata) -> frozenset[str]:
        """Google's reference: the issuer is ``https://accounts.google.com``, and
        ``accounts.google.com`` is also returned for legacy implementations."""
        if metadata.issuer == GOOGLE_ISSUER:
            return frozenset({GOOGLE_ISSUER, LEGACY_GOOGLE_ISSUER})
        return super().accepted_issuers(metadata)

    def scopes(self) -> tuple[str, ...]:
        """The configured scopes: Google refuses ``offline_access`` (see
        :meth:`authorize_params`)."""
        return self.settings.scopes

    def authorize_params(self, request: LoginRequest, http: httpx.Client) -> dict[str, str]:
        """Google's authentication URI parameters: ``hd`` as a hint for the account chooser
        (the domain when one is allowed, ``*`` for "any Workspace account" when several are);
        ``access_type=offline`` with ``prompt=consent`` only when a refresh token is needed."""
        params = super().authorize_params(request, http)
        if len(self.hosted_domains) == 1:
            params["hd"] = self.hosted_domains[0]
        elif self.hosted_domains:
            params["hd"] = "*"
        if self.requirements.offline:
            params["access_type"] = "offline"
            params["prompt"] = "consent"
        return params

    def build_identity(
        self, claims: Mapping[str, Any], id_claims: Mapping[str, Any], metadata: ProviderMetadata
    ) -> Identity:
        """The base identity plus ``hosted_domain``, from the signed ID Token's ``hd`` alone."""
        identity = super().build_identity(claims, id_claims, metadata)
        return replace(identity, hosted_domain=optional_str(id_claims.get("hd")))

    def check_restrictions(self, identity: Identity) -> None:
        """With ``hosted_domains``, the ID Token's ``hd`` must be one of them: an account
        without ``hd`` (a consumer account) or of another organisation is refused."""
        hd = identity.hosted_domain
        found = "no hd claim" if hd is None else f"hd {hd[:100]!r}"
        self.require_membership(
            self.hosted_domains,
            [hd.lower()] if hd is not None else [],
            reason="domain_not_allowed",
            detail=f"id_token has {found}, hosted_domains are {', '.join(self.hosted_domains)}",
            message="This Google account does not belong to an organisation allowed here. "
            "Sign in with your organisation's account.",
        )


@hookimpl
def broker_register_providers() -> Iterable[ProviderType]:
    return [GoogleProvider]
