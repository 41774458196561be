"""Hook specifications of the broker's plugin system (pluggy).

Hooks are called with keyword arguments; an implementation may accept a subset of them, so a
parameter added at the end never breaks an existing plugin.
"""

from __future__ import annotations

from collections.abc import Iterable

import pluggy

from .contract import ProviderType

PROJECT_NAME = "broker"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def broker_register_providers() -> Iterable[ProviderType]:  # type: ignore[empty-body]
    """Register upstream identity provider types.

    Return an iterable of provider types: objects with a ``type_name`` (the value of ``type:`` in
    ``broker.yaml``, and the default when the provider's config key has the same name) and a
    ``from_config(name, config, *, base_dir)`` that returns a configured provider. Return ``None``
    or an empty iterable to register nothing. Two plugins registering the same ``type_name`` is a
    start-up error. Called once per application, in no guaranteed order.
    """
