"""Clients as Authlib sees them, and redirect URI matching.

Redirect URIs match exactly (OAuth 2.1 section 4.1.1, RFC 9700 section 4.1.3), with one exception
(RFC 8252 section 7.3): for a registered loopback URI (``http://127.0.0.1``, ``http://[::1]`` and
``http://localhost``) any port is accepted, scheme, host, path and query still exact.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from authlib.oauth2.rfc6749 import ClientMixin

from ..crypto import verify_password
from ..models import Client

LOOPBACK_HOSTS = ("127.0.0.1", "[::1]", "localhost")


def _split(uri: str) -> tuple[str, str, int | None, str, str, str] | None:
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError:
        return None
    host = parts.netloc.rsplit("@", 1)[-1]
    host = host[: host.index("]") + 1] if host.startswith("[") else host.split(":", 1)[0]
    return parts.scheme, host.lower(), port, parts.path, parts.query, parts.fragment


def is_loopback_redirect(uri: str) -> bool:
    parts = _split(uri)
    return parts is not None and parts[0] == "http" and parts[1] in LOOPBACK_HOSTS


def redirect_uri_matches(registered: str, requested: str) -> bool:
    if registered == requested:
        return True
    reg, req = _split(registered), _split(requested)
    if reg is None or req is None or not is_loopback_redirect(registered):
        return False
    # Any port on loopback; everything else exact. localhost and 127.0.0.1 stay distinct.
    # A registered host-only URI ("http://127.0.0.1") also matches the path "/" the MCP SDK adds.
    reg_path = reg[3] or "/"
    req_path = req[3] or "/"
    return (reg[0], reg[1], reg_path, reg[4]) == (req[0], req[1], req_path, req[4]) and not req[5]


def redirect_digest(uris: list[str]) -> str:
    return hashlib.sha256(json.dumps(sorted(uris)).encode()).hexdigest()


@dataclass
class OAuthClient(ClientMixin):  # type: ignore[misc]
    """A :class:`Client` row wrapped for Authlib."""

    row: Client

    @property
    def client_id(self) -> str:
        return self.row.client_id

    @property
    def name(self) -> str:
        return self.row.name

    @property
    def is_public(self) -> bool:
        return self.row.token_endpoint_auth_method == "none"

    def get_client_id(self) -> str:
        return self.row.client_id

    def get_default_redirect_uri(self) -> str | None:
        # OAuth 2.1 section 2.3.1: a client with one registered URI may omit redirect_uri.
        uris = self.row.redirect_uris
        if len(uris) == 1 and not is_loopback_redirect(uris[0]):
            return uris[0]
        return None

    def get_allowed_scope(self, scope: str | None) -> str:
        # Which scopes are granted is decided by policy after sign-in; keep what was asked.
        return " ".join(dict.fromkeys((scope or "").split()))

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return any(redirect_uri_matches(r, redirect_uri) for r in self.row.redirect_uris)

    def check_client_secret(self, client_secret: str) -> bool:
        if not self.row.secret_hash:
            return False
        return verify_password(self.row.secret_hash, client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        if endpoint == "token":
            return method == self.row.token_endpoint_auth_method
        return True

    def check_response_type(self, response_type: str) -> bool:
        return response_type in self.row.response_types

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in self.row.grant_types

    def metadata_json(self) -> dict[str, Any]:
        return dict(self.row.client_metadata or {})
