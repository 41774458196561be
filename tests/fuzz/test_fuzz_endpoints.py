"""The other API endpoints from valid requests: registration (RFC 7591) with its JSON body,
revocation (RFC 7009) by a confidential and by a public client, introspection (RFC 7662), the
metadata documents (RFC 8414, and OpenID discovery's name), the JWKS, health and readiness; and
every path with every method."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.cases import CASES, DOCUMENTS
from tests.fuzz.mutations import Op, Template
from tests.fuzz.runner import fuzz, run_case
from tests.fuzz.world import FuzzWorld

REGISTER, REVOKE, INTROSPECT = CASES["register"], CASES["revoke"], CASES["introspect"]
DOCUMENT = CASES["documents"]


@fuzz(REGISTER.share)
@given(variant=st.integers(0, REGISTER.variants - 1), plan=REGISTER.plans)
def test_register(world: FuzzWorld, variant: int, plan: tuple[Op, ...]) -> None:
    REGISTER.run(world, variant, plan, world)


@fuzz(REVOKE.share)
@given(variant=st.integers(0, REVOKE.variants - 1), plan=REVOKE.plans)
def test_revoke(world: FuzzWorld, variant: int, plan: tuple[Op, ...]) -> None:
    REVOKE.run(world, variant, plan, world)


@fuzz(INTROSPECT.share)
@given(plan=INTROSPECT.plans)
def test_introspect(world: FuzzWorld, plan: tuple[Op, ...]) -> None:
    INTROSPECT.run(world, 0, plan, world)


@fuzz(DOCUMENT.share)
@given(variant=st.integers(0, DOCUMENT.variants - 1), plan=DOCUMENT.plans)
def test_documents(world: FuzzWorld, variant: int, plan: tuple[Op, ...]) -> None:
    answer = DOCUMENT.run(world, variant, plan, world)
    if answer.status == 200 and DOCUMENTS[variant][0] == "metadata" and answer.body:
        assert answer.json()["issuer"] == world.issuer


PATHS = [
    ("authorize", "/authorize"),
    ("token", "/token"),
    ("register", "/register"),
    ("revoke", "/revoke"),
    ("introspect", "/introspect"),
    ("consent", "/consent"),
    ("login", "/login/local"),
    ("login", "/login/github"),
    ("callback", "/callback/github"),
    ("callback", "/callback/local"),
    ("account", "/account"),
    ("account", "/account/disconnect"),
    ("account", "/account/disconnect-all"),
    *DOCUMENTS,
]
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND", "get"]


@pytest.mark.parametrize("method", METHODS)
def test_every_path_with_every_method(world: FuzzWorld, method: str) -> None:
    """Methods an endpoint does not allow are 405 (with ``Allow``), never 500; ChatGPT sends GET
    and HEAD to /register before its POST."""
    cookies = world.alice.cookie_header()
    for endpoint, path in PATHS:
        answer = run_case(world, Template(endpoint, method, path, headers=cookies))
        if answer.status == 405:
            assert "Allow" in answer.headers, (method, path)
