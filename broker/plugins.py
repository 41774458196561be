"""The pluggy plugin manager and a typed facade over it; views never call ``pm.hook``."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any

import pluggy

from providers import BUILTIN_PLUGINS, hookspecs
from providers.contract import (
    PasswordLogin,
    Provider,
    ProviderType,
    RedirectLogin,
    RequirementsAware,
    provider_facts,
)
from providers.errors import ConfigError as ProviderConfigError

from . import policy
from .config import ConfigError, Settings

ENTRY_POINT_GROUP = "broker.providers"


def plugin_manager(
    *, load_entry_points: bool = True, extra: tuple[object, ...] = ()
) -> pluggy.PluginManager:
    """Built-in plugins are registered exactly like third-party ones (through ``pm.register``)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for name in BUILTIN_PLUGINS:
        module = importlib.import_module(name)
        pm.register(module, name=name)
    if load_entry_points:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for plugin in extra:
        pm.register(plugin)
    pm.check_pending()
    return pm


def provider_types(pm: pluggy.PluginManager) -> dict[str, ProviderType]:
    types: dict[str, ProviderType] = {}
    problems: list[str] = []
    for result in pm.hook.broker_register_providers():
        for ptype in result or ():
            name = getattr(ptype, "type_name", None)
            if not isinstance(name, str) or not name:
                problems.append(f"plugins: provider type {ptype!r} has no type_name")
                continue
            if name in types and types[name] is not ptype:
                problems.append(f"plugins: two plugins register the provider type {name!r}")
                continue
            types[name] = ptype
    if problems:
        raise ConfigError(problems)
    return types


class ProviderRegistry:
    """The configured providers, by name, in configuration order."""

    def __init__(self, providers: dict[str, Provider]) -> None:
        self._providers = providers

    @classmethod
    def from_config(
        cls, pm: pluggy.PluginManager, configs: Mapping[str, Mapping[str, Any]], *, base_dir: str
    ) -> ProviderRegistry:
        types = provider_types(pm)
        providers: dict[str, Provider] = {}
        problems: list[str] = []
        for name, conf in configs.items():
            type_name = conf.get("type", name)
            ptype = types.get(str(type_name))
            if ptype is None:
                where = f"providers.{name}.type" if "type" in conf else f"providers.{name}"
                known = ", ".join(sorted(types)) or "none"
                problems.append(
                    f"{where}: unknown provider type {type_name!r} (installed: {known})"
                )
                continue
            try:
                provider = ptype.from_config(name, conf, base_dir=base_dir)
            except ProviderConfigError as exc:
                problems.extend(f"providers.{name}.{p}" for p in exc.problems)
                continue
            if not isinstance(provider, RedirectLogin | PasswordLogin):
                problems.append(
                    f"providers.{name}: provider type {type_name!r} offers neither a redirect "
                    "login (login_url, handle_callback) nor a password login (authenticate)"
                )
                continue
            providers[name] = provider
        if problems:
            raise ConfigError(problems)
        return cls(providers)

    @classmethod
    def for_settings(cls, pm: pluggy.PluginManager, settings: Settings) -> ProviderRegistry:
        """The providers of ``settings``, with the rules checked against the facts they declare
        and each provider told what the configuration needs of it."""
        registry = cls.from_config(pm, settings.providers, base_dir=settings.base_dir)
        facts = {name: provider_facts(provider) for name, provider in registry.items()}
        problems = policy.check_rules(settings, facts) + policy.check_claims(settings, facts)
        if problems:
            raise ConfigError(problems)
        for name, provider in registry.items():
            if isinstance(provider, RequirementsAware):
                provider.apply_requirements(policy.requirements(settings, name, facts[name]))
        return registry

    def items(self) -> Iterator[tuple[str, Provider]]:
        return iter(self._providers.items())

    def __getitem__(self, name: str) -> Provider:
        return self._providers[name]

    def get(self, name: str) -> Provider | None:
        return self._providers.get(name)

    def __iter__(self) -> Iterator[Provider]:
        return iter(self._providers.values())

    def __len__(self) -> int:
        return len(self._providers)

    def names(self) -> list[str]:
        return list(self._providers)
