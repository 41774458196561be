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
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from .crypto import Sealer
from .db import rows_affected, utcnow
from .models import SigningKey

ACTIVE_KEY_RECHECK = 30.0
JWKS_MAX_AGE = 300
"""Seconds resource servers may cache the JWKS (its ``Cache-Control``)."""
PUBLISH_BEFORE_SIGNING = dt.timedelta(seconds=JWKS_MAX_AGE + ACTIVE_KEY_RECHECK)
"""A next key is in the JWKS at least this long before it signs: every cache has seen it."""
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


class RotationRefused(Exception):
    """A rotation cannot happen now (the next key was published too recently)."""


@dataclass(frozen=True)
class Rotation:
    """What a rotation did: the key that signs now, the one retired (kept in the JWKS until
    ``retired_until``), and the new next key published for the rotation after."""

    active: str
    retired: str | None
    retired_until: dt.datetime | None
    next: str


class KeyRing:
    """The application's signing keys.

    Life of a key: ``next`` (published in the JWKS, not signing), ``active`` (signing), ``retired``
    (published until every token it signed has expired, then dropped from the JWKS). A rotation
    activates the next key only once it has been published for :data:`PUBLISH_BEFORE_SIGNING`,
    so resource servers that cache the JWKS already know it when the first token it signs
    arrives; tokens of the retired key keep verifying until they expire.
    """

    def __init__(self, sealer: Sealer, alg: str, *, access_ttl: int = 3600) -> None:
        self._sealer = sealer
        self.alg = alg
        self.access_ttl = access_ttl
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
        row = self._newest(session, "active")
        if row is None:
            row = self.create(session)
        return row

    def _newest(self, session: Session, state: str) -> SigningKey | None:
        order = SigningKey.activated_at if state == "active" else SigningKey.created_at
        return session.scalars(
            select(SigningKey)
            .where(SigningKey.state == state, SigningKey.alg == self.alg)
            .order_by(order.desc())
            .limit(1)
        ).first()

    def ensure_next(self, session: Session) -> SigningKey:
        """The published next key, created if there is none (so the next rotation can happen
        without waiting for caches)."""
        return self._newest(session, "next") or self.create(session, state="next")

    def rotate(self, session: Session, *, force: bool = False) -> Rotation:
        """Activate the next key and retire the active one; publish a new next key.

        Refused (:class:`RotationRefused`) while the next key has been published for less than
        :data:`PUBLISH_BEFORE_SIGNING`, unless ``force`` (then resource servers that cached the
        JWKS refetch it on the unknown ``kid``). Decided by conditional updates, so two hosts
        rotating at once activate one key."""
        now = utcnow()
        upcoming = self._newest(session, "next")
        if upcoming is None:
            upcoming = self.create(session, state="next")
            if not force:
                raise RotationRefused(
                    f"no next key was published: published {upcoming.kid} now; rotate again "
                    f"after {int(PUBLISH_BEFORE_SIGNING.total_seconds())} s (or --force)"
                )
        published = now - upcoming.created_at
        if not force and published < PUBLISH_BEFORE_SIGNING:
            wait = int((PUBLISH_BEFORE_SIGNING - published).total_seconds()) + 1
            raise RotationRefused(
                f"the next key {upcoming.kid} was published {int(published.total_seconds())} s "
                f"ago; rotate again in {wait} s (or --force)"
            )
        previous = self._newest(session, "active")
        won = rows_affected(
            session,
            update(SigningKey)
            .where(SigningKey.kid == upcoming.kid, SigningKey.state == "next")
            .values(state="active", activated_at=now),
        )
        if not won:
            raise RotationRefused("another rotation is in progress")
        retired_until = None
        if previous is not None:
            # Tokens signed until every worker has seen the rotation, plus their lifetime.
            retired_until = now + dt.timedelta(seconds=self.access_ttl + ACTIVE_KEY_RECHECK + 60)
            session.execute(
                update(SigningKey)
                .where(SigningKey.kid == previous.kid, SigningKey.state == "active")
                .values(state="retired", retired_at=now, expires_at=retired_until)
            )
        fresh = self.create(session, state="next")
        self._active = None
        return Rotation(
            active=upcoming.kid,
            retired=previous.kid if previous else None,
            retired_until=retired_until,
            next=fresh.kid,
        )

    def rotate_if_older(self, session: Session, age: dt.timedelta) -> Rotation | None:
        """Rotation by age: rotate when the active key is older than ``age`` and the next key
        has been published long enough; ``None`` when nothing was due."""
        active = self._newest(session, "active")
        if active is None or active.activated_at is None:
            return None
        if utcnow() - active.activated_at < age:
            return None
        try:
            return self.rotate(session)
        except RotationRefused:
            return None

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
