"""Signing keys: created on first start, private keys sealed at rest, published as a JWKS; and
re-sealing every sealed value of the database after the root secret changed (``broker keys
reseal``).

Key objects are parsed once per process and kept (parsing a PEM per signature costs more than the
signature itself); which key is active is read from the database, so a rotation on one host is
seen by every other. Tokens are verified with the public half (``public_jwk``), so a retired key's
private half is never opened again.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt import PyJWK
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.orm import Session

from .crypto import Sealer, SealError
from .db import Database, rows_affected, utcnow
from .models import PendingLogin, RefreshToken, SigningKey, UpstreamToken

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
        self._public: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._active: tuple[LoadedKey, float] | None = None

    @property
    def sealer(self) -> Sealer:
        return self._sealer

    def forget(self) -> None:
        """Read the active key from the database at the next signature (after keys changed)."""
        self._active = None

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
            retired_until = self.retired_until(now)
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

    def retired_until(self, now: dt.datetime) -> dt.datetime:
        """How long a key retired ``now`` stays published: tokens are signed with it until every
        worker has seen the change, and then verify for their lifetime."""
        return now + dt.timedelta(seconds=self.access_ttl + ACTIVE_KEY_RECHECK + 60)

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

    def current(self) -> LoadedKey | None:
        """The key that signs now, when :meth:`active` read it less than
        ``ACTIVE_KEY_RECHECK`` seconds ago; ``None`` when it is to be read again."""
        cached = self._active
        if cached is not None and time.monotonic() - cached[1] < ACTIVE_KEY_RECHECK:
            return cached[0]
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

    def public_key(self, row: SigningKey) -> Any:
        """The public key object of ``row``, from its published JWK (parsed once)."""
        with self._lock:
            key = self._public.get(row.kid)
            if key is None:
                key = self._public[row.kid] = PyJWK(row.public_jwk).key
            return key

    def unopened(self, session: Session) -> tuple[int, list[str]]:
        """How many keys sign or are about to (active and next), and the kids of those whose
        private key the configured secrets do not open (``secret_key`` changed without its old
        value in ``previous_secret_keys``, or a host with another ``secret_key``)."""
        rows = session.scalars(
            select(SigningKey)
            .where(SigningKey.state.in_(("active", "next")))
            .order_by(SigningKey.created_at)
        ).all()
        unopened = []
        for row in rows:
            try:
                self._load(row)
            except SealError:
                unopened.append(row.kid)
        return len(rows), unopened

    def startup_problem(self, session: Session) -> str | None:
        """The one-line configuration problem when a signing key does not open, else ``None``."""
        total, unopened = self.unopened(session)
        if not unopened:
            return None
        if len(unopened) == total:
            return (
                f"secret_key: opens none of the {total} signing keys in the database (was "
                "secret_key changed? put the old one in previous_secret_keys; if it is lost, "
                "`broker keys reseal --discard-unreadable` retires those keys)"
            )
        return (
            f"secret_key: opens {total - len(unopened)} of the {total} signing keys in the "
            f"database, not {', '.join(unopened)} (a host with another secret_key? every host "
            "needs the same secret_key and previous_secret_keys)"
        )

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
    return ring.public_key(row), row.alg


# -- re-sealing under the current root secret ------------------------------------------------------

RESEAL_BATCH = 200
"""Rows per transaction of :func:`reseal`: each transaction is short, and a crash half-way leaves
every row sealed under either the old secret or the new one (both open while the old one is in
``previous_secret_keys``)."""


@dataclass
class ResealCount:
    """What :func:`reseal` found in one table (its rows holding at least one sealed value)."""

    table: str
    resealed: int = 0
    """Opened under a previous secret and sealed again under ``secret_key`` (dry run: would be)."""
    current: int = 0
    """Already sealed under ``secret_key``."""
    unreadable: int = 0
    """Opened by no configured secret: left alone (or discarded, see ``discarded``)."""
    discarded: int = 0
    """Unreadable and discarded (``discard_unreadable``)."""
    left: int = 0
    """Still sealed under a previous secret when the run ended (in use meanwhile: run again)."""


@dataclass(frozen=True)
class _SealedTable:
    """A table with sealed columns: how to find its rows, their AAD, and how to discard one."""

    name: str
    model: Any
    key: Any
    columns: tuple[str, ...]
    aad: Callable[[Any, str], str]
    """(primary key, column) -> the AAD the value was sealed with."""
    discard: Callable[[Any, dt.datetime], Any]
    """(row, now) -> the statement that discards the row's unreadable values."""
    free: Callable[[dt.datetime], Any] | None = None
    """now -> the condition for touching a row at all (no upstream refresh holds it)."""


