"""The plugin system: built-ins through the same hook as third-party plugins, entry points,
duplicate type names, misspelt hooks, and the hook documentation matching the hookspecs."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pytest

from broker.config import ConfigError
from broker.plugins import ENTRY_POINT_GROUP, ProviderRegistry, plugin_manager, provider_types
from providers import BUILTIN_PLUGINS, hookimpl, hookspecs
from providers.contract import Identity, LoginResult, PasswordLogin, Provider, ProviderType

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


class AcmeProvider:
    type_name = "acme"

    def __init__(self, name: str, display_name: str) -> None:
        self.name, self.display_name = name, display_name

    @classmethod
    def from_config(cls, name: str, config: Any, *, base_dir: str) -> AcmeProvider:
        return cls(name, config.get("display_name", "Acme"))

    def authenticate(self, username: str, password: str) -> LoginResult:
        return LoginResult(Identity(provider=self.name, subject=username))


class AcmePlugin:
    @hookimpl
    def broker_register_providers(self) -> list[type[AcmeProvider]]:
        return [AcmeProvider]


def test_builtins_register_through_the_hook() -> None:
    pm = plugin_manager(load_entry_points=False)
    assert {name for name, _ in pm.list_name_plugin()} >= set(BUILTIN_PLUGINS)
    types = provider_types(pm)
    assert {"local", "oidc"} <= set(types)
    for ptype in types.values():
        assert isinstance(ptype, ProviderType)


def test_third_party_plugin_and_instances_by_name(tmp_path: Path) -> None:
    pm = plugin_manager(load_entry_points=False, extra=(AcmePlugin(),))
    registry = ProviderRegistry.from_config(
        pm, {"acme": {}, "acme2": {"type": "acme"}}, base_dir=str(tmp_path)
    )
    assert registry.names() == ["acme", "acme2"]
    assert isinstance(registry["acme2"], Provider)
    assert isinstance(registry["acme2"], PasswordLogin)
    assert registry["acme2"].name == "acme2"


def test_a_provider_without_a_login_capability_is_refused(tmp_path: Path) -> None:
    class Nameless:
        type_name = "nameless"

        def __init__(self, name: str) -> None:
            self.name, self.display_name = name, name

        @classmethod
        def from_config(cls, name: str, config: Any, *, base_dir: str) -> Nameless:
            return cls(name)

    class Plugin:
        @hookimpl
        def broker_register_providers(self) -> list[Any]:
            return [Nameless]

    pm = plugin_manager(load_entry_points=False, extra=(Plugin(),))
    with pytest.raises(ConfigError) as info:
        ProviderRegistry.from_config(pm, {"nameless": {}}, base_dir=str(tmp_path))
    assert info.value.problems == [
        "providers.nameless: provider type 'nameless' offers neither a redirect login "
        "(login_url, handle_callback) nor a password login (authenticate)"
    ]


def test_duplicate_type_names_are_a_startup_error() -> None:
    class Clash:
        @hookimpl
        def broker_register_providers(self) -> list[Any]:
            class Other(AcmeProvider):
                type_name = "local"

            return [Other]

    pm = plugin_manager(load_entry_points=False, extra=(Clash(),))
    with pytest.raises(ConfigError) as info:
        provider_types(pm)
    assert "two plugins register the provider type 'local'" in info.value.problems[0]


def test_misspelt_hooks_fail_at_startup() -> None:
    class Typo:
        @hookimpl
        def broker_register_provider(self) -> list[Any]:
            return []

    from pluggy import PluginValidationError

    with pytest.raises(PluginValidationError):
        plugin_manager(load_entry_points=False, extra=(Typo(),))


def test_entry_point_group_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata as md
    import sys
    import types as pytypes

    module = pytypes.ModuleType("acme_broker_provider")
    module.broker_register_providers = AcmePlugin().broker_register_providers  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "acme_broker_provider", module)
    ep = md.EntryPoint(name="acme", value="acme_broker_provider", group=ENTRY_POINT_GROUP)

    class Dist:
        entry_points = (ep,)
        metadata = {"name": "acme-broker-provider"}

    monkeypatch.setattr(md, "distributions", lambda: [Dist()])
    pm = plugin_manager()
    assert "acme" in provider_types(pm)


def test_hook_docs_match_the_hookspecs() -> None:
    text = DOCS.read_text()
    specs = {
        name: fn
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("broker_")
    }
    assert specs
    for name, fn in specs.items():
        params = ", ".join(inspect.signature(fn).parameters)
        assert f"### `{name}({params})`" in text, name
        first_line = inspect.getdoc(fn).splitlines()[0]  # type: ignore[union-attr]
        assert first_line in text
    documented = set(re.findall(r"^### `(broker_\w+)\(", text, flags=re.M))
    assert documented == set(specs)
