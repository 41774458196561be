"""``broker explain``: the policy decision for one identity and one resource, and why.

Operators ask "why did alice get (or not get) ``jira:write``?" without signing in. The decision
is the one a sign-in gets (:func:`broker.policy.entitle`, which the authorization flow applies);
beside it, every rule in order: whether it is read for the resource, whether it matched, and
for a rule that did not, the condition that failed. Pure functions over :class:`Settings` and an
:class:`Identity`, plus the readers of an identity file and of a stored identity.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session

from providers.contract import BASE_FACTS, FIELD_FACTS, Identity

from . import policy
from .config import FACT_NAME, ResourceSettings, RuleSettings, Settings


class ExplainError(Exception):
    """A problem with what ``broker explain`` was asked (exit code 2); ``problems`` are lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


# -- the identity file -------------------------------------------------------------------------

TEXT_FIELDS = ("username", "name", "email", "hosted_domain")
LIST_FIELDS = ("groups", "roles", "orgs", "teams", "tenants", "sites")
IDENTITY_KEYS = (
    "provider",
    "subject",
    "username",
    "name",
    "email",
    "email_verified",
    "groups",
    "roles",
    "orgs",
    "teams",
    "hosted_domain",
    "tenants",
    "sites",
    "extra_facts",
    "raw",
)
"""The keys of an identity file: those of :meth:`Identity.snapshot` (``raw`` is accepted, so a
stored snapshot can be pasted, and ignored: no rule reads it)."""


