"""Clients as Authlib sees them, and redirect URI matching.

Redirect URIs match exactly (OAuth 2.1 section 4.1.1, RFC 9700 section 4.1.3), with one exception
(RFC 8252 section 7.3): for a registered loopback URI (``http://127.0.0.1``, ``http://[::1]`` and
``http://localhost``) any port is accepted, scheme, host, path and query still exact.

A URI with user info (``https://app.example.com@evil.example/cb``: RFC 3986 section 3.2.1 reads the
host after the ``@``), with a backslash (``https://evil.example\\@app.example.com/cb``: WHATWG URL
parsers, and so browsers, read ``\\`` as ``/`` and the host as ``evil.example``, while RFC 3986
parsers read user info), or with a character outside printable ASCII (browsers drop tabs and
newlines before parsing) never matches, the loopback rule included: the broker and the browser
could disagree about where it leads (RFC 9700 section 4.1.3).

Client authentication (RFC 6749 section 2.3): HTTP Basic credentials are decoded in one place,
:func:`basic_credentials`, strictly; malformed ones are ``invalid_client`` with 401 (section 5.2),
never a server error. Section 2.3 allows one authentication method per request: a request with
Basic credentials is authenticated by them alone (:func:`client_auth_methods`), never as the
public client its body may also name.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from authlib.oauth2.rfc6749 import ClientMixin
from authlib.oauth2.rfc6749.errors import InvalidClientError

from ..crypto import verify_password
from ..models import Client

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "[::1]", "localhost")
SECRET_METHODS = ("client_secret_basic", "client_secret_post")
_AUTHORITY_END = re.compile(r"[/?#]")
# WHATWG URL "special" schemes: browsers find their authority after any number of slashes.
_SPECIAL_SCHEMES = frozenset({"http", "https", "ws", "wss", "ftp", "file"})


def redirect_uri_problem(uri: str) -> str | None:
    """Why ``uri`` can never be a redirect target (see the module docstring), or ``None``. For
    http(s) the authority is read as browsers read it, after the scheme and any number of
    slashes (``http:evil@host`` is ``http://evil@host`` to them)."""
    if any(not 0x21 <= ord(c) <= 0x7E for c in uri):
        return "a character outside printable ASCII"
    if "\\" in uri:
        return "a backslash"
    scheme, _, rest = uri.partition(":")
    if scheme.lower() in _SPECIAL_SCHEMES:
        rest = "//" + rest.lstrip("/")
    if rest.startswith("//") and "@" in _AUTHORITY_END.split(rest[2:], maxsplit=1)[0]:
        return "user info"
    return None


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
    if redirect_uri_problem(requested) is not None or redirect_uri_problem(registered) is not None:
        return False
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
        if (
            len(uris) == 1
            and not is_loopback_redirect(uris[0])
            and not redirect_uri_problem(uris[0])
        ):
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
        """RFC 6749 section 2.3.1: a client with a secret may send it either way (Basic or in
        the body); a public client only as ``none``."""
        if endpoint == "token":
            registered = self.row.token_endpoint_auth_method
            if registered in SECRET_METHODS:
                return method in SECRET_METHODS
            return method == registered
        return True

    def check_response_type(self, response_type: str) -> bool:
        return response_type in self.row.response_types

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in self.row.grant_types

    def metadata_json(self) -> dict[str, Any]:
        return dict(self.row.client_metadata or {})


# -- client authentication (RFC 6749 section 2.3) --------------------------------------------


def basic_credentials(headers: Any) -> tuple[str, str] | None:
    """The client id and secret of an ``Authorization: Basic`` header (RFC 6749 section 2.3.1:
    each form-urlencoded, then RFC 7617 section 2: base64 of ``id:secret``), or ``None`` when the
    request has no Basic credentials. Raises ``invalid_client`` (401) when they are malformed:
    not base64, not UTF-8, no colon, bad percent-encoding, or an empty id or secret. The only
    place that decodes client credentials from a header."""
    header = headers.get("Authorization") if headers is not None else None
    if not header:
        return None
    scheme, *rest = header.split(None, 1)
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode("".join(rest).strip(), validate=True).decode("utf-8")
        client_id, colon, secret = decoded.partition(":")
        client_id, secret = unquote(client_id, errors="strict"), unquote(secret, errors="strict")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        colon = ""
    if not colon or not client_id or not secret:
        log.info("client authentication refused: malformed HTTP Basic credentials")
        raise InvalidClientError(
            status_code=401, description="The HTTP Basic client credentials are malformed."
        )
    return client_id, secret


def client_auth_methods(request: Any, methods: list[str]) -> list[str]:
    """The methods to try for ``request`` (section 2.3: one method per request). With Basic
    credentials only ``client_secret_basic``: a client id in the body beside them does not make
    the request a public client's, and a failure is 401 (section 5.2). Malformed credentials
    raise ``invalid_client`` here, whatever else the request carries, and so does a
    ``client_id`` parameter naming another client than the credentials (which one asks?)."""
    credentials = basic_credentials(request.headers)
    if credentials is None:
        return list(methods)
    if "client_secret_basic" not in methods:
        raise InvalidClientError(
            status_code=401, description="This endpoint does not accept HTTP Basic credentials."
        )
    payload = getattr(request, "payload", None)
    named = payload.client_id if payload is not None else None
    if named is not None and named != credentials[0]:
        raise InvalidClientError(
            status_code=401,
            description="The client_id parameter names another client than the credentials.",
        )
    return ["client_secret_basic"]


def authenticate_client_secret_basic(
    query_client: Callable[[str], OAuthClient | None], request: Any
) -> OAuthClient | None:
    """Authlib's ``client_secret_basic`` method, reading the header with
    :func:`basic_credentials` (Authlib's own reader lets bytes that are not UTF-8 through)."""
    credentials = basic_credentials(request.headers)
    if credentials is None:
        return None
    client_id, secret = credentials
    client = query_client(client_id)
    if client is None:
        raise InvalidClientError(
            status_code=401, description="The client does not exist on this server."
        )
    return client if client.check_client_secret(secret) else None
