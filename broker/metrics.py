"""Prometheus metrics of the broker (``/metrics``, docs/metrics.md).

Every metric is named ``broker_*`` and carries labels of bounded cardinality only: provider
names, resource URIs, grant types, Flask endpoint names and error or outcome codes, each from
a fixed set or from the configuration (anything else is ``other``). Never a user, an address or
a client id: a dynamic registration or a metadata document would make one series per client.

Under gunicorn with ``broker.gunicorn_conf`` every worker writes its values to files in
``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode, chosen when the library is
imported) and a scrape sums them with a ``MultiProcessCollector``. Without that variable (the
development server, tests) the process's default registry is used.

The recording functions below are what the rest of the broker calls, one line each.
"""

from __future__ import annotations

import os
import re
import time
from typing import TYPE_CHECKING, Any

import httpx
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from providers.errors import AccessDenied, LoginFailed, ProviderError, UpstreamUnavailable

if TYPE_CHECKING:
    from .config import ResourceSettings

__all__ = [
    "CONTENT_TYPE_LATEST",
    "MULTIPROC_ENV",
    "UpstreamClient",
    "client_metadata_fetch",
    "exposition",
    "multiprocess_registry",
    "oauth_error",
    "registration",
    "request_finished",
    "sign_in",
    "sign_in_finished",
    "token_issued",
]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""Set by ``broker.gunicorn_conf`` in the master before any worker is forked."""

PROVIDER_EXTENSION = "provider"
"""The httpx request extension ``providers._http.UpstreamHTTP`` tags each upstream request with:
the configured provider name (the provider package never imports the broker)."""

OTHER = "other"

SIGN_IN_OUTCOMES = frozenset(
    {
        "success",  # signed in, and a code went back to the client
        "denied",  # the broker's rules, or the provider's own restrictions, refused the identity
        "cancelled",  # the user said no at the provider
        "failed",  # a wrong password, or a provider answer that could not be verified
        "unavailable",  # the provider could not be reached, or answered a server error
        "error",  # any other provider error
        "throttled",  # the login form refused more attempts (login throttle)
    }
)

GRANT_TYPES = frozenset(
    {
        "authorization_code",
        "refresh_token",
        "client_credentials",
        "urn:ietf:params:oauth:grant-type:token-exchange",
    }
)

OAUTH_ERRORS = frozenset(
    {
        # RFC 6749 sections 4.1.2.1 and 5.2
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "unsupported_response_type",
        "invalid_scope",
        "access_denied",
        "server_error",
        "temporarily_unavailable",
        # RFC 7591 section 3.2.2
        "invalid_redirect_uri",
        "invalid_client_metadata",
        "invalid_software_statement",
        "unapproved_software_statement",
        # RFC 7009 section 2.2.1, RFC 6750 section 3.1, RFC 8707 section 2
        "unsupported_token_type",
        "invalid_token",
        "insufficient_scope",
        "invalid_target",
        # OpenID Connect Core section 3.1.2.6 (prompt=none)
        "login_required",
        "consent_required",
        "interaction_required",
        "account_selection_required",
        # the broker's own: RFC 6585 rate limits, an endpoint switched off
        "too_many_requests",
        "not_found",
    }
)

_CODE = re.compile(r"^[a-z][a-z0-9_]{0,47}$")

SIGN_INS = Counter(
    "broker_sign_ins",
    "Sign-ins at a provider (the upstream leg or the login form), by how they ended.",
    ["provider", "outcome"],
)
TOKENS_ISSUED = Counter(
    "broker_tokens_issued",
    "Tokens issued by the token endpoint, by grant type and resource.",
    ["grant_type", "resource"],
)
OAUTH_ERROR_RESPONSES = Counter(
    "broker_oauth_errors",
    "Requests refused with an OAuth error (a JSON error body or an error redirect), by Flask "
    "endpoint and error code.",
    ["endpoint", "error"],
)
REGISTRATIONS = Counter(
    "broker_registrations",
    "Dynamic client registrations (POST /register), by outcome: success or the error code.",
    ["outcome"],
)
CLIENT_METADATA_FETCHES = Counter(
    "broker_client_metadata_fetches",
    "Fetches of client ID metadata documents, by outcome: success or the refusal reason.",
    ["outcome"],
)
REQUEST_DURATION = Histogram(
    "broker_request_duration_seconds",
    "Time to answer a request, by Flask endpoint (none: no route matched).",
    ["endpoint"],
)
UPSTREAM_DURATION = Histogram(
    "broker_upstream_request_duration_seconds",
    "Time of a back-channel request to an upstream provider, by provider and outcome "
    "(answered: any HTTP status; failed: no answer, such as a timeout or a refused connection).",
    ["provider", "outcome"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)


def _code(value: object, known: frozenset[str]) -> str:
    return value if isinstance(value, str) and value in known else OTHER


# -- recording (one line at each call site) ---------------------------------------------------


def sign_in(provider: str, outcome: str) -> None:
    """A sign-in through ``provider`` (a configured name) ended with ``outcome``
    (one of :data:`SIGN_IN_OUTCOMES`)."""
    assert outcome in SIGN_IN_OUTCOMES, outcome
    SIGN_INS.labels(provider, outcome).inc()


def sign_in_finished(provider: str, answer: object, outcome: object) -> None:
    """The end of a sign-in: the provider's ``answer`` (a ``LoginResult`` or the
    :class:`ProviderError` it raised) and the flow's ``outcome`` (a redirect to the client, a
    string, or the refusal page's ``Denied``)."""
    if isinstance(answer, AccessDenied):
        # The user declining at the upstream is the provider's upstream_denied.
        label = "cancelled" if answer.reason == "upstream_denied" else "denied"
    elif isinstance(answer, LoginFailed):
        label = "failed"
    elif isinstance(answer, UpstreamUnavailable):
        label = "unavailable"
    elif isinstance(answer, ProviderError):
        label = "error"
    else:
        label = "success" if isinstance(outcome, str) else "denied"
    sign_in(provider, label)


