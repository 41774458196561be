"""A fake broker for the resource kit: real keys, a JWKS over real HTTP, tokens signed by PyJWT."""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from broker.resource import BrokerTokenVerifier

AUDIENCE = "http://127.0.0.1:8001/mcp"
JWKS_PATH = "/jwks.json"

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


@pytest.fixture(scope="session")
def httpserver_listen_address() -> tuple[str, int]:
    # Loopback by address: "localhost" may try ::1 first.
    return ("127.0.0.1", 0)


@pytest.fixture(scope="session")
def signing_keys() -> dict[str, tuple[PrivateKey, str]]:
    """kid -> (private key, alg), generated once per session (RSA generation is slow)."""
    return {
        "ec-1": (ec.generate_private_key(ec.SECP256R1()), "ES256"),
        "ec-2": (ec.generate_private_key(ec.SECP256R1()), "ES256"),
        "rsa-1": (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
        "ed-1": (ed25519.Ed25519PrivateKey.generate(), "EdDSA"),
    }


def public_jwk(private_key: PrivateKey, kid: str, alg: str) -> dict[str, Any]:
    public = private_key.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
    jwk.pop("key_ops", None)
    return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def compact(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    """A JWS in compact form, built by hand (for what PyJWT refuses to produce)."""
    return ".".join(
        (b64(json.dumps(header).encode()), b64(json.dumps(claims).encode()), b64(signature))
    )


class FakeBroker:
    """What the broker contributes: an issuer string, a JWKS endpoint, signed access tokens."""

    def __init__(self, server: HTTPServer, keys: dict[str, tuple[PrivateKey, str]]) -> None:
        self.server = server
        self.keys = keys
        self.issuer = server.url_for("/").rstrip("/")
        self.audience = AUDIENCE
        self.jwks_uri = server.url_for(JWKS_PATH)
        self.published: list[dict[str, Any]] = []
        self.failing = False
        self.publish("ec-1", "rsa-1", "ed-1")
        server.expect_request(JWKS_PATH).respond_with_handler(self._jwks)

    def _jwks(self, request: Request) -> Response:
        if self.failing:
            return Response("down", status=500)
        return Response(json.dumps({"keys": self.published}), content_type="application/json")

    compact = staticmethod(compact)

    def publish(self, *kids: str, extra: Iterable[dict[str, Any]] = ()) -> None:
        """Replace the JWKS with the public keys of `kids` (and any raw `extra` JWKs)."""
        self.published = [
            public_jwk(self.keys[kid][0], kid, self.keys[kid][1]) for kid in kids
        ] + list(extra)

    @property
    def jwks_requests(self) -> int:
        return sum(1 for request, _response in self.server.log if request.path == JWKS_PATH)

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": "user-1",
            "aud": AUDIENCE,
            "client_id": "client-1",
            "scope": "mcp:read mcp:write",
            "exp": now + 300,
            "iat": now,
            "nbf": now,
            "jti": secrets.token_urlsafe(12),
            "auth_time": now,
        }
        claims.update(overrides)
        return {name: value for name, value in claims.items() if value is not None}

    def sign(
        self,
        claims: dict[str, Any] | None = None,
        *,
        kid: str = "ec-1",
        typ: str | None = "at+jwt",
        key: Any = None,
        alg: str | None = None,
        **overrides: Any,
    ) -> str:
        """A token; claims from `claims()` with `overrides` (None removes a claim)."""
        private_key, key_alg = self.keys[kid] if key is None else (key, alg)
        headers: dict[str, Any] = {"kid": kid}
        if typ is not None:
            headers["typ"] = typ
        return jwt.encode(
            claims if claims is not None else self.claims(**overrides),
            private_key,
            algorithm=alg or key_alg,
            headers=headers,
        )


@pytest.fixture
def broker(httpserver: HTTPServer, signing_keys: dict[str, tuple[PrivateKey, str]]) -> FakeBroker:
    return FakeBroker(httpserver, signing_keys)


@pytest.fixture
def make_verifier(broker: FakeBroker) -> Callable[..., BrokerTokenVerifier]:
    def make(**options: Any) -> BrokerTokenVerifier:
        options.setdefault("timeout", 2.0)
        return BrokerTokenVerifier(broker.issuer, options.pop("audience", AUDIENCE), **options)

    return make


@pytest.fixture
def verifier(make_verifier: Callable[..., BrokerTokenVerifier]) -> BrokerTokenVerifier:
    return make_verifier()
