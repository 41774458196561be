"""Resources and rules: which scopes an identity is entitled to for a resource.

Rules are evaluated in order: the first matching ``deny`` ends the evaluation; ``grant`` rules add
up. Without any rule, a signed-in identity is entitled to every scope of the resource.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import ResourceSettings, RuleSettings, Settings


@dataclass(frozen=True)
class Decision:
    scopes: frozenset[str]
    denied: str | None = None


def _matches(rule: RuleSettings, identity: dict[str, Any]) -> bool:
    email = identity.get("email") if identity.get("email_verified") else None
    facts: dict[str, set[str]] = {
        "provider": {identity.get("provider") or ""},
        "subject": {identity.get("subject") or ""},
        "username": {identity.get("username") or ""},
        "email": {email.lower()} if email else set(),
        "email_domain": {email.rsplit("@", 1)[-1].lower()} if email and "@" in email else set(),
        "groups": set(identity.get("groups") or ()),
        "roles": set((identity.get("extra") or {}).get("roles") or ()),
    }
    for key, wanted in rule.when.items():
        values = {w.lower() for w in wanted} if key in ("email", "email_domain") else set(wanted)
        if not facts.get(key, set()) & values:
            return False
    return True


def decide(settings: Settings, resource: ResourceSettings, identity: dict[str, Any]) -> Decision:
    """Entitled scopes of ``identity`` (an :meth:`Identity.snapshot`) for ``resource``."""
    if resource.providers is not None and identity.get("provider") not in resource.providers:
        return Decision(frozenset(), denied="This sign-in method is not allowed for this resource.")
    rules = [r for r in settings.rules if r.resources is None or resource.uri in r.resources]
    if not rules:
        return Decision(frozenset(resource.scopes))
    granted: set[str] = set()
    for rule in rules:
        if not _matches(rule, identity):
            continue
        if rule.kind == "deny":
            return Decision(frozenset(), denied=rule.reason)
        granted.update(s for s in rule.scopes if s in resource.scopes)
    return Decision(frozenset(granted))
