"""The token endpoint (RFC 6749 section 3.2) for every grant it serves, from valid requests: a
real code (public client, and confidential with HTTP Basic), a real refresh token, client
credentials of an operator's agent, and an RFC 8693 exchange of a real access token."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from tests.fuzz.cases import CASES
from tests.fuzz.mutations import Duplicate, Header, Op
from tests.fuzz.runner import fuzz
from tests.fuzz.world import FuzzWorld

CODE, REFRESH = CASES["token_code"], CASES["token_refresh"]
CLIENT_CREDENTIALS, EXCHANGE = CASES["token_client_credentials"], CASES["token_exchange"]


@fuzz(CODE.share)
@given(variant=st.integers(0, CODE.variants - 1), plan=CODE.plans)
# Found by the fuzzer (see test_fuzz_regressions.py): a 500, and a 400 where 401 is due.
@example(variant=0, plan=(Header("Host", "evil.example"),))
@example(variant=1, plan=(Duplicate("client_id", " "),))
def test_authorization_code(world: FuzzWorld, variant: int, plan: tuple[Op, ...]) -> None:
    CODE.run(world, variant, plan, world)


@fuzz(REFRESH.share)
@given(plan=REFRESH.plans)
def test_refresh_token(world: FuzzWorld, plan: tuple[Op, ...]) -> None:
    REFRESH.run(world, 0, plan, world)


@fuzz(CLIENT_CREDENTIALS.share)
@given(plan=CLIENT_CREDENTIALS.plans)
def test_client_credentials(world: FuzzWorld, plan: tuple[Op, ...]) -> None:
    CLIENT_CREDENTIALS.run(world, 0, plan, world)


@fuzz(EXCHANGE.share)
@given(plan=EXCHANGE.plans)
def test_token_exchange(world: FuzzWorld, plan: tuple[Op, ...]) -> None:
    EXCHANGE.run(world, 0, plan, world)
