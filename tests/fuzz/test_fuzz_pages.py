"""The browser's endpoints from valid requests: /authorize (a signed-in browser that goes straight
through to a code, and a new one sent to consent), the consent page and its CSRF-protected form,
the local login form, GitHub's redirect back to /callback with its real code and state, and the
account page with its disconnect forms."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from tests.fuzz.cases import CASES
from tests.fuzz.mutations import Duplicate, Header, Op, Set
from tests.fuzz.runner import fuzz
from tests.fuzz.wire import Raw
from tests.fuzz.world import FuzzWorld

AUTHORIZE, CONSENT_PAGE, CONSENT_FORM = (
    CASES["authorize"],
    CASES["consent_page"],
    CASES["consent_form"],
)
LOGIN_PAGE, LOGIN_FORM, CALLBACK = CASES["login_page"], CASES["login_form"], CASES["callback"]
ACCOUNT_PAGE, DISCONNECT = CASES["account_page"], CASES["account_disconnect"]


@fuzz(AUTHORIZE.share)
@given(variant=st.integers(0, AUTHORIZE.variants - 1), plan=AUTHORIZE.plans)
@example(variant=1, plan=(Header("Host", "evil.example"),))  # found: a 500 (insecure_transport)
@example(variant=0, plan=(Set("prompt", "none"),))  # found: a refusal that stored a pending login
def test_authorize(world: FuzzWorld, variant: int, plan: tuple[Op, ...]) -> None:
    AUTHORIZE.run(world, variant, plan, world)


@fuzz(CONSENT_PAGE.share)
@given(plan=CONSENT_PAGE.plans)
def test_consent_page(world: FuzzWorld, plan: tuple[Op, ...]) -> None:
    CONSENT_PAGE.run(world, 0, plan, world)


@fuzz(CONSENT_FORM.share)
@given(plan=CONSENT_FORM.plans)
@example(plan=(Set("csrf", "\x80"),))  # found: a 500 (compare_digest on non-ASCII)
def test_consent_form(world: FuzzWorld, plan: tuple[Op, ...]) -> None:
    CONSENT_FORM.run(world, 0, plan, world)


@fuzz(LOGIN_PAGE.share)
@given(plan=LOGIN_PAGE.plans)
@example(plan=(Set("login", Raw(b"\xff")),))  # found: a 500 (raw bytes that are not UTF-8)
def test_login_page(world: FuzzWorld, plan: tuple[Op, ...]) -> None:
    LOGIN_PAGE.run(world, 0, plan, world)


@fuzz(LOGIN_FORM.share)
@given(plan=LOGIN_FORM.plans)
@example(plan=(Set("csrf", "\x80"),))  # found: a 500 (compare_digest on non-ASCII)
def test_login_form(world: FuzzWorld, plan: tuple[Op, ...]) -> None:
    LOGIN_FORM.run(world, 0, plan, world)


@fuzz(CALLBACK.share)
@given(plan=CALLBACK.plans)
def test_callback(world: FuzzWorld, plan: tuple[Op, ...]) -> None:
    CALLBACK.run(world, 0, plan, world)


@fuzz(ACCOUNT_PAGE.share)
@given(plan=ACCOUNT_PAGE.plans)
def test_account_page(world: FuzzWorld, plan: tuple[Op, ...]) -> None:
    ACCOUNT_PAGE.run(world, 0, plan, world)


@fuzz(DISCONNECT.share)
@given(variant=st.integers(0, DISCONNECT.variants - 1), plan=DISCONNECT.plans)
@example(variant=0, plan=(Duplicate("csrf", "\x80", first=True),))  # found: a 500, as above
def test_account_disconnect(world: FuzzWorld, variant: int, plan: tuple[Op, ...]) -> None:
    DISCONNECT.run(world, variant, plan, world)
