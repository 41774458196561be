"""OpenID Connect relying party: the generic base of the OIDC provider plugins.

Implements the client side of OpenID Connect Core 1.0 (the authorization code flow of section 3.1,
ID Token validation of 3.1.3.7, UserInfo of 5.3, refresh of 12), OpenID Connect Discovery 1.0,
PKCE (RFC 7636, S256 only) and the authorization response ``iss`` parameter (RFC 9207).

Named providers (Google, Keycloak, Salesforce...) subclass :class:`OpenIDConnectProvider` and stay
thin: they compute the issuer from their own keys (:meth:`OpenIDConnectProvider.read_settings`
takes it as an argument), accept extra issuers (:meth:`~OpenIDConnectProvider.accepted_issuers`),
shape the identity (:meth:`~OpenIDConnectProvider.build_identity`) and refuse users
(:meth:`~OpenIDConnectProvider.check_restrictions`).

Users are keyed on (issuer, ``sub``) as OIDC Core 5.7 requires: ``Identity.subject`` is ``sub``,
``Identity.extra["issuer"]`` the issuer, and a configured provider talks to exactly one issuer.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import httpx
import jwt

from .contract import CallbackRequest, Identity, LoginRequest, LoginResult, UpstreamTokens
from .errors import AccessDenied, ConfigError, LoginFailed, UpstreamUnavailable

__all__ = [
    "ConfigReader",
    "OIDCSettings",
    "OpenIDConnectProvider",
    "ProviderMetadata",
    "check_url",
    "sanitize_code",
]

DISCOVERY_TTL = 3600.0
"""Seconds a discovery document is reused before it is fetched again."""
JWKS_TTL = 3600.0
"""Seconds a JWK Set is reused (an unknown ``kid`` refetches it sooner)."""
JWKS_FORCED_REFETCH_INTERVAL = 30.0
"""At most one refetch of the JWK Set per this many seconds because of an unknown ``kid``."""
CLOCK_SKEW = 60
"""Leeway in seconds for ``exp`` and ``iat`` (OIDC Core 3.1.3.7 items 9 and 10)."""
MAX_RESPONSE_BYTES = 1 << 20

SUPPORTED_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
"""Asymmetric JWS algorithms accepted for ID Tokens. Never ``none``; never HS*, whose key would be
the client secret (OIDC Core 10.1 allows it, we do not: a leaked secret must not mint logins)."""

DEFAULT_SCOPES = ("openid", "email", "profile")
TOKEN_ENDPOINT_AUTH_METHODS = ("client_secret_basic", "client_secret_post")
PROTECTED_AUTHORIZE_PARAMS = frozenset(
    {
        "response_type",
        "client_id",
        "redirect_uri",
        "scope",
        "state",
        "nonce",
        "code_challenge",
        "code_challenge_method",
        "request",
        "request_uri",
        "response_mode",
    }
)

_KTY_FOR_ALG = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
_CURVE_FOR_ALG = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
_HASH_FOR_ALG: dict[str, Callable[[bytes], Any]] = {
    f"{family}{bits}": getattr(hashlib, f"sha{bits}")
    for family in ("RS", "PS", "ES")
    for bits in (256, 384, 512)
}
_SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")
_UNSAFE_CODE_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")


def sanitize_code(value: object) -> str:
    """An upstream error code reduced to a short, log-safe token (never shown to anyone)."""
    if not isinstance(value, str):
        return "invalid"
    return _UNSAFE_CODE_CHARS.sub("", value)[:64] or "invalid"


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(value: object, *, allow_query: bool = True) -> str | None:
    """Why ``value`` is not an acceptable upstream URL, or ``None`` when it is: an absolute https
    URL without fragment (plain http only for loopback hosts, for local IdPs and tests)."""
    message = "must be an https URL (http allowed only for loopback hosts)"
    if not isinstance(value, str) or not value:
        return message
    try:
        parts = urlsplit(value)
        host = parts.hostname
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError:
        return message
    if not host or parts.scheme not in ("https", "http"):
        return message
    if parts.scheme == "http" and not is_loopback_host(host):
        return message
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials"
    if parts.fragment or value.endswith("#"):
        return "must not have a fragment"
    if not allow_query and (parts.query or value.endswith("?")):
        return "must not have a query"
    return None


class ConfigReader:
    """Reads one provider's configuration mapping and collects every problem at once.

    Each reader method records a problem prefixed with the key path and returns a default, so
    ``from_config`` reports all problems in one :class:`ConfigError`. Keys never read are
    reported as unknown by :meth:`finish`.
    """

    def __init__(self, config: object, *, prefix: str = "") -> None:
        self.problems: list[str] = []
        self._prefix = prefix
        self._seen: set[str] = set()
        if isinstance(config, Mapping):
            self._config: Mapping[str, Any] = config
        else:
            self._config = {}
            self.problems.append(f"{prefix.rstrip('.') or '(provider)'}: must be a mapping")

    def path(self, key: str) -> str:
        return f"{self._prefix}{key}"

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self.path(key)}: {message}")

    def has(self, key: str) -> bool:
        return key in self._config and self._config[key] is not None

    def raw(self, key: str) -> Any:
        self._seen.add(key)
        return self._config.get(key)

    def string(self, key: str, *, required: bool = False, default: str | None = None) -> str | None:
        value = self.raw(key)
        if value is None:
            if required:
                self.problem(key, "required")
            return default
        if not isinstance(value, str) or not value.strip():
            self.problem(key, "must be a non-empty string")
            return default
        return value

    def url(self, key: str, *, required: bool = False, allow_query: bool = True) -> str | None:
        value = self.raw(key)
        if value is None:
            if required:
                self.problem(key, "required")
            return None
        error = check_url(value, allow_query=allow_query)
        if error:
            self.problem(key, error)
            return None
        assert isinstance(value, str)
        return value

    def string_list(self, key: str, default: Iterable[str]) -> tuple[str, ...]:
        value = self.raw(key)
        if value is None:
            return tuple(default)
        if isinstance(value, str):
            value = value.split()
        if not isinstance(value, list | tuple) or not all(
            isinstance(item, str) and item for item in value
        ):
            self.problem(key, "must be a list of strings")
            return tuple(default)
        return tuple(dict.fromkeys(value))

    def number(self, key: str, default: float, *, minimum: float, maximum: float) -> float:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problem(key, "must be a number")
            return default
        if not minimum < value <= maximum:
            self.problem(key, f"must be more than {minimum:g} and at most {maximum:g}")
            return default
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.problem(key, "must be true or false")
            return default
        return value

    def choice(self, key: str, choices: Iterable[str], default: str) -> str:
        allowed = tuple(choices)
        value = self.raw(key)
        if value is None:
            return default
        if value not in allowed:
            self.problem(key, f"must be one of {', '.join(allowed)}")
            return default
        assert isinstance(value, str)
        return value

    def string_map(self, key: str) -> dict[str, str]:
        value = self.raw(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.problem(key, "must be a mapping of strings")
            return {}
        result: dict[str, str] = {}
        for item_key, item in value.items():
            if not isinstance(item_key, str) or not item_key:
                self.problem(key, "keys must be non-empty strings")
            elif isinstance(item, bool) or not isinstance(item, str | int):
                self.problem(f"{key}.{item_key}", "must be a string")
            else:
                result[item_key] = str(item)
        return result

    def finish(self, *, ignore: Iterable[str] = ("type",)) -> None:
        """Report unknown keys, then raise :class:`ConfigError` if anything was wrong."""
        ignored = set(ignore)
        for key in self._config:
            if str(key) not in self._seen and str(key) not in ignored:
                self.problem(str(key), "unknown key")
        if self.problems:
            raise ConfigError(list(self.problems))


@dataclass(frozen=True)
class OIDCSettings:
    """A validated OIDC provider configuration (see ``docs/providers/oidc.md``)."""

    issuer: str
    client_id: str
    client_secret: str
    display_name: str
    discovery_url: str
    expected_issuer: str
    scopes: tuple[str, ...] = DEFAULT_SCOPES
    token_endpoint_auth_method: str = "client_secret_basic"
    extra_authorize_params: Mapping[str, str] = field(default_factory=dict)
    groups_claim: str = "groups"
    timeout: float = 10.0
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
    def from_document(cls, document: Mapping[str, Any], *, expected_issuer: str) -> Self:
        """Validate a discovery document (OIDC Discovery 1.0 section 4.3: the ``issuer`` it
        names MUST be identical to the issuer the document was requested for)."""
        if document.get("issuer") != expected_issuer:
            raise LoginFailed(
                "issuer_mismatch", detail="discovery document names a different issuer"
            )
        endpoints: dict[str, str | None] = {}
        for key in ("authorization_endpoint", "token_endpoint", "jwks_uri", "userinfo_endpoint"):
            value = document.get(key)
            if value is None and key == "userinfo_endpoint":
                endpoints[key] = None
                continue
            if check_url(value):
                raise LoginFailed("discovery_invalid", detail=f"{key}: missing or not https")
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


class OpenIDConnectProvider:
    """A generic OpenID Connect relying party (authorization code flow with PKCE).

    Subclasses set ``type_name`` and, where useful, ``default_display_name`` and
    ``default_scopes``, and override the hooks documented in the module docstring.
    """

    type_name: ClassVar[str] = "oidc"
    default_display_name: ClassVar[str | None] = None
    default_scopes: ClassVar[tuple[str, ...]] = DEFAULT_SCOPES

    def __init__(self, name: str, settings: OIDCSettings) -> None:
        self.name = name
        self.display_name = settings.display_name
        self.settings = settings
        self._metadata_lock = threading.Lock()
        self._metadata: tuple[float, ProviderMetadata] | None = None
        self._jwks_lock = threading.Lock()
        self._jwks: _JWKSCache | None = None
        self._last_forced_jwks_fetch: float | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} issuer={self.settings.issuer!r}>"

    # -- configuration -------------------------------------------------------------------------

    @classmethod
    def from_config(cls, name: str, config: Mapping[str, Any], *, base_dir: str) -> Self:
        """Validate ``config`` eagerly; raise :class:`ConfigError` listing every problem."""
        reader = ConfigReader(config)
        settings = cls.read_settings(name, reader)
        reader.finish()
        assert settings is not None
        return cls(name, settings)

    @classmethod
    def read_settings(
        cls,
        name: str,
        reader: ConfigReader,
        *,
        issuer: str | None = None,
        discovery_url: str | None = None,
    ) -> OIDCSettings | None:
        """Read the generic OIDC keys. A subclass that derives the issuer (Keycloak's server URL
        and realm) passes ``issuer`` and ``discovery_url``; the ``issuer`` key is then not read.
        Returns ``None`` when a problem was recorded."""
        if issuer is None:
            issuer = reader.url("issuer", required=True, allow_query=False)
        client_id = reader.string("client_id", required=True)
        client_secret = reader.string("client_secret", required=True)
        scopes_given = reader.has("scopes")
        scopes = reader.string_list("scopes", cls.default_scopes)
        if scopes_given:
            bad = [scope for scope in scopes if not _SCOPE_TOKEN.match(scope)]
            if bad:
                reader.problem("scopes", "contains invalid characters")
            elif "openid" not in scopes:
                reader.problem("scopes", "must contain openid")
        display_name = reader.string("display_name") or cls.default_display_name
        if display_name is None:
            pretty = name.replace("_", " ").replace("-", " ").strip()
            display_name = (
                "Single sign-on" if name == cls.type_name or not pretty else pretty.title()
            )
        discovery = reader.url("discovery_url")
        expected_issuer = reader.url("expected_issuer", allow_query=False)
        method = reader.choice(
            "token_endpoint_auth_method", TOKEN_ENDPOINT_AUTH_METHODS, "client_secret_basic"
        )
        extra = reader.string_map("extra_authorize_params")
        for key in sorted(PROTECTED_AUTHORIZE_PARAMS & set(extra)):
            reader.problem(f"extra_authorize_params.{key}", "is set by the broker")
        groups_claim = reader.string("groups_claim", default="groups") or "groups"
        timeout = reader.number("timeout", 10.0, minimum=0, maximum=120)
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
        fetch_userinfo = reader.boolean("fetch_userinfo", True)

        if reader.problems or issuer is None or client_id is None or client_secret is None:
            return None
        return OIDCSettings(
            issuer=issuer,
            client_id=client_id,
            client_secret=client_secret,
            display_name=display_name,
            discovery_url=discovery
            or discovery_url
            or issuer.rstrip("/") + "/.well-known/openid-configuration",
            expected_issuer=expected_issuer or issuer,
            scopes=scopes,
            token_endpoint_auth_method=method,
            extra_authorize_params=extra,
            groups_claim=groups_claim,
            timeout=timeout,
            allowed_algorithms=algorithms,
            fetch_userinfo=fetch_userinfo,
        )

    # -- hooks for subclasses ------------------------------------------------------------------

    def accepted_issuers(self) -> frozenset[str]:
        """The ``iss`` values accepted in ID Tokens: exactly the expected issuer (OIDC Core
        3.1.3.7 item 2). Google overrides this to also accept ``accounts.google.com``."""
        return frozenset({self.settings.expected_issuer})

    def build_identity(self, claims: Mapping[str, Any], id_claims: Mapping[str, Any]) -> Identity:
        """Map the merged claims to an :class:`Identity`. ``id_claims`` are the signature-verified
        ID Token claims alone; claims that gate access by domain (``hd``) come only from them."""
        groups = claims.get(self.settings.groups_claim)
        # The configured issuer, not the token's spelling of it (Google accepts two): the user
        # key (issuer, sub) must not depend on which one a token used.
        extra: dict[str, Any] = {"issuer": self.settings.expected_issuer}
        realm_access = claims.get("realm_access")
        if isinstance(realm_access, Mapping) and isinstance(realm_access.get("roles"), list):
            extra["roles"] = _strings(realm_access["roles"])
        resource_access = claims.get("resource_access")
        if isinstance(resource_access, Mapping):
            # Keycloak's shape, {client: {"roles": [...]}}, keeping only lists of strings.
            extra["resource_access"] = {
                str(client): {"roles": _strings(entry["roles"])}
                for client, entry in resource_access.items()
                if isinstance(entry, Mapping) and isinstance(entry.get("roles"), list)
            }
        if isinstance(id_claims.get("hd"), str):
            extra["hd"] = id_claims["hd"]
        return Identity(
            provider=self.name,
            subject=id_claims["sub"],
            username=_optional_str(claims.get("preferred_username")),
            name=_optional_str(claims.get("name")),
            email=_optional_str(claims.get("email")),
            email_verified=claims.get("email_verified") is True,
            groups=tuple(_strings(groups)) if isinstance(groups, list) else (),
            extra=extra,
        )

    def check_restrictions(self, identity: Identity, id_claims: Mapping[str, Any]) -> None:
        """Raise :class:`AccessDenied` when the provider's own restrictions (hosted domain,
        realm role...) refuse this identity. The generic provider has none."""

    # -- the upstream leg ----------------------------------------------------------------------

    def login_url(self, request: LoginRequest, http: httpx.Client) -> str:
        """The authentication request (OIDC Core 3.1.2.1): ``response_type=code``, the
        broker's ``state`` and ``nonce``, and a PKCE S256 challenge (RFC 7636 4.2) unless
        discovery lists methods without S256. ``offline_access`` is only honoured with
        ``prompt=consent`` (OIDC Core 11), so it is added when no prompt is configured."""
        metadata = self.metadata(http)
        settings = self.settings
        params: dict[str, str] = {
            "response_type": "code",
            "client_id": settings.client_id,
            "redirect_uri": request.redirect_uri,
            "scope": " ".join(settings.scopes),
            "state": request.state,
            "nonce": request.nonce,
        }
        methods = metadata.code_challenge_methods
        if methods is None or "S256" in methods:
            digest = hashlib.sha256(request.code_verifier.encode("ascii")).digest()
            params["code_challenge"] = _b64url(digest)
            params["code_challenge_method"] = "S256"
        if request.login_hint:
            params["login_hint"] = request.login_hint
        if "offline_access" in settings.scopes and "prompt" not in settings.extra_authorize_params:
            params["prompt"] = "consent"
        params.update(settings.extra_authorize_params)
        return _with_query(metadata.authorization_endpoint, params)

    def handle_callback(self, request: CallbackRequest, http: httpx.Client) -> LoginResult:
        """Validate the authentication response (OIDC Core 3.1.2.5-3.1.2.6, RFC 9207), redeem
        the code (3.1.3), validate the ID Token (3.1.3.7) and read UserInfo (5.3)."""
        params = request.params
        metadata = self.metadata(http)
        # RFC 9207 section 2.4: compare iss with the issuer before anything else, errors included.
        if "iss" in params:
            if params["iss"] != metadata.issuer:
                raise LoginFailed("issuer_mismatch", detail="iss parameter is another issuer")
        elif metadata.iss_parameter_supported:
            raise LoginFailed("issuer_missing", detail="iss parameter missing")
        if "error" in params:
            code = sanitize_code(params["error"])
            if code == "access_denied":
                raise AccessDenied("upstream_denied", detail=code)
            raise LoginFailed("upstream_error", detail=code)
        authorization_code = params.get("code")
        if not authorization_code:
            raise LoginFailed("missing_code")

        body = self._token_request(
            http,
            metadata,
            {
                "grant_type": "authorization_code",
                "code": authorization_code,
                "redirect_uri": request.redirect_uri,
                "code_verifier": request.code_verifier,
            },
        )
        access_token = _access_token(body)
        id_token = body.get("id_token")
        if not isinstance(id_token, str) or not id_token:
            # OIDC Core 3.1.3.3: a successful token response of the code flow carries an ID Token.
            raise LoginFailed("id_token_invalid", detail="no id_token in the token response")
        id_claims = self._verify_id_token(
            http, metadata, id_token, nonce=request.nonce, access_token=access_token
        )
        claims: dict[str, Any] = {}
        if self.settings.fetch_userinfo and metadata.userinfo_endpoint:
            claims.update(self._userinfo(http, metadata, access_token, subject=id_claims["sub"]))
        # The signed ID Token wins over UserInfo for every claim both carry.
        claims.update(id_claims)
        identity = self.build_identity(claims, id_claims)
        self.check_restrictions(identity, id_claims)
        tokens = UpstreamTokens(
            access_token=access_token,
            refresh_token=_optional_str(body.get("refresh_token")),
            expires_at=_expires_at(body),
            scope=_optional_str(body.get("scope")) or " ".join(self.settings.scopes),
            id_token=id_token,
            context={"issuer": self.settings.expected_issuer, "subject": id_claims["sub"]},
        )
        return LoginResult(identity=identity, tokens=tokens)

    def refresh(self, tokens: UpstreamTokens, http: httpx.Client) -> UpstreamTokens:
        """Refresh the upstream tokens (OIDC Core 12, RFC 6749 6). The old refresh token is kept
        when none is returned; a returned ID Token must name the same ``iss`` and ``sub``
        (OIDC Core 12.2)."""
        if not tokens.refresh_token:
            raise LoginFailed("no_refresh_token")
        metadata = self.metadata(http)
        body = self._token_request(
            http, metadata, {"grant_type": "refresh_token", "refresh_token": tokens.refresh_token}
        )
        access_token = _access_token(body)
        id_token = _optional_str(body.get("id_token"))
        if id_token:
            claims = self._verify_id_token(
                http, metadata, id_token, nonce=None, access_token=access_token
            )
            subject = tokens.context.get("subject")
            if subject is not None and claims["sub"] != subject:
                raise LoginFailed("id_token_invalid", detail="refreshed id_token has another sub")
        return UpstreamTokens(
            access_token=access_token,
            refresh_token=_optional_str(body.get("refresh_token")) or tokens.refresh_token,
            expires_at=_expires_at(body),
            scope=_optional_str(body.get("scope")) or tokens.scope,
            id_token=id_token or tokens.id_token,
            context=tokens.context,
        )

    # -- discovery, keys, HTTP -----------------------------------------------------------------

    def metadata(self, http: httpx.Client) -> ProviderMetadata:
        """The provider's discovery document (OIDC Discovery 1.0 section 4), cached."""
        with self._metadata_lock:
            now = time.monotonic()
            if self._metadata is not None and now - self._metadata[0] < DISCOVERY_TTL:
                return self._metadata[1]
            document = self._get_json(http, self.settings.discovery_url, what="discovery")
            metadata = ProviderMetadata.from_document(
                document, expected_issuer=self.settings.expected_issuer
            )
            self._metadata = (now, metadata)
            return metadata

    def allowed_algorithms(self, metadata: ProviderMetadata) -> frozenset[str]:
        """Configured algorithms, else what discovery lists (RS256 when it lists nothing: OIDC
        Discovery 3 makes RS256 mandatory), never ``none`` nor HS*."""
        if self.settings.allowed_algorithms is not None:
            return frozenset(self.settings.allowed_algorithms)
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
        claims = self._decode_signed_jwt(
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
            alg = jwt.get_unverified_header(token)["alg"]
            hasher = _HASH_FOR_ALG.get(alg)
            if hasher is not None:
                digest = hasher(access_token.encode("ascii")).digest()
                expected = _b64url(digest[: len(digest) // 2])
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
    ) -> dict[str, Any]:
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
                issuer=self.accepted_issuers(),
                leeway=CLOCK_SKEW,
                options={"require": require},
            )
        except jwt.ExpiredSignatureError:
            raise LoginFailed(reason, detail="expired") from None
        except jwt.InvalidTokenError as exc:
            raise LoginFailed(reason, detail=type(exc).__name__) from None
        return claims

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
                    return jwt.PyJWK(dict(candidates[0]), algorithm=alg).key
                except (jwt.PyJWKError, jwt.InvalidKeyError):
                    raise LoginFailed(reason, detail="unusable signing key") from None
            keys = self._refetch_jwk_set(http, metadata)
        raise LoginFailed(reason, detail="no matching signing key")

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
        document = self._get_json(http, metadata.jwks_uri, what="jwks")
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
        response = self._send(
            http,
            "GET",
            metadata.userinfo_endpoint,
            what="userinfo",
            headers={
                "Accept": "application/json, application/jwt",
                "Authorization": f"Bearer {access_token}",
            },
        )
        if response.status_code != 200:
            raise LoginFailed("userinfo_failed", detail=f"HTTP {response.status_code}")
        content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "application/jwt":
            claims = self._decode_signed_jwt(
                http, metadata, response.text.strip(), what="userinfo", require=["sub"]
            )
        else:
            claims = _json_object(response, reason="userinfo_failed")
        if claims.get("sub") != subject:
            raise LoginFailed("userinfo_subject_mismatch")
        return claims

    def _token_request(
        self, http: httpx.Client, metadata: ProviderMetadata, data: Mapping[str, str]
    ) -> dict[str, Any]:
        """A token endpoint request with client authentication (RFC 6749 2.3.1: with
        client_secret_basic the id and secret are form-urlencoded before base64)."""
        settings = self.settings
        form = dict(data)
        headers = {"Accept": "application/json"}
        if settings.token_endpoint_auth_method == "client_secret_basic":
            credentials = (
                f"{quote(settings.client_id, safe='')}:{quote(settings.client_secret, safe='')}"
            )
            headers["Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
        else:
            form["client_id"] = settings.client_id
            form["client_secret"] = settings.client_secret
        response = self._send(
            http, "POST", metadata.token_endpoint, what="token", headers=headers, data=form
        )
        try:
            body = _json_object(response, reason="token_error")
        except LoginFailed:
            raise LoginFailed("token_error", detail=f"HTTP {response.status_code}") from None
        if response.status_code != 200 or "error" in body:
            raise LoginFailed("token_error", detail=sanitize_code(body.get("error")))
        return body

    def _get_json(self, http: httpx.Client, url: str, *, what: str) -> dict[str, Any]:
        response = self._send(http, "GET", url, what=what, headers={"Accept": "application/json"})
        if response.status_code != 200:
            raise LoginFailed(f"{what}_failed", detail=f"HTTP {response.status_code}")
        return _json_object(response, reason=f"{what}_invalid")

    def _send(
        self,
        http: httpx.Client,
        method: str,
        url: str,
        *,
        what: str,
        headers: Mapping[str, str],
        data: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """One back-channel request: network failures, 5xx and 429 are temporary
        (:class:`UpstreamUnavailable`); the caller judges other statuses."""
        try:
            response = http.request(
                method, url, headers=headers, data=data, timeout=self.settings.timeout
            )
        except httpx.RequestError as exc:
            raise UpstreamUnavailable(
                f"{self.name}: {what} request failed: {type(exc).__name__}"
            ) from exc
        if response.status_code >= 500 or response.status_code == 429:
            raise UpstreamUnavailable(f"{self.name}: {what} answered HTTP {response.status_code}")
        return response


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


def _json_object(response: httpx.Response, *, reason: str) -> dict[str, Any]:
    if len(response.content) > MAX_RESPONSE_BYTES:
        raise LoginFailed(reason, detail="response too large")
    try:
        body = response.json()
    except ValueError:
        raise LoginFailed(reason, detail="response is not JSON") from None
    if not isinstance(body, dict):
        raise LoginFailed(reason, detail="response is not a JSON object")
    return body


def _access_token(body: Mapping[str, Any]) -> str:
    """RFC 6749 5.1: ``access_token`` and ``token_type`` (Bearer: RFC 6750) are REQUIRED."""
    access_token = body.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise LoginFailed("token_error", detail="no access_token")
    token_type = body.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise LoginFailed("token_error", detail="token_type is not Bearer")
    return access_token


def _expires_at(body: Mapping[str, Any]) -> int | None:
    expires_in = body.get("expires_in")
    if isinstance(expires_in, str) and expires_in.isdigit():
        expires_in = int(expires_in)
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
        return None
    return int(time.time() + expires_in)


def _strings(values: Iterable[object]) -> list[str]:
    return [value for value in values if isinstance(value, str)]


def _optional_str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _with_query(url: str, params: Mapping[str, str]) -> str:
    """Append parameters to an endpoint URL, keeping any query it already has (RFC 6749 3.1)."""
    parts = urlsplit(url)
    query = [
        pair for pair in parse_qsl(parts.query, keep_blank_values=True) if pair[0] not in params
    ]
    query.extend(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))