def read_identity_file(
    path: str | Path, provider_facts: Mapping[str, frozenset[str]] | None = None
) -> Identity:
    """The identity a YAML or JSON file describes (``.json``: JSON; otherwise YAML, which also
    reads JSON). Raises :class:`ExplainError` with one line per problem, each naming the file."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ExplainError([f"{name}: cannot read it: {reason}"]) from None
    try:
        data = json.loads(text) if name.endswith(".json") else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise ExplainError([f"{name}: not JSON: {exc.msg} (line {exc.lineno})"]) from None
    except yaml.YAMLError as exc:
        raise ExplainError([f"{name}: not YAML: {_yaml_problem(exc)}"]) from None
    try:
        return identity_from_document(data, provider_facts)
    except ExplainError as exc:
        raise ExplainError([f"{name}: {problem}" for problem in exc.problems]) from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} (line {mark.line + 1})" if mark is not None else str(problem)


def identity_from_document(
    data: object, provider_facts: Mapping[str, frozenset[str]] | None = None
) -> Identity:
    """The :class:`Identity` a parsed identity document describes (the shape of
    :meth:`Identity.snapshot`). With ``provider_facts`` (the facts each configured provider
    declares), the provider must be configured and declare every fact the document fills in."""
    if not isinstance(data, Mapping):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise ExplainError(
            [
                "must be a mapping of identity facts (provider, subject, email, groups...), "
                f"not {kind}"
            ]
        )
    problems: list[str] = []
    for key in data:
        if key == "email_domain":
            problems.append("email_domain: is derived from email; set email and email_verified")
        elif key not in IDENTITY_KEYS:
            problems.append(
                f"{key}: unknown key (known: {', '.join(IDENTITY_KEYS)}; "
                "a provider's own facts go under extra_facts)"
            )
    provider = data.get("provider")
    if not isinstance(provider, str) or not provider:
        problems.append("provider: required, the provider's name in broker.yaml")
    subject = data.get("subject")
    if isinstance(subject, int) and not isinstance(subject, bool):
        subject = str(subject)  # a numeric id (GitHub's) that YAML read as a number
    if not isinstance(subject, str) or not subject:
        problems.append("subject: required, the provider's stable id for the user (a string)")
    for key in TEXT_FIELDS:
        if data.get(key) is not None and not isinstance(data[key], str):
            problems.append(f"{key}: must be a string")
    if "email_verified" in data and not isinstance(data["email_verified"], bool):
        problems.append("email_verified: must be true or false")
    for key in LIST_FIELDS:
        if data.get(key) is not None and not _strings(data[key]):
            problems.append(f"{key}: must be a list of strings")
    extra: dict[str, tuple[str, ...]] = {}
    raw_extra = data.get("extra_facts")
    if raw_extra is not None and not isinstance(raw_extra, Mapping):
        problems.append("extra_facts: must be a mapping of fact names to lists of strings")
    for fact, values in (raw_extra or {}).items() if isinstance(raw_extra, Mapping) else ():
        where = f"extra_facts.{fact}"
        if not isinstance(fact, str) or not FACT_NAME.match(fact):
            problems.append(f"{where}: not a fact name (lower-case letters, digits, _)")
        elif fact in BASE_FACTS or fact in FIELD_FACTS:
            problems.append(f"{where}: is a built-in fact; set it at the top level")
        elif not _strings(values):
            problems.append(f"{where}: must be a list of strings")
        else:
            extra[fact] = tuple(values)
    if data.get("raw") is not None and not isinstance(data["raw"], Mapping):
        problems.append("raw: must be a mapping")
    if problems:
        raise ExplainError(problems)
    assert isinstance(provider, str) and isinstance(subject, str)
    identity = Identity(
        provider=provider,
        subject=subject,
        username=data.get("username") or None,
        name=data.get("name") or None,
        email=data.get("email") or None,
        email_verified=data.get("email_verified") is True,
        groups=tuple(data.get("groups") or ()),
        roles=tuple(data.get("roles") or ()),
        orgs=tuple(data.get("orgs") or ()),
        teams=tuple(data.get("teams") or ()),
        hosted_domain=data.get("hosted_domain") or None,
        tenants=tuple(data.get("tenants") or ()),
        sites=tuple(data.get("sites") or ()),
        extra_facts=extra,
    )
    if provider_facts is not None:
        _check_provider(identity, provider_facts)
    return identity


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _check_provider(identity: Identity, provider_facts: Mapping[str, frozenset[str]]) -> None:
    """An identity no configured provider could produce explains nothing: say so."""
    declared = provider_facts.get(identity.provider)
    if declared is None:
        configured = ", ".join(provider_facts) or "none"
        raise ExplainError(
            [
                f"provider: {identity.provider} is not a configured provider "
                f"(configured: {configured})"
            ]
        )
    filled = [key for key in (*TEXT_FIELDS, *LIST_FIELDS) if getattr(identity, key)]
    problems = [
        f"{'extra_facts.' if key in identity.extra_facts else ''}{key}: provider "
        f"{identity.provider} does not yield this fact (it yields: {', '.join(sorted(declared))})"
        for key in (*filled, *identity.extra_facts)
        if key not in declared
    ]
    if problems:
        raise ExplainError(problems)


# -- a stored identity -------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredIdentity:
    """A user's stored identity: the snapshot the rules read at refresh and at a sign-in that
    reuses the broker session."""

    user_id: str
    identity: Identity
    disabled: bool
    last_login_at: str | None
    last_recheck_at: str | None

    def notes(self) -> tuple[str, ...]:
        notes = [
            f"the stored identity of user {self.user_id} (last sign-in {self.last_login_at}"
            + (f", last re-check {self.last_recheck_at}" if self.last_recheck_at else "")
            + "): a new sign-in replaces it with what the provider says then"
        ]
        if self.disabled:
            notes.append(
                f"user {self.user_id} is disabled: its refreshes and broker sessions are refused "
                "whatever the rules say (broker users enable)"
            )
        return tuple(notes)


def stored_identity(session: Session, ref: str) -> StoredIdentity:
    """The stored identity of the user ``ref`` names (id, ``provider:subject`` or email). A user
    with several identities is named by ``provider:subject``."""
    from .admin import NotFound, find_user
    from .models import Identity as IdentityRow

    try:
        user = find_user(session, ref)
    except NotFound as exc:
        raise ExplainError([str(exc)]) from None
    rows = list(
        session.scalars(
            select(IdentityRow).where(IdentityRow.user_id == user.id).order_by(IdentityRow.id)
        )
    )
    named = [row for row in rows if f"{row.provider}:{row.subject}" == ref]
    if named:
        rows = named
    if not rows:
        raise ExplainError([f"{ref}: user {user.id} has no identity"])
    if len(rows) > 1:
        names = ", ".join(f"{row.provider}:{row.subject}" for row in rows)
        raise ExplainError(
            [f"{ref}: user {user.id} has {len(rows)} identities; name one of: {names}"]
        )
    row = rows[0]
    return StoredIdentity(
        user_id=user.id,
        identity=Identity.from_snapshot(row.snapshot or {}),
        disabled=user.disabled_at is not None,
        last_login_at=row.last_login_at.isoformat() if row.last_login_at else None,
        last_recheck_at=row.last_recheck_at.isoformat() if row.last_recheck_at else None,
    )


# -- the explanation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ConditionCheck:
    """One ``when`` condition of a rule against the identity's facts."""

    fact: str
    wanted: tuple[str, ...]
    have: tuple[str, ...]
    matching: tuple[str, ...]
    note: str | None = None

    @property
    def holds(self) -> bool:
        return bool(self.matching)

    def describe(self) -> str:
        have = f"identity {self.fact} [{', '.join(self.have)}]"
        if self.holds:
            text = f"{self.fact}: {', '.join(self.matching)} in {have}"
        else:
            text = f"{self.fact}: none of [{', '.join(self.wanted)}] in {have}"
        return f"{text} ({self.note})" if self.note else text

    def as_json(self) -> dict[str, Any]:
        return {
            "fact": self.fact,
            "wanted": list(self.wanted),
            "have": list(self.have),
            "holds": self.holds,
            "note": self.note,
        }


