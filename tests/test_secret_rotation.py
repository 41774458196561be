"""The root secret rotates: ``previous_secret_keys`` open what older secrets sealed, ``broker keys
reseal`` seals it all again under the current one, and a ``secret_key`` that opens no signing key
stops start-up with one line instead of answering 500 at ``/token``.

On SQLite and PostgreSQL, through the ``Deployment`` of ``test_lifecycle``: a config file, the
broker (re)started on it, and the ``broker`` command run against it as an operator runs it.
"""

from __future__ import annotations

import re
from typing import Any

import jwt
import pytest
from click.testing import CliRunner
from flask import Flask
from sqlalchemy import select

from broker.app import create_app
from broker.cli import main
from broker.config import ConfigError
from broker.crypto import Sealer, SealError
from broker.keys import KeyRing, reseal
from broker.models import PendingLogin, RefreshToken, SigningKey, UpstreamToken
from broker.oauth2.rfc6749 import successor_aad
from broker.upstream import SignInRequired, UpstreamTokenService, sealed_aad
from providers.contract import Identity, LoginResult, UpstreamTokens
from tests.support import RESOURCE, login_form
from tests.test_lifecycle import Deployment, refresh, signed_in
from tests.test_lifecycle import deployment as deployment  # the fixture

OLD = "old-root-secret-" + "o" * 40
NEW = "new-root-secret-" + "n" * 40
UNKNOWN = "nobody-knows-this-" + "u" * 40


# -- helpers ---------------------------------------------------------------------------------------


def broker_of(deployment: Deployment) -> Any:
    return deployment.apps[-1].extensions["broker"]


def sealed_values(deployment: Deployment) -> dict[tuple[str, str, str], tuple[str, str]]:
    """Every sealed value in the database, with the AAD its writer sealed it with:
    (table, row, column) -> (sealed, aad)."""
    found: dict[tuple[str, str, str], tuple[str, str]] = {}
    with broker_of(deployment).db.read() as session:
        for key in session.scalars(select(SigningKey)):
            if key.private_key_sealed:
                found["signing_keys", key.kid, "private_key"] = (
                    key.private_key_sealed,
                    f"signing_keys:{key.kid}:private_key",
                )
        for token in session.scalars(select(UpstreamToken)):
            found["upstream_tokens", str(token.identity_id), "access"] = (
                token.access_token_sealed,
                sealed_aad(token.identity_id, "access"),
            )
            if token.refresh_token_sealed:
                found["upstream_tokens", str(token.identity_id), "refresh"] = (
                    token.refresh_token_sealed,
                    sealed_aad(token.identity_id, "refresh"),
                )
        for row in session.scalars(select(RefreshToken)):
            if row.successor_sealed:
                found["refresh_tokens", row.token_hash, "successor"] = (
                    row.successor_sealed,
                    successor_aad(row.token_hash),
                )
        for login in session.scalars(select(PendingLogin)):
            if login.upstream_secrets_sealed:
                found["pending_logins", login.id, "upstream"] = (
                    login.upstream_secrets_sealed,
                    f"pending_logins:{login.id}:upstream",
                )
    return found


def open_only_with(deployment: Deployment, secret: str) -> set[str]:
    """The tables whose sealed values all open with ``secret`` alone (and none is empty)."""
    sealer = Sealer(secret)
    tables: dict[str, bool] = {}
    for (table, _row, _column), (sealed, aad) in sealed_values(deployment).items():
        try:
            sealer.open(sealed, aad)
            tables.setdefault(table, True)
        except SealError:
            tables[table] = False
    return {table for table, opens in tables.items() if opens}


def upstream_tokens(deployment: Deployment, subject: str, access: str, refresh: str) -> int:
    """A sign-in stored upstream tokens for ``subject`` (as a provider callback stores them)."""
    broker = broker_of(deployment)
    with deployment.apps[-1].app_context(), broker.db.session() as session:
        identity = broker.flow.link_identity(
            session,
            LoginResult(
                Identity(provider="local", subject=subject),
                UpstreamTokens(access_token=access, refresh_token=refresh),
            ),
        )
        return int(identity.id)


