"""The contract between the broker and an upstream identity provider plugin.

Modelled on Dex's connector interfaces: the base is small, capabilities are separate protocols, and
the result of a login is a frozen :class:`Identity`. A provider sees plain mappings and an HTTP
client, never ``flask.request``; it imports neither Flask, SQLAlchemy nor ``broker``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import httpx


@dataclass(frozen=True)
class Identity:
    """Who the upstream says the user is.

    ``subject`` is the provider's stable, never-reassigned id for the user (GitHub numeric id,
    OIDC ``sub``, ...), never an email or a renamable login. ``email`` counts for policy only when
    ``email_verified`` is true. ``extra`` holds provider specifics that rules may use (roles, teams,
    cloud ids); ``connector_data`` is opaque data for the provider itself and is never shown.
    """

    provider: str
    subject: str
    username: str | None = None
    name: str | None = None
    email: str | None = None
    email_verified: bool = False
    groups: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    def snapshot(self) -> dict[str, Any]:
        """A JSON-serialisable copy for storage and the audit log."""
        return {
            "provider": self.provider,
            "subject": self.subject,
            "username": self.username,
            "name": self.name,
            "email": self.email,
            "email_verified": self.email_verified,
            "groups": list(self.groups),
            "extra": dict(self.extra),
        }


@dataclass(frozen=True)
class UpstreamTokens:
    """Tokens the upstream issued at login; the broker seals them before storing."""

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
class FormLogin:
    """A provider that signs users in with a form on the broker's own page (``local``) answers
    :meth:`Provider.login_url` with this instead of a URL."""

    fields: tuple[str, ...] = ("username", "password")


@runtime_checkable
class Provider(Protocol):
    """The base capability: every provider has a name, a display name, and the upstream leg."""

    name: str
    display_name: str

    def login_url(self, request: LoginRequest, http: httpx.Client) -> str | FormLogin:
        """The URL to send the browser to, or :class:`FormLogin` for a form on the broker."""
        ...

    def handle_callback(self, request: CallbackRequest, http: httpx.Client) -> LoginResult:
        """Turn the callback into an identity, or raise a :mod:`providers.errors` error."""
        ...


@runtime_checkable
class PasswordProvider(Protocol):
    """Optional: signs users in with a username and password typed on the broker's own form."""

    def authenticate(self, username: str, password: str) -> LoginResult:
        """Return the identity, or raise :class:`providers.errors.LoginFailed` (``bad_credentials``)
        taking the same time whether or not the user exists."""
        ...


@runtime_checkable
class RefreshingProvider(Protocol):
    """Optional: can refresh the upstream token (used for token exchange, a later capability)."""

    def refresh(self, tokens: UpstreamTokens, http: httpx.Client) -> UpstreamTokens: ...


@runtime_checkable
class ProviderType(Protocol):
    """What a plugin registers: a provider class (or any factory) with a ``type_name`` and a
    ``from_config`` that validates its configuration eagerly and raises
    :class:`providers.errors.ConfigError` naming the key paths of every problem."""

    type_name: str

    def from_config(self, name: str, config: Mapping[str, Any], *, base_dir: str) -> Provider: ...
