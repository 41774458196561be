"""A dump of the database gives an attacker no usable credential: codes, refresh tokens,
client secrets and session ids are hashed; private keys and upstream tokens are sealed with
AES-GCM under a key derived from secret_key, with AAD binding each value to its row."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select, text

from broker.crypto import Sealer, SealError
from broker.models import Base, SigningKey, UpstreamToken
from providers.contract import Identity, LoginResult, UpstreamTokens
from tests.support import authorize_params, pkce, query, redeem, sign_in_local


def dump(app: Any) -> str:
    chunks = []
    with app.extensions["broker"].db.session() as session:
        for table in Base.metadata.sorted_tables:
            for row in session.execute(text(f"SELECT * FROM {table.name}")):
                chunks.append(repr(tuple(row)))
    return "\n".join(chunks)


def test_no_usable_credential_in_a_dump(app: Any, client: FlaskClient) -> None:
    confidential = client.post(
        "/register",
        json={
            "redirect_uris": ["http://127.0.0.1/callback"],
            "token_endpoint_auth_method": "client_secret_post",
        },
    ).json
    verifier, challenge = pkce()
    response = sign_in_local(client, authorize_params(confidential["client_id"], challenge))
    code = query(response.headers["Location"])["code"]
    session_cookie = next(c for c in client._cookies.values() if c.key == "broker_session")
    tokens = redeem(
        client,
        confidential["client_id"],
        code,
        verifier,
        client_secret=confidential["client_secret"],
    ).json
    with app.app_context():
        flow = app.extensions["broker"].flow
        with app.extensions["broker"].db.session() as session:
            flow.link_identity(
                session,
                LoginResult(
                    Identity(provider="local", subject="alice"),
                    UpstreamTokens(
                        access_token="upstream-access-SECRET-123",
                        refresh_token="upstream-refresh-SECRET-456",
                    ),
                ),
            )
    data = dump(app)
    for secret in (
        code,
        tokens["refresh_token"],
        tokens["access_token"],
        confidential["client_secret"],
        "upstream-access-SECRET-123",
        "upstream-refresh-SECRET-456",
        "alice-password",
        "PRIVATE KEY",
        session_cookie.value.split(".")[0],
    ):
        assert secret not in data


def test_sealed_values_open_only_with_the_key_and_their_row(app: Any) -> None:
    broker = app.extensions["broker"]
    with broker.db.session() as session:
        key = session.scalars(select(SigningKey)).first()
        assert key is not None
        pem = broker.sealer.open(key.private_key_sealed, f"signing_keys:{key.kid}:private_key")
        assert b"PRIVATE KEY" in pem
        with pytest.raises(SealError):
            Sealer("another-secret-" + "z" * 40).open(
                key.private_key_sealed, f"signing_keys:{key.kid}:private_key"
            )
        with pytest.raises(SealError):  # moved to another row: the AAD no longer matches
            broker.sealer.open(key.private_key_sealed, "signing_keys:other:private_key")
        tampered = key.private_key_sealed[:-4] + (
            "AAAA" if key.private_key_sealed[-4:] != "AAAA" else "BBBB"
        )
        with pytest.raises(SealError):
            broker.sealer.open(tampered, f"signing_keys:{key.kid}:private_key")


def test_upstream_tokens_are_sealed_per_identity(app: Any) -> None:
    broker = app.extensions["broker"]
    with broker.db.session() as session:
        identity = broker.flow.link_identity(
            session,
            LoginResult(
                Identity(provider="local", subject="bob"),
                UpstreamTokens(
                    access_token="at-bob", refresh_token="rt-bob", expires_at=2_000_000_000
                ),
            ),
        )
        identity_id = identity.id
    with broker.db.session() as session:
        row = session.get(UpstreamToken, identity_id)
        assert row is not None and "at-bob" not in row.access_token_sealed
        assert (
            broker.sealer.open_text(
                row.access_token_sealed, f"upstream_tokens:{identity_id}:access"
            )
            == "at-bob"
        )
        assert row.refresh_token_sealed is not None
        with pytest.raises(SealError):  # the access seal does not open as the refresh token
            broker.sealer.open_text(
                row.access_token_sealed, f"upstream_tokens:{identity_id}:refresh"
            )
