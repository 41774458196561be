"""`WWW-Authenticate: Bearer` challenges (RFC 6750 section 3, RFC 9728 section 5.1).

- RFC 6750 section 3: a request without a token gets a challenge without an error code (3.1:
  "SHOULD NOT include an error code"); a bad token gets `error="invalid_token"` with 401; a token
  without a needed scope gets `error="insufficient_scope"` with 403 and MAY name the `scope`.
- RFC 6750 section 3: `scope`, `error` and `error_description` values MUST NOT contain characters
  outside %x20-21 / %x23-5B / %x5D-7E (so never a quote or a backslash); other values are
  quoted-strings (RFC 9110 section 5.6.4), with `"` and `\\` escaped.
- RFC 9728 section 5.1: `resource_metadata` carries the URL of the protected resource metadata;
  the MCP authorization spec makes it the way clients discover the broker, and asks for `scope`
  (the scopes needed) on 401 and 403 alike.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .metadata import validate_scope_tokens

#: The fixed `error_description` of an `invalid_token` challenge: which check failed is for the
#: server's log, not for the client.
INVALID_TOKEN_DESCRIPTION = "The access token is invalid or expired"
INSUFFICIENT_SCOPE_DESCRIPTION = "The access token lacks a required scope"

_NQSCHAR = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")


def _quoted(value: str) -> str:
    if _PRINTABLE.fullmatch(value) is None:
        raise ValueError("challenge parameter values must be printable ASCII")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def bearer_challenge(
    *,
    error: str | None = None,
    error_description: str | None = None,
    scope: Iterable[str] = (),
    resource_metadata: str | None = None,
) -> str:
    """A `Bearer` challenge: error, error_description, resource_metadata, scope; unset ones
    left out."""
    params: list[str] = []
    for name, value in (("error", error), ("error_description", error_description)):
        if value is None:
            continue
        if not value or _NQSCHAR.fullmatch(value) is None:
            raise ValueError(f"{name} has characters RFC 6750 does not allow")
        params.append(f"{name}={_quoted(value)}")
    if resource_metadata is not None:
        params.append(f"resource_metadata={_quoted(resource_metadata)}")
    scopes = validate_scope_tokens(scope)
    if scopes:
        params.append(f"scope={_quoted(' '.join(scopes))}")
    return "Bearer " + ", ".join(params) if params else "Bearer"


def missing_token_challenge(resource_metadata: str, scopes: Iterable[str] = ()) -> str:
    """401 without a token: where the metadata is and what scopes to ask for, no error code."""
    return bearer_challenge(resource_metadata=resource_metadata, scope=scopes)


def invalid_token_challenge(resource_metadata: str, scopes: Iterable[str] = ()) -> str:
    """401 for a token that was presented and refused."""
    return bearer_challenge(
        error="invalid_token",
        error_description=INVALID_TOKEN_DESCRIPTION,
        resource_metadata=resource_metadata,
        scope=scopes,
    )


def insufficient_scope_challenge(resource_metadata: str, scopes: Iterable[str]) -> str:
    """403 for a valid token without a scope the request needs; `scopes` are all those needed."""
    return bearer_challenge(
        error="insufficient_scope",
        error_description=INSUFFICIENT_SCOPE_DESCRIPTION,
        scope=scopes,
        resource_metadata=resource_metadata,
    )
