"""Signing-key rotation: the next key is published before it signs, the retired one stays in the
JWKS until every token it signed has expired, and two hosts rotating at once activate one key."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections import Counter
from typing import Any

import jwt
import pytest
from flask import Flask
from sqlalchemy import update

from broker.keys import PUBLISH_BEFORE_SIGNING, KeyRing, RotationRefused
from broker.models import SigningKey
from broker.oauth2.rfc9068 import AccessTokenClaims, issue_access_token
from broker.resource import BrokerTokenVerifier
from tests.support import RESOURCE, free_port, serve_wsgi


def ring(app: Flask) -> tuple[Any, KeyRing]:
    broker = app.extensions["broker"]
    return broker.db, broker.keys


def states(app: Flask) -> dict[str, str]:
    db, keys = ring(app)
    with db.session() as session:
        return {row.kid: row.state for row in keys.public_keys(session)}


def age_next_key(app: Flask, by: dt.timedelta = PUBLISH_BEFORE_SIGNING) -> None:
    db, _ = ring(app)
    with db.session() as session:
        for row in session.query(SigningKey).filter_by(state="next"):
            row.created_at = row.created_at - by


def jwks_kids(app: Flask) -> set[str]:
    return {key["kid"] for key in app.test_client().get("/jwks.json").json["keys"]}


def sign(app: Flask, keys: KeyRing | None = None, audience: str = "aud") -> str:
    db, own = ring(app)
    with db.session() as session:
        token, _ = issue_access_token(
            (keys or own).active(session),
            AccessTokenClaims("http://127.0.0.1:8000", "usr", audience, "cid", "", 0, 600),
        )
    return token


def test_first_start_publishes_an_active_and_a_next_key(app: Flask) -> None:
    assert sorted(states(app).values()) == ["active", "next"]
    assert jwks_kids(app) == set(states(app))


def test_a_next_key_published_too_recently_is_not_activated(app: Flask) -> None:
    db, keys = ring(app)
    with db.session() as session, pytest.raises(RotationRefused) as refused:
        keys.rotate(session)
    assert "rotate again in" in str(refused.value)
    assert sorted(states(app).values()) == ["active", "next"]


def test_rotation_activates_the_published_key_and_keeps_the_old_one_published(
    app: Flask,
) -> None:
    before = states(app)
    old_active = next(kid for kid, state in before.items() if state == "active")
    old_next = next(kid for kid, state in before.items() if state == "next")
    old_token = sign(app)
    age_next_key(app)
    db, keys = ring(app)
    with db.session() as session:
        rotation = keys.rotate(session)
    assert (rotation.active, rotation.retired) == (old_next, old_active)
    after = states(app)
    assert after[old_active] == "retired" and after[old_next] == "active"
    assert after[rotation.next] == "next"
    # The retired key still verifies what it signed; new tokens carry the new kid.
    assert {old_active, old_next, rotation.next} == jwks_kids(app)
    assert jwt.get_unverified_header(old_token)["kid"] == old_active
    assert jwt.get_unverified_header(sign(app))["kid"] == old_next
    # Once its tokens have expired, the retired key leaves the JWKS.
    with db.session() as session:
        session.execute(
            update(SigningKey)
            .where(SigningKey.kid == old_active)
            .values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
        )
    assert old_active not in jwks_kids(app)
    assert rotation.retired_until is not None


def test_force_rotates_at_once(app: Flask) -> None:
    db, keys = ring(app)
    with db.session() as session:
        rotation = keys.rotate(session, force=True)
    assert states(app)[rotation.active] == "active"


def test_a_second_rotation_right_after_is_refused(app: Flask) -> None:
    """Two hosts rotating one after the other: the second finds only the fresh next key (too
    recent) and changes nothing; one key is active."""
    age_next_key(app)
    db, keys = ring(app)
    other = KeyRing(app.extensions["broker"].sealer, keys.alg)
    with db.session() as session:
        rotation = keys.rotate(session)
    with db.session() as session, pytest.raises(RotationRefused):
        other.rotate(session)
    assert list(states(app).values()).count("active") == 1
    assert states(app)[rotation.active] == "active"


def test_rotation_by_age(make_app: Any) -> None:
    app = make_app(tokens={"key_rotation_days": 30})
    db, keys = ring(app)
    with db.session() as session:
        assert keys.rotate_if_older(session, dt.timedelta(days=30)) is None  # too young
        for row in session.query(SigningKey):
            row.activated_at = (row.activated_at or row.created_at) - dt.timedelta(days=31)
            row.created_at = row.created_at - dt.timedelta(days=31)
    with db.session() as session:
        rotation = keys.rotate_if_older(session, dt.timedelta(days=30))
    assert rotation is not None and states(app)[rotation.active] == "active"


def test_rotations_while_tokens_are_issued_and_verified(app: Flask) -> None:
    """Three rotations while two hosts sign and an MCP server verifies with the resource kit
    over real HTTP: no token fails. This host sees each rotation at once; the other keeps
    signing with the key it loaded first (as for up to ``ACTIVE_KEY_RECHECK``), which is retired
    by then and still published. Time is scaled: the MCP server caches the JWKS for
    ``MAX_AGE`` and refetches for an unknown ``kid`` once an hour, so a key that signed before
    that server had seen it published would fail; each rotation waits two cache lifetimes after
    its next key was published, as ``PUBLISH_BEFORE_SIGNING`` does in real time."""
    max_age = 0.2
    other_host = KeyRing(app.extensions["broker"].sealer, ring(app)[1].alg)
    stop = threading.Event()
    failures: list[str] = []
    signed: Counter[tuple[str, str]] = Counter()

    with serve_wsgi(app, free_port()) as base:
        verifier = BrokerTokenVerifier(
            "http://127.0.0.1:8000",
            RESOURCE,
            jwks_uri=f"{base}/jwks.json",
            jwks_max_age=max_age,
            refetch_interval=3600,
            timeout=5.0,
        )

        def host(name: str, keys: KeyRing | None) -> None:
            while not stop.is_set():
                try:
                    token = sign(app, keys, audience=RESOURCE)
                    verifier.verify(token)
                    signed[name, jwt.get_unverified_header(token)["kid"]] += 1
                except Exception as exc:  # every failure is the finding
                    failures.append(f"{name}: {exc!r}")
                time.sleep(0.005)

        threads = [
            threading.Thread(target=host, args=("this", None)),
            threading.Thread(target=host, args=("other", other_host)),
        ]
        for thread in threads:
            thread.start()
        try:
            for _ in range(3):
                time.sleep(2 * max_age)  # the next key has been in every cache
                age_next_key(app)
                db, keys = ring(app)
                with db.session() as session:
                    rotation = keys.rotate(session)
                # Under load a thread may not run for a while: wait until this host has signed
                # (and the MCP server verified) with the key just activated.
                deadline = time.monotonic() + 20
                while ("this", rotation.active) not in signed and time.monotonic() < deadline:
                    time.sleep(0.01)
            time.sleep(2 * max_age)
        finally:
            stop.set()
            for thread in threads:
                thread.join(10)
    assert failures == []
    this_kids = {kid for name, kid in signed if name == "this"}
    other_kids = {kid for name, kid in signed if name == "other"}
    assert len(this_kids) == 4  # the first key and three activated ones, all verified
    assert len(other_kids) == 1 and other_kids <= this_kids  # the first key, retired thrice
    assert states(app)[next(iter(other_kids))] == "retired"
