"""The contract between the broker and an upstream identity provider plugin.

Modelled on Dex's connector interfaces: the base is small (a name and a display name) and every
capability is a separate protocol a provider may implement:

- :class:`RedirectLogin`: the browser goes to the upstream and comes back to the broker's
  callback (OAuth 2.0 and OpenID Connect providers);
- :class:`PasswordLogin`: the user types a username and password into the broker's own form
  (``local``);
- :class:`RefreshingProvider`: the upstream token can be refreshed;
- :class:`RecheckingProvider`: the user can be checked again upstream after sign-in (membership
  still valid);
- :class:`RequirementsAware`: the provider wants to know, once at start-up, what the broker's
  configuration needs of it (the facts the rules read, whether its token must outlive the login).

The result of a login is a frozen :class:`Identity`. A provider sees plain mappings and an HTTP
client, never ``flask.request``; it imports neither Flask, SQLAlchemy nor ``broker``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import httpx

BASE_FACTS = frozenset(
    {"provider", "subject", "username", "name", "email", "email_domain", "email_verified"}
)
"""Facts every identity declares (``email`` and ``email_domain`` only when the email is
verified)."""

FIELD_FACTS = frozenset({"groups", "roles", "orgs", "teams", "hosted_domain", "tenants", "sites"})
"""Facts backed by :class:`Identity` fields; a provider lists those it fills in ``facts``."""


@dataclass(frozen=True)
class Identity:
    """Who the upstream says the user is, normalised for rules and MCP servers.

    ``subject`` is the provider's stable, never-reassigned id for the user (GitHub numeric id,
    OIDC ``sub``, Salesforce organisation and user id), never an email or a renamable login.
    ``email`` counts for policy only when ``email_verified`` is true. ``teams`` are
    ``org/team`` slugs; ``tenants`` are the upstream tenancy ids the user belongs to (Atlassian
    cloud ids, a Salesforce organisation id); ``sites`` their URLs. ``extra_facts`` are further
    facts a provider declares for rules (``client_roles``...): names to lists of strings.
    ``raw`` is server-only data for the provider itself (never in a token, a page or a log).
    """

    provider: str
    subject: str
    username: str | None = None
    name: str | None = None
    email: str | None = None
    email_verified: bool = False
    groups: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    orgs: tuple[str, ...] = ()
    teams: tuple[str, ...] = ()
    hosted_domain: str | None = None
    tenants: tuple[str, ...] = ()
    sites: tuple[str, ...] = ()
    extra_facts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict)

    def facts(self) -> dict[str, frozenset[str]]:
        """Every fact this identity declares, as sets of strings, for the rules: the base facts,
        the fields, and ``extra_facts``. An unverified email declares neither ``email`` nor
        ``email_domain``."""
        email = self.email if self.email_verified and self.email else None
        facts: dict[str, frozenset[str]] = {
            "provider": frozenset({self.provider}),
            "subject": frozenset({self.subject}),
            "username": frozenset({self.username} if self.username else ()),
            "name": frozenset({self.name} if self.name else ()),
            "email": frozenset({email} if email else ()),
            "email_domain": frozenset({email.rsplit("@", 1)[1]} if email and "@" in email else ()),
            "email_verified": frozenset({"true" if self.email_verified else "false"}),
            "groups": frozenset(self.groups),
            "roles": frozenset(self.roles),
            "orgs": frozenset(self.orgs),
            "teams": frozenset(self.teams),
            "hosted_domain": frozenset({self.hosted_domain} if self.hosted_domain else ()),
            "tenants": frozenset(self.tenants),
            "sites": frozenset(self.sites),
        }
        for name, values in self.extra_facts.items():
            # A provider's own facts add to the built-in ones, never replace them (an extra
            # "email" must not bypass the verified-email rule).
            if name not in facts:
                facts[name] = frozenset(values)
        return facts

    def snapshot(self) -> dict[str, Any]:
        """A JSON-serialisable copy for storage (``identities.snapshot``)."""
        return {
            "provider": self.provider,
            "subject": self.subject,
            "username": self.username,
            "name": self.name,
            "email": self.email,
            "email_verified": self.email_verified,
            "groups": list(self.groups),
            "roles": list(self.roles),
            "orgs": list(self.orgs),
            "teams": list(self.teams),
            "hosted_domain": self.hosted_domain,
            "tenants": list(self.tenants),
            "sites": list(self.sites),
            "extra_facts": {k: list(v) for k, v in self.extra_facts.items()},
            "raw": dict(self.raw),
        }

    @classmethod
    def from_snapshot(cls, data: Mapping[str, Any]) -> Identity:
        """The inverse of :meth:`snapshot`; also reads snapshots of the first release, whose
        ``extra`` held ``roles`` and ``hd``."""
        legacy = data.get("extra") if isinstance(data.get("extra"), Mapping) else {}
        assert isinstance(legacy, Mapping)

        def strings(key: str, fallback: Any = ()) -> tuple[str, ...]:
            value = data.get(key, fallback)
            if not isinstance(value, list | tuple):
                return ()
            return tuple(item for item in value if isinstance(item, str))

        extra = data.get("extra_facts")
        return cls(
            provider=str(data["provider"]),
            subject=str(data["subject"]),
            username=_opt(data.get("username")),
            name=_opt(data.get("name")),
            email=_opt(data.get("email")),
            email_verified=data.get("email_verified") is True,
            groups=strings("groups"),
            roles=strings("roles", legacy.get("roles", ())),
            orgs=strings("orgs"),
            teams=strings("teams"),
            hosted_domain=_opt(data.get("hosted_domain", legacy.get("hd"))),
            tenants=strings("tenants"),
            sites=strings("sites"),
            extra_facts={
                str(k): tuple(x for x in v if isinstance(x, str))
                for k, v in (extra.items() if isinstance(extra, Mapping) else ())
                if isinstance(v, list | tuple)
            },
            raw=dict(data.get("raw") or legacy),
        )


def _opt(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True)
class UpstreamTokens:
    """Tokens the upstream issued at login; the broker seals them before storing. ``context`` is
    what an MCP server needs beside the token (Atlassian cloud ids and sites, Salesforce
    ``instance_url``, the GitHub API host); it is not secret."""

    access_token: str
    refresh_token: str | None = None
    expires_at: int | None = None
    scope: str | None = None
    id_token: str | None = None
    context: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LoginResult:
    identity: Identity
    tokens: UpstreamTokens | None = None


@dataclass(frozen=True)
class LoginRequest:
    """What the broker hands a provider to start the upstream leg.

    ``state`` is the broker's single-use upstream state (bound server-side to the pending login),
    ``nonce`` and ``code_verifier`` are fresh secrets the broker keeps sealed for the callback,
    ``redirect_uri`` is the broker's callback URL for this provider, ``login_hint`` optional.
    """

    state: str
    nonce: str
    code_verifier: str
    redirect_uri: str
    login_hint: str | None = None


@dataclass(frozen=True)
class CallbackRequest:
    """The callback as the provider needs it: query (or form) parameters, plus the secrets kept from
    :class:`LoginRequest` (the broker has already matched ``state``)."""

    params: Mapping[str, str]
    nonce: str
    code_verifier: str
    redirect_uri: str


@dataclass(frozen=True)
class Requirements:
    """What the broker's configuration needs of one provider, told once at start-up.

    ``facts`` are the identity facts that rules (and the claims resources may see) read;
    ``offline`` says the upstream token must outlive the login (a resource obtains it by token
    exchange), so the provider asks for a refresh token.
    """

    facts: frozenset[str] = frozenset()
    offline: bool = False


@runtime_checkable
class Provider(Protocol):
    """The base every provider has: a name (its key in ``broker.yaml``) and a display name.

    A provider may also have ``facts``, a ``frozenset`` of the fact names its identities can
    declare (default :data:`BASE_FACTS`); a rule naming a fact no configured provider declares
    is a start-up error. A provider implements :class:`RedirectLogin` or :class:`PasswordLogin`.
    """

    name: str
    display_name: str


@runtime_checkable
class RedirectLogin(Protocol):
    """Sign-in at the upstream: the browser is sent there and comes back to the callback."""

    def login_url(self, request: LoginRequest, http: httpx.Client) -> str:
        """The URL to send the browser to."""
        ...

    def handle_callback(self, request: CallbackRequest, http: httpx.Client) -> LoginResult:
        """Turn the callback into an identity, or raise a :mod:`providers.errors` error."""
        ...


@runtime_checkable
class PasswordLogin(Protocol):
    """Sign-in with a username and password typed on the broker's own form."""

    def authenticate(self, username: str, password: str) -> LoginResult:
        """Return the identity, or raise :class:`providers.errors.LoginFailed` (``bad_credentials``)
        taking the same time whether or not the user exists."""
        ...


