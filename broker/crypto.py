"""Secrets at rest.

Keys for encryption derive from the operator's ``secret_key`` with HKDF-SHA256 (RFC 5869), one key
per purpose and version. Sealed values are AES-256-GCM with associated data naming the table, row
and purpose, so a sealed value copied to another row or column does not open. Values presented
back to us (codes, refresh tokens, session ids) are stored as SHA-256 hashes. Client secrets the
broker generates are high-entropy, so they are stored with a fast salted HMAC-SHA256 and checked in
constant time (:func:`hash_client_secret`); argon2id hashes of client secrets written before it, and
passwords, keep verifying.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SEAL_VERSION = 1
_password_hasher = PasswordHasher()


class SealError(Exception):
    """A sealed value could not be opened (wrong key, wrong AAD, or tampered)."""


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Sealer:
    """AES-GCM seal/open under keys derived from the root secret.

    The output is ``v<version>.<base64url(nonce || ciphertext)>``: the version names how the key
    is derived from a root secret (HKDF info ``broker/v1/seal``), not which root secret. Values
    always seal under the current ``secret_key``; opening tries it first, then each of
    ``previous`` (``previous_secret_keys``), so a rotated secret keeps opening what the old one
    sealed until :meth:`reseal` has moved every value over (``broker keys reseal``).
    """

    def __init__(self, secret_key: str, *, previous: tuple[str, ...] = ()) -> None:
        self._keys: dict[int, AESGCM] = {SEAL_VERSION: AESGCM(derive_key(secret_key, "seal"))}
        self._previous = [AESGCM(derive_key(s, "seal")) for s in previous]

    def seal(self, plaintext: bytes, aad: str) -> str:
        nonce = os.urandom(12)
        ciphertext = self._keys[SEAL_VERSION].encrypt(nonce, plaintext, aad.encode("utf-8"))
        return f"v{SEAL_VERSION}.{_b64e(nonce + ciphertext)}"

    def open(self, sealed: str, aad: str) -> bytes:
        return self._open(sealed, aad)[0]

    def reseal(self, sealed: str, aad: str) -> str | None:
        """``sealed`` sealed again under the current secret with the same ``aad``, or ``None``
        when it already is. Raises :class:`SealError` when no secret opens it."""
        plaintext, current = self._open(sealed, aad)
        return None if current else self.seal(plaintext, aad)

    def _open(self, sealed: str, aad: str) -> tuple[bytes, bool]:
        """The plaintext, and whether the current secret (not a previous one) opened it."""
        version, _, body = sealed.partition(".")
        if not version.startswith("v") or not version[1:].isdigit() or not body:
            raise SealError("malformed sealed value")
        key = self._keys.get(int(version[1:]))
        if key is None:
            raise SealError("unknown seal version")
        try:
            raw = _b64d(body)
        except ValueError:  # binascii.Error: not base64
            raise SealError("malformed sealed value") from None
        if len(raw) < 12 + 16:  # nonce and tag
            raise SealError("malformed sealed value")
        for candidate in (key, *self._previous):
            try:
                return candidate.decrypt(raw[:12], raw[12:], aad.encode("utf-8")), candidate is key
            except InvalidTag:
                continue
        raise SealError("sealed value does not open")

    def seal_text(self, text: str, aad: str) -> str:
        return self.seal(text.encode("utf-8"), aad)

    def open_text(self, sealed: str, aad: str) -> str:
        return self.open(sealed, aad).decode("utf-8")


def derive_key(
    secret_key: str, purpose: str, *, version: int = SEAL_VERSION, length: int = 32
) -> bytes:
    """HKDF-SHA256 of the root secret for one purpose and version."""
    return HKDF(
        algorithm=hashes.SHA256(),
        length=length,
        salt=b"mcp-identity-broker",
        info=f"broker/v{version}/{purpose}".encode(),
    ).derive(secret_key.encode("utf-8"))


def token_hash(value: str) -> str:
    """SHA-256 of a high-entropy value we issued (code, refresh token, session id)."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def new_token(nbytes: int = 32) -> str:
    return secrets.token_urlsafe(nbytes)


def constant_time_equals(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def hash_password(secret: str) -> str:
    """A slow hash (argon2id) for client secrets and passwords."""
    return _password_hasher.hash(secret)


CLIENT_SECRET_SCHEME = "hmac-sha256"
_CLIENT_SECRET_SALT_BYTES = 16


def hash_client_secret(secret: str) -> str:
    """A fast salted hash of a client secret the broker generated:
    ``hmac-sha256$<salt>$<digest>``, HMAC-SHA256 of the secret keyed with a random 128-bit salt
    (both base64url).

    Only for high-entropy secrets (``new_token(32)``: 256 bits), which no guessing reaches, so a
    slow hash buys nothing and argon2id's ~140 ms and 64 MiB per check would let any holder of a
    confidential client exhaust the workers. It does not depend on ``secret_key``: static-client
    migrations are written before, and outlive, a rotation of it.
    """
    salt = os.urandom(_CLIENT_SECRET_SALT_BYTES)
    digest = hmac.new(salt, secret.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
    return f"{CLIENT_SECRET_SCHEME}${_b64e(salt)}${_b64e(digest)}"


def _verify_client_secret(hashed: str, secret: str) -> bool:
    scheme, _, rest = hashed.partition("$")
    salt_text, _, digest_text = rest.partition("$")
    if scheme != CLIENT_SECRET_SCHEME or not salt_text or not digest_text:
        return False
    try:
        salt, expected = _b64d(salt_text), _b64d(digest_text)
    except ValueError:  # binascii.Error: not base64
        return False
    actual = hmac.new(salt, secret.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
    return hmac.compare_digest(actual, expected)


def verify_password(hashed: str, secret: str) -> bool:
    """Whether ``secret`` matches ``hashed``: a :func:`hash_client_secret` value (compared in
    constant time) or an argon2 hash (older client secrets, passwords)."""
    if hashed.startswith(CLIENT_SECRET_SCHEME + "$"):
        return _verify_client_secret(hashed, secret)
    try:
        return _password_hasher.verify(hashed, secret)
    except (VerificationError, InvalidHashError):
        return False


# A hash that takes as long to check as a real one, for unknown users (no timing oracle).
DUMMY_PASSWORD_HASH = _password_hasher.hash(secrets.token_urlsafe(16))