@dataclass(frozen=True)
class RuleTrace:
    """One rule as the decision for this identity and resource read it.

    ``applies``: the rule is read for the resource (``resources``). ``read``: the decision got
    to it (the provider is allowed for the resource and no earlier deny matched);
    ``denied_by``: the index of that earlier deny.
    """

    index: int
    rule: RuleSettings
    applies: bool
    read: bool
    conditions: tuple[ConditionCheck, ...]
    resource_scopes: tuple[str, ...]
    denied_by: int | None = None

    @property
    def path(self) -> str:
        return f"rules[{self.index}]"

    @property
    def matched(self) -> bool:
        """Whether every condition holds (a rule without any matches every identity)."""
        return all(check.holds for check in self.conditions)

    @property
    def failed(self) -> tuple[ConditionCheck, ...]:
        return tuple(check for check in self.conditions if not check.holds)

    @property
    def grants(self) -> tuple[str, ...]:
        """The scopes this rule adds for the resource (those of its scopes the resource has)."""
        return tuple(s for s in self.rule.scopes if s in self.resource_scopes)

    @property
    def outcome(self) -> str:
        if not self.applies:
            return "not for this resource (only for: " + ", ".join(self.rule.resources or ()) + ")"
        would = "would match" if self.matched else "would not match"
        if not self.read and self.denied_by is not None:
            return f"not read: rules[{self.denied_by}] denied first ({would})"
        if not self.read:
            return f"not read: the provider is not allowed for this resource ({would})"
        if not self.matched:
            return "did not match"
        if self.rule.kind == "deny":
            return "matched: denies"
        if not self.grants:
            return "matched: grants nothing for this resource"
        return "matched: grants " + " ".join(self.grants)

    def heading(self) -> str:
        if self.rule.kind == "deny":
            what = f"deny {json.dumps(self.rule.reason)}"
        else:
            what = "grant " + " ".join(self.rule.scopes)
        if self.rule.resources is not None:
            what += " on " + ", ".join(self.rule.resources)
        return what

    def as_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "path": self.path,
            "kind": self.rule.kind,
            "scopes": list(self.rule.scopes),
            "reason": self.rule.reason or None,
            "resources": list(self.rule.resources) if self.rule.resources is not None else None,
            "applies": self.applies,
            "read": self.read,
            "matched": self.matched,
            "denied_by": f"rules[{self.denied_by}]" if self.denied_by is not None else None,
            "grants": list(self.grants) if self.rule.kind == "grant" else [],
            "outcome": self.outcome,
            "conditions": [check.as_json() for check in self.conditions],
            "failed": [check.describe() for check in self.failed],
        }


