"""Signing keys: created on first start, private keys sealed at rest, published as a JWKS.

Key objects are parsed once per process and kept (parsing a PEM per signature costs more than the
signature itself); which key is active is read from the database, so a rotation on one host is
seen by every other.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from sqlalchemy import select
from sqlalchemy.orm import Session

from .crypto import Sealer
from .db import utcnow
from .models import SigningKey

ACTIVE_KEY_RECHECK = 30.0
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True)
class LoadedKey:
    kid: str
    alg: str
    private_key: PrivateKey


def _aad(kid: str) -> str:
    return f"signing_keys:{kid}:private_key"


def generate_private_key(alg: str) -> PrivateKey:
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unsupported signing algorithm {alg}")


def public_jwk(private_key: PrivateKey, kid: str, alg: str) -> dict[str, Any]:
    public = private_key.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        jwk = json.loads(ECAlgorithm.to_jwk(public))
    elif isinstance(public, rsa.RSAPublicKey):
        jwk = json.loads(RSAAlgorithm.to_jwk(public))
    else:
        jwk = json.loads(OKPAlgorithm.to_jwk(public))
    jwk.pop("key_ops", None)  # RFC 7517 section 4.3: use and key_ops should not both appear
    jwk.update({"kid": kid, "alg": alg, "use": "sig"})
    return dict(jwk)


class KeyRing:
    """The application's signing keys."""

    def __init__(self, sealer: Sealer, alg: str) -> None:
        self._sealer = sealer
        self.alg = alg
        self._loaded: dict[str, LoadedKey] = {}
        self._lock = threading.Lock()
        self._active: tuple[LoadedKey, float] | None = None

    def create(
        self, session: Session, *, alg: str | None = None, state: str = "active"
    ) -> SigningKey:
        alg = alg or self.alg
        private_key = generate_private_key(alg)
        kid = secrets.token_urlsafe(12)
        pem = private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        now = utcnow()
        row = SigningKey(
            kid=kid,
            alg=alg,
            state=state,
            private_key_sealed=self._sealer.seal(pem, _aad(kid)),
            public_jwk=public_jwk(private_key, kid, alg),
            created_at=now,
            activated_at=now if state == "active" else None,
        )
        session.add(row)
        session.flush()
        return row

    def ensure_active(self, session: Session) -> SigningKey:
        """The newest active key of the configured algorithm, created if there is none."""
        row = session.scalars(
            select(SigningKey)
            .where(SigningKey.state == "active", SigningKey.alg == self.alg)
            .order_by(SigningKey.activated_at.desc())
            .limit(1)
        ).first()
        if row is None:
            row = self.create(session)
        return row

    def active(self, session: Session) -> LoadedKey:
        """The key that signs now. Which key is active is re-read from the database at most every
        ``ACTIVE_KEY_RECHECK`` seconds: a key is published in the JWKS well before it becomes
        active and stays published after, so a worker signing with the previous active key for a
        few seconds after a rotation issues tokens that still verify everywhere."""
        now = time.monotonic()
        cached = self._active
        if cached is not None and now - cached[1] < ACTIVE_KEY_RECHECK:
            return cached[0]
        loaded = self._load(self.ensure_active(session))
        self._active = (loaded, now)
        return loaded

    def _load(self, row: SigningKey) -> LoadedKey:
        with self._lock:
            loaded = self._loaded.get(row.kid)
            if loaded is None:
                pem = self._sealer.open(row.private_key_sealed, _aad(row.kid))
                key = serialization.load_pem_private_key(pem, password=None)
                assert isinstance(
                    key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
                )
                loaded = LoadedKey(row.kid, row.alg, key)
                self._loaded[row.kid] = loaded
            return loaded

    def public_keys(self, session: Session) -> list[SigningKey]:
        return list(session.scalars(select(SigningKey).order_by(SigningKey.created_at)))

    def jwks(self, session: Session, *, now: dt.datetime | None = None) -> dict[str, Any]:
        """JWKS = next + active + retired keys whose tokens may still be in use."""
        now = now or utcnow()
        keys = []
        for row in self.public_keys(session):
            if row.state == "retired" and row.expires_at is not None and row.expires_at <= now:
                continue
            keys.append(row.public_jwk)
        return {"keys": keys}


def verification_key(ring: KeyRing, session: Session, kid: str) -> tuple[Any, str] | None:
    """The public key object and algorithm for ``kid`` (for the broker's own introspection and
    revocation of the tokens it issued)."""
    row = session.get(SigningKey, kid)
    if row is None:
        return None
    return ring._load(row).private_key.public_key(), row.alg
