"""The provider plugin contract and the built-in provider plugins.

A third-party plugin writes ``from providers import hookimpl, Identity`` and registers itself in the
``broker.providers`` entry-point group. It may build on the same bases as the built-in providers:
:class:`OAuth2Provider` (plain OAuth 2.0 upstreams) and :class:`OpenIDConnectProvider`, with
:class:`ConfigReader` for its configuration.
"""

from __future__ import annotations

from ._config import ConfigReader
from ._http import UpstreamHTTP
from ._oauth2 import OAuth2Provider, OAuth2Settings
from ._oidc import OIDCSettings, OpenIDConnectProvider
from .contract import (
    BASE_FACTS,
    CallbackRequest,
    Identity,
    LoginRequest,
    LoginResult,
    PasswordLogin,
    Provider,
    ProviderType,
    RecheckingProvider,
    RedirectLogin,
    RefreshingProvider,
    Requirements,
    RequirementsAware,
    UpstreamTokens,
)
from .errors import AccessDenied, ConfigError, LoginFailed, ProviderError, UpstreamUnavailable
from .hookspecs import hookimpl

__all__ = [
    "BASE_FACTS",
    "AccessDenied",
    "CallbackRequest",
    "ConfigError",
    "ConfigReader",
    "Identity",
    "LoginFailed",
    "LoginRequest",
    "LoginResult",
    "OAuth2Provider",
    "OAuth2Settings",
    "OIDCSettings",
    "OpenIDConnectProvider",
    "PasswordLogin",
    "Provider",
    "ProviderError",
    "ProviderType",
    "RecheckingProvider",
    "RedirectLogin",
    "RefreshingProvider",
    "Requirements",
    "RequirementsAware",
    "UpstreamHTTP",
    "UpstreamTokens",
    "UpstreamUnavailable",
    "hookimpl",
]

# Built-in plugins, registered through the same hook as third-party ones.
BUILTIN_PLUGINS = (
    "providers.local",
    "providers.oidc",
    "providers.github",
    "providers.google",
    "providers.keycloak",
    "providers.atlassian",
    "providers.salesforce",
)