@dataclass(frozen=True)
class Explanation:
    """The decision for ``identity`` asking ``asked`` of ``resource``, with the rules behind it."""

    identity: Identity
    resource: ResourceSettings
    resource_path: str
    entitlement: policy.Entitlement
    provider_allowed: bool
    provider_configured: bool | None
    rules: tuple[RuleTrace, ...]
    asked_unknown: tuple[str, ...]
    notes: tuple[str, ...]

    @property
    def allowed(self) -> bool:
        return self.entitlement.refused is None

    @property
    def exit_code(self) -> int:
        """0 when a sign-in would be allowed, 1 when it would be refused."""
        return 0 if self.allowed else 1

    @property
    def not_granted(self) -> dict[str, tuple[str, ...]]:
        """The scopes of the resource asked (nothing asked: all of them) but not granted, each
        with the paths of the grant rules for this resource that name it."""
        if self.entitlement.refused is not None:
            return {}
        wanted = self.entitlement.asked or tuple(self.resource.scopes)
        return {
            scope: tuple(
                trace.path
                for trace in self.rules
                if trace.applies and trace.rule.kind == "grant" and scope in trace.rule.scopes
            )
            for scope in wanted
            if scope in self.resource.scopes and scope not in self.entitlement.granted
        }

    @property
    def missing_required(self) -> tuple[str, ...]:
        entitled = self.entitlement.decision.scopes
        return tuple(s for s in self.resource.required_scopes if s not in entitled)


def explain(
    settings: Settings,
    resource: ResourceSettings,
    identity: Identity,
    asked: Iterable[str] = (),
    *,
    configured_providers: Collection[str] | None = None,
    notes: Iterable[str] = (),
) -> Explanation:
    """Decide as a sign-in does and trace every rule. ``asked``: the scopes a client asks
    (space-separated strings are split; nothing: every scope the identity is entitled to).
    ``configured_providers`` lets the explanation say when the identity's provider is not one;
    ``notes`` go first among the notes (where the identity comes from)."""
    scopes = [s for item in asked for s in item.split()]
    entitlement = policy.entitle(settings, resource, identity, scopes)
    allowed = policy.provider_allowed(resource, identity.provider)
    facts = identity.facts()
    traces: list[RuleTrace] = []
    denied_by: int | None = None
    for index, rule in enumerate(settings.rules):
        applies = policy.rule_applies(rule, resource)
        trace = RuleTrace(
            index=index,
            rule=rule,
            applies=applies,
            read=applies and allowed and denied_by is None,
            conditions=tuple(
                _check(key, wanted, facts, identity) for key, wanted in rule.when.items()
            ),
            resource_scopes=tuple(resource.scopes),
            denied_by=denied_by if applies else None,
        )
        traces.append(trace)
        if trace.read and trace.matched and rule.kind == "deny":
            denied_by = index
    position = next((i for i, r in enumerate(settings.resources) if r.uri == resource.uri), None)
    unknown = tuple(s for s in entitlement.asked if s not in resource.scopes)
    configured = None if configured_providers is None else identity.provider in configured_providers
    return Explanation(
        identity=identity,
        resource=resource,
        resource_path=f"resources[{position}]" if position is not None else "resource",
        entitlement=entitlement,
        provider_allowed=allowed,
        provider_configured=configured,
        rules=tuple(traces),
        asked_unknown=unknown,
        notes=(
            *notes,
            *_notes(settings, identity, traces, allowed, configured, unknown),
        ),
    )


def _check(
    key: str, wanted: tuple[str, ...], facts: Mapping[str, frozenset[str]], identity: Identity
) -> ConditionCheck:
    have = facts.get(key, frozenset())
    matching = policy.matching_values(key, wanted, have)
    note = None
    if key in ("email", "email_domain") and identity.email and not identity.email_verified:
        note = f"the email {identity.email} is not verified, so no rule sees it"
    elif key in policy.CASE_SENSITIVE_FACTS and not matching:
        note = "compared case-sensitively"
    return ConditionCheck(key, wanted, tuple(sorted(have)), tuple(sorted(matching)), note)


