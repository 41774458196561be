"""OpenID Connect relying party: the generic base of the OpenID providers.

Implements, on the OAuth 2.0 base (:mod:`providers._oauth2`), the client side of OpenID Connect
Core 1.0 (the authorization code flow of section 3.1, ID Token validation of 3.1.3.7, UserInfo
of 5.3, refresh of 12), OpenID Connect Discovery 1.0, PKCE (RFC 7636, S256 only, when discovery
lists it) and the authorization response ``iss`` parameter (RFC 9207).

Named providers (``google``, ``keycloak``) subclass :class:`OpenIDConnectProvider` and stay thin:
they derive the issuer from their own keys (:meth:`~OpenIDConnectProvider.read_oidc_settings`
takes it as an argument), offer several discovery locations
(:meth:`~OpenIDConnectProvider.discovery_candidates`), accept extra issuer spellings
(:meth:`~OpenIDConnectProvider.accepted_issuers`), shape the identity
(:meth:`~OpenIDConnectProvider.build_identity`) and refuse users
(:meth:`~providers._oauth2.OAuth2Provider.check_restrictions`).

Users are keyed on (issuer, ``sub``) as OIDC Core 5.7 requires: ``Identity.subject`` is ``sub``,
``Identity.raw["issuer"]`` the issuer, and a configured provider talks to exactly one issuer.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Self

import httpx
import jwt

from ._config import ConfigReader, check_url, sanitize_code
from ._http import bare_url
from ._oauth2 import OAuth2Provider, OAuth2Settings, b64url, optional_str, strings
from .contract import BASE_FACTS, Identity, LoginRequest, UpstreamTokens
from .errors import LoginFailed

__all__ = ["OIDCSettings", "OpenIDConnectProvider", "ProviderMetadata"]

DISCOVERY_TTL = 3600.0
"""Seconds a discovery document is reused before it is fetched again."""
JWKS_TTL = 3600.0
"""Seconds a JWK Set is reused (an unknown ``kid`` refetches it sooner)."""
JWKS_FORCED_REFETCH_INTERVAL = 30.0
"""At most one refetch of the JWK Set per this many seconds because of an unknown ``kid``."""
CLOCK_SKEW = 60
"""Leeway in seconds for ``exp`` and ``iat`` (OIDC Core 3.1.3.7 items 9 and 10)."""

SUPPORTED_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
"""Asymmetric JWS algorithms accepted for ID Tokens. Never ``none``; never HS*, whose key would be
the client secret (OIDC Core 10.1 allows it, we do not: a leaked secret must not mint logins)."""

DEFAULT_SCOPES = ("openid", "email", "profile")

_KTY_FOR_ALG = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
_CURVE_FOR_ALG = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
_HASH_FOR_ALG: dict[str, Callable[[bytes], Any]] = {
    f"{family}{bits}": getattr(hashlib, f"sha{bits}")
    for family in ("RS", "PS", "ES")
    for bits in (256, 384, 512)
}


@dataclass(frozen=True)
class OIDCSettings:
    """The OpenID keys of a provider (see ``docs/providers/oidc.md``)."""

    issuer: str
    discovery_url: str
    expected_issuer: str
    groups_claim: str = "groups"
    allowed_algorithms: tuple[str, ...] | None = None
    fetch_userinfo: bool = True


@dataclass(frozen=True)
class ProviderMetadata:
    """The parts of an OpenID Provider's discovery document the relying party uses."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    userinfo_endpoint: str | None
    code_challenge_methods: tuple[str, ...] | None
    id_token_algorithms: tuple[str, ...] | None
    iss_parameter_supported: bool

    @classmethod
    def from_document(
        cls, document: Mapping[str, Any], *, expected_issuer: str, where: str
    ) -> Self:
        """Validate a discovery document (OIDC Discovery 1.0 section 4.3: the ``issuer`` it
        names MUST be identical to the issuer the document was requested for)."""
        if document.get("issuer") != expected_issuer:
            named = document.get("issuer")
            shown = named[:200] if isinstance(named, str) else type(named).__name__
            raise LoginFailed(
                "issuer_mismatch",
                detail=f"{where}: names issuer {shown!r}, expected {expected_issuer!r}",
            )
        endpoints: dict[str, str | None] = {}
        for key in ("authorization_endpoint", "token_endpoint", "jwks_uri", "userinfo_endpoint"):
            value = document.get(key)
            if value is None and key == "userinfo_endpoint":
                endpoints[key] = None
                continue
            if check_url(value):
                raise LoginFailed(
                    "discovery_invalid", detail=f"{where}: {key} missing or not https"
                )
            endpoints[key] = value
        return cls(
            issuer=expected_issuer,
            authorization_endpoint=endpoints["authorization_endpoint"] or "",
            token_endpoint=endpoints["token_endpoint"] or "",
            jwks_uri=endpoints["jwks_uri"] or "",
            userinfo_endpoint=endpoints["userinfo_endpoint"],
            code_challenge_methods=_string_tuple(document.get("code_challenge_methods_supported")),
            id_token_algorithms=_string_tuple(
                document.get("id_token_signing_alg_values_supported")
            ),
            iss_parameter_supported=(
                document.get("authorization_response_iss_parameter_supported") is True
            ),
        )


