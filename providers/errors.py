"""Errors a provider plugin raises.

The broker turns them into standard OAuth errors and log lines; their text never reaches a client
or a page verbatim (upstream text may be attacker-controlled).
"""

from __future__ import annotations


class ProviderError(Exception):
    """Base class of everything a provider raises on purpose."""


class ConfigError(ProviderError):
    """A provider's configuration is invalid; ``problems`` holds one message per problem, each
    starting with the key path relative to the provider (``client_id: required``)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class LoginFailed(ProviderError):
    """The upstream login did not produce an identity: the user cancelled, the upstream answered an
    error, a check (state, nonce, signature) failed. ``reason`` is a short fixed code for the audit
    log; ``detail`` is for the operator's log only (what was asked, where, why); ``message`` is an
    optional sentence for the person signing in, written by the provider's author (never upstream
    text)."""

    def __init__(self, reason: str, detail: str = "", *, message: str | None = None) -> None:
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail
        self.message = message


class AccessDenied(LoginFailed):
    """The upstream identity is valid but not allowed by the provider's own restrictions
    (organisation, hosted domain, realm role...)."""


class UpstreamUnavailable(ProviderError):
    """The upstream could not be reached or answered a server error: temporary, so the broker
    answers ``temporarily_unavailable`` and never ``invalid_grant``."""