@runtime_checkable
class RefreshingProvider(Protocol):
    """Optional: refreshes the upstream token. Returns the new tokens (keeping the old refresh
    token when the upstream sends none); raises :class:`providers.errors.LoginFailed` when the
    refresh token is no longer good and :class:`providers.errors.UpstreamUnavailable` when the
    upstream cannot be reached."""

    def refresh(self, tokens: UpstreamTokens, http: httpx.Client) -> UpstreamTokens: ...


@runtime_checkable
class RecheckingProvider(Protocol):
    """Optional: checks the user again upstream, some time after sign-in.

    Given the stored identity and the current upstream tokens, return the identity as the
    upstream sees it now; raise :class:`providers.errors.AccessDenied` when the user no longer
    passes the provider's restrictions (left the organisation, site removed), and
    :class:`providers.errors.UpstreamUnavailable` when the upstream cannot be reached.
    """

    def recheck(
        self, identity: Identity, tokens: UpstreamTokens | None, http: httpx.Client
    ) -> Identity: ...


@runtime_checkable
class CheckingProvider(Protocol):
    """Optional: ``broker check-config --connect`` asks the provider whether it can work: reach
    its upstream (discovery, keys, endpoints) or read its files. Returns one line per thing
    checked (``discovery https://idp/.well-known/openid-configuration: issuer https://idp``);
    raises a :mod:`providers.errors` error naming the URL and the cause when one fails."""

    def check(self, http: httpx.Client) -> list[str]: ...


@runtime_checkable
class RequirementsAware(Protocol):
    """Optional: told once, after configuration and before the first request, what the broker
    needs of this provider (GitHub asks for ``read:org`` only when rules read orgs or teams)."""

    def apply_requirements(self, requirements: Requirements) -> None: ...


@runtime_checkable
class ProviderType(Protocol):
    """What a plugin registers: a provider class (or any factory) with a ``type_name`` and a
    ``from_config`` that validates its configuration eagerly and raises
    :class:`providers.errors.ConfigError` naming the key paths of every problem."""

    type_name: str

    def from_config(self, name: str, config: Mapping[str, Any], *, base_dir: str) -> Provider: ...


def provider_facts(provider: Provider) -> frozenset[str]:
    """The facts ``provider``'s identities can declare."""
    declared = getattr(provider, "facts", None)
    if isinstance(declared, frozenset | set | tuple | list):
        return BASE_FACTS | frozenset(str(name) for name in declared)
    return BASE_FACTS