def current_upstream_token(deployment: Deployment, identity_id: int) -> str:
    """The upstream access token as token exchange reads it."""
    broker = broker_of(deployment)
    service = UpstreamTokenService(broker.db, broker.sealer, broker.providers, broker.http)
    return service.current(identity_id, "local").access_token


def counts(output: str) -> dict[str, tuple[int, int, int]]:
    """``broker keys reseal`` output: table -> (re-sealed, already current, open with no key)."""
    found = {}
    for table, resealed, current, unreadable in re.findall(
        r"^(\w+): (\d+) (?:re-sealed|would re-seal), (\d+) already current, (\d+) open with no key",
        output,
        re.MULTILINE,
    ):
        found[table] = (int(resealed), int(current), int(unreadable))
    return found


def refused_start(deployment: Deployment, **changes: Any) -> list[str]:
    with pytest.raises(ConfigError) as refused:
        deployment.start(**changes)
    return refused.value.problems


# -- the sealer ------------------------------------------------------------------------------------


def test_reseal_keeps_the_aad_and_leaves_current_values_alone() -> None:
    old, rotated = Sealer(OLD), Sealer(NEW, previous=(OLD,))
    sealed = old.seal(b"private", "signing_keys:k1:private_key")
    again = rotated.reseal(sealed, "signing_keys:k1:private_key")
    assert again is not None and again.startswith("v1.")  # the format existing rows use
    assert Sealer(NEW).open(again, "signing_keys:k1:private_key") == b"private"
    with pytest.raises(SealError):  # bound to the same row as before
        Sealer(NEW).open(again, "signing_keys:k2:private_key")
    assert rotated.reseal(again, "signing_keys:k1:private_key") is None  # already current
    with pytest.raises(SealError):
        rotated.reseal(Sealer(UNKNOWN).seal(b"x", "a"), "a")
    with pytest.raises(SealError):  # not base64: a SealError like any other unreadable value
        rotated.open("v1.not*base64!", "a")


# -- start-up --------------------------------------------------------------------------------------


def test_a_changed_secret_stops_start_up_with_one_line(deployment: Deployment) -> None:
    client_id, tokens = signed_in(deployment.start(secret_key=OLD))
    [problem] = refused_start(deployment, secret_key=NEW)
    assert problem == (
        "secret_key: opens none of the 2 signing keys in the database (was secret_key changed? "
        "put the old one in previous_secret_keys; if it is lost, `broker keys reseal "
        "--discard-unreadable` retires those keys)"
    )
    # The operator's check of what the config points at says the same, in one line.
    checked = CliRunner().invoke(
        main, ["--config", str(deployment.path), "check-config", "--connect"]
    )
    assert checked.exit_code == 1
    assert f"FAIL signing keys: {problem}" in checked.output.splitlines()
    # Nothing was created under the wrong secret; the old one still starts and serves.
    client = deployment.start(secret_key=OLD)
    assert refresh(client, client_id, tokens["refresh_token"]).status_code == 200


def test_previous_secret_keys_open_what_the_old_secret_sealed(deployment: Deployment) -> None:
    client_id, tokens = signed_in(deployment.start(secret_key=OLD))
    identity_id = upstream_tokens(deployment, "alice", "upstream-access-A", "upstream-refresh-A")
    client = deployment.start(secret_key=NEW, previous_secret_keys=[OLD])
    refreshed = refresh(client, client_id, tokens["refresh_token"])
    assert refreshed.status_code == 200, refreshed.json  # signed with the old-sealed key
    jwks = {key["kid"] for key in client.get("/jwks.json").json["keys"]}
    assert jwt.get_unverified_header(refreshed.json["access_token"])["kid"] in jwks
    assert current_upstream_token(deployment, identity_id) == "upstream-access-A"
    assert client.get("/ready").json == {"status": "ok"}
    signed_in(client)  # a new sign-in, sealed under the new secret


