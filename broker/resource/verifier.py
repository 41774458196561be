"""JWT Profile for OAuth 2.0 Access Tokens (RFC 9068), as an MCP server validates them.

RFC 9068 section 4 lists what a resource server MUST do with a JWT access token, and this module
does each of them, in that order:

- the `typ` header is `at+jwt` (or `application/at+jwt`) and nothing else (section 4, item 1);
- the signature verifies with a key of the issuer's JWKS (RFC 7517), with an algorithm fixed by
  configuration, never `none` and never an HS* algorithm (item 4; RFC 8725 section 3.1);
- `iss` is exactly the broker's issuer string (item 2);
- `aud` names this server's canonical URI (item 3; RFC 8707; MCP authorization spec: "MUST validate
  that access tokens were issued specifically for them as the intended audience");
- `exp` (and `nbf`, `iat`) hold, within a small leeway (item 5);
- the claims section 2.2 makes REQUIRED are present: iss, exp, aud, sub, client_id, iat, jti.

RFC 6750 section 3.1 errors follow from this: any failure is one `InvalidToken` (answered with 401
and `error="invalid_token"`), a missing scope is `InsufficientScope` (403, `insufficient_scope`).

Why the JWS compact form (RFC 7515 section 7.1) is parsed here rather than by `jwt.decode`: the
key has to be chosen by `kid` before verifying, and PyJWT 2.14 and later check base64url one
character at a time in Python, about a quarter of a whole ES256 verification. The segments are
checked with a compiled pattern and a canonical re-encoding instead, and the signature itself is
still checked by PyJWT's algorithm objects over keys loaded once from `PyJWKSet`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import http.client
import json
import logging
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt import PyJWK, PyJWKSet
from jwt.algorithms import Algorithm
from jwt.exceptions import PyJWKSetError, PyJWTError

logger = logging.getLogger(__name__)

#: What the broker signs with (RFC 9068 section 4: the algorithms the resource server accepts are
#: fixed by configuration, not read from the token).
DEFAULT_ALGORITHMS: tuple[str, ...] = ("ES256", "RS256", "EdDSA")

#: Asymmetric algorithms a configuration may name. `none` and HS* are absent on purpose: an HMAC
#: "verified" with a public key as its secret is the classic algorithm-confusion forgery.
ASYMMETRIC_ALGORITHMS: frozenset[str] = frozenset(
    {"ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA"}
)

#: RFC 9068 section 2.2: REQUIRED claims of a JWT access token.
REQUIRED_CLAIMS: tuple[str, ...] = ("iss", "exp", "aud", "sub", "client_id", "iat", "jti")

#: RFC 9068 section 2.1 and 4: `at+jwt`, compared case-insensitively, with or without the
#: `application/` prefix (RFC 7515 section 4.1.9).
ACCEPTED_TYPES: frozenset[str] = frozenset({"at+jwt", "application/at+jwt"})

_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
_MIN_RSA_BITS = 2048
_MAX_JWKS_BYTES = 256 * 1024
_FETCH_ERRORS = (OSError, ValueError, http.client.HTTPException)


# -- errors ---------------------------------------------------------------------------------------


class InvalidToken(Exception):
    """The token cannot be accepted (RFC 6750 section 3.1, `invalid_token`).

    `reason` is one short fixed phrase meant for logs; it never holds any part of the token.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InsufficientScope(Exception):
    """The token lacks a scope the request needs (RFC 6750 section 3.1, `insufficient_scope`).

    `required` is every scope the operation needs (what a 403 challenge advertises, so that a
    client can re-authorize with them); `missing` is the part the token does not have.
    """

    def __init__(self, required: Iterable[str], missing: Iterable[str]) -> None:
        self.required = tuple(required)
        self.missing = tuple(missing)
        super().__init__("insufficient scope: " + " ".join(self.missing))


class KeysUnavailable(Exception):
    """The broker's JWKS could not be fetched and no keys are known yet.

    Not a client error: answer 503 (or let the framework answer 500), never 401, so a client does
    not throw away a good token because the broker was briefly unreachable.
    """


