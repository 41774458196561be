"""The ``salesforce`` provider: Salesforce users through the OAuth 2.0 web server flow.

See ``docs/providers/salesforce.md``. The token response names the user by its identity URL
(``id``: ``https://{host}/id/{orgId}/{userId}``), signed with the client secret together with
``issued_at``. The provider checks the signature, and that the URL is on a host Salesforce uses for
the configured login host, before it sends the token there; the identity URL then gives the user
(subject ``{orgId}/{userId}``, ``tenants`` the org). ``instance_url``, the REST base, is kept with
the upstream token for MCP servers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self
from urllib.parse import urlsplit

import httpx

from ._config import ConfigReader, check_url
from ._http import log_host, origin
from ._oauth2 import OAuth2Provider, OAuth2Settings
from .contract import BASE_FACTS, Identity, ProviderType, UpstreamTokens
from .errors import AccessDenied, LoginFailed
from .hookspecs import hookimpl

__all__ = ["SalesforceProvider", "SalesforceSettings", "broker_register_providers"]

PRODUCTION, SANDBOX = "https://login.salesforce.com", "https://test.salesforce.com"
_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_ORG_ID = re.compile(r"^00D[A-Za-z0-9]{12}(?:[A-Za-z0-9]{3})?$")
_IDENTITY_PATH = re.compile(r"^/id/(00D[A-Za-z0-9]{15})/(005[A-Za-z0-9]{15})$")
_IDENTITY_SCOPES = frozenset({"id", "profile", "email", "address", "phone", "full"})
"""Scopes that open the identity URL (profile, email, address, phone are synonyms of id)."""


@dataclass(frozen=True)
class SalesforceSettings(OAuth2Settings):
    """The OAuth 2.0 keys plus the login host and the organisations allowed to sign in (their
    ids' first 15 characters)."""

    login_host: str = PRODUCTION
    allowed_org_ids: frozenset[str] = frozenset()

    @property
    def identity_origins(self) -> frozenset[str]:
        """Where Salesforce puts identity URLs for logins at ``login_host``: that host, and for
        a My Domain also the general login host of its kind (``test`` for sandbox and scratch
        orgs)."""
        host = (urlsplit(self.login_host).hostname or "").lower()
        if not host.endswith(".my.salesforce.com"):
            return frozenset({origin(self.login_host)})
        sandbox = host.endswith((".sandbox.my.salesforce.com", ".scratch.my.salesforce.com"))
        return frozenset({origin(self.login_host), SANDBOX if sandbox else PRODUCTION})


class SalesforceProvider(OAuth2Provider):
    """Salesforce (``type: salesforce``): production, sandbox, My Domain or any login host."""

    type_name: ClassVar[str] = "salesforce"
    default_display_name: ClassVar[str | None] = "Salesforce"
    default_scopes: ClassVar[tuple[str, ...]] = ("id",)
    default_auth_method: ClassVar[str] = "client_secret_post"
    authorization_path: ClassVar[str] = "/services/oauth2/authorize"
    token_path: ClassVar[str] = "/services/oauth2/token"
    # A refresh token when the token must outlive the login: refresh_token asked, either counts.
    offline_scopes: ClassVar[tuple[str, ...]] = ("refresh_token", "offline_access")
    settings_class = SalesforceSettings
    facts = BASE_FACTS | {"tenants"}
    settings: SalesforceSettings

    @classmethod
    def from_reader(cls, name: str, reader: ConfigReader) -> Self | None:
        host = cls.read_login_host(reader)
        orgs = reader.pattern_list("allowed_org_ids", _ORG_ID, "a 15- or 18-character org id")
        allowed = frozenset(org[:15] for org in orgs)  # the 18-character form adds a checksum
        settings = cls.read_settings_under(name, reader, host)
        if settings is not None and not _IDENTITY_SCOPES & set(settings.scopes):
            reader.problem("scopes", "must contain id (the broker reads the identity URL)")
        return cls.build(name, reader, settings, login_host=host, allowed_org_ids=allowed)

    @staticmethod
    def read_login_host(reader: ConfigReader) -> str:
        """The login host from ``sandbox``, ``my_domain`` or ``login_url`` (no trailing ``/``)."""
        sandbox, my_domain = reader.boolean("sandbox", False), reader.string("my_domain")
        login_url = reader.url("login_url", allow_query=False)
        if reader.has("login_url"):
            for key in [k for k, v in (("sandbox", sandbox), ("my_domain", my_domain)) if v]:
                reader.problem(key, "cannot be combined with login_url")
            if login_url and urlsplit(login_url).path not in ("", "/"):
                reader.problem("login_url", "must be a host only, without a path")
            return (login_url or PRODUCTION).rstrip("/")
        if my_domain is None:
            return SANDBOX if sandbox else PRODUCTION
        name = my_domain.lower()
        if not _LABEL.match(name):
            reader.problem("my_domain", "must be the name only (acme for acme.my.salesforce.com)")
        elif sandbox != ("--" in name):
            reader.problem("my_domain", "a sandbox My Domain is MYDOMAIN--SANDBOX, sandbox: true")
        return f"https://{name}.{'sandbox.' if sandbox else ''}my.salesforce.com"

    def token_context(
        self, body: Mapping[str, Any], previous: UpstreamTokens | None
    ) -> Mapping[str, Any]:
        """Check the identity URL (host, shape, signature) before anything uses it, and keep it
        with ``instance_url``. A refresh answer repeating them is checked again: same user only."""
        where = self.upstream.where("token", "POST", self.settings.token_endpoint)
        context = dict(previous.context) if previous is not None else {}
        if body.get("id") is not None or previous is None:
            url, org, user = self.check_identity_url(body.get("id"), where)
            self.check_signature(body, url, where)
            if previous is not None and url != context.get("identity_url"):
                raise LoginFailed("identity_changed", detail=f"{where}: another user's id")
            context.update(identity_url=url, organization_id=org, user_id=user)
        instance_url = body.get("instance_url")
        if instance_url is not None or previous is None:
            if not isinstance(instance_url, str) or check_url(instance_url, allow_query=False):
                raise LoginFailed("instance_url_invalid", detail=f"{where}: instance_url not https")
            context["instance_url"] = instance_url.rstrip("/")
        return context

    def check_identity_url(self, url: object, where: str) -> tuple[str, str, str]:
        """The URL and its org and user ids, when it is on an allowed host and shaped right."""
        if not isinstance(url, str) or check_url(url, allow_query=False) is not None:
            raise LoginFailed("identity_url_invalid", detail=f"{where}: id is not an https URL")
        if origin(url) not in self.settings.identity_origins:
            allowed = " or ".join(sorted(log_host(item) for item in self.settings.identity_origins))
            detail = f"{where}: identity URL on {log_host(url)}, not on {allowed}"
            raise LoginFailed("identity_url_host", detail=detail)
        match = _IDENTITY_PATH.match(urlsplit(url).path)
        if match is None:
            raise LoginFailed("identity_url_invalid", detail=f"{where}: id is not /id/ORG/USER")
        return url, match[1], match[2]

    def check_signature(self, body: Mapping[str, Any], url: str, where: str) -> None:
        """``signature``: base64 HMAC-SHA256 of ``id`` + ``issued_at`` keyed with the secret."""
        signature, issued_at = body.get("signature"), body.get("issued_at")
        if not isinstance(signature, str) or not isinstance(issued_at, str) or not issued_at:
            raise LoginFailed("signature_missing", detail=f"{where}: no signature or issued_at")
        key, message = self.settings.client_secret.encode(), (url + issued_at).encode()
        try:
            given = base64.b64decode(signature, validate=True)
        except ValueError:
            given = b""
        if not hmac.compare_digest(hmac.new(key, message, hashlib.sha256).digest(), given):
            raise LoginFailed("signature_invalid", detail=f"{where}: signature does not match id")

    def identify(
        self, http: httpx.Client, tokens: UpstreamTokens, *, nonce: str | None
    ) -> Identity:
        """``GET`` the checked identity URL with the token: it must name the same org and user."""
        url, org, user = (tokens.context[k] for k in ("identity_url", "organization_id", "user_id"))
        body = self.upstream.get_object(http, url, what="identity", token=tokens.access_token)
        where = self.upstream.where("identity", "GET", url)
        if body.get("organization_id") != org or body.get("user_id") != user:
            raise LoginFailed("identity_mismatch", detail=f"{where}: not the user of the URL")
        if body.get("active", True) is not True:
            message = f"Your {self.display_name} user is not active."
            raise AccessDenied("user_inactive", detail=f"{where}: {org}/{user}", message=message)
        return self.identity_from(body, f"{org}/{user}", name="display_name", tenants=(org,))

    def check_restrictions(self, identity: Identity) -> None:
        org = identity.tenants[0]
        self.require_membership(
            self.settings.allowed_org_ids,
            [org[:15]],
            reason="org_not_allowed",
            detail=f"organisation {org} is not in allowed_org_ids",
            message=f"Your {self.display_name} organisation is not allowed to sign in here.",
        )


@hookimpl
def broker_register_providers() -> Iterable[ProviderType]:
    return [SalesforceProvider]