def test_reseal_moves_everything_to_the_new_secret(deployment: Deployment) -> None:
    client = deployment.start(secret_key=OLD)
    client_id, first = signed_in(client)
    second = refresh(client, client_id, first["refresh_token"]).json  # a successor kept sealed
    identity_id = upstream_tokens(deployment, "alice", "upstream-access-A", "upstream-refresh-A")
    login_form(client)  # a sign-in under way: its upstream verifier and nonce sealed
    before = sealed_values(deployment)
    assert {table for table, _, _ in before} == {
        "signing_keys",
        "upstream_tokens",
        "refresh_tokens",
        "pending_logins",
    }
    deployment.start(secret_key=NEW, previous_secret_keys=[OLD])

    dry = deployment.cli("keys", "reseal", "--dry-run").output
    assert counts(dry)["signing_keys"] == (2, 0, 0)
    assert counts(dry)["upstream_tokens"] == (1, 0, 0)
    assert counts(dry)["refresh_tokens"] == (1, 0, 0)
    assert sealed_values(deployment) == before  # a dry run changes nothing

    done = deployment.cli("keys", "reseal").output
    assert counts(done) == counts(dry)
    assert "previous_secret_keys can go" in done
    assert open_only_with(deployment, NEW) == {table for table, _, _ in before}
    assert sealed_values(deployment).keys() == before.keys()  # the same rows, sealed again

    # Idempotent: a second run finds everything current and changes nothing.
    resealed = sealed_values(deployment)
    again = counts(deployment.cli("keys", "reseal").output)
    assert all(resealed_count == 0 for resealed_count, _, _ in again.values())
    assert again["signing_keys"] == (0, 2, 0)
    assert sealed_values(deployment) == resealed

    # The old secret leaves the config; everything still works.
    client = deployment.start(secret_key=NEW)
    assert client.get("/ready").json == {"status": "ok"}
    grace = refresh(client, client_id, first["refresh_token"])  # a replay within the grace
    assert grace.status_code == 200 and grace.json["refresh_token"] == second["refresh_token"]
    assert refresh(client, client_id, second["refresh_token"]).status_code == 200
    assert current_upstream_token(deployment, identity_id) == "upstream-access-A"
    signed_in(client)


def test_a_row_no_secret_opens_is_reported_and_left_alone(deployment: Deployment) -> None:
    deployment.start(secret_key=NEW)
    identity_id = upstream_tokens(deployment, "bob", "at-bob", "rt-bob")
    stranger = Sealer(UNKNOWN)
    with broker_of(deployment).db.session() as session:
        row = session.get(UpstreamToken, identity_id)
        assert row is not None
        row.access_token_sealed = stranger.seal_text("at-bob", sealed_aad(identity_id, "access"))
        unreadable = row.access_token_sealed
    result = deployment.cli("keys", "reseal")
    assert counts(result.output)["upstream_tokens"] == (0, 0, 1)
    assert "1 row(s) open with no configured secret and were left alone" in result.output
    with broker_of(deployment).db.read() as session:
        kept = session.get(UpstreamToken, identity_id)
        assert kept is not None and kept.access_token_sealed == unreadable
    with pytest.raises(SignInRequired):  # token exchange: that user signs in again
        current_upstream_token(deployment, identity_id)

    discarded = deployment.cli("keys", "reseal", "--discard-unreadable").output
    assert "upstream_tokens: 0 re-sealed, 0 already current, 1 open with no key (1 discarded)" in (
        discarded
    )
    with broker_of(deployment).db.read() as session:
        assert session.get(UpstreamToken, identity_id) is None


