"""The provider plugin contract and the built-in provider plugins.

A third-party plugin writes ``from providers import hookimpl, Identity`` and registers itself in the
``broker.providers`` entry-point group.
"""

from __future__ import annotations

from .contract import (
    CallbackRequest,
    FormLogin,
    Identity,
    LoginRequest,
    LoginResult,
    PasswordProvider,
    Provider,
    ProviderType,
    RefreshingProvider,
    UpstreamTokens,
)
from .errors import AccessDenied, ConfigError, LoginFailed, ProviderError, UpstreamUnavailable
from .hookspecs import hookimpl

__all__ = [
    "AccessDenied",
    "CallbackRequest",
    "ConfigError",
    "FormLogin",
    "Identity",
    "LoginFailed",
    "LoginRequest",
    "LoginResult",
    "PasswordProvider",
    "Provider",
    "ProviderError",
    "ProviderType",
    "RefreshingProvider",
    "UpstreamTokens",
    "UpstreamUnavailable",
    "hookimpl",
]

# Built-in plugins, registered through the same hook as third-party ones.
BUILTIN_PLUGINS = ("providers.local", "providers.oidc")
