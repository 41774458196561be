"""OAuth 2.0 Protected Resource Metadata (RFC 9728), as an MCP server publishes it.

- RFC 9728 section 1.2: the resource identifier is an http(s) URL that MUST NOT have a fragment
  (and SHOULD NOT have a query; this kit refuses one, so the well-known URL is unambiguous).
- Section 2: `resource` is REQUIRED; `authorization_servers` lists issuer identifiers; here it
  holds the broker's issuer exactly as the broker spells it (clients compare issuers as strings).
- Section 3.1: the document lives at `/.well-known/oauth-protected-resource` inserted between the
  host and the path of the resource identifier. MCP clients also try the bare well-known path, so
  that one is served as well unless the host serves several resources.
- Section 3.3: the `resource` in the document MUST be identical to the identifier the well-known
  URL was built from.
- MCP authorization spec: servers MUST publish this document; `bearer_methods_supported` is
  `["header"]` because tokens in query strings are forbidden (OAuth 2.1 section 5.2).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

WELL_KNOWN_PATH = "/.well-known/oauth-protected-resource"

# RFC 6749 section 3.3: scope-token = 1*NQCHAR.
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")


def validate_scope_tokens(scopes: Iterable[str]) -> tuple[str, ...]:
    """The scopes as a tuple without duplicates; ValueError for anything not a scope-token."""
    result: list[str] = []
    for scope in scopes:
        if not isinstance(scope, str) or _SCOPE_TOKEN.fullmatch(scope) is None:
            raise ValueError(f"not a valid scope token: {scope!r}")
        if scope not in result:
            result.append(scope)
    return tuple(result)


def _check_url(value: str, what: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{what} must be an absolute http(s) URL")
    if "#" in value:
        raise ValueError(f"{what} must not have a fragment")


@dataclass(frozen=True)
class ResourceMetadata:
    """The protected resource metadata of one MCP server.

    `resource` is the server's canonical URI, exactly as the broker's resource configuration and
    the tokens' `aud` spell it, for example `https://mcp.example.com/mcp`.
    """

    resource: str
    authorization_servers: tuple[str, ...]
    scopes_supported: tuple[str, ...] = ()
    resource_name: str | None = None
    resource_documentation: str | None = None
    #: Also serve the document at the bare `/.well-known/oauth-protected-resource`. Turn it off
    #: when one host serves several resources, where the bare path would be ambiguous.
    serve_bare_path: bool = True
    _json: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_url(self.resource, "resource")
        if urlsplit(self.resource).query:
            raise ValueError("resource must not have a query")
        if isinstance(self.authorization_servers, str):
            raise ValueError("authorization_servers is a list of issuer strings")
        servers = tuple(self.authorization_servers)
        if not servers:
            raise ValueError("authorization_servers must name the broker's issuer")
        for issuer in servers:
            _check_url(issuer, "an authorization server")
        scopes = validate_scope_tokens(self.scopes_supported)
        if "offline_access" in scopes:
            # Clients add offline_access themselves when the broker's metadata lists it.
            raise ValueError("an MCP server does not list offline_access in scopes_supported")
        if self.resource_documentation is not None:
            _check_url(self.resource_documentation, "resource_documentation")
        object.__setattr__(self, "authorization_servers", servers)
        object.__setattr__(self, "scopes_supported", scopes)
        object.__setattr__(self, "_json", json.dumps(self.document()).encode())

    @classmethod
    def for_broker(
        cls,
        resource: str,
        issuer: str,
        *,
        scopes_supported: Iterable[str] = (),
        resource_name: str | None = None,
        resource_documentation: str | None = None,
        serve_bare_path: bool = True,
    ) -> ResourceMetadata:
        """The metadata of a resource whose one authorization server is the broker at `issuer`."""
        return cls(
            resource=resource,
            authorization_servers=(issuer,),
            scopes_supported=tuple(scopes_supported),
            resource_name=resource_name,
            resource_documentation=resource_documentation,
            serve_bare_path=serve_bare_path,
        )

    def document(self) -> dict[str, Any]:
        """The JSON document (RFC 9728 section 2)."""
        document: dict[str, Any] = {
            "resource": self.resource,
            "authorization_servers": list(self.authorization_servers),
            "bearer_methods_supported": ["header"],
        }
        if self.scopes_supported:
            document["scopes_supported"] = list(self.scopes_supported)
        if self.resource_name is not None:
            document["resource_name"] = self.resource_name
        if self.resource_documentation is not None:
            document["resource_documentation"] = self.resource_documentation
        return document

    def json_bytes(self) -> bytes:
        """`document()` serialised once."""
        return self._json

    @property
    def metadata_path(self) -> str:
        """The path of the well-known URL (RFC 9728 section 3.1): the suffix before the path."""
        path = urlsplit(self.resource).path
        return WELL_KNOWN_PATH if path in ("", "/") else WELL_KNOWN_PATH + path

    @property
    def metadata_url(self) -> str:
        """The well-known URL, the value of `resource_metadata` in a `WWW-Authenticate`."""
        parts = urlsplit(self.resource)
        return f"{parts.scheme}://{parts.netloc}{self.metadata_path}"

    @property
    def well_known_paths(self) -> tuple[str, ...]:
        """Every path the document is served at: the path-inserted one first."""
        if self.serve_bare_path and self.metadata_path != WELL_KNOWN_PATH:
            return (self.metadata_path, WELL_KNOWN_PATH)
        return (self.metadata_path,)
