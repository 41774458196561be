"""OAuth 2.0 Token Exchange (RFC 8693), as an MCP server asks the broker for the user's upstream
token.

Token passthrough is forbidden: an MCP server never forwards the broker's token to an upstream
API. An MCP server whose resource lists `upstream_tokens: [atlassian]` in the broker's
configuration authenticates as its own confidential client and exchanges the caller's broker
access token (the `subject_token`, RFC 8693 section 2.1) for the user's current upstream access
token, naming the provider as the `audience`. The answer (section 2.2.1) carries the token, its
expiry and scope, and in the broker's `upstream` member the context the MCP server needs
(Atlassian cloud ids and sites, Salesforce `instance_url`, GitHub API host).

`UpstreamTokenClient.exchange` caches the answer per (user, provider) until shortly before the
upstream token expires, so one upstream token serves every MCP request of that user. The user is
the `sub` of a subject token the broker accepted: a token the broker never saw does not hit the
cache, whatever it claims. Refusals (section 2.2.2, RFC 6749 section 5.2) are `ExchangeRefused`
with the OAuth error code; a broker that cannot answer now is `ExchangeUnavailable`.

Standard library HTTP only (as the JWKS fetch of `verifier`): no redirects, a size cap, a timeout.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import http.client
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

logger = logging.getLogger(__name__)

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
"""RFC 8693 section 2.1 `grant_type`."""
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
"""RFC 8693 section 3: the token type identifier of an access token."""
AUTH_METHODS = ("client_secret_basic", "client_secret_post")

_MAX_RESPONSE_BYTES = 64 * 1024
_FETCH_ERRORS = (OSError, ValueError, http.client.HTTPException)


# -- errors ---------------------------------------------------------------------------------------


class ExchangeError(Exception):
    """Base of the exchange errors; never holds any part of a token."""


class ExchangeRefused(ExchangeError):
    """The broker refused the exchange (RFC 8693 section 2.2.2, RFC 6749 section 5.2).

    `error` is the OAuth error code:

    - `invalid_request`: the subject token is not (or no longer) a valid broker token for this
      server: answer the MCP client 401, it gets a new one;
    - `invalid_grant`: the user has no usable token of that provider (`sign_in_required`): tell
      the user to sign in with the provider again;
    - `invalid_target`: this resource may not obtain that provider's tokens (configuration);
    - `invalid_client`, `unauthorized_client`: this server's own client is wrong (configuration).
    """

    def __init__(self, error: str, description: str | None, status: int) -> None:
        super().__init__(f"{error}: {description}" if description else error)
        self.error = error
        self.description = description
        self.status = status

    @property
    def sign_in_required(self) -> bool:
        """The user must sign in with the provider again (`invalid_grant`)."""
        return self.error == "invalid_grant"


class ExchangeUnavailable(ExchangeError):
    """The broker could not answer now (unreachable, 5xx, `temporarily_unavailable`, or a
    malformed answer): try again later; nothing about the user is wrong."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- the result -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UpstreamToken:
    """The user's upstream access token, as the broker handed it out.

    `expires_at` is a Unix time (None when the upstream gave no expiry), `scope` the granted
    upstream scopes, `context` the broker's context for this provider (read-only), `provider` the
    provider name it was asked for. Use it as `Authorization: Bearer <access_token>` upstream.
    """

    access_token: str = field(repr=False)
    expires_at: int | None
    scope: tuple[str, ...]
    context: Mapping[str, Any] = field(compare=False, hash=False)
    provider: str


# -- the client -----------------------------------------------------------------------------------


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@dataclass(frozen=True, slots=True)
class _Subject:
    subject: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class _Entry:
    token: UpstreamToken
    fresh_until: float  # inf when the upstream gave no expiry


