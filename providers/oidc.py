"""The ``oidc`` provider type: any OpenID Connect provider, configured by its issuer.

See ``docs/providers/oidc.md``. The protocol lives in :mod:`providers._oidc`; this module only
names the type and registers it with the plugin manager.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from ._oidc import OpenIDConnectProvider
from .contract import ProviderType
from .hookspecs import hookimpl

__all__ = ["OIDCProvider", "broker_register_providers"]


class OIDCProvider(OpenIDConnectProvider):
    """A generic OpenID Connect provider (``type: oidc``)."""

    type_name: ClassVar[str] = "oidc"


@hookimpl
def broker_register_providers() -> Iterable[ProviderType]:
    return [OIDCProvider]
