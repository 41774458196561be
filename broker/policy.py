"""Resources and rules: which scopes an identity is entitled to for a resource.

Rules are evaluated in order: the first matching ``deny`` ends the evaluation; ``grant`` rules add
up. Without any rule, a signed-in identity is entitled to every scope of the resource; with rules,
an identity no grant matches is entitled to nothing.

A rule's ``when`` names identity facts (``teams``, ``hosted_domain``, ``tenants``...). The facts
are whatever the identity declares (:meth:`providers.contract.Identity.facts`), so a provider that
adds a fact needs no change here; a rule naming a fact that no configured provider declares is a
start-up error (:func:`check_rules`). Values compare case-insensitively, except ``subject``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from providers.contract import Identity, Requirements

from .config import ResourceSettings, RuleSettings, Settings

CASE_SENSITIVE_FACTS = frozenset({"subject"})


@dataclass(frozen=True)
class Decision:
    scopes: frozenset[str]
    denied: str | None = None


def _matches(rule: RuleSettings, facts: Mapping[str, frozenset[str]]) -> bool:
    for key, wanted in rule.when.items():
        have = facts.get(key, frozenset())
        if key in CASE_SENSITIVE_FACTS:
            if not have & set(wanted):
                return False
        elif not {v.casefold() for v in have} & {w.casefold() for w in wanted}:
            return False
    return True


def decide(settings: Settings, resource: ResourceSettings, identity: Identity) -> Decision:
    """Entitled scopes of ``identity`` for ``resource``."""
    if resource.providers is not None and identity.provider not in resource.providers:
        return Decision(frozenset(), denied="This sign-in method is not allowed for this resource.")
    rules = [r for r in settings.rules if r.resources is None or resource.uri in r.resources]
    if not rules:
        return Decision(frozenset(resource.scopes))
    facts = identity.facts()
    granted: set[str] = set()
    for rule in rules:
        if not _matches(rule, facts):
            continue
        if rule.kind == "deny":
            return Decision(frozenset(), denied=rule.reason)
        granted.update(s for s in rule.scopes if s in resource.scopes)
    return Decision(frozenset(granted))


def _providers_of(rule: RuleSettings, configured: Mapping[str, frozenset[str]]) -> list[str]:
    """The configured providers whose identities ``rule`` can match."""
    named = rule.when.get("provider")
    return [name for name in configured if named is None or name in named]


def check_rules(settings: Settings, facts_by_provider: Mapping[str, frozenset[str]]) -> list[str]:
    """Problems, with key paths, of rules that cannot mean what they say: a fact no provider
    the rule can match declares, an unknown provider or resource, a scope no resource has."""
    problems: list[str] = []
    all_scopes = {scope for resource in settings.resources for scope in resource.scopes}
    resource_uris = {resource.uri for resource in settings.resources}
    for index, rule in enumerate(settings.rules):
        path = f"rules[{index}]"
        for name in rule.when.get("provider", ()):
            if name not in facts_by_provider:
                problems.append(f"{path}.when.provider: unknown provider {name}")
        matched = _providers_of(rule, facts_by_provider)
        for key in rule.when:
            if matched and not any(key in facts_by_provider[name] for name in matched):
                offered = sorted(set().union(*(facts_by_provider[name] for name in matched)))
                problems.append(
                    f"{path}.when.{key}: no provider this rule applies to "
                    f"({', '.join(matched)}) yields the fact {key!r} "
                    f"(they yield: {', '.join(offered)})"
                )
        for uri in rule.resources or ():
            if uri not in resource_uris:
                problems.append(f"{path}.resources: unknown resource {uri}")
        for scope in rule.scopes:
            if scope not in all_scopes:
                problems.append(f"{path}.grant: {scope} is not a scope of any resource")
    return problems


def check_claims(settings: Settings, facts_by_provider: Mapping[str, frozenset[str]]) -> list[str]:
    """Problems of ``resources[].claims``: a claim no provider allowed for the resource yields."""
    problems: list[str] = []
    for index, resource in enumerate(settings.resources):
        names = [
            name
            for name in facts_by_provider
            if resource.providers is None or name in resource.providers
        ]
        offered: set[str] = set().union(*(facts_by_provider[name] for name in names))
        for claim in resource.claims:
            if claim not in offered:
                problems.append(
                    f"resources[{index}].claims: {claim} is a fact none of its providers "
                    f"({', '.join(names) or 'none'}) yields "
                    f"(they yield: {', '.join(sorted(offered))})"
                )
    return problems


def requirements(settings: Settings, provider: str, provider_facts: frozenset[str]) -> Requirements:
    """What the configuration needs of ``provider``: the facts the rules that can match its
    identities read and the claims its resources carry, and whether a resource obtains its
    upstream token (token exchange)."""
    facts_by_provider: dict[str, frozenset[str]] = {
        name: frozenset() for name in settings.providers
    }
    facts: set[str] = set()
    for rule in settings.rules:
        if provider in _providers_of(rule, facts_by_provider):
            facts.update(key for key in rule.when if key in provider_facts)
    for resource in settings.resources:
        if resource.providers is None or provider in resource.providers:
            facts.update(claim for claim in resource.claims if claim in provider_facts)
    offline = any(provider in resource.upstream_tokens for resource in settings.resources)
    return Requirements(facts=frozenset(facts), offline=offline)
