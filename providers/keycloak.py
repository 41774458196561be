"""The ``keycloak`` provider type: one realm of a Keycloak server (``docs/providers/keycloak.md``).

OpenID Connect on :mod:`providers._oidc`. The issuer is the realm base, ``{server_url}/realms/
{realm}`` (Keycloak 17+) or ``{server_url}/auth/realms/{realm}`` (16-, ``--http-relative-path``),
chosen by ``relative_path`` or by probing discovery; ``expected_issuer`` names it behind a proxy.
Roles come from the access token (a JWT signed with the realm keys) when it is one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any, ClassVar, Self
from urllib.parse import quote, urlsplit

import httpx
import jwt
from jwt.types import Options

from ._config import ConfigReader, sanitize_code
from ._oauth2 import OAuth2Settings, strings
from ._oidc import CLOCK_SKEW, OIDCSettings, OpenIDConnectProvider, ProviderMetadata
from .contract import BASE_FACTS, Identity, ProviderType, UpstreamTokens
from .errors import LoginFailed
from .hookspecs import hookimpl

__all__ = ["KeycloakProvider", "broker_register_providers"]

LAYOUTS = ("", "/auth")
"""Relative paths probed without ``relative_path``: Keycloak 17+ first, then the old ``/auth``."""
_RELATIVE_PATH = re.compile(r"^(/(?!\.\.?(/|$))[A-Za-z0-9._~!$&'()*+,;=:@-]+)*/?$")
"""``relative_path``: empty, or ``/``-separated path segments (no ``.``, ``..`` or escapes)."""
_DERIVED = "derived from server_url, realm and relative_path (expected_issuer behind a proxy)"


class KeycloakProvider(OpenIDConnectProvider):
    """Sign-in with one Keycloak realm (``type: keycloak``)."""

    type_name: ClassVar[str] = "keycloak"
    default_display_name: ClassVar[str | None] = "Keycloak"
    facts: frozenset[str] = BASE_FACTS | {"groups", "roles", "client_roles"}

    def __init__(
        self,
        name: str,
        settings: OAuth2Settings,
        oidc: OIDCSettings,
        *,
        realm_bases: tuple[str, ...],
    ) -> None:
        super().__init__(name, settings, oidc)
        self.realm_bases = realm_bases
        # A configured expected_issuer (a proxy) holds for every layout probed.
        self.pinned_issuer = oidc.expected_issuer if oidc.expected_issuer != oidc.issuer else None

    @classmethod
    def from_reader(cls, name: str, reader: ConfigReader) -> Self | None:
        for key in ("issuer", "discovery_url"):
            if reader.raw(key) is not None:
                reader.problem(key, f"not a keycloak key: the issuer is {_DERIVED}")
        server_url = reader.url("server_url", required=True, allow_query=False)
        if server_url is not None:
            server_url = server_url.rstrip("/")
            if "/realms/" in urlsplit(server_url).path + "/":
                reader.problem("server_url", "must be the server's URL, without /realms/<realm>")
        realm = reader.string("realm", required=True)
        if realm is not None and ("/" in realm or realm.strip(".") == "" or realm != realm.strip()):
            reader.problem("realm", "must be a realm name (no /, no surrounding spaces)")
        relative = reader.raw("relative_path")
        layouts: tuple[str, ...] = LAYOUTS
        if relative is not None:
            if not isinstance(relative, str) or not _RELATIVE_PATH.match(relative):
                reader.problem("relative_path", 'must be "" or a path such as /auth')
            else:
                layouts = (relative.rstrip("/"),)
        realm_path = quote(realm or "", safe="")
        bases = tuple(f"{server_url}{path}/realms/{realm_path}" for path in layouts)
        oidc = cls.read_oidc_settings(name, reader, issuer=bases[0])
        settings = cls.read_settings(name, reader, authorization_endpoint="", token_endpoint="")
        if oidc is None or settings is None or server_url is None or realm is None:
            return None
        return cls(name, settings, oidc, realm_bases=bases)

    def discovery_candidates(self) -> list[tuple[str, str]]:
        """Each layout's discovery; its issuer must be that base (or ``expected_issuer``)."""
        return [
            (f"{base}/.well-known/openid-configuration", self.pinned_issuer or base)
            for base in self.realm_bases
        ]

    def build_identity(
        self, claims: Mapping[str, Any], id_claims: Mapping[str, Any], metadata: ProviderMetadata
    ) -> Identity:
        identity = super().build_identity(claims, id_claims, metadata)
        fields = {"extra_facts": {"client_roles": ()}, **self.authorization(claims)}
        return replace(identity, **fields)

    def identify(
        self, http: httpx.Client, tokens: UpstreamTokens, *, nonce: str | None
    ) -> Identity:
        """The ID Token and UserInfo identity; roles and groups from a JWT access token win."""
        identity = super().identify(http, tokens, nonce=nonce)
        access = self.access_token_claims(http, tokens.access_token, subject=identity.subject)
        return identity if access is None else replace(identity, **self.authorization(access))

    def recheck_identity(
        self,
        identity: Identity,
        claims: Mapping[str, Any],
        tokens: UpstreamTokens,
        http: httpx.Client,
    ) -> Identity:
        """As at sign-in: roles and groups of a JWT access token win over UserInfo's."""
        current = super().recheck_identity(identity, claims, tokens, http)
        access = self.access_token_claims(http, tokens.access_token, subject=identity.subject)
        return current if access is None else replace(current, **self.authorization(access))

    def authorization(self, claims: Mapping[str, Any]) -> dict[str, Any]:
        """Identity fields of the claims present: ``roles`` (``realm_access.roles``),
        ``client_roles`` (``resource_access``, as ``<client>/<role>``) and ``groups``."""
        fields: dict[str, Any] = {}
        if isinstance(realm := claims.get("realm_access"), Mapping):
            fields["roles"] = strings(realm.get("roles"))
        if isinstance(clients := claims.get("resource_access"), Mapping):
            pairs = [(client, e) for client, e in clients.items() if isinstance(e, Mapping)]
            roles = tuple(f"{client}/{r}" for client, e in pairs for r in strings(e.get("roles")))
            fields["extra_facts"] = {"client_roles": roles}
        if self.oidc.groups_claim in claims:
            fields["groups"] = strings(claims[self.oidc.groups_claim])
        return fields

    def access_token_claims(
        self, http: httpx.Client, token: str, *, subject: str
    ) -> dict[str, Any] | None:
        """A JWT access token's claims, verified with the realm's keys (``None`` when opaque).
        Its ``aud`` is Keycloak's ``account``, not us: ``azp`` must be our client id instead,
        ``sub`` the ID Token's, ``typ`` Bearer."""
        if token.count(".") != 2:
            return None  # opaque (a JWE has five parts; Keycloak does not encrypt access tokens)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            return None
        reason = "access_token_invalid"
        metadata = self.metadata(http)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.allowed_algorithms(metadata):
            raise LoginFailed(reason, detail=f"algorithm {sanitize_code(alg)} not allowed")
        key = self._verification_key(http, metadata, header, alg, reason=reason)
        try:
            issuers = self.accepted_issuers(metadata)
            required: Options = {"require": ["iss", "exp", "azp"], "verify_aud": False}
            claims: dict[str, Any] = jwt.decode(
                token, key, [alg], issuer=issuers, leeway=CLOCK_SKEW, options=required
            )
        except jwt.InvalidTokenError as exc:
            expired = isinstance(exc, jwt.ExpiredSignatureError)
            raise LoginFailed(reason, detail="expired" if expired else type(exc).__name__) from None
        if claims["azp"] != self.settings.client_id:
            raise LoginFailed(reason, detail="azp is another client")
        if claims.get("sub", subject) != subject:
            raise LoginFailed(reason, detail="sub is not the ID Token's")
        if claims.get("typ", "Bearer") != "Bearer":
            raise LoginFailed(reason, detail="typ is not Bearer")
        return claims


@hookimpl
def broker_register_providers() -> Iterable[ProviderType]:
    return [KeycloakProvider]
