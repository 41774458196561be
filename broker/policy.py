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

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from providers.contract import Identity, Requirements

from .config import ResourceSettings, RuleSettings, Settings

CASE_SENSITIVE_FACTS = frozenset({"subject"})

IGNORED_SCOPES = frozenset({"offline_access", "openid", "profile", "email"})
"""Scopes a client may ask that are no resource's (OpenID Connect's, ``offline_access``): they
neither widen nor narrow an entitlement."""

PROVIDER_NOT_ALLOWED = "This sign-in method is not allowed for this resource."
UNVERIFIED_EMAIL = (
    "Your email address is not verified with your identity provider, and "
    "access to this resource depends on it."
)
NOT_ENTITLED = "Your account is not entitled to any access to this resource."
REQUIRED_NOT_ENTITLED = "Your account is not entitled to the access this resource requires."


@dataclass(frozen=True)
class Decision:
    scopes: frozenset[str]
    denied: str | None = None


def provider_allowed(resource: ResourceSettings, provider: str) -> bool:
    """Whether ``provider``'s identities may be used for ``resource`` (its ``providers``)."""
    return resource.providers is None or provider in resource.providers


def rule_applies(rule: RuleSettings, resource: ResourceSettings) -> bool:
    """Whether ``rule`` is read for ``resource`` (``rules[].resources``; default: every one)."""
    return rule.resources is None or resource.uri in rule.resources


def matching_values(key: str, wanted: Iterable[str], have: Iterable[str]) -> frozenset[str]:
    """The values of the identity's fact ``key`` that one of ``wanted`` matches (the condition
    holds when there is one): case-insensitively, except :data:`CASE_SENSITIVE_FACTS`."""
    if key in CASE_SENSITIVE_FACTS:
        return frozenset(have) & frozenset(wanted)
    folded = {w.casefold() for w in wanted}
    return frozenset(v for v in have if v.casefold() in folded)


def _matches(rule: RuleSettings, facts: Mapping[str, frozenset[str]]) -> bool:
    return all(
        matching_values(key, wanted, facts.get(key, frozenset()))
        for key, wanted in rule.when.items()
    )


def decide(settings: Settings, resource: ResourceSettings, identity: Identity) -> Decision:
    """Entitled scopes of ``identity`` for ``resource``."""
    if not provider_allowed(resource, identity.provider):
        return Decision(frozenset(), denied=PROVIDER_NOT_ALLOWED)
    rules = [r for r in settings.rules if rule_applies(r, resource)]
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


@dataclass(frozen=True)
class Entitlement:
    """What a sign-in for one request gets: the :class:`Decision`, the scopes the client asked
    (without :data:`IGNORED_SCOPES`), and either the scopes granted or the refusal the user sees."""

    decision: Decision
    asked: tuple[str, ...]
    granted: tuple[str, ...]
    refused: str | None


def entitle(
    settings: Settings, resource: ResourceSettings, identity: Identity, asked: Iterable[str]
) -> Entitlement:
    """The scopes to grant ``identity`` for a request of ``resource`` asking ``asked`` (nothing
    asked: every entitled scope), or the reason to refuse it. The required scopes are added when
    entitled; a request that cannot carry them all is refused. Mirrors
    :meth:`broker.flow.AuthorizationFlow.entitlement`."""
    decision = decide(settings, resource, identity)
    wanted = tuple(s for s in dict.fromkeys(asked) if s and s not in IGNORED_SCOPES)
    granted = [s for s in wanted if s in decision.scopes] if wanted else sorted(decision.scopes)
    for s in resource.required_scopes:
        if s in decision.scopes and s not in granted:
            granted.append(s)
    refused: str | None = None
    if decision.denied is not None:
        refused = decision.denied
    elif resource.scopes and not decision.scopes:
        if identity.email and not identity.email_verified and rules_read_email(settings):
            refused = UNVERIFIED_EMAIL
        else:
            refused = NOT_ENTITLED
    elif not set(resource.required_scopes) <= set(granted):
        refused = REQUIRED_NOT_ENTITLED
    return Entitlement(decision, wanted, () if refused else tuple(granted), refused)


def rules_read_email(settings: Settings) -> bool:
    """Whether any rule reads the email (so an unverified one can explain a refusal)."""
    return any({"email", "email_domain"} & set(rule.when) for rule in settings.rules)


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