# -- the result -----------------------------------------------------------------------------------


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _texts(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(item for item in value if isinstance(item, str))


@dataclass(frozen=True, slots=True)
class TokenIdentity:
    """Who the user is, as far as this MCP server may know: the identity claims the broker put
    in the token for this resource (its `resources[].claims`; nothing beyond the RFC 9068 claims
    by default). A claim the resource may not see is absent here: `None` or empty. `email` is
    only ever a verified one. `other` holds further facts (a provider's own, such as
    `client_roles`), by claim name."""

    provider: str | None = None
    preferred_username: str | None = None
    name: str | None = None
    email: str | None = None
    email_verified: bool | None = None
    groups: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    orgs: tuple[str, ...] = ()
    teams: tuple[str, ...] = ()
    tenants: tuple[str, ...] = ()
    sites: tuple[str, ...] = ()
    hosted_domain: str | None = None
    other: Mapping[str, Any] = field(default_factory=dict)

    _STRINGS = ("provider", "preferred_username", "name", "email", "hosted_domain")
    _LISTS = ("groups", "roles", "orgs", "teams", "tenants", "sites")
    _REGISTERED = frozenset(
        {"iss", "sub", "aud", "exp", "iat", "nbf", "jti", "client_id", "scope", "auth_time"}
    )

    @classmethod
    def from_claims(cls, claims: Mapping[str, Any]) -> TokenIdentity:
        verified = claims.get("email_verified")
        known = {*cls._STRINGS, *cls._LISTS, "email_verified"}
        return cls(
            provider=_text(claims.get("provider")),
            preferred_username=_text(claims.get("preferred_username")),
            name=_text(claims.get("name")),
            email=_text(claims.get("email")),
            email_verified=verified if isinstance(verified, bool) else None,
            groups=_texts(claims.get("groups")),
            roles=_texts(claims.get("roles")),
            orgs=_texts(claims.get("orgs")),
            teams=_texts(claims.get("teams")),
            tenants=_texts(claims.get("tenants")),
            sites=_texts(claims.get("sites")),
            hosted_domain=_text(claims.get("hosted_domain")),
            other=MappingProxyType(
                {k: v for k, v in claims.items() if k not in known and k not in cls._REGISTERED}
            ),
        )


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """A validated access token: who (`subject`), through which client, for what (`scopes`)."""

    subject: str
    client_id: str
    scopes: tuple[str, ...]
    audience: str
    issuer: str
    expires_at: int
    issued_at: int
    jti: str
    #: Every claim of the token, read-only (the same object is shared by cache hits).
    claims: Mapping[str, Any] = field(compare=False, hash=False, repr=False)

    def has_scopes(self, scopes: Iterable[str]) -> bool:
        return set(scopes).issubset(self.scopes)

    @property
    def identity(self) -> TokenIdentity:
        """The identity claims this resource may see (see :class:`TokenIdentity`)."""
        return TokenIdentity.from_claims(self.claims)


def require_scopes(token: VerifiedToken, scopes: Iterable[str]) -> None:
    """Raise `InsufficientScope` unless `token` carries every scope of `scopes`."""
    required = tuple(dict.fromkeys(scopes))
    missing = [scope for scope in required if scope not in token.scopes]
    if missing:
        raise InsufficientScope(required, missing)


# -- keys -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _VerificationKey:
    kid: str
    algorithm_name: str
    algorithm: Algorithm
    key: Any


def _load_keys(document: Any, algorithms: frozenset[str]) -> dict[str, _VerificationKey]:
    """Key objects from a JWK set document, parsed once (RFC 7517 section 5).

    Keys without `kid`, meant for encryption, using an algorithm outside `algorithms`, private, or
    RSA below 2048 bits are left out. PyJWK infers `alg` from `kty`/`crv` when the JWK omits it,
    so a symmetric (`oct`) key becomes HS256 and is dropped here.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWK set")
    try:
        key_set = PyJWKSet.from_dict(document)
    except PyJWKSetError as error:
        raise ValueError("no usable keys") from error
    keys: dict[str, _VerificationKey] = {}
    for jwk in key_set:
        kid = jwk.key_id
        if not isinstance(kid, str) or not kid:
            continue
        if jwk.public_key_use not in (None, "sig") or jwk.algorithm_name not in algorithms:
            continue
        usable = _usable_public_key(jwk)
        if usable is None:
            logger.warning("JWKS key %s left out: not a usable public key", kid)
            continue
        keys[kid] = _VerificationKey(kid, jwk.algorithm_name, jwk.Algorithm, usable)
    return keys


def _usable_public_key(jwk: PyJWK) -> Any | None:
    key = jwk.key
    if not isinstance(
        key,
        ec.EllipticCurvePublicKey
        | rsa.RSAPublicKey
        | ed25519.Ed25519PublicKey
        | ed448.Ed448PublicKey,
    ):
        return None  # a private key in a JWKS is a broker bug: do not build on it
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < _MIN_RSA_BITS:
        return None
    try:
        # Checks, among others, that an ES256 key is on P-256.
        return jwk.Algorithm.prepare_key(key)
    except (PyJWTError, TypeError, ValueError):
        return None


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class RemoteKeySet:
    """The issuer's JWKS, fetched over HTTP, kept as key objects.

    A `kid` not in the set triggers a refetch (the broker has rotated keys), but at most one per
    `refetch_interval` seconds whatever the kids asked for, so a flood of made-up kids cannot turn
    every resource server into a load generator against the broker. Keys older than `max_age` are
    refreshed on the next use; if that fails the old keys stay in use. Thread-safe.
    """

    def __init__(
        self,
        jwks_uri: str,
        *,
        algorithms: Iterable[str] = DEFAULT_ALGORITHMS,
        timeout: float = 5.0,
        refetch_interval: float = 10.0,
        max_age: float = 300.0,
    ) -> None:
        if urlsplit(jwks_uri).scheme not in ("http", "https"):
            raise ValueError("jwks_uri must be an http(s) URL")
        self.jwks_uri = jwks_uri
        self._algorithms = frozenset(algorithms)
        self._timeout = timeout
        self._refetch_interval = refetch_interval
        self._max_age = max_age
        self._opener = urllib.request.build_opener(_NoRedirects())
        self._lock = threading.Lock()
        self._keys: dict[str, _VerificationKey] | None = None
        self._loaded_at = 0.0
        # Fetches caused by unknown kids, and failed fetches, wait until this monotonic time.
        self._quiet_until = 0.0
        #: Bumped whenever a refetch drops a key, so that token caches can be cleared.
        self.generation = 0

    def get(self, kid: str) -> _VerificationKey | None:
        """The key for `kid`, fetching the set when needed (see the class docstring)."""
        keys = self._keys
        if keys is None:
            return self._get_or_fetch(kid)
        now = time.monotonic()
        stale = now - self._loaded_at >= self._max_age and now >= self._quiet_until
        # Stale keys: one thread refreshes; the others go on meanwhile with the keys they have.
        if stale and self._lock.acquire(blocking=False):
            try:
                self._fetch(now)
            except _FETCH_ERRORS as error:
                self._quiet_until = now + self._refetch_interval
                logger.warning("JWKS refresh from %s failed: %s", self.jwks_uri, error)
            finally:
                self._lock.release()
            keys = self._keys or keys
        key = keys.get(kid)
        if key is None:
            key = self._get_or_fetch(kid)
        return key

    def refresh(self) -> None:
        """Fetch the set now (for example at start-up); raises `KeysUnavailable` on failure."""
        with self._lock:
            try:
                self._fetch(time.monotonic())
            except _FETCH_ERRORS as error:
                raise KeysUnavailable("JWKS unavailable") from error

    def _get_or_fetch(self, kid: str) -> _VerificationKey | None:
        with self._lock:
            now = time.monotonic()
            keys = self._keys
            if keys is not None:
                if kid in keys:
                    return keys[kid]  # another thread fetched it while this one waited
                if now < self._quiet_until:
                    return None
            elif now < self._quiet_until:
                raise KeysUnavailable("JWKS unavailable")
            try:
                self._fetch(now)
            except _FETCH_ERRORS as error:
                self._quiet_until = now + self._refetch_interval
                logger.warning("JWKS fetch from %s failed: %s", self.jwks_uri, error)
                if self._keys is None:
                    raise KeysUnavailable("JWKS unavailable") from error
                return None
            if keys is not None:
                # A refetch for an unknown kid: the next one waits (the first load does not count).
                self._quiet_until = now + self._refetch_interval
            assert self._keys is not None
            return self._keys.get(kid)

    def _fetch(self, now: float) -> None:
        request = urllib.request.Request(  # noqa: S310 - the scheme is checked in __init__
            self.jwks_uri,
            headers={"Accept": "application/jwk-set+json, application/json"},
        )
        try:
            response = self._opener.open(request, timeout=self._timeout)
        except urllib.error.HTTPError as error:
            error.close()  # it holds the connection
            raise ValueError(f"HTTP {error.code}") from None
        with response:
            if response.status != 200:
                raise ValueError(f"HTTP {response.status}")
            body = response.read(_MAX_JWKS_BYTES + 1)
        if len(body) > _MAX_JWKS_BYTES:
            raise ValueError("JWKS too large")
        try:
            document = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError("JWKS is not JSON") from error
        keys = _load_keys(document, self._algorithms)
        if not keys:
            raise ValueError("JWKS holds no usable signing key")
        previous = self._keys
        self._keys = keys
        self._loaded_at = now
        if previous is not None and not previous.keys() <= keys.keys():
            self.generation += 1
        logger.info("JWKS loaded from %s: %d keys", self.jwks_uri, len(keys))


# -- the verified-token cache ---------------------------------------------------------------------


class _TokenCache:
    """Verified tokens by SHA-256 of the token string, each until its `exp`; bounded, thread-safe.

    An MCP client sends the same token for up to an hour: a hit costs a hash and a dict lookup
    instead of a signature check. Failures are never stored. `generation` follows
    `RemoteKeySet.generation`: when a key leaves the JWKS, everything cached so far is dropped.
    """

    def __init__(self, max_entries: int) -> None:
        self._max_entries = max_entries
        self._entries: dict[bytes, VerifiedToken] = {}
        self._lock = threading.Lock()
        self._generation = 0

    def get(self, digest: bytes, now: float, generation: int) -> VerifiedToken | None:
        with self._lock:
            if generation > self._generation:
                self._entries.clear()
                self._generation = generation
                return None
            token = self._entries.get(digest)
            if token is not None and now >= token.expires_at:
                del self._entries[digest]
                return None
            return token

    def put(self, digest: bytes, token: VerifiedToken, generation: int) -> None:
        if self._max_entries <= 0:
            return
        with self._lock:
            if generation < self._generation:
                return  # verified with a key set that has since lost a key
            if generation > self._generation:
                self._entries.clear()
                self._generation = generation
            if digest not in self._entries and len(self._entries) >= self._max_entries:
                # Oldest first: dicts keep insertion order.
                del self._entries[next(iter(self._entries))]
            self._entries[digest] = token

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


# -- the verifier ---------------------------------------------------------------------------------


def _b64decode(segment: str) -> bytes:
    """Strict base64url without padding (RFC 7515 section 2): alphabet, length, canonical bits."""
    if len(segment) % 4 == 1 or _SEGMENT.fullmatch(segment) is None:
        raise InvalidToken("malformed token")
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise InvalidToken("malformed token") from None
    if base64.urlsafe_b64encode(raw).rstrip(b"=") != segment.encode("ascii"):
        raise InvalidToken("malformed token")  # non-zero trailing bits: a second spelling
    return raw


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidToken("malformed token") from None
    if not isinstance(value, dict):
        raise InvalidToken("malformed token")
    return value


def _numeric_date(claims: Mapping[str, Any], name: str) -> float:
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidToken("malformed claim")
    return float(value)


def _string(claims: Mapping[str, Any], name: str) -> str:
    value = claims[name]
    if not isinstance(value, str) or not value:
        raise InvalidToken("malformed claim")
    return value


class BrokerTokenVerifier:
    """Validates the broker's JWT access tokens for one MCP server (one audience).

    `issuer` and `audience` are compared as exact strings: pass the broker's issuer as its
    metadata spells it (no trailing slash) and this server's canonical URI as the broker's
    resource configuration spells it.
    """

    def __init__(
        self,
        issuer: str,
        audience: str,
        *,
        jwks_uri: str | None = None,
        algorithms: Sequence[str] = DEFAULT_ALGORITHMS,
        leeway: float = 30.0,
        timeout: float = 5.0,
        refetch_interval: float = 10.0,
        jwks_max_age: float = 300.0,
        cache_size: int = 10_000,
        max_token_bytes: int = 8 * 1024,
    ) -> None:
        if not issuer or not isinstance(issuer, str):
            raise ValueError("issuer is required")
        if not audience or not isinstance(audience, str):
            raise ValueError("audience is required")
        if isinstance(algorithms, str) or not algorithms:
            raise ValueError("algorithms must be a non-empty list of algorithm names")
        refused = [alg for alg in algorithms if alg not in ASYMMETRIC_ALGORITHMS]
        if refused:
            raise ValueError(f"algorithms not allowed for access tokens: {', '.join(refused)}")
        if leeway < 0:
            raise ValueError("leeway must not be negative")
        self.issuer = issuer
        self.audience = audience
        self.algorithms = tuple(algorithms)
        self.leeway = float(leeway)
        self.max_token_bytes = max_token_bytes
        self.keys = RemoteKeySet(
            jwks_uri if jwks_uri is not None else f"{issuer}/jwks.json",
            algorithms=self.algorithms,
            timeout=timeout,
            refetch_interval=refetch_interval,
            max_age=jwks_max_age,
        )
        self._allowed = frozenset(self.algorithms)
        self._cache = _TokenCache(cache_size)

    def cached(self, token: str) -> VerifiedToken | None:
        """The cached result for `token` if it was verified before and has not expired.

        Never blocks on the network: an async caller can use it before deciding to hop to a
        thread for `verify`.
        """
        if len(token) > self.max_token_bytes or not token.isascii():
            return None
        digest = hashlib.sha256(token.encode("ascii")).digest()
        return self._cache.get(digest, time.time(), self.keys.generation)

    def verify(self, token: str) -> VerifiedToken:
        """Validate `token`; raise `InvalidToken`, or `KeysUnavailable` when no keys can be had."""
        if not isinstance(token, str):
            raise InvalidToken("malformed token")
        if len(token) > self.max_token_bytes:
            raise InvalidToken("token too large")
        if not token.isascii():
            raise InvalidToken("malformed token")
        digest = hashlib.sha256(token.encode("ascii")).digest()
        generation = self.keys.generation
        hit = self._cache.get(digest, time.time(), generation)
        if hit is not None:
            return hit
        try:
            verified = self._verify(token)
        except InvalidToken as error:
            logger.debug("access token refused: %s", error.reason)
            raise
        if verified.expires_at > time.time():
            self._cache.put(digest, verified, generation)
        return verified

    def clear_cache(self) -> None:
        self._cache.clear()

    def _verify(self, token: str) -> VerifiedToken:
        parts = token.split(".")
        if len(parts) != 3:
            raise InvalidToken("malformed token")  # JWE (5 parts) and unsecured forms included
        header = _json_object(_b64decode(parts[0]))

        # RFC 9068 section 4 item 1 (and RFC 8725 section 3.11: explicit typing).
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() not in ACCEPTED_TYPES:
            raise InvalidToken("wrong token type")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._allowed:
            raise InvalidToken("algorithm not allowed")
        if "crit" in header:
            # RFC 7515 section 4.1.11: extensions we do not understand MUST be refused.
            raise InvalidToken("unsupported header")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise InvalidToken("missing key id")

        key = self.keys.get(kid)
        if key is None:
            raise InvalidToken("unknown key")
        if key.algorithm_name != alg:
            raise InvalidToken("algorithm not allowed")  # the key decides, not the header
        signature = _b64decode(parts[2])
        signing_input = token[: len(parts[0]) + 1 + len(parts[1])].encode("ascii")
        try:
            valid = key.algorithm.verify(signing_input, key.key, signature)
        except (PyJWTError, TypeError, ValueError):
            valid = False
        if not valid:
            raise InvalidToken("bad signature")

        claims = _json_object(_b64decode(parts[1]))
        return self._validate_claims(claims)

    def _validate_claims(self, claims: dict[str, Any]) -> VerifiedToken:
        for name in REQUIRED_CLAIMS:
            if claims.get(name) is None:
                raise InvalidToken("missing claim")
        if claims["iss"] != self.issuer:
            raise InvalidToken("wrong issuer")
        aud = claims["aud"]
        if isinstance(aud, str):
            audience_ok = aud == self.audience
        elif isinstance(aud, list) and all(isinstance(item, str) for item in aud):
            audience_ok = self.audience in aud
        else:
            raise InvalidToken("malformed claim")
        if not audience_ok:
            raise InvalidToken("wrong audience")

        now = time.time()
        exp = _numeric_date(claims, "exp")
        iat = _numeric_date(claims, "iat")
        if exp <= now - self.leeway:
            raise InvalidToken("token expired")
        if claims.get("nbf") is not None and _numeric_date(claims, "nbf") > now + self.leeway:
            raise InvalidToken("token not yet valid")
        if iat > now + self.leeway:
            raise InvalidToken("token issued in the future")

        scope = claims.get("scope")
        if scope is None:
            scopes: tuple[str, ...] = ()
        elif isinstance(scope, str):
            scopes = tuple(dict.fromkeys(scope.split()))
        else:
            raise InvalidToken("malformed claim")  # RFC 9068 section 2.2.3: a string

        return VerifiedToken(
            subject=_string(claims, "sub"),
            client_id=_string(claims, "client_id"),
            scopes=scopes,
            audience=self.audience,
            issuer=self.issuer,
            expires_at=int(exp),
            issued_at=int(iat),
            jti=_string(claims, "jti"),
            claims=MappingProxyType(claims),
        )
