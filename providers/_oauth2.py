"""OAuth 2.0 client: the generic base of every redirect-login provider.

Implements the client side of the authorization code grant (RFC 6749 section 4.1) with PKCE
(RFC 7636, S256 only), client authentication at the token endpoint (section 2.3.1), the refresh
grant (section 6) and the error responses of sections 4.1.2.1 and 5.2. Providers without an ID
Token (GitHub, Atlassian, Salesforce) subclass :class:`OAuth2Provider` directly and supply the
identity from their APIs (:meth:`~OAuth2Provider.identify`); the OpenID Connect base
(:mod:`providers._oidc`) subclasses it too.

A named provider stays thin: it passes its endpoints to :meth:`OAuth2Provider.read_settings`
(or its base URL to :meth:`~OAuth2Provider.read_settings_under`), reads its own keys in
:meth:`~OAuth2Provider.from_reader` into its own settings dataclass
(:attr:`~OAuth2Provider.settings_class`, built by :meth:`~OAuth2Provider.build`), declares its
upstream's quirks in class attributes (endpoint paths, ``offline_scopes``,
``fixed_authorize_params``, ``login_hint_param``, ``scope_delimiter``), and overrides the
hooks ``scopes``, ``authorize_params``, ``identify``, ``check_restrictions``,
``token_context``, ``identity_context`` and ``granted_scope``. Shared mechanics:
:meth:`~OAuth2Provider.identity_from` (a profile with the verified-email rule),
:meth:`~OAuth2Provider.require_membership` (the ``allowed_...`` restrictions) and
:class:`RecheckByToken`.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Self
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import httpx

from ._config import ConfigReader, sanitize_code
from ._http import UpstreamHTTP, bare_url
from .contract import (
    BASE_FACTS,
    CallbackRequest,
    Identity,
    LoginRequest,
    LoginResult,
    Requirements,
    UpstreamTokens,
)
from .errors import AccessDenied, ConfigError, LoginFailed, UpstreamUnavailable

__all__ = [
    "PROTECTED_AUTHORIZE_PARAMS",
    "TOKEN_ENDPOINT_AUTH_METHODS",
    "OAuth2Provider",
    "OAuth2Settings",
    "RecheckByToken",
    "b64url",
    "with_query",
]

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
"""Authorization request parameters the broker sets; ``extra_authorize_params`` may not."""


@dataclass(frozen=True)
class OAuth2Settings:
    """The keys every OAuth 2.0 provider reads (see ``docs/plugins.md``)."""

    client_id: str
    client_secret: str
    display_name: str
    authorization_endpoint: str
    token_endpoint: str
    scopes: tuple[str, ...]
    token_endpoint_auth_method: str = "client_secret_basic"
    extra_authorize_params: Mapping[str, str] = field(default_factory=dict)
    timeout: float = 10.0
    pkce: bool = True


class OAuth2Provider:
    """The authorization code grant against one upstream; subclasses supply the identity.

    Class attributes a subclass sets: ``type_name``, ``default_display_name``,
    ``default_scopes``, ``default_auth_method``, ``default_pkce``, ``facts`` (the identity
    facts its identities declare), and those below.
    """

    type_name: ClassVar[str]
    default_display_name: ClassVar[str | None] = None
    default_scopes: ClassVar[tuple[str, ...]] = ()
    default_auth_method: ClassVar[str] = "client_secret_basic"
    default_pkce: ClassVar[bool] = True
    facts: frozenset[str] = BASE_FACTS
    settings_class: ClassVar[type[OAuth2Settings]] = OAuth2Settings
    """The settings dataclass: :class:`OAuth2Settings`, or a subclass adding the provider's own
    keys as fields (see :meth:`build`)."""
    offline_scopes: ClassVar[tuple[str, ...]] = ()
    """Scopes that ask the upstream for a refresh token: when the token must outlive the login
    (``Requirements.offline``) and none of them is configured, :meth:`scopes` adds the first."""
    fixed_authorize_params: ClassVar[Mapping[str, str]] = {}
    """Authorization request parameters the upstream requires on every request (Atlassian's
    ``audience`` and ``prompt``); ``extra_authorize_params`` may not change them."""
    scope_delimiter: ClassVar[str] = " "
    """How the token response lists the granted scopes (RFC 6749: spaces; GitHub: commas)."""
    login_hint_param: ClassVar[str | None] = None
    """The authorization request parameter that carries ``LoginRequest.login_hint`` (GitHub's
    ``login``); ``None``: the hint is not sent."""
    authorization_path: ClassVar[str] = "/authorize"
    token_path: ClassVar[str] = "/token"
    """Where the endpoints are under the upstream's base URL (see :meth:`read_settings_under`)."""

    def __init__(self, name: str, settings: OAuth2Settings) -> None:
        self.name = name
        self.display_name = settings.display_name
        self.settings = settings
        self.upstream = UpstreamHTTP(name, timeout=settings.timeout)
        self.requirements = Requirements()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    # -- configuration -------------------------------------------------------------------------

    @classmethod
    def from_config(cls, name: str, config: Mapping[str, Any], *, base_dir: str) -> Self:
        """Validate ``config`` eagerly; raise :class:`ConfigError` listing every problem."""
        reader = ConfigReader(config)
        provider = cls.from_reader(name, reader)
        reader.finish()
        if provider is None:  # a from_reader that refused without saying why
            raise ConfigError([f"({name}): the provider's configuration was refused"])
        return provider

    @classmethod
    def from_reader(cls, name: str, reader: ConfigReader) -> Self | None:
        """Read every key and build the provider, or ``None`` when a problem was recorded. A
        subclass with keys of its own overrides this and calls :meth:`read_settings`."""
        settings = cls.read_settings(name, reader)
        return None if settings is None else cls(name, settings)

    @classmethod
    def build(
        cls, name: str, reader: ConfigReader, settings: OAuth2Settings | None, **own: Any
    ) -> Self | None:
        """The provider from the keys :meth:`read_settings` read and the provider's ``own``
        keys (the further fields of :attr:`settings_class`), or ``None`` once any problem is
        recorded: the end of a subclass's :meth:`from_reader`."""
        if settings is None or reader.problems:
            return None
        common = {item.name: getattr(settings, item.name) for item in fields(settings)}
        return cls(name, cls.settings_class(**common, **own))

    @classmethod
    def read_settings_under(
        cls, name: str, reader: ConfigReader, base_url: str
    ) -> OAuth2Settings | None:
        """:meth:`read_settings` with the endpoints at :attr:`authorization_path` and
        :attr:`token_path` under ``base_url`` (read with :meth:`ConfigReader.base_url`, so that
        an enterprise host or a local fake can replace the upstream's)."""
        return cls.read_settings(
            name,
            reader,
            authorization_endpoint=base_url + cls.authorization_path,
            token_endpoint=base_url + cls.token_path,
        )

    @classmethod
    def read_settings(
        cls,
        name: str,
        reader: ConfigReader,
        *,
        authorization_endpoint: str | None = None,
        token_endpoint: str | None = None,
    ) -> OAuth2Settings | None:
        """Read the keys every OAuth 2.0 provider has. The endpoints come from the subclass
        (derived from its own base-URL keys), else from the ``authorization_endpoint`` and
        ``token_endpoint`` keys. Returns ``None`` when a problem was recorded."""
        if authorization_endpoint is None:
            authorization_endpoint = reader.url("authorization_endpoint", required=True)
        if token_endpoint is None:
            token_endpoint = reader.url("token_endpoint", required=True)
        client_id = reader.string("client_id", required=True)
        client_secret = reader.string("client_secret", required=True)
        scopes = reader.scopes("scopes", cls.default_scopes)
        display_name = reader.string("display_name") or cls.default_display_name
        if display_name is None:
            pretty = name.replace("_", " ").replace("-", " ").strip()
            display_name = (
                "Single sign-on" if name == cls.type_name or not pretty else pretty.title()
            )
        method = reader.choice(
            "token_endpoint_auth_method", TOKEN_ENDPOINT_AUTH_METHODS, cls.default_auth_method
        )
        extra = reader.string_map("extra_authorize_params")
        for key in sorted(PROTECTED_AUTHORIZE_PARAMS & set(extra)):
            reader.problem(f"extra_authorize_params.{key}", "is set by the broker")
        for key in sorted(cls.fixed_authorize_params.keys() & set(extra)):
            reader.problem(f"extra_authorize_params.{key}", "is set by the provider")
        timeout = reader.number("timeout", 10.0, minimum=0, maximum=120)
        pkce = reader.boolean("pkce", cls.default_pkce)
        if (
            reader.problems
            or authorization_endpoint is None
            or token_endpoint is None
            or client_id is None
            or client_secret is None
        ):
            return None
        return OAuth2Settings(
            client_id=client_id,
            client_secret=client_secret,
            display_name=display_name,
            authorization_endpoint=authorization_endpoint,
            token_endpoint=token_endpoint,
            scopes=scopes,
            token_endpoint_auth_method=method,
            extra_authorize_params=extra,
            timeout=timeout,
            pkce=pkce,
        )

    def apply_requirements(self, requirements: Requirements) -> None:
        """What the broker needs of this provider (``RequirementsAware``)."""
        self.requirements = requirements

    # -- hooks for subclasses ------------------------------------------------------------------

    def scopes(self) -> tuple[str, ...]:
        """The scopes to ask for: the configured ones, plus the first of :attr:`offline_scopes`
        when the token must outlive the login (subclasses add what else requirements need)."""
        scopes = self.settings.scopes
        offline = self.offline_scopes
        if self.requirements.offline and offline and not set(offline) & set(scopes):
            scopes = (*scopes, offline[0])
        return scopes

    def authorize_params(self, request: LoginRequest, http: httpx.Client) -> dict[str, str]:
        """Extra authorization request parameters of this upstream (``audience``, ``prompt``)."""
        return {}

    def authorization_endpoint(self, http: httpx.Client) -> str:
        return self.settings.authorization_endpoint

    def token_endpoint(self, http: httpx.Client) -> str:
        return self.settings.token_endpoint

    def use_pkce(self, http: httpx.Client) -> bool:
        return self.settings.pkce

    def check_callback(self, params: Mapping[str, str], http: httpx.Client) -> None:
        """Checks of the authorization response before anything else (OIDC: RFC 9207 ``iss``)."""

    def identify(
        self, http: httpx.Client, tokens: UpstreamTokens, *, nonce: str | None
    ) -> Identity:
        """The identity behind ``tokens`` (from the upstream's API, or the ID Token)."""
        raise NotImplementedError

    def check_restrictions(self, identity: Identity) -> Identity | None:
        """Raise :class:`AccessDenied` when the provider's own restrictions (organisations,
        hosted domains, sites) refuse this identity; may return it narrowed to what they allow
        (only the sanctioned sites), ``None`` for unchanged."""
        return None

    def identity_context(self, identity: Identity) -> Mapping[str, Any]:
        """Context for MCP servers known only once the identity is (Atlassian's sites); merged
        over :meth:`token_context` at sign-in."""
        return {}

    def token_context(
        self, body: Mapping[str, Any], previous: UpstreamTokens | None
    ) -> Mapping[str, Any]:
        """What MCP servers need beside the upstream token, from a token response."""
        return previous.context if previous is not None else {}

    def granted_scope(self, body: Mapping[str, Any]) -> str | None:
        """The granted scope of a token response (RFC 6749 section 5.1), as a space-separated
        string whatever the upstream's :attr:`scope_delimiter`."""
        scope = body.get("scope")
        if not isinstance(scope, str):
            return None
        return " ".join(scope.replace(self.scope_delimiter, " ").split()) or None

    # -- shared mechanics for subclasses -------------------------------------------------------

    def identity_from(
        self,
        profile: Mapping[str, Any],
        subject: str,
        *,
        username: str = "username",
        name: str = "name",
        email: str = "email",
        **more: Any,
    ) -> Identity:
        """An identity from an upstream's JSON profile: ``username``, ``name`` and ``email`` name
        the members holding them (absent or not a string: none). The email counts as verified
        only when ``email_verified`` is JSON ``true``. ``more`` are further
        :class:`Identity` fields (``tenants``, ``raw``...)."""
        return Identity(
            provider=self.name,
            subject=subject,
            username=optional_str(profile.get(username)),
            name=optional_str(profile.get(name)),
            email=optional_str(profile.get(email)),
            email_verified=profile.get("email_verified") is True,
            **more,
        )

    @staticmethod
    def require_membership(
        allowed: Collection[str],
        present: Iterable[str],
        *,
        reason: str,
        detail: str,
        message: str | None = None,
    ) -> None:
        """The restriction of an ``allowed_...`` key, for :meth:`check_restrictions`: pass when
        ``allowed`` is empty (no restriction) or names one of the identity's ``present`` values;
        else raise :class:`AccessDenied` with the fixed ``reason``, the operator's ``detail`` and
        the optional ``message`` for the person signing in (without one, the broker says the
        account is not allowed to sign in here)."""
        if allowed and not set(allowed) & set(present):
            raise AccessDenied(reason, detail=detail, message=message)

    # -- the upstream leg ----------------------------------------------------------------------

    def login_url(self, request: LoginRequest, http: httpx.Client) -> str:
        """The authorization request (RFC 6749 section 4.1.1) with the broker's ``state`` and a
        PKCE S256 challenge (RFC 7636 section 4.2)."""
        params: dict[str, str] = {
            "response_type": "code",
            "client_id": self.settings.client_id,
            "redirect_uri": request.redirect_uri,
            "scope": " ".join(self.scopes()),
            "state": request.state,
        }
        if self.use_pkce(http):
            digest = hashlib.sha256(request.code_verifier.encode("ascii")).digest()
            params["code_challenge"] = b64url(digest)
            params["code_challenge_method"] = "S256"
        if request.login_hint and self.login_hint_param:
            params[self.login_hint_param] = request.login_hint
        params.update(self.fixed_authorize_params)
        params.update(self.authorize_params(request, http))
        params.update(self.settings.extra_authorize_params)
        return with_query(self.authorization_endpoint(http), params)

    def handle_callback(self, request: CallbackRequest, http: httpx.Client) -> LoginResult:
        """The authorization response (RFC 6749 section 4.1.2): an error (4.1.2.1) is a failed
        login, ``access_denied`` a refusal; a code is redeemed (4.1.3) with the PKCE verifier."""
        params = request.params
        self.check_callback(params, http)
        if "error" in params:
            code = sanitize_code(params["error"])
            if code == "access_denied":
                raise AccessDenied("upstream_denied", detail=f"upstream said {code}")
            if code in ("server_error", "temporarily_unavailable"):
                # Section 4.1.2.1: the upstream's own trouble, temporary: the client may retry.
                raise UpstreamUnavailable(f"authorization response: upstream said {code}")
            raise LoginFailed("upstream_error", detail=f"upstream said {code}")
        authorization_code = params.get("code")
        if not authorization_code:
            raise LoginFailed("missing_code", detail="callback without code")
        data = {
            "grant_type": "authorization_code",
            "code": authorization_code,
            "redirect_uri": request.redirect_uri,
        }
        if self.use_pkce(http):
            data["code_verifier"] = request.code_verifier
        body = self.token_request(http, data)
        tokens = self.tokens_from(body, previous=None)
        identity = self.identify(http, tokens, nonce=request.nonce)
        identity = self.check_restrictions(identity) or identity
        extra = self.identity_context(identity)
        if extra:
            tokens = replace(tokens, context={**tokens.context, **extra})
        return LoginResult(identity=identity, tokens=tokens)

    def check(self, http: httpx.Client) -> list[str]:
        """The authorization and token endpoints answer at all (any status but 5xx and 429: a
        bare GET is not a valid request, only a sign that the host serves them)."""
        lines = []
        for what, url in (
            ("authorization endpoint", self.authorization_endpoint(http)),
            ("token endpoint", self.token_endpoint(http)),
        ):
            response = self.upstream.send(http, "GET", url, what=what)
            lines.append(f"{what} {bare_url(url)} answers (HTTP {response.status_code})")
        return lines

    def refresh(self, tokens: UpstreamTokens, http: httpx.Client) -> UpstreamTokens:
        """The refresh grant (RFC 6749 section 6); the old refresh token is kept when the
        response carries none."""
        if not tokens.refresh_token:
            raise LoginFailed("no_refresh_token", detail="no refresh token stored")
        body = self.token_request(
            http, {"grant_type": "refresh_token", "refresh_token": tokens.refresh_token}
        )
        return self.tokens_from(body, previous=tokens)

    def tokens_from(
        self, body: Mapping[str, Any], previous: UpstreamTokens | None
    ) -> UpstreamTokens:
        """A successful token response (RFC 6749 section 5.1): ``access_token`` and a Bearer
        ``token_type`` are required."""
        where = self.upstream.where("token", "POST", self.settings.token_endpoint or "token")
        access_token = body.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise LoginFailed("token_error", detail=f"{where}: no access_token")
        token_type = body.get("token_type")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise LoginFailed("token_error", detail=f"{where}: token_type is not Bearer")
        refresh_token = body.get("refresh_token")
        id_token = body.get("id_token")
        return UpstreamTokens(
            access_token=access_token,
            refresh_token=refresh_token
            if isinstance(refresh_token, str) and refresh_token
            else (previous.refresh_token if previous else None),
            expires_at=expires_at(body),
            scope=self.granted_scope(body)
            or (previous.scope if previous else None)
            or " ".join(self.scopes()),
            id_token=id_token
            if isinstance(id_token, str) and id_token
            else (previous.id_token if previous else None),
            context=dict(self.token_context(body, previous)),
        )

    def token_request(self, http: httpx.Client, data: Mapping[str, str]) -> dict[str, Any]:
        """A token endpoint request with client authentication (RFC 6749 section 2.3.1: with
        ``client_secret_basic`` the id and secret are form-urlencoded before base64). An error
        answer (section 5.2, or HTTP 200 with ``error`` as GitHub sends) is ``token_error``."""
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
        url = self.token_endpoint(http)
        response = self.upstream.send(http, "POST", url, what="token", headers=headers, data=form)
        body = self.upstream.json(response, what="token", reason="token_error")
        where = self.upstream.where("token", "POST", url)
        if not isinstance(body, dict):
            raise LoginFailed("token_error", detail=f"{where}: HTTP {response.status_code}")
        if response.status_code != 200 or "error" in body:
            raise LoginFailed(
                "token_error",
                detail=f"{where}: HTTP {response.status_code}, "
                f"error={sanitize_code(body.get('error'))}",
            )
        return body


