"""A refresh-token family's lifetimes (OAuth 2.1 section 4.3.1, RFC 9700 section 4.14.2): the
absolute expiry belongs to the family, so a rotation never extends it; an expired or idle token
is refused with ``invalid_grant``, and, not being a reuse, revokes nothing."""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select, update

from broker.models import Grant, RefreshToken
from tests.support import authorize_params, pkce, query, redeem, sign_in_local


def _tokens(client: FlaskClient, client_id: str) -> dict[str, Any]:
    verifier, challenge = pkce()
    done = sign_in_local(client, authorize_params(client_id, challenge))
    tokens = redeem(client, client_id, query(done.headers["Location"])["code"], verifier)
    assert tokens.status_code == 200, tokens.json
    return dict(tokens.json)


def _refresh(client: FlaskClient, client_id: str, token: str) -> Any:
    return client.post(
        "/token",
        data={"grant_type": "refresh_token", "refresh_token": token, "client_id": client_id},
    )


def _row(app: Flask, token: str) -> RefreshToken:
    with app.extensions["broker"].db.session() as session:
        row = session.get(RefreshToken, hashlib.sha256(token.encode()).hexdigest())
        assert row is not None
        return row


def _set(app: Flask, token: str, **values: Any) -> None:
    digest = hashlib.sha256(token.encode()).hexdigest()
    with app.extensions["broker"].db.session() as session:
        session.execute(
            update(RefreshToken).where(RefreshToken.token_hash == digest).values(**values)
        )


def _revoked(app: Flask) -> list[Any]:
    with app.extensions["broker"].db.session() as session:
        return list(session.scalars(select(Grant.revoked_at)))


def test_a_rotation_keeps_the_familys_absolute_expiry(
    app: Flask, client: FlaskClient, registered: dict[str, Any]
) -> None:
    client_id = registered["client_id"]
    first = _tokens(client, client_id)["refresh_token"]
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    _set(app, first, expires_at=soon, idle_expires_at=soon)  # the family ends in an hour
    second = _refresh(client, client_id, first)
    assert second.status_code == 200, second.json
    row = _row(app, second.json["refresh_token"])
    assert abs(row.expires_at - soon) < dt.timedelta(seconds=1)  # not now + refresh_ttl
    assert row.idle_expires_at <= row.expires_at


def test_an_expired_family_is_refused_and_revokes_nothing(
    app: Flask, client: FlaskClient, registered: dict[str, Any]
) -> None:
    client_id = registered["client_id"]
    token = _tokens(client, client_id)["refresh_token"]
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    _set(app, token, expires_at=past)
    refused = _refresh(client, client_id, token)
    assert refused.status_code == 400 and refused.json["error"] == "invalid_grant"
    assert _revoked(app) == [None]


def test_an_idle_token_is_refused_and_revokes_nothing(
    app: Flask, client: FlaskClient, registered: dict[str, Any]
) -> None:
    client_id = registered["client_id"]
    token = _tokens(client, client_id)["refresh_token"]
    _set(app, token, idle_expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
    refused = _refresh(client, client_id, token)
    assert refused.status_code == 400 and refused.json["error"] == "invalid_grant"
    assert _revoked(app) == [None]