def _sealed_tables(ring: KeyRing) -> tuple[_SealedTable, ...]:
    """Every column holding a sealed value, with the AAD its writer seals it with."""
    from .oauth2.rfc6749 import successor_aad
    from .upstream import sealed_aad

    def retire(row: SigningKey, now: dt.datetime) -> Any:
        # The public half keeps verifying what the key signed; the private half is erased.
        expires = {"active": ring.retired_until(now), "next": now}.get(row.state, row.expires_at)
        return (
            update(SigningKey)
            .where(SigningKey.state == row.state)
            .values(
                state="retired",
                private_key_sealed="",
                retired_at=row.retired_at or now,
                expires_at=expires,
            )
        )

    def upstream_free(now: dt.datetime) -> Any:
        return or_(
            UpstreamToken.refresh_lock_until.is_(None), UpstreamToken.refresh_lock_until <= now
        )

    return (
        _SealedTable(
            "signing_keys",
            SigningKey,
            SigningKey.kid,
            ("private_key_sealed",),
            lambda kid, _column: _aad(kid),
            retire,
        ),
        _SealedTable(
            "upstream_tokens",
            UpstreamToken,
            UpstreamToken.identity_id,
            ("access_token_sealed", "refresh_token_sealed"),
            lambda identity_id, column: sealed_aad(identity_id, column.split("_", 1)[0]),
            # The token's user signs in with that provider again.
            lambda _row, _now: delete(UpstreamToken),
            upstream_free,
        ),
        _SealedTable(
            "refresh_tokens",
            RefreshToken,
            RefreshToken.token_hash,
            ("successor_sealed",),
            lambda token_hash, _column: successor_aad(token_hash),
            # Only a replay within the grace window needed it; that replay is now refused.
            lambda _row, _now: update(RefreshToken).values(successor_sealed=None),
        ),
        _SealedTable(
            "pending_logins",
            PendingLogin,
            PendingLogin.id,
            ("upstream_secrets_sealed",),
            # As broker/flow.py seals the upstream PKCE verifier and nonce.
            lambda login_id, _column: f"pending_logins:{login_id}:upstream",
            # That sign-in's callback no longer matches: the user starts again.
            lambda _row, _now: delete(PendingLogin),
        ),
    )


def reseal(
    db: Database,
    ring: KeyRing,
    *,
    dry_run: bool = False,
    discard_unreadable: bool = False,
    batch: int = RESEAL_BATCH,
) -> list[ResealCount]:
    """Seal every sealed value in the database again under the current ``secret_key`` (the
    ring's :class:`Sealer`), with the AAD it was sealed with, so that ``previous_secret_keys``
    can be emptied afterwards. Idempotent.

    One transaction per ``batch`` rows; each row is changed by a conditional ``UPDATE`` on the
    values it was read with, so a value the broker rewrote meanwhile is never overwritten, and
    rows locked by a running request are skipped rather than waited for (``FOR UPDATE SKIP
    LOCKED`` on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` makes each batch exclusive). A last
    read-only pass counts what is still under a previous secret (``left``).

    Values no configured secret opens are left alone and counted, unless ``discard_unreadable``
    (the old secret is lost): then signing keys are retired with their private half erased (a
    new active and next key are created), upstream tokens and pending sign-ins are deleted (those
    users sign in again), and refresh-token successors kept for the reuse grace are dropped.
    """
    counts = []
    for table in _sealed_tables(ring):
        count = _reseal_table(
            db, ring.sealer, table, dry_run=dry_run, discard=discard_unreadable, batch=batch
        )
        if not dry_run:
            count.left = _reseal_table(
                db, ring.sealer, table, dry_run=True, discard=False, batch=batch
            ).resealed
        counts.append(count)
    if discard_unreadable and not dry_run:
        ring.forget()
        with db.session() as session:
            ring.ensure_active(session)
            ring.ensure_next(session)
    return counts


def _reseal_table(
    db: Database,
    sealer: Sealer,
    table: _SealedTable,
    *,
    dry_run: bool,
    discard: bool,
    batch: int,
) -> ResealCount:
    count = ResealCount(table.name)
    attributes = [getattr(table.model, name) for name in table.columns]
    holds_a_seal = or_(*(and_(a.is_not(None), a != "") for a in attributes))
    last: Any = None
    while True:
        with db.read() if dry_run else db.session() as session:
            query = select(table.model).where(holds_a_seal).order_by(table.key).limit(batch)
            if last is not None:
                query = query.where(table.key > last)
            if not dry_run:
                query = query.with_for_update(skip_locked=True)
            rows = session.scalars(query).all()
            if not rows:
                return count
            last = getattr(rows[-1], table.key.key)
            now = utcnow()
            for row in rows:
                _reseal_row(session, sealer, table, row, now, count, dry_run, discard)


def _reseal_row(
    session: Session,
    sealer: Sealer,
    table: _SealedTable,
    row: Any,
    now: dt.datetime,
    count: ResealCount,
    dry_run: bool,
    discard: bool,
) -> None:
    key = getattr(row, table.key.key)
    seen = {name: getattr(row, name) for name in table.columns}
    fresh: dict[str, str] = {}
    try:
        for name, sealed in seen.items():
            if sealed:
                again = sealer.reseal(sealed, table.aad(key, name))
                if again is not None:
                    fresh[name] = again
    except SealError:
        count.unreadable += 1
        if discard and not dry_run:
            statement = table.discard(row, now)
            count.discarded += _unchanged(session, table, statement, key, seen, now)
        return
    if not fresh:
        count.current += 1
        return
    if dry_run:
        count.resealed += 1
        return
    count.resealed += _unchanged(
        session, table, update(table.model).values(**fresh), key, seen, now
    )


def _unchanged(
    session: Session,
    table: _SealedTable,
    statement: Any,
    key: Any,
    seen: dict[str, str | None],
    now: dt.datetime,
) -> int:
    """Run ``statement`` on the row only while its sealed values are still those ``seen`` (and
    no request holds it); 1 when it did."""
    conditions = [table.key == key]
    for name, value in seen.items():
        attribute = getattr(table.model, name)
        conditions.append(attribute.is_(None) if value is None else attribute == value)
    if table.free is not None:
        conditions.append(table.free(now))
    statement = statement.where(*conditions).execution_options(synchronize_session=False)
    return rows_affected(session, statement)
