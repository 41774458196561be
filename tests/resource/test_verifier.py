"""RFC 9068 access-token validation by the resource kit, against a JWKS served over real HTTP."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from jwt.warnings import InsecureKeyLengthWarning

from broker.resource import (
    BrokerTokenVerifier,
    InsufficientScope,
    InvalidToken,
    KeysUnavailable,
    VerifiedToken,
    require_scopes,
)

if TYPE_CHECKING:
    from conftest import FakeBroker

MakeVerifier = Callable[..., BrokerTokenVerifier]


def refused(verifier: BrokerTokenVerifier, token: str) -> str:
    with pytest.raises(InvalidToken) as info:
        verifier.verify(token)
    return info.value.reason


# -- the valid case -------------------------------------------------------------------------------


@pytest.mark.parametrize("kid", ["ec-1", "rsa-1", "ed-1"])
def test_valid_token_for_each_algorithm(
    broker: FakeBroker, verifier: BrokerTokenVerifier, kid: str
) -> None:
    claims = broker.claims(sub="user-42", client_id="https://client.example/cimd.json")
    token = broker.sign(claims, kid=kid)

    verified = verifier.verify(token)

    assert isinstance(verified, VerifiedToken)
    assert verified.subject == "user-42"
    assert verified.client_id == "https://client.example/cimd.json"
    assert verified.scopes == ("mcp:read", "mcp:write")
    assert verified.audience == broker.audience
    assert verified.issuer == broker.issuer
    assert verified.expires_at == claims["exp"]
    assert verified.issued_at == claims["iat"]
    assert verified.jti == claims["jti"]
    assert verified.claims["auth_time"] == claims["auth_time"]
    with pytest.raises(TypeError):
        verified.claims["sub"] = "someone-else"  # type: ignore[index]


def test_token_without_scope_claim_has_no_scopes(
    broker: FakeBroker, verifier: BrokerTokenVerifier
) -> None:
    assert verifier.verify(broker.sign(scope=None)).scopes == ()
    assert verifier.verify(broker.sign(scope="")).scopes == ()


def test_audience_list_containing_this_resource_is_accepted(
    broker: FakeBroker, verifier: BrokerTokenVerifier
) -> None:
    token = broker.sign(aud=["http://other.example/mcp", broker.audience])
    assert verifier.verify(token).audience == broker.audience


@pytest.mark.parametrize("typ", ["at+jwt", "AT+JWT", "application/at+jwt", "Application/AT+JWT"])
def test_accepted_type_headers(broker: FakeBroker, verifier: BrokerTokenVerifier, typ: str) -> None:
    assert verifier.verify(broker.sign(typ=typ)).subject == "user-1"


# -- one thing wrong ------------------------------------------------------------------------------


def test_wrong_issuer(broker: FakeBroker, verifier: BrokerTokenVerifier) -> None:
    assert refused(verifier, broker.sign(iss="http://evil.example")) == "wrong issuer"
    # Exact string comparison: a trailing slash is another issuer.
    assert refused(verifier, broker.sign(iss=broker.issuer + "/")) == "wrong issuer"


def test_token_for_another_resource_is_refused(
    broker: FakeBroker, verifier: BrokerTokenVerifier
) -> None:
    assert refused(verifier, broker.sign(aud="http://127.0.0.1:8002/mcp")) == "wrong audience"
    assert refused(verifier, broker.sign(aud=broker.audience + "/")) == "wrong audience"
    assert refused(verifier, broker.sign(aud=["http://127.0.0.1:8002/mcp"])) == "wrong audience"


def test_expired(broker: FakeBroker, verifier: BrokerTokenVerifier) -> None:
    now = int(time.time())
    token = broker.sign(iat=now - 7200, nbf=now - 7200, exp=now - 3600)
    assert refused(verifier, token) == "token expired"


def test_not_yet_valid(broker: FakeBroker, verifier: BrokerTokenVerifier) -> None:
    now = int(time.time())
    assert refused(verifier, broker.sign(nbf=now + 3600, exp=now + 7200)) == "token not yet valid"


def test_issued_in_the_future(broker: FakeBroker, verifier: BrokerTokenVerifier) -> None:
    now = int(time.time())
    token = broker.sign(iat=now + 3600, nbf=None, exp=now + 7200)
    assert refused(verifier, token) == "token issued in the future"


@pytest.mark.parametrize("typ", [None, "JWT", "jwt", "at+jwt; charset=utf-8", "application/jwt"])
def test_missing_or_wrong_type(broker: FakeBroker, verifier: BrokerTokenVerifier, typ: str) -> None:
    assert refused(verifier, broker.sign(typ=typ)) == "wrong token type"


@pytest.mark.parametrize("claim", ["iss", "exp", "aud", "sub", "client_id", "iat", "jti"])
def test_required_claims(broker: FakeBroker, verifier: BrokerTokenVerifier, claim: str) -> None:
    assert refused(verifier, broker.sign(**{claim: None})) == "missing claim"


@pytest.mark.parametrize(
    "overrides",
    [
        {"exp": "tomorrow"},
        {"exp": True},
        {"sub": ""},
        {"sub": 42},
        {"client_id": ["a"]},
        {"scope": ["mcp:read"]},
        {"aud": 7},
        {"aud": [7]},
    ],
)
def test_malformed_claims(
    broker: FakeBroker, verifier: BrokerTokenVerifier, overrides: dict[str, Any]
) -> None:
    assert refused(verifier, broker.sign(**overrides)) == "malformed claim"


def test_missing_kid(broker: FakeBroker, verifier: BrokerTokenVerifier) -> None:
    key = broker.keys["ec-1"][0]
    token = jwt.encode(broker.claims(), key, algorithm="ES256", headers={"typ": "at+jwt"})
    assert refused(verifier, token) == "missing key id"


def test_tampered_payload(broker: FakeBroker, verifier: BrokerTokenVerifier) -> None:
    header, _payload, signature = broker.sign().split(".")
    forged = broker.compact({}, broker.claims(sub="admin")).split(".")[1]
    assert refused(verifier, f"{header}.{forged}.{signature}") == "bad signature"


def test_signature_of_another_key(broker: FakeBroker, verifier: BrokerTokenVerifier) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    assert refused(verifier, broker.sign(key=other, alg="ES256")) == "bad signature"


def test_crit_header_is_refused(broker: FakeBroker, verifier: BrokerTokenVerifier) -> None:
    key = broker.keys["ec-1"][0]
    headers = {"typ": "at+jwt", "kid": "ec-1", "crit": ["exp"], "exp": 1}
    token = jwt.encode(broker.claims(), key, algorithm="ES256", headers=headers)
    assert refused(verifier, token) == "unsupported header"


# -- algorithm confusion --------------------------------------------------------------------------


def test_alg_none_is_refused(broker: FakeBroker, verifier: BrokerTokenVerifier) -> None:
    header = {"alg": "none", "typ": "at+jwt", "kid": "ec-1"}
    assert refused(verifier, broker.compact(header, broker.claims())) == "algorithm not allowed"
    token = broker.compact(header, broker.claims(), b"x")
    assert refused(verifier, token) == "algorithm not allowed"


@pytest.mark.parametrize("kid", ["ec-1", "rsa-1"])
def test_hs256_with_the_public_key_as_secret_is_refused(
    broker: FakeBroker, verifier: BrokerTokenVerifier, kid: str
) -> None:
    public_pem = (
        broker.keys[kid][0]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    unsigned = broker.compact({"alg": "HS256", "typ": "at+jwt", "kid": kid}, broker.claims())
    signing_input = unsigned.rsplit(".", 1)[0]
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    token = signing_input + "." + broker.compact({}, {}, mac).split(".")[2]
    assert refused(verifier, token) == "algorithm not allowed"


def test_header_alg_must_match_the_keys_alg(
    broker: FakeBroker, verifier: BrokerTokenVerifier
) -> None:
    # Signed with the RSA key, but naming the EC key's kid: the key decides the algorithm.
    token = broker.sign(kid="ec-1", key=broker.keys["rsa-1"][0], alg="RS256")
    assert refused(verifier, token) == "algorithm not allowed"


def test_algorithms_limit_what_is_accepted(broker: FakeBroker, make_verifier: MakeVerifier) -> None:
    verifier = make_verifier(algorithms=["ES256"])
    assert verifier.verify(broker.sign(kid="ec-1")).subject == "user-1"
    assert refused(verifier, broker.sign(kid="rsa-1")) == "algorithm not allowed"


@pytest.mark.parametrize(
    "algorithms", [["none"], ["HS256"], ["ES256", "HS512"], [], "ES256", ["ES257"]]
)
def test_construction_refuses_unsafe_algorithms(broker: FakeBroker, algorithms: Any) -> None:
    with pytest.raises(ValueError):
        BrokerTokenVerifier(broker.issuer, broker.audience, algorithms=algorithms)


# -- malformed input ------------------------------------------------------------------------------


def test_oversized_token_is_refused_before_decoding(
    broker: FakeBroker, verifier: BrokerTokenVerifier
) -> None:
    token = broker.sign(padding="x" * 9000)
    assert refused(verifier, token) == "token too large"
    assert broker.jwks_requests == 0


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t + "=",  # padding
        lambda t: t + ".",  # a fourth segment
        lambda t: t + ".a.b",  # JWE shape
        lambda t: t.replace(".", ". ", 1),
        lambda t: "",
        lambda t: "garbage",
        lambda t: t.split(".")[0] + "..",
        lambda t: "é" + t,
        lambda t: t[:-1] + ("B" if t[-1] == "A" else "A"),  # another signature
        lambda t: t[:-1] + chr(ord(t[-1]) ^ 1),  # perhaps only the unused trailing bits
        lambda t: t.split(".", 1)[1],  # no header
    ],
)
def test_malformed_tokens_are_refused_and_never_accepted_where_pyjwt_refuses(
    broker: FakeBroker, verifier: BrokerTokenVerifier, mangle: Callable[[str], str]
) -> None:
    token = mangle(broker.sign())
    with pytest.raises(InvalidToken):
        verifier.verify(token)
    # A differential check: PyJWT's own decoder refuses these too.
    public_key = broker.keys["ec-1"][0].public_key()
    with pytest.raises(jwt.PyJWTError):
        jwt.decode(
            token,
            public_key,
            algorithms=["ES256"],
            audience=broker.audience,
            issuer=broker.issuer,
        )


def test_errors_never_carry_the_token(broker: FakeBroker, verifier: BrokerTokenVerifier) -> None:
    token = broker.sign(iss="http://evil.example")
    with pytest.raises(InvalidToken) as info:
        verifier.verify(token)
    for part in token.split("."):
        assert part not in str(info.value)
        assert part not in repr(info.value)


# -- the JWKS: rotation, rate limit, failures -----------------------------------------------------


def test_unknown_kid_triggers_one_refetch_after_rotation(
    broker: FakeBroker, verifier: BrokerTokenVerifier
) -> None:
    assert verifier.verify(broker.sign(kid="ec-1")).subject == "user-1"
    assert broker.jwks_requests == 1

    broker.publish("ec-1", "ec-2")  # the broker rotates in a new key
    assert verifier.verify(broker.sign(kid="ec-2")).subject == "user-1"
    assert broker.jwks_requests == 2

    assert verifier.verify(broker.sign(kid="ec-2", sub="user-2")).subject == "user-2"
    assert verifier.verify(broker.sign(kid="ec-1", sub="user-3")).subject == "user-3"
    assert broker.jwks_requests == 2


def test_a_flood_of_unknown_kids_causes_at_most_one_refetch(
    broker: FakeBroker, verifier: BrokerTokenVerifier
) -> None:
    verifier.verify(broker.sign())
    assert broker.jwks_requests == 1
    key = broker.keys["ec-1"][0]
    bogus = [
        jwt.encode(
            broker.claims(),
            key,
            algorithm="ES256",
            headers={"typ": "at+jwt", "kid": secrets.token_hex(8)},
        )
        for _ in range(64)
    ]

    def attempt(token: str) -> str:
        try:
            verifier.verify(token)
        except InvalidToken as error:
            return error.reason
        return "accepted"

    with ThreadPoolExecutor(max_workers=8) as pool:
        reasons = list(pool.map(attempt, bogus))

    assert set(reasons) == {"unknown key"}
    assert broker.jwks_requests == 2
    # Known keys keep working during the quiet period.
    assert verifier.verify(broker.sign(sub="user-2")).subject == "user-2"


def test_refetch_interval_zero_refetches_every_unknown_kid(
    broker: FakeBroker, make_verifier: MakeVerifier
) -> None:
    verifier = make_verifier(refetch_interval=0)
    verifier.verify(broker.sign())
    for _ in range(3):
        assert refused(verifier, broker.sign(kid="ec-2")) == "unknown key"
    assert broker.jwks_requests == 4


def test_jwks_unavailable(broker: FakeBroker, verifier: BrokerTokenVerifier) -> None:
    broker.failing = True
    token = broker.sign()
    with pytest.raises(KeysUnavailable):
        verifier.verify(token)
    # Failed fetches are rate-limited too: the broker is not asked again at once.
    with pytest.raises(KeysUnavailable):
        verifier.verify(token)
    assert broker.jwks_requests == 1


def test_refresh_at_start_up(broker: FakeBroker, verifier: BrokerTokenVerifier) -> None:
    verifier.keys.refresh()
    assert broker.jwks_requests == 1
    verifier.verify(broker.sign())
    assert broker.jwks_requests == 1
    broker.failing = True
    with pytest.raises(KeysUnavailable):
        verifier.keys.refresh()


def test_stale_keys_are_refreshed_and_kept_when_the_refresh_fails(
    broker: FakeBroker, make_verifier: MakeVerifier
) -> None:
    verifier = make_verifier(jwks_max_age=0)
    verifier.verify(broker.sign())
    broker.failing = True
    assert verifier.verify(broker.sign(sub="user-2")).subject == "user-2"
    assert broker.jwks_requests == 2


def test_keys_the_kit_will_not_use(broker: FakeBroker, verifier: BrokerTokenVerifier) -> None:
    leaked = ec.generate_private_key(ec.SECP256R1())
    private_jwk = {**ECAlgorithm.to_jwk(leaked, as_dict=True), "kid": "leaked", "alg": "ES256"}
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    weak_jwk = {
        **RSAAlgorithm.to_jwk(weak.public_key(), as_dict=True),
        "kid": "weak",
        "alg": "RS256",
    }
    enc = ec.generate_private_key(ec.SECP256R1())
    enc_jwk = {
        **ECAlgorithm.to_jwk(enc.public_key(), as_dict=True),
        "kid": "enc",
        "alg": "ES256",
        "use": "enc",
    }
    secret_jwk = {"kty": "oct", "kid": "secret", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"}
    broker.publish("ec-1", extra=[private_jwk, weak_jwk, enc_jwk, secret_jwk])

    assert verifier.verify(broker.sign()).subject == "user-1"
    assert refused(verifier, broker.sign(kid="leaked", key=leaked, alg="ES256")) == "unknown key"
    with pytest.warns(InsecureKeyLengthWarning):
        weak_token = broker.sign(kid="weak", key=weak, alg="RS256")
    assert refused(verifier, weak_token) == "unknown key"
    assert refused(verifier, broker.sign(kid="enc", key=enc, alg="ES256")) == "unknown key"
    hs = jwt.encode(
        broker.claims(),
        "a-long-enough-secret-for-hs256-0123456789",
        algorithm="HS256",
        headers={"typ": "at+jwt", "kid": "secret"},
    )
    assert refused(verifier, hs) == "algorithm not allowed"


# -- the verified-token cache ---------------------------------------------------------------------


def test_repeat_token_is_answered_from_the_cache(
    broker: FakeBroker, verifier: BrokerTokenVerifier
) -> None:
    token = broker.sign()
    assert verifier.cached(token) is None
    first = verifier.verify(token)
    assert verifier.verify(token) is first
    assert verifier.cached(token) is first
    assert verifier.verify(broker.sign()) is not first


def test_failures_are_not_cached(broker: FakeBroker, make_verifier: MakeVerifier) -> None:
    verifier = make_verifier(refetch_interval=0)
    token = broker.sign(kid="ec-2")
    assert refused(verifier, token) == "unknown key"
    assert verifier.cached(token) is None
    broker.publish("ec-1", "ec-2")
    assert verifier.verify(token).subject == "user-1"


def test_tokens_past_exp_are_not_cached(broker: FakeBroker, verifier: BrokerTokenVerifier) -> None:
    now = int(time.time())
    token = broker.sign(exp=now - 5)  # expired, but within the leeway
    first = verifier.verify(token)
    assert verifier.cached(token) is None
    assert verifier.verify(token) is not first


def test_withdrawing_a_key_empties_the_cache(
    broker: FakeBroker, verifier: BrokerTokenVerifier
) -> None:
    token = broker.sign(kid="ec-1")
    verifier.verify(token)
    broker.publish("ec-2")  # ec-1 withdrawn, say after a compromise
    verifier.verify(broker.sign(kid="ec-2"))  # unknown kid: refetch, which drops ec-1
    assert verifier.cached(token) is None
    assert refused(verifier, token) == "unknown key"


def test_cache_is_bounded(broker: FakeBroker, make_verifier: MakeVerifier) -> None:
    verifier = make_verifier(cache_size=2)
    tokens = [broker.sign() for _ in range(3)]
    results = [verifier.verify(token) for token in tokens]
    assert verifier.cached(tokens[0]) is None
    assert verifier.cached(tokens[1]) is results[1]
    assert verifier.cached(tokens[2]) is results[2]


# -- scopes ---------------------------------------------------------------------------------------


def test_require_scopes(broker: FakeBroker, verifier: BrokerTokenVerifier) -> None:
    token = verifier.verify(broker.sign(scope="mcp:read"))
    require_scopes(token, ["mcp:read"])
    require_scopes(token, [])
    assert token.has_scopes(["mcp:read"])
    with pytest.raises(InsufficientScope) as info:
        require_scopes(token, ["mcp:read", "mcp:write"])
    assert info.value.required == ("mcp:read", "mcp:write")
    assert info.value.missing == ("mcp:write",)
    assert not token.has_scopes(["mcp:write"])