def _string_tuple(value: object) -> tuple[str, ...] | None:
    if not isinstance(value, list):
        return None
    return tuple(item for item in value if isinstance(item, str))


@dataclass
class _JWKSCache:
    uri: str
    keys: list[Mapping[str, Any]]
    fetched_at: float
    # Key objects of ``keys`` by (id of the JWK, algorithm): parsed once per fetched set.
    parsed: dict[tuple[int, str], Any] = field(default_factory=dict)


class OpenIDConnectProvider(OAuth2Provider):
    """A generic OpenID Connect relying party (authorization code flow with PKCE).

    Subclasses set ``type_name`` and, where useful, ``default_display_name``,
    ``default_scopes`` and ``facts``, and override the hooks named in the module docstring.
    """

    type_name: ClassVar[str] = "oidc"
    default_scopes: ClassVar[tuple[str, ...]] = DEFAULT_SCOPES
    default_fetch_userinfo: ClassVar[bool] = True
    facts: frozenset[str] = BASE_FACTS | {"groups"}

    def __init__(self, name: str, settings: OAuth2Settings, oidc: OIDCSettings) -> None:
        super().__init__(name, settings)
        self.oidc = oidc
        self._metadata_lock = threading.Lock()
        self._metadata: tuple[float, ProviderMetadata] | None = None
        self._jwks_lock = threading.Lock()
        self._jwks: _JWKSCache | None = None
        self._last_forced_jwks_fetch: float | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} issuer={self.oidc.issuer!r}>"

    # -- configuration -------------------------------------------------------------------------

    @classmethod
    def from_reader(cls, name: str, reader: ConfigReader) -> Self | None:
        oidc = cls.read_oidc_settings(name, reader)
        settings = cls.read_settings(name, reader, authorization_endpoint="", token_endpoint="")
        if oidc is None or settings is None:
            return None
        return cls(name, settings, oidc)

    @classmethod
    def read_settings(
        cls,
        name: str,
        reader: ConfigReader,
        *,
        authorization_endpoint: str | None = None,
        token_endpoint: str | None = None,
    ) -> OAuth2Settings | None:
        """The OAuth 2.0 keys; the endpoints come from discovery, and ``scopes`` must contain
        ``openid``."""
        settings = super().read_settings(
            name,
            reader,
            authorization_endpoint=authorization_endpoint,
            token_endpoint=token_endpoint,
        )
        if reader.has("scopes") and "openid" not in reader.scopes("scopes", ()):
            reader.problem("scopes", "must contain openid")
            return None
        return settings

    @classmethod
    def read_oidc_settings(
        cls,
        name: str,
        reader: ConfigReader,
        *,
        issuer: str | None = None,
        discovery_url: str | None = None,
    ) -> OIDCSettings | None:
        """Read the OpenID keys. A subclass that derives the issuer (Keycloak's server URL and
        realm) passes ``issuer`` and ``discovery_url``; the ``issuer`` key is then not read.
        Returns ``None`` when a problem was recorded."""
        if issuer is None:
            issuer = reader.url("issuer", required=True, allow_query=False)
        discovery = reader.url("discovery_url")
        expected_issuer = reader.url("expected_issuer", allow_query=False)
        groups_claim = reader.string("groups_claim", default="groups") or "groups"
        algorithms: tuple[str, ...] | None = None
        if reader.has("allowed_algorithms"):
            algorithms = reader.string_list("allowed_algorithms", ())
            for alg in algorithms:
                if alg.lower() == "none":
                    reader.problem("allowed_algorithms", "none is never allowed")
                elif alg.upper().startswith("HS"):
                    reader.problem("allowed_algorithms", f"{alg}: symmetric algorithms not allowed")
                elif alg not in SUPPORTED_ALGORITHMS:
                    reader.problem("allowed_algorithms", f"{alg}: unsupported algorithm")
            if not algorithms:
                reader.problem("allowed_algorithms", "must not be empty")
        else:
            reader.raw("allowed_algorithms")
        fetch_userinfo = reader.boolean("fetch_userinfo", cls.default_fetch_userinfo)
        if issuer is None:
            return None
        return OIDCSettings(
            issuer=issuer,
            discovery_url=discovery
            or discovery_url
            or issuer.rstrip("/") + "/.well-known/openid-configuration",
            expected_issuer=expected_issuer or issuer,
            groups_claim=groups_claim,
            allowed_algorithms=algorithms,
            fetch_userinfo=fetch_userinfo,
        )

    # -- hooks for subclasses ------------------------------------------------------------------

    def discovery_candidates(self) -> list[tuple[str, str]]:
        """Where discovery may be, in order, as (discovery URL, issuer it must name). The first
        that does not answer 404 is used (Keycloak probes both URL layouts)."""
        return [(self.oidc.discovery_url, self.oidc.expected_issuer)]

    def accepted_issuers(self, metadata: ProviderMetadata) -> frozenset[str]:
        """The ``iss`` values accepted in ID Tokens: exactly the discovered issuer (OIDC Core
        3.1.3.7 item 2). Google overrides this to also accept ``accounts.google.com``."""
        return frozenset({metadata.issuer})

    def build_identity(
        self, claims: Mapping[str, Any], id_claims: Mapping[str, Any], metadata: ProviderMetadata
    ) -> Identity:
        """Map the merged claims to an :class:`Identity`. ``id_claims`` are the signature-verified
        ID Token claims alone: facts that gate access (Google's ``hd``) come only from them."""
        groups = claims.get(self.oidc.groups_claim)
        return Identity(
            provider=self.name,
            subject=id_claims["sub"],
            username=optional_str(claims.get("preferred_username")),
            name=optional_str(claims.get("name")),
            email=optional_str(claims.get("email")),
            email_verified=claims.get("email_verified") is True,
            groups=strings(groups),
            # The discovered issuer, not the token's spelling of it (Google accepts two): the
            # user key (issuer, sub) must not depend on which one a token used.
            raw={"issuer": metadata.issuer},
        )

    # -- the OAuth 2.0 hooks, from discovery ---------------------------------------------------

    def authorization_endpoint(self, http: httpx.Client) -> str:
        return self.metadata(http).authorization_endpoint

    def token_endpoint(self, http: httpx.Client) -> str:
        return self.metadata(http).token_endpoint

    def use_pkce(self, http: httpx.Client) -> bool:
        """PKCE unless configured off or discovery lists methods without S256."""
        methods = self.metadata(http).code_challenge_methods
        return self.settings.pkce and (methods is None or "S256" in methods)

    def scopes(self) -> tuple[str, ...]:
        """The configured scopes, plus ``offline_access`` when the token must outlive the login
        (OIDC Core 11)."""
        scopes = self.settings.scopes
        if self.requirements.offline and "offline_access" not in scopes:
            scopes = (*scopes, "offline_access")
        return scopes

    def authorize_params(self, request: LoginRequest, http: httpx.Client) -> dict[str, str]:
        """The authentication request (OIDC Core 3.1.2.1): ``nonce``, ``login_hint``, and
        ``prompt=consent`` with ``offline_access``, which is only honoured with it (OIDC Core
        11), unless a prompt is configured."""
        params = {"nonce": request.nonce}
        if request.login_hint:
            params["login_hint"] = request.login_hint
        if (
            "offline_access" in self.scopes()
            and "prompt" not in self.settings.extra_authorize_params
        ):
            params["prompt"] = "consent"
        return params

    def check_callback(self, params: Mapping[str, str], http: httpx.Client) -> None:
        """RFC 9207 section 2.4: compare ``iss`` with the issuer before anything else, errors
        included; when discovery says the parameter is supported, it must be there."""
        metadata = self.metadata(http)
        if "iss" in params:
            if params["iss"] != metadata.issuer:
                raise LoginFailed(
                    "issuer_mismatch",
                    detail=f"callback iss {params['iss'][:200]!r}, expected {metadata.issuer!r}",
                )
        elif metadata.iss_parameter_supported:
            raise LoginFailed("issuer_missing", detail="callback without iss")

    def identify(
        self, http: httpx.Client, tokens: UpstreamTokens, *, nonce: str | None
    ) -> Identity:
        """Validate the ID Token (3.1.3.7; OIDC Core 3.1.3.3: a successful token response of the
        code flow carries one) and read UserInfo (5.3); the signed ID Token wins over UserInfo
        for every claim both carry."""
        metadata = self.metadata(http)
        if not tokens.id_token:
            raise LoginFailed("id_token_invalid", detail="no id_token")
        id_claims = self._verify_id_token(
            http, metadata, tokens.id_token, nonce=nonce, access_token=tokens.access_token
        )
        claims: dict[str, Any] = {}
        if self.oidc.fetch_userinfo and metadata.userinfo_endpoint:
            claims.update(
                self._userinfo(http, metadata, tokens.access_token, subject=id_claims["sub"])
            )
        claims.update(id_claims)
        return self.build_identity(claims, id_claims, metadata)

    def token_context(
        self, body: Mapping[str, Any], previous: UpstreamTokens | None
    ) -> Mapping[str, Any]:
        """The issuer discovery found (a token request always follows discovery)."""
        cached = self._metadata
        return {"issuer": cached[1].issuer if cached else self.oidc.expected_issuer}

    def refresh(self, tokens: UpstreamTokens, http: httpx.Client) -> UpstreamTokens:
        """Refresh (OIDC Core 12): a returned ID Token must name the same ``iss`` and ``sub``
        (12.2)."""
        previous_id = tokens.id_token
        refreshed = super().refresh(tokens, http)
        if refreshed.id_token and refreshed.id_token != previous_id:
            metadata = self.metadata(http)
            claims = self._verify_id_token(
                http, metadata, refreshed.id_token, nonce=None, access_token=refreshed.access_token
            )
            if previous_id:
                old = jwt.decode(previous_id, options={"verify_signature": False})
                if claims["sub"] != old.get("sub"):
                    raise LoginFailed(
                        "id_token_invalid", detail="refreshed id_token has another sub"
                    )
        return refreshed

    def recheck(
        self, identity: Identity, tokens: UpstreamTokens | None, http: httpx.Client
    ) -> Identity:
        """The ``RecheckingProvider`` capability. The broker hands over the current access token,
        refreshed first when it was due (a refresh the upstream refuses, as Keycloak does for a
        disabled user or an ended session, ends access before this runs). UserInfo (OIDC Core
        5.3) then says who the user is now, when it is on (``fetch_userinfo``) and discovered;
        without it the identity stays as signed in. Facts that gate access only as the signed ID
        Token states them (Google's ``hd``) keep the sign-in's value; the provider's
        restrictions apply again."""
        if tokens is None:
            raise LoginFailed("no_upstream_token", detail="no upstream token stored")
        metadata = self.metadata(http)
        if not (self.oidc.fetch_userinfo and metadata.userinfo_endpoint):
            return identity
        claims = self._userinfo(http, metadata, tokens.access_token, subject=identity.subject)
        current = self.recheck_identity(identity, claims, tokens, http)
        return self.check_restrictions(current) or current

    def recheck_identity(
        self,
        identity: Identity,
        claims: Mapping[str, Any],
        tokens: UpstreamTokens,
        http: httpx.Client,
    ) -> Identity:
        """The identity from fresh UserInfo ``claims``; subclasses add what their tokens carry
        (Keycloak's roles in the access token)."""
        current = self.build_identity(claims, {"sub": identity.subject}, self.metadata(http))
        return replace(current, hosted_domain=identity.hosted_domain, raw=identity.raw)

    def check(self, http: httpx.Client) -> list[str]:
        """Discovery (the issuer it names must be the configured one) and the signing keys."""
        metadata = self.metadata(http)
        keys = self._fetch_jwk_set(http, metadata)
        url, _ = self.discovery_candidates()[0]
        return [
            f"discovery {bare_url(url)}: issuer {metadata.issuer}",
            f"jwks {bare_url(metadata.jwks_uri)}: {len(keys)} key(s)",
        ]

    # -- discovery, keys, HTTP -----------------------------------------------------------------

    def metadata(self, http: httpx.Client) -> ProviderMetadata:
        """The provider's discovery document (OIDC Discovery 1.0 section 4), cached."""
        with self._metadata_lock:
            now = time.monotonic()
            if self._metadata is not None and now - self._metadata[0] < DISCOVERY_TTL:
                return self._metadata[1]
            candidates = self.discovery_candidates()
            for index, (url, issuer) in enumerate(candidates):
                response = self.upstream.send(
                    http, "GET", url, what="discovery", headers={"Accept": "application/json"}
                )
                if response.status_code == 404 and index + 1 < len(candidates):
                    continue
                where = self.upstream.where("discovery", "GET", url)
                if response.status_code != 200:
                    raise LoginFailed(
                        "discovery_failed", detail=f"{where}: answered HTTP {response.status_code}"
                    )
                document = self.upstream.json_object(
                    response, what="discovery", reason="discovery_invalid"
                )
                metadata = ProviderMetadata.from_document(
                    document, expected_issuer=issuer, where=where
                )
                self._metadata = (now, metadata)
                return metadata
            raise LoginFailed("discovery_failed", detail="no discovery location")

    def allowed_algorithms(self, metadata: ProviderMetadata) -> frozenset[str]:
        """Configured algorithms, else what discovery lists (RS256 when it lists nothing: OIDC
        Discovery 3 makes RS256 mandatory), never ``none`` nor HS*."""
        if self.oidc.allowed_algorithms is not None:
            return frozenset(self.oidc.allowed_algorithms)
        listed = metadata.id_token_algorithms or ("RS256",)
        return frozenset(listed) & SUPPORTED_ALGORITHMS

    def _verify_id_token(
        self,
        http: httpx.Client,
        metadata: ProviderMetadata,
        token: str,
        *,
        nonce: str | None,
        access_token: str | None,
    ) -> dict[str, Any]:
        """ID Token validation, OIDC Core 3.1.3.7: the signature with a key from ``jwks_uri``
        and an algorithm within the allowed ones (6-8); ``iss`` MUST exactly match (2); ``aud``
        MUST contain the client_id, and with several audiences ``azp`` MUST be the client_id
        (3-5); ``exp`` MUST be in the future and ``iat`` not (9-10, with ``CLOCK_SKEW``);
        ``nonce`` MUST equal the one sent (11). ``at_hash``, when present, MUST match the access
        token (3.2.2.9, used here for the code flow too)."""
        claims, alg = self._decode_signed_jwt(
            http,
            metadata,
            token,
            what="id_token",
            require=["iss", "sub", "aud", "exp", "iat"],
        )
        audience = claims["aud"]
        client_id = self.settings.client_id
        if isinstance(audience, list) and len(audience) > 1 and claims.get("azp") != client_id:
            raise LoginFailed("id_token_invalid", detail="several audiences and azp is not us")
        if "azp" in claims and claims["azp"] != client_id:
            raise LoginFailed("id_token_invalid", detail="azp is another client")
        if not isinstance(claims["sub"], str) or not claims["sub"]:
            raise LoginFailed("id_token_invalid", detail="sub is not a string")
        if nonce is not None:
            token_nonce = claims.get("nonce")
            if not isinstance(token_nonce, str) or not hmac.compare_digest(
                token_nonce.encode(), nonce.encode()
            ):
                raise LoginFailed("nonce_mismatch")
        at_hash = claims.get("at_hash")
        if access_token is not None and at_hash is not None:
            hasher = _HASH_FOR_ALG.get(alg)
            if hasher is not None:
                digest = hasher(access_token.encode("ascii")).digest()
                expected = b64url(digest[: len(digest) // 2])
                if not isinstance(at_hash, str) or not hmac.compare_digest(at_hash, expected):
                    raise LoginFailed("id_token_invalid", detail="at_hash mismatch")
        return claims

    def _decode_signed_jwt(
        self,
        http: httpx.Client,
        metadata: ProviderMetadata,
        token: str,
        *,
        what: str,
        require: list[str],
    ) -> tuple[dict[str, Any], str]:
        """The verified claims of a JWS from the provider, and its algorithm."""
        reason = f"{what}_invalid"
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise LoginFailed(reason, detail="malformed JWT") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.allowed_algorithms(metadata):
            raise LoginFailed(reason, detail=f"algorithm {sanitize_code(alg)} not allowed")
        key = self._verification_key(http, metadata, header, alg, reason=reason)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=self.settings.client_id,
                issuer=self.accepted_issuers(metadata),
                leeway=CLOCK_SKEW,
                options={"require": require},
            )
        except jwt.ExpiredSignatureError:
            raise LoginFailed(reason, detail="expired") from None
        except jwt.InvalidTokenError as exc:
            raise LoginFailed(reason, detail=type(exc).__name__) from None
        return claims, alg

    def _verification_key(
        self,
        http: httpx.Client,
        metadata: ProviderMetadata,
        header: Mapping[str, Any],
        alg: str,
        *,
        reason: str,
    ) -> Any:
        """The public key for a JWS header (OIDC Core 10.1.1): by ``kid`` when given (a JWK Set
        with several usable keys MUST come with a ``kid``); an unknown ``kid`` refetches the set
        once, at most every ``JWKS_FORCED_REFETCH_INTERVAL`` seconds, for key rotation."""
        kid = header.get("kid")
        keys: list[Mapping[str, Any]] | None = self._jwk_set(http, metadata)
        while keys is not None:
            candidates = [
                jwk
                for jwk in keys
                if _usable_for(jwk, alg) and (kid is None or jwk.get("kid") == kid)
            ]
            if len(candidates) > 1:
                raise LoginFailed(reason, detail="several keys match and no distinct kid")
            if candidates:
                try:
                    return self._key_object(candidates[0], alg)
                except (jwt.PyJWKError, jwt.InvalidKeyError):
                    raise LoginFailed(reason, detail="unusable signing key") from None
            keys = self._refetch_jwk_set(http, metadata)
        raise LoginFailed(reason, detail="no matching signing key")

    def _key_object(self, jwk: Mapping[str, Any], alg: str) -> Any:
        """The key object of ``jwk`` for ``alg``, parsed once per fetched JWK Set (parsing an
        RSA key costs more than verifying a signature with it)."""
        cache = self._jwks
        slot = (id(jwk), alg)
        if cache is not None and slot in cache.parsed:
            return cache.parsed[slot]
        key = jwt.PyJWK(dict(jwk), algorithm=alg).key
        if cache is not None and any(known is jwk for known in cache.keys):
            cache.parsed[slot] = key  # the set holds the JWK: its id is not reused meanwhile
        return key

    def _jwk_set(self, http: httpx.Client, metadata: ProviderMetadata) -> list[Mapping[str, Any]]:
        with self._jwks_lock:
            cached = self._jwks
            if (
                cached is not None
                and cached.uri == metadata.jwks_uri
                and time.monotonic() - cached.fetched_at < JWKS_TTL
            ):
                return cached.keys
            return self._fetch_jwk_set(http, metadata)

    def _refetch_jwk_set(
        self, http: httpx.Client, metadata: ProviderMetadata
    ) -> list[Mapping[str, Any]] | None:
        """Fetch the JWK Set again for an unknown ``kid``, unless one such refetch happened in
        the last ``JWKS_FORCED_REFETCH_INTERVAL`` seconds (then ``None``)."""
        with self._jwks_lock:
            now = time.monotonic()
            last = self._last_forced_jwks_fetch
            if last is not None and now - last < JWKS_FORCED_REFETCH_INTERVAL:
                return None
            self._last_forced_jwks_fetch = now
            return self._fetch_jwk_set(http, metadata)

    def _fetch_jwk_set(
        self, http: httpx.Client, metadata: ProviderMetadata
    ) -> list[Mapping[str, Any]]:
        document = self.upstream.get_object(http, metadata.jwks_uri, what="jwks")
        keys = document.get("keys")
        if not isinstance(keys, list):
            raise LoginFailed("jwks_invalid", detail="no keys array")
        usable: list[Mapping[str, Any]] = [key for key in keys if isinstance(key, Mapping)]
        self._jwks = _JWKSCache(uri=metadata.jwks_uri, keys=usable, fetched_at=time.monotonic())
        return usable

    def _userinfo(
        self, http: httpx.Client, metadata: ProviderMetadata, access_token: str, *, subject: str
    ) -> dict[str, Any]:
        """UserInfo (OIDC Core 5.3): the response ``sub`` MUST equal the ID Token's (5.3.2);
        a signed response is verified like an ID Token (its ``iss`` and ``aud`` MUST match)."""
        assert metadata.userinfo_endpoint is not None
        response = self.upstream.get_json(
            http,
            metadata.userinfo_endpoint,
            what="userinfo",
            token=access_token,
            headers={"Accept": "application/json, application/jwt"},
        )
        content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "application/jwt":
            claims, _ = self._decode_signed_jwt(
                http, metadata, response.text.strip(), what="userinfo", require=["sub"]
            )
        else:
            claims = self.upstream.json_object(response, what="userinfo", reason="userinfo_failed")
        if claims.get("sub") != subject:
            raise LoginFailed(
                "userinfo_subject_mismatch", detail="userinfo sub is not the ID Token's"
            )
        return claims


def _usable_for(jwk: Mapping[str, Any], alg: str) -> bool:
    """Whether a JWK may verify a JWS with ``alg`` (RFC 7517 4.2-4.4: ``use``, ``key_ops``,
    ``alg``; and the key type the algorithm needs)."""
    if jwk.get("use") not in (None, "sig"):
        return False
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        return False
    if jwk.get("alg") not in (None, alg):
        return False
    if jwk.get("kty") != _KTY_FOR_ALG.get(alg[:2]):
        return False
    curve = _CURVE_FOR_ALG.get(alg)
    return curve is None or jwk.get("crv") == curve
