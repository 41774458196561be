"""What is fuzzed: for every endpoint, the valid request it starts from (a factory of the
world), the plans drawn for it, and the tables a refused request may still change (and why).
The in-process tests and the run over real HTTP against gunicorn draw from this one table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import strategies as st

from tests.fuzz.mutations import Op, Template, plans
from tests.fuzz.runner import Target, run_case
from tests.fuzz.wire import Answer
from tests.fuzz.world import FuzzWorld

TOKEN_ARTIFACTS = [
    "public_client",
    "confidential_client",
    "agent_client",
    "subject_token",
    "confidential_access",
    "access_token",
    "resource",
    "other_resource",
    "redirect",
    "loopback_redirect",
]
PAGE_ARTIFACTS = [
    "public_client",
    "confidential_client",
    "agent_client",
    "resource",
    "other_resource",
    "redirect",
    "loopback_redirect",
]
AUTHORIZE = [
    "response_type",
    "client_id",
    "redirect_uri",
    "state",
    "code_challenge",
    "code_challenge_method",
    "resource",
    "scope",
    "prompt",
    "login_hint",
]
DOCUMENTS = (
    ("metadata", "/.well-known/oauth-authorization-server"),
    ("metadata", "/.well-known/openid-configuration"),
    ("jwks", "/jwks.json"),
    ("health", "/health"),
    ("ready", "/ready"),
)

# A refused metadata-document client is remembered for a minute (no refetch flood) and audited.
CIMD_REFUSAL = ("client_metadata_failures", "audit_events", "rate_limit_counters")
# A failed sign-in is audited and counted (the login throttle).
FAILED_LOGIN = ("audit_events", "rate_limit_counters")
# An upstream state is single-use: its first use ends the pending login, a failure is audited.
SPENT_STATE = ("pending_logins", "audit_events")


@dataclass(frozen=True)
class Fuzzed:
    """One endpoint's fuzzing: ``make(world, variant)`` builds a fresh valid request (the
    variant: confidential or public client, signed in or not...), ``plans`` the changes."""

    name: str
    make: Callable[[FuzzWorld, int], Template]
    plans: st.SearchStrategy[tuple[Op, ...]]
    variants: int = 1
    allowed: tuple[str, ...] = ()
    when_spent: tuple[str, ...] = ()
    share: float = 1.0  # of the profile's examples, in-process

    def run(self, world: FuzzWorld, variant: int, plan: tuple[Op, ...], target: Target) -> Answer:
        return run_case(
            target,
            self.make(world, variant),
            plan,
            allowed=self.allowed,
            when_spent=self.when_spent,
        )


def _token_plans(names: list[str]) -> st.SearchStrategy[tuple[Op, ...]]:
    return plans(names, post=True, artifacts=TOKEN_ARTIFACTS, auth=True)


REVOKE = ["token", "token_type_hint", "client_id", "client_secret"]

CASES: dict[str, Fuzzed] = {
    case.name: case
    for case in (
        Fuzzed(
            "token_code",
            lambda w, v: w.token_code(confidential=bool(v)),
            _token_plans(["grant_type", "code", "client_id", "redirect_uri", "code_verifier"]),
            variants=2,
        ),
        Fuzzed(
            "token_refresh",
            lambda w, v: w.token_refresh(),
            _token_plans(["grant_type", "refresh_token", "client_id", "scope", "resource"]),
        ),
        Fuzzed(
            "token_client_credentials",
            lambda w, v: w.token_client_credentials(),
            _token_plans(["grant_type", "resource", "scope", "client_id", "client_secret"]),
            share=0.75,
        ),
        Fuzzed(
            "token_exchange",
            lambda w, v: w.token_exchange(),
            _token_plans(
                [
                    "grant_type",
                    "subject_token",
                    "subject_token_type",
                    "audience",
                    "resource",
                    "actor_token",
                    "requested_token_type",
                ]
            ),
            share=0.75,
        ),
        Fuzzed(
            "register",
            lambda w, v: w.register(confidential=bool(v)),
            plans([], post=True, json_body=True),
            variants=2,
            share=1.5,
        ),
        Fuzzed(
            "revoke",
            lambda w, v: w.revoke(public=bool(v)),
            plans(REVOKE, post=True, artifacts=TOKEN_ARTIFACTS, auth=True),
            variants=2,
        ),
        Fuzzed(
            "introspect",
            lambda w, v: w.introspect(),
            plans(REVOKE, post=True, artifacts=TOKEN_ARTIFACTS, auth=True),
            share=0.75,
        ),
        Fuzzed(
            "documents",
            lambda w, v: w.document(*DOCUMENTS[v]),
            plans(["x"], post=False, auth=True, max_ops=3),
            variants=len(DOCUMENTS),
            share=0.75,
        ),
        Fuzzed(
            "authorize",
            lambda w, v: w.authorize(signed_in=bool(v)),
            plans(AUTHORIZE, post=False, artifacts=PAGE_ARTIFACTS, cookies=True),
            variants=2,
            allowed=CIMD_REFUSAL,
            share=1.5,
        ),
        Fuzzed(
            "consent_page",
            lambda w, v: w.consent_page(),
            plans(["login"], post=False, cookies=True),
            share=0.5,
        ),
        Fuzzed(
            "consent_form",
            lambda w, v: w.consent_form(),
            plans(["login", "csrf", "action", "provider"], post=True, cookies=True),
        ),
        Fuzzed(
            "login_page",
            lambda w, v: w.login_form(submit=False),
            plans(["login"], post=False, cookies=True),
            share=0.5,
        ),
        Fuzzed(
            "login_form",
            lambda w, v: w.login_form(submit=True),
            plans(["login", "csrf", "username", "password"], post=True, cookies=True, max_ops=3),
            allowed=FAILED_LOGIN,
            share=0.75,
        ),
        Fuzzed(
            "callback",
            lambda w, v: w.callback(),
            plans(["code", "state", "error", "error_description"], post=False, cookies=True),
            when_spent=SPENT_STATE,
            share=0.75,
        ),
        Fuzzed(
            "account_page",
            lambda w, v: w.account_page(),
            plans(["disconnected"], post=False, cookies=True),
            share=0.5,
        ),
        Fuzzed(
            "account_disconnect",
            lambda w, v: w.account_disconnect(everything=bool(v)),
            plans(["csrf", "grant"], post=True, cookies=True, max_ops=3),
            variants=2,
            share=0.75,
        ),
    )
}
