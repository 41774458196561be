"""Running one fuzzed request and checking everything :mod:`tests.fuzz.verdict` demands."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from typing import Any, Protocol
from urllib.parse import parse_qsl

from hypothesis import event, settings
from hypothesis.control import currently_in_test_context

from tests.fuzz.mutations import Op, Template, render
from tests.fuzz.verdict import ErrorLog, Snapshot, check_answer, check_database, refused
from tests.fuzz.verdict import World as Checks
from tests.fuzz.wire import Answer, Wire

PROFILE = os.environ.get("BROKER_FUZZ_PROFILE", "ci")
PROFILES = ("ci", "long")


def fuzz(share: float = 1.0) -> Callable[[Any], Any]:
    """The Hypothesis settings of the selected profile (registered in ``conftest.py``), with
    ``share`` of its ``max_examples``."""
    profile = settings.get_profile(PROFILE)
    return settings(profile, max_examples=max(1, int(profile.max_examples * share)))


class Target(Protocol):
    """Where fuzzed requests go: the world in-process, or the world served by gunicorn."""

    def send(self, wire: Wire, /) -> Answer: ...

    def checks(self) -> Checks: ...

    def snapshot(self) -> Snapshot: ...


def run_case(
    target: Target,
    template: Template,
    plan: tuple[Op, ...] | list[Op] = (),
    *,
    allowed: Iterable[str] = (),
    when_spent: Iterable[str] = (),
) -> Answer:
    """Send ``template`` changed by ``plan``; check the answer's shape, the log, and (when the
    request was refused) that the database did not change, except for ``allowed`` tables, and
    ``when_spent`` ones when the request still carries the template's single-use credential
    (an upstream state is consumed by its first use, whatever else is wrong with the request)."""
    wire = render(template, plan)
    before = target.snapshot()
    with ErrorLog().watching() as errors:
        answer = target.send(wire)
    check_answer(template.endpoint, wire, answer, target.checks())
    errors.check(wire, answer)
    if currently_in_test_context():  # --hypothesis-show-statistics
        event(f"{template.endpoint}: {outcome(answer)}")
    if refused(answer):
        if template.spends is not None and carries(wire, template.spends):
            allowed = (*allowed, *when_spent)
        check_database(wire, answer, before, allowed)
    return answer


def outcome(answer: Answer) -> str:
    """A short label of an answer: its status and, for an error, its code."""
    label = str(answer.status)
    if answer.mimetype == "application/json" and answer.status >= 400:
        with contextlib.suppress(ValueError, AttributeError):
            label += " " + str(answer.json().get("error"))
    elif answer.location:
        location = answer.location
        label += " -> " + ("client" if "://" in location else location.split("?")[0])
        if "error=" in location:
            label += " (error)"
    return label


def carries(wire: Wire, value: str) -> bool:
    """Whether the request carries ``value`` as a whole parameter value: in the query or a form
    body, or as a JSON string or multipart part of the body."""
    for part in (wire.query, wire.body):
        pairs = parse_qsl(part.decode("latin-1"), keep_blank_values=True)
        if any(v == value for _, v in pairs):
            return True
    raw = value.encode()
    return b'"' + raw + b'"' in wire.body or b"\r\n\r\n" + raw + b"\r\n" in wire.body