def token_issued(grant_type: str, resource: ResourceSettings | None) -> None:
    """The token endpoint issued a token of ``grant_type`` for ``resource`` (the configured
    resource, or ``None``: labelled ``other``)."""
    TOKENS_ISSUED.labels(
        _code(grant_type, GRANT_TYPES), resource.uri if resource is not None else OTHER
    ).inc()


def oauth_error(endpoint: str | None, error: object) -> None:
    """A response carried the OAuth ``error`` code (anything not in :data:`OAUTH_ERRORS` is
    ``other``)."""
    OAUTH_ERROR_RESPONSES.labels(endpoint or "none", _code(error, OAUTH_ERRORS)).inc()


def registration(outcome: object) -> None:
    """``POST /register`` answered: ``success``, or its OAuth error code."""
    REGISTRATIONS.labels("success" if outcome == "success" else _code(outcome, OAUTH_ERRORS)).inc()


def client_metadata_fetch(outcome: str) -> None:
    """A metadata document was fetched: ``success``, or the refusal reason (one of
    ``broker.oauth2.cimd.REASONS``)."""
    CLIENT_METADATA_FETCHES.labels(outcome if _CODE.match(outcome) else OTHER).inc()


def request_finished(endpoint: str | None, seconds: float) -> None:
    REQUEST_DURATION.labels(endpoint or "none").observe(seconds)


class UpstreamClient(httpx.Client):
    """The broker's HTTP client for the providers: an :class:`httpx.Client` (with its proxy and
    certificate settings from the environment) that times every request a provider tagged with
    its name (:data:`PROVIDER_EXTENSION`), answered or not, body included."""

    def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        provider = request.extensions.get(PROVIDER_EXTENSION)
        if not isinstance(provider, str):
            return super().send(request, **kwargs)
        started = time.perf_counter()
        outcome = "failed"
        try:
            response = super().send(request, **kwargs)
            outcome = "answered"
            return response
        finally:
            UPSTREAM_DURATION.labels(provider, outcome).observe(time.perf_counter() - started)


# -- exposition --------------------------------------------------------------------------------


def multiprocess_registry() -> CollectorRegistry:
    """A registry that sums the files of every worker, live or dead, in
    ``PROMETHEUS_MULTIPROC_DIR`` (made per scrape, as prometheus_client advises)."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def exposition() -> bytes:
    """Every metric in the Prometheus text format (:data:`CONTENT_TYPE_LATEST`): summed over the
    gunicorn workers in multiprocess mode, else this process's."""
    if os.environ.get(MULTIPROC_ENV):
        return generate_latest(multiprocess_registry())
    return generate_latest(REGISTRY)