def _notes(
    settings: Settings,
    identity: Identity,
    traces: list[RuleTrace],
    allowed: bool,
    configured: bool | None,
    unknown: tuple[str, ...],
) -> list[str]:
    notes: list[str] = []
    if configured is False:
        notes.append(f"the provider {identity.provider} is not configured: nobody signs in with it")
    if allowed and not any(trace.applies for trace in traces):
        notes.append(
            "no rule applies to this resource: every identity allowed for it is entitled "
            "to all its scopes"
        )
    if identity.email and not identity.email_verified and policy.rules_read_email(settings):
        notes.append(
            f"the email {identity.email} is not verified: rules on email and email_domain "
            "do not see it"
        )
    for scope in unknown:
        notes.append(f"asked scope {scope} is not a scope of this resource: it is never granted")
    return notes


# -- output ------------------------------------------------------------------------------------


def identity_label(identity: Identity) -> str:
    parts = [f"{identity.provider}:{identity.subject}"]
    if identity.username:
        parts.append(identity.username)
    if identity.email:
        verified = "verified" if identity.email_verified else "not verified"
        parts.append(f"<{identity.email}> (email {verified})")
    return " ".join(parts)


def render_text(explanation: Explanation) -> str:
    """The explanation for a terminal: the decision first, then the rules in order."""
    e = explanation
    ent = e.entitlement
    resource = e.resource
    if ent.refused is None:
        decision = "allowed: " + (" ".join(ent.granted) or "(no scopes)")
    else:
        decision = f"refused: {ent.refused}"
    if resource.providers is None:
        provider = f"{e.identity.provider}: allowed (the resource allows every provider)"
    else:
        word = "allowed" if e.provider_allowed else "not allowed"
        provider = (
            f"{e.identity.provider}: {word} for this resource "
            f"({e.resource_path}.providers: {', '.join(resource.providers)})"
        )
    if resource.required_scopes:
        missing = e.missing_required
        state = f"not entitled: {' '.join(missing)}" if missing else "entitled"
        required = f"{' '.join(resource.required_scopes)} ({state})"
    else:
        required = "(none)"
    lines = [
        f"identity:  {identity_label(e.identity)}",
        f"resource:  {resource.uri} ({resource.name})",
        f"decision:  {decision}",
        "asked:     "
        + (" ".join(ent.asked) or "(nothing: every scope the identity is entitled to)"),
        "entitled:  " + (" ".join(sorted(ent.decision.scopes)) or "(none)"),
        f"required:  {required}",
        f"provider:  {provider}",
    ]
    lines[3:3] = [
        f"not granted: {scope} ("
        + (f"{', '.join(paths)} would grant it and did not match" if paths else "no rule grants it")
        + ")"
        for scope, paths in e.not_granted.items()
    ]
    if not e.rules:
        lines.append("rules:     (none)")
    else:
        lines.append("rules:")
    for trace in e.rules:
        lines.append(f"  {trace.path}  {trace.heading()}")
        lines.append(f"      {trace.outcome}")
        if not trace.applies:
            continue
        if not trace.conditions:
            lines.append("      (no conditions: matches every identity)")
        # A match shows every condition (what made it match); a non-match the ones that failed.
        for check in trace.conditions if trace.matched else trace.failed:
            lines.append(f"      {check.describe()}")
    if e.notes:
        lines.append("notes:")
        lines.extend(f"  {note}" for note in e.notes)
    return "\n".join(lines)


def as_json(explanation: Explanation) -> dict[str, Any]:
    """The explanation as JSON (``broker explain --json``)."""
    e = explanation
    ent = e.entitlement
    identity = e.identity.snapshot()
    del identity["raw"]  # server-only data for the provider: never shown
    return {
        "allowed": e.allowed,
        "refused": ent.refused,
        "scopes": list(ent.granted),
        "asked": list(ent.asked),
        "entitled": sorted(ent.decision.scopes),
        "denied": ent.decision.denied,
        "required_scopes": list(e.resource.required_scopes),
        "not_granted": {scope: list(paths) for scope, paths in e.not_granted.items()},
        "missing_required": list(e.missing_required),
        "identity": identity,
        "resource": {"uri": e.resource.uri, "name": e.resource.name, "path": e.resource_path},
        "provider": {
            "name": e.identity.provider,
            "allowed": e.provider_allowed,
            "allowed_providers": (
                list(e.resource.providers) if e.resource.providers is not None else None
            ),
            "configured": e.provider_configured,
        },
        "rules": [trace.as_json() for trace in e.rules],
        "notes": list(e.notes),
    }
