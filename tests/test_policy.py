"""Rules read the facts an identity declares; rules that cannot mean what they say stop start-up.

The facts come from :meth:`providers.contract.Identity.facts`, so a provider that declares a new
fact needs no change to the broker: a third-party provider here declares ``clearance``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from broker.config import ConfigError, Settings, parse
from broker.plugins import ProviderRegistry, plugin_manager
from broker.policy import decide, requirements
from providers import hookimpl
from providers.contract import BASE_FACTS, Identity, LoginResult, Requirements

RESOURCE = "https://mcp.example.com/jira"


class ClearanceProvider:
    """A third-party provider whose identities declare a fact of its own, ``clearance``."""

    type_name = "clearance"
    facts = frozenset({"clearance", "groups"})

    def __init__(self, name: str) -> None:
        self.name, self.display_name = name, "Clearance"
        self.requirements: Requirements | None = None

    @classmethod
    def from_config(cls, name: str, config: Any, *, base_dir: str) -> ClearanceProvider:
        return cls(name)

    def authenticate(self, username: str, password: str) -> LoginResult:
        return LoginResult(Identity(provider=self.name, subject=username))

    def apply_requirements(self, requirements: Requirements) -> None:
        self.requirements = requirements


class ClearancePlugin:
    @hookimpl
    def broker_register_providers(self) -> list[Any]:
        return [ClearanceProvider]


def settings(tmp_path: Path, rules: list[dict[str, Any]], **extra: Any) -> Settings:
    users = tmp_path / "users.yaml"
    users.write_text("users: {}\n")
    data: dict[str, Any] = {
        "issuer": "http://127.0.0.1:8000",
        "secret_key": "s" * 40,
        "providers": {"local": {"users_file": str(users)}, "vault": {"type": "clearance"}},
        "resources": [
            {
                "uri": RESOURCE,
                "scopes": {"jira:read": "Read", "jira:write": "Write"},
                "upstream_tokens": ["vault"],
            }
        ],
        "rules": rules,
        **extra,
    }
    return parse(data, env={}, base_dir=str(tmp_path), testing=True)


def registry(config: Settings) -> ProviderRegistry:
    pm = plugin_manager(load_entry_points=False, extra=(ClearancePlugin(),))
    return ProviderRegistry.for_settings(pm, config)


def alice(**facts: Any) -> Identity:
    base: dict[str, Any] = {
        "provider": "vault",
        "subject": "u-1",
        "email": "Alice@Example.com",
        "email_verified": True,
    }
    base.update(facts)
    return Identity(**base)


def test_rules_match_a_fact_only_a_third_party_provider_declares(tmp_path: Path) -> None:
    config = settings(
        tmp_path,
        [
            {"deny": "Suspended", "when": {"clearance": ["suspended"]}},
            {"grant": ["jira:read"], "when": {"email_domain": ["example.com"]}},
            {"grant": ["jira:write"], "when": {"clearance": ["Secret"]}},
        ],
    )
    registry(config)  # the rules are valid: the vault provider declares clearance
    resource = config.resources[0]
    secret = alice(extra_facts={"clearance": ("secret",)})
    assert decide(config, resource, secret).scopes == {"jira:read", "jira:write"}
    assert decide(config, resource, alice()).scopes == {"jira:read"}
    suspended = decide(config, resource, alice(extra_facts={"clearance": ("suspended",)}))
    assert suspended.denied == "Suspended"
    assert suspended.scopes == frozenset()


def test_an_unverified_email_declares_no_email_facts() -> None:
    facts = alice(email_verified=False).facts()
    assert facts["email"] == frozenset()
    assert facts["email_domain"] == frozenset()
    assert alice().facts()["email_domain"] == {"Example.com"}


def test_values_compare_case_insensitively_except_the_subject(tmp_path: Path) -> None:
    config = settings(
        tmp_path,
        [
            {"grant": ["jira:read"], "when": {"groups": ["Platform"]}},
            {"grant": ["jira:write"], "when": {"subject": ["U-1"]}},
        ],
    )
    resource = config.resources[0]
    assert decide(config, resource, alice(groups=("platform",))).scopes == {"jira:read"}
    assert decide(config, resource, alice(subject="U-1")).scopes == {"jira:write"}


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        (
            {"grant": ["jira:read"], "when": {"planet": ["mars"]}},
            "rules[0].when.planet: no provider this rule applies to (local, vault) yields the "
            "fact 'planet'",
        ),
        (
            {"grant": ["jira:read"], "when": {"provider": ["local"], "clearance": ["x"]}},
            "rules[0].when.clearance: no provider this rule applies to (local) yields the fact "
            "'clearance'",
        ),
        (
            {"grant": ["jira:read"], "when": {"provider": ["github"]}},
            "rules[0].when.provider: unknown provider github",
        ),
        (
            {"grant": ["jira:admin"], "when": {"groups": ["staff"]}},
            "rules[0].grant: jira:admin is not a scope of any resource",
        ),
        (
            {"grant": ["jira:read"], "resources": ["https://mcp.example.com/gone"]},
            "rules[0].resources: unknown resource https://mcp.example.com/gone",
        ),
    ],
)
def test_rules_that_cannot_mean_what_they_say_stop_startup(
    tmp_path: Path, rule: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        registry(settings(tmp_path, [rule]))
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith(problem), caught.value.problems


def test_each_provider_is_told_what_the_configuration_needs(tmp_path: Path) -> None:
    config = settings(
        tmp_path,
        [
            {"grant": ["jira:read"], "when": {"provider": ["vault"], "clearance": ["secret"]}},
            {"grant": ["jira:write"], "when": {"groups": ["platform"]}},
            {"grant": ["jira:write"], "when": {"provider": ["local"], "username": ["root"]}},
        ],
    )
    vault = registry(config)["vault"]
    assert isinstance(vault, ClearanceProvider)
    assert vault.requirements == Requirements(
        facts=frozenset({"provider", "clearance", "groups"}), offline=True
    )
    assert requirements(config, "local", BASE_FACTS | {"groups"}) == Requirements(
        facts=frozenset({"provider", "groups", "username"}), offline=False
    )


def test_a_rule_condition_must_be_a_fact_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        settings(tmp_path, [{"grant": ["jira:read"], "when": {"Teams": ["x"]}}])
    assert caught.value.problems == ["rules[0].when.Teams: not a fact name (lower-case letters, _)"]
