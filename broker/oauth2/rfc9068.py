"""RFC 9068 - JSON Web Token (JWT) Profile for OAuth 2.0 Access Tokens.

Section 2.1: the header ``typ`` is ``at+jwt``. Section 2.2: ``iss``, ``exp``, ``aud``, ``sub``,
``client_id``, ``iat`` and ``jti`` are REQUIRED; ``scope`` carries the granted scopes and
``auth_time`` when the user last authenticated. ``aud`` is the one resource (RFC 8707) the token
was issued for. Signed with pyjwt's algorithms using key objects loaded once (see
``broker.keys``); the protected header of each key is serialised once, since it never changes.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
from jwt.utils import base64url_encode

from providers.contract import Identity

from ..keys import LoadedKey

SINGLE_VALUED_FACTS = frozenset(
    {"provider", "subject", "username", "name", "email", "email_domain", "hosted_domain"}
)
CLAIM_NAMES = {"username": "preferred_username", "subject": "upstream_sub"}
"""Facts whose token claim has another name: OIDC's ``preferred_username``, and the upstream's
own subject, which must not be confused with the broker's ``sub``."""


def identity_claims(identity: Identity, names: tuple[str, ...]) -> dict[str, Any]:
    """The identity claims a resource may see (``resources[].claims``; RFC 9068 section 2.2.3.1
    allows identity claims such as ``groups`` and ``roles``): each named fact the identity
    declares, a string for a single-valued fact, ``email_verified`` a boolean, others lists.
    ``email`` is present only when verified, as the facts say."""
    facts = identity.facts()
    claims: dict[str, Any] = {}
    for name in names:
        values = sorted(facts.get(name, ()))
        if name == "email_verified":
            claims[name] = identity.email_verified
        elif name in SINGLE_VALUED_FACTS:
            if values:
                claims[CLAIM_NAMES.get(name, name)] = values[0]
        else:
            claims[name] = values
    return claims


@dataclass(frozen=True)
class AccessTokenClaims:
    issuer: str
    subject: str
    audience: str
    client_id: str
    scope: str
    auth_time: int | None
    lifetime: int
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Signer:
    """What signing with one key needs, prepared once: the encoded protected header
    (section 2.1: ``typ`` is ``at+jwt``; ``kid`` names the key in the JWKS) and pyjwt's
    algorithm with its key."""

    header: bytes
    algorithm: Any
    key: Any


_signers: dict[str, _Signer] = {}


def _signer(key: LoadedKey) -> _Signer:
    signer = _signers.get(key.kid)
    if signer is None:
        header = {"alg": key.alg, "kid": key.kid, "typ": "at+jwt"}
        algorithm = jwt.get_algorithm_by_name(key.alg)
        signer = _Signer(
            base64url_encode(json.dumps(header, separators=(",", ":"), sort_keys=True).encode()),
            algorithm,
            algorithm.prepare_key(key.private_key),
        )
        _signers[key.kid] = signer  # a kid never names another key
    return signer


def issue_access_token(
    key: LoadedKey, claims: AccessTokenClaims, *, now: int | None = None
) -> tuple[str, dict[str, Any]]:
    """Sign an access token; returns the JWT and its payload."""
    now = int(time.time()) if now is None else now
    payload: dict[str, Any] = {
        "iss": claims.issuer,
        "sub": claims.subject,
        "aud": claims.audience,
        "client_id": claims.client_id,
        "scope": claims.scope,
        "iat": now,
        "nbf": now,
        "exp": now + claims.lifetime,
        "jti": secrets.token_urlsafe(16),
    }
    if claims.auth_time is not None:
        payload["auth_time"] = claims.auth_time
    for name, value in claims.extra.items():
        payload.setdefault(name, value)  # never over a registered claim
    # RFC 7515 section 7.1, the JWS Compact Serialization (as jwt.encode builds it).
    signer = _signer(key)
    body = base64url_encode(json.dumps(payload, separators=(",", ":")).encode())
    signing_input = signer.header + b"." + body
    signature = base64url_encode(signer.algorithm.sign(signing_input, signer.key))
    return (signing_input + b"." + signature).decode("ascii"), payload