class RecheckByToken:
    """The ``RecheckingProvider`` capability for an upstream whose identity comes from its API
    with the access token alone (GitHub, Atlassian): fetch the identity again and apply the
    restrictions again. Mix in before :class:`OAuth2Provider`."""

    def recheck(
        self, identity: Identity, tokens: UpstreamTokens | None, http: httpx.Client
    ) -> Identity:
        """The identity as the upstream sees it now; :class:`AccessDenied` when the user no
        longer passes the restrictions (left the organisation, lost the site)."""
        assert isinstance(self, OAuth2Provider)
        if tokens is None:
            raise LoginFailed("no_upstream_token", detail="no upstream token stored")
        current = self.identify(http, tokens, nonce=None)
        if current.subject != identity.subject:
            raise LoginFailed("subject_mismatch", detail="the stored token names another user")
        return self.check_restrictions(current) or current


def expires_at(body: Mapping[str, Any]) -> int | None:
    """``expires_in`` of a token response as an absolute time (a number or a digit string)."""
    expires_in = body.get("expires_in")
    if isinstance(expires_in, str) and expires_in.isdigit():
        expires_in = int(expires_in)
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
        return None
    return int(time.time() + expires_in)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def with_query(url: str, params: Mapping[str, str]) -> str:
    """Append parameters to an endpoint URL, keeping any query it already has (RFC 6749 3.1)."""
    parts = urlsplit(url)
    query = [
        pair for pair in parse_qsl(parts.query, keep_blank_values=True) if pair[0] not in params
    ]
    query.extend(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def strings(values: object) -> tuple[str, ...]:
    """The strings of a JSON list (anything else is no strings)."""
    if not isinstance(values, list | tuple):
        return ()
    return tuple(value for value in values if isinstance(value, str) and value)


def optional_str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