def test_a_lost_secret_is_repaired_by_discarding_what_it_sealed(deployment: Deployment) -> None:
    old_client = deployment.start(secret_key=OLD)
    client_id, tokens = signed_in(old_client)
    old_kid = jwt.get_unverified_header(tokens["access_token"])["kid"]
    upstream_tokens(deployment, "alice", "upstream-access-A", "upstream-refresh-A")
    deployment.path.write_text(deployment.path.read_text().replace(OLD, NEW))
    # Without --discard-unreadable the command refuses like start-up does.
    refused = CliRunner().invoke(main, ["--config", str(deployment.path), "keys", "reseal"])
    assert refused.exit_code == 2 and "opens none of the 2 signing keys" in refused.output

    output = deployment.cli("keys", "reseal", "--discard-unreadable").output
    assert counts(output)["signing_keys"] == (0, 0, 2)
    assert counts(output)["upstream_tokens"] == (0, 0, 1)
    client = deployment.start(secret_key=NEW)
    assert client.get("/ready").json == {"status": "ok"}
    # The retired key's public half still verifies what it signed, until those tokens expire.
    jwks = jwt.PyJWKSet.from_dict(client.get("/jwks.json").json)
    claims = jwt.decode(
        tokens["access_token"], jwks[old_kid].key, algorithms=["ES256"], audience=RESOURCE
    )
    assert claims["client_id"] == client_id
    # The broker checks its own tokens with the public half too (its private one is erased).
    revoked = client.post("/revoke", data={"token": tokens["access_token"], "client_id": client_id})
    assert revoked.status_code == 200
    refreshed = refresh(client, client_id, tokens["refresh_token"])
    assert refreshed.status_code == 200, refreshed.json
    assert jwt.get_unverified_header(refreshed.json["access_token"])["kid"] != old_kid
    assert open_only_with(deployment, NEW) >= {"signing_keys"}


def test_a_crash_half_way_leaves_every_value_openable(deployment: Deployment) -> None:
    client = deployment.start(secret_key=OLD)
    client_id, first = signed_in(client)
    refresh(client, client_id, first["refresh_token"])
    for number in range(3):
        upstream_tokens(deployment, f"user-{number}", f"at-{number}", f"rt-{number}")
    app = create_app(str(deployment.path))
    deployment.apps.append(app)
    broker = app.extensions["broker"]

    class CrashingSealer(Sealer):
        """The process dies after re-sealing a few values (a kill, a lost connection)."""

        calls = 0

        def reseal(self, sealed: str, aad: str) -> str | None:
            CrashingSealer.calls += 1
            if CrashingSealer.calls > 3:
                raise KeyboardInterrupt
            return super().reseal(sealed, aad)

    ring = KeyRing(CrashingSealer(NEW, previous=(OLD,)), broker.keys.alg)
    with pytest.raises(KeyboardInterrupt):
        reseal(broker.db, ring, batch=1)
    rotated = Sealer(NEW, previous=(OLD,))
    values = sealed_values(deployment)
    for sealed, aad in values.values():
        rotated.open(sealed, aad)  # each is old- or new-sealed, never half-written
    new_only = Sealer(NEW)
    opened_by_new = 0
    for sealed, aad in values.values():
        try:
            new_only.open(sealed, aad)
            opened_by_new += 1
        except SealError:
            pass
    assert 0 < opened_by_new < len(values)
    # Running it again finishes the job.
    deployment.start(secret_key=NEW, previous_secret_keys=[OLD])
    deployment.cli("keys", "reseal")
    client = deployment.start(secret_key=NEW)
    assert refresh(client, client_id, first["refresh_token"]).status_code == 200


# -- readiness -------------------------------------------------------------------------------------


def test_ready_fails_when_a_key_that_will_sign_does_not_open(deployment: Deployment) -> None:
    client = deployment.start(secret_key=NEW)
    assert client.get("/ready").status_code == 200
    app: Flask = deployment.apps[-1]
    broker = app.extensions["broker"]
    # A host started with another secret_key publishes a next key this one cannot open.
    other_host = KeyRing(Sealer(UNKNOWN), broker.keys.alg)
    with broker.db.session() as session:
        other_host.create(session, state="next")
    answer = client.get("/ready")
    assert answer.status_code == 503
    assert answer.json == {"status": "unavailable", "signing_keys": "unreadable"}
    [problem] = refused_start(deployment, secret_key=NEW)
    assert problem.startswith("secret_key: opens 2 of the 3 signing keys in the database, not ")