def _subject_of(token: str) -> _Subject | None:
    """`sub` and `exp` of a JWT's payload, unverified: only used after the broker accepted it."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(payload, dict):
        return None
    sub, exp = payload.get("sub"), payload.get("exp")
    if not isinstance(sub, str) or isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return _Subject(sub, float(exp))


class UpstreamTokenClient:
    """Exchanges broker access tokens for upstream tokens at the broker's token endpoint.

    `client_id` and `client_secret` are this MCP server's confidential client at the broker
    (one static client per MCP server, bound to its resource), sent with `auth_method`
    (`client_secret_basic`, the default, or `client_secret_post`, as the client is registered).
    Answers are cached until `refresh_margin` seconds (at most half the token's lifetime) before
    the upstream token expires, never past the subject token's own `exp`; at most `cache_size`
    users. Thread-safe.
    """

    def __init__(
        self,
        token_endpoint: str,
        client_id: str,
        client_secret: str,
        *,
        auth_method: str = "client_secret_basic",
        timeout: float = 10.0,
        refresh_margin: float = 60.0,
        cache_size: int = 10_000,
    ) -> None:
        if urlsplit(token_endpoint).scheme not in ("http", "https"):
            raise ValueError("token_endpoint must be an http(s) URL")
        if not client_id or not client_secret:
            raise ValueError("client_id and client_secret are required")
        if auth_method not in AUTH_METHODS:
            raise ValueError(f"auth_method must be one of {', '.join(AUTH_METHODS)}")
        self.token_endpoint = token_endpoint
        self.client_id = client_id
        self._client_secret = client_secret
        self.auth_method = auth_method
        self.timeout = timeout
        self.refresh_margin = refresh_margin
        self.cache_size = cache_size
        self._opener = urllib.request.build_opener(_NoRedirects())
        self._lock = threading.Lock()
        # (sha256 of a subject token the broker accepted, provider) -> its subject
        self._subjects: dict[tuple[bytes, str], _Subject] = {}
        # (subject, provider) -> the latest upstream token
        self._tokens: dict[tuple[str, str], _Entry] = {}

    @classmethod
    def for_broker(
        cls, issuer: str, client_id: str, client_secret: str, **options: Any
    ) -> UpstreamTokenClient:
        """A client for the broker at `issuer` (its token endpoint is `{issuer}/token`)."""
        return cls(f"{issuer}/token", client_id, client_secret, **options)

    def __repr__(self) -> str:
        return f"UpstreamTokenClient({self.token_endpoint!r}, {self.client_id!r})"

    # -- the cache --------------------------------------------------------------------------------

    def cached(self, subject_token: str, provider: str) -> UpstreamToken | None:
        """The cached upstream token for this subject token's user, if still fresh. Never
        blocks on the network: an async caller can use it before hopping to a thread."""
        now = time.time()
        key = (_digest(subject_token), provider)
        with self._lock:
            subject = self._subjects.get(key)
            if subject is None:
                return None
            if subject.expires_at <= now:
                del self._subjects[key]
                return None
            entry = self._tokens.get((subject.subject, provider))
            if entry is None or entry.fresh_until <= now:
                return None
            return entry.token

    def forget(self, subject_token: str, provider: str) -> None:
        """Drop the cached token of this subject token's user (the upstream refused it before its
        expiry: it was revoked there); the next `exchange` asks the broker again."""
        with self._lock:
            subject = self._subjects.pop((_digest(subject_token), provider), None)
            if subject is not None:
                self._tokens.pop((subject.subject, provider), None)

    def clear_cache(self) -> None:
        with self._lock:
            self._subjects.clear()
            self._tokens.clear()

    def _remember(
        self, subject_token: str, provider: str, token: UpstreamToken, fresh_until: float
    ) -> None:
        if self.cache_size <= 0:
            return
        subject = _subject_of(subject_token)
        if subject is None:
            return
        with self._lock:
            # Oldest first when full: dicts keep insertion order.
            if len(self._subjects) >= self.cache_size:
                del self._subjects[next(iter(self._subjects))]
            if len(self._tokens) >= self.cache_size:
                del self._tokens[next(iter(self._tokens))]
            self._subjects[(_digest(subject_token), provider)] = subject
            self._tokens.pop((subject.subject, provider), None)
            self._tokens[(subject.subject, provider)] = _Entry(token, fresh_until)

    # -- the exchange -----------------------------------------------------------------------------

    def exchange(self, subject_token: str, provider: str) -> UpstreamToken:
        """The user's upstream token for `provider`, in exchange for their broker access token
        for this MCP server (RFC 8693 section 2.1); from the cache while it is fresh.

        Raises `ExchangeRefused` (with the OAuth error code) or `ExchangeUnavailable`.
        """
        if not isinstance(subject_token, str) or not subject_token:
            raise ValueError("subject_token is required")
        if not provider:
            raise ValueError("provider is required")
        hit = self.cached(subject_token, provider)
        if hit is not None:
            return hit
        status, body = self._post(subject_token, provider)
        token, fresh_until = self._token(status, body, provider)
        self._remember(subject_token, provider, token, fresh_until)
        return token

    def _post(self, subject_token: str, provider: str) -> tuple[int, bytes]:
        form = {
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": subject_token,
            "subject_token_type": ACCESS_TOKEN_TYPE,
            "requested_token_type": ACCESS_TOKEN_TYPE,
            "audience": provider,
        }
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
        }
        if self.auth_method == "client_secret_basic":
            # RFC 6749 section 2.3.1: id and secret are form-encoded before base64.
            pair = f"{quote(self.client_id, safe='')}:{quote(self._client_secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            form["client_id"] = self.client_id
            form["client_secret"] = self._client_secret
        request = urllib.request.Request(  # noqa: S310 - the scheme is checked in __init__
            self.token_endpoint,
            data=urlencode(form).encode("ascii"),
            headers=headers,
            method="POST",
        )
        try:
            try:
                response = self._opener.open(request, timeout=self.timeout)
            except urllib.error.HTTPError as error:
                response = error  # an error answer (4xx, 5xx) is read like any other
            with response:
                return response.status, response.read(_MAX_RESPONSE_BYTES + 1)
        except _FETCH_ERRORS as error:
            logger.warning("token exchange at %s failed: %s", self.token_endpoint, error)
            raise ExchangeUnavailable("broker unreachable") from None

    def _token(self, status: int, raw: bytes, provider: str) -> tuple[UpstreamToken, float]:
        """The token of a 200 answer (RFC 8693 section 2.2.1) and until when to cache it:
        `refresh_margin` seconds (at most half its lifetime) before it expires, as the broker
        refreshes it; the error of any other answer (section 2.2.2)."""
        body = _json_object(raw)
        if status != 200:
            error = body.get("error") if body is not None else None
            description = body.get("error_description") if body is not None else None
            if status >= 500 or status == 429 or not isinstance(error, str) or not error:
                logger.warning("token exchange at %s: HTTP %d", self.token_endpoint, status)
                raise ExchangeUnavailable(f"HTTP {status}")
            if error == "temporarily_unavailable":
                raise ExchangeUnavailable(error)
            raise ExchangeRefused(
                error, description if isinstance(description, str) else None, status
            )
        if body is None:
            raise ExchangeUnavailable("malformed answer")
        access_token = body.get("access_token")
        token_type = body.get("token_type")
        expires_in = body.get("expires_in")
        scope = body.get("scope")
        upstream = body.get("upstream")
        if (
            not isinstance(access_token, str)
            or not access_token
            or body.get("issued_token_type") != ACCESS_TOKEN_TYPE
            or not isinstance(token_type, str)
            or token_type.lower() != "bearer"
            or (
                expires_in is not None
                and (isinstance(expires_in, bool) or not isinstance(expires_in, int))
            )
            or (scope is not None and not isinstance(scope, str))
            or (upstream is not None and not isinstance(upstream, dict))
        ):
            raise ExchangeUnavailable("malformed answer")
        upstream = upstream or {}
        context = upstream.get("context")
        if upstream.get("provider", provider) != provider or not isinstance(
            context if context is not None else {}, dict
        ):
            raise ExchangeUnavailable("malformed answer")
        now = time.time()
        token = UpstreamToken(
            access_token=access_token,
            expires_at=int(now + expires_in) if expires_in is not None else None,
            scope=tuple(scope.split()) if scope else (),
            context=MappingProxyType(dict(context or {})),
            provider=provider,
        )
        if expires_in is None:
            return token, float("inf")
        return token, now + expires_in - min(self.refresh_margin, expires_in / 2)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _json_object(raw: bytes) -> dict[str, Any] | None:
    if len(raw) > _MAX_RESPONSE_BYTES:
        return None
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None
