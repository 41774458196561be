"""RFC 7591 - OAuth 2.0 Dynamic Client Registration.

Claude, VS Code, Cursor and the MCP SDKs register this way. Section 2 fields are validated here
rather than by Authlib's ``ClientMetadataClaims``, which refuses a registration that lists a grant
type the server does not support; real clients list device-code and jwt-bearer grants they never
use, so unsupported values are dropped and only what the broker supports is granted (section 3.2.1
allows the server to replace requested values). Section 3.2.2: a bad redirect URI is
``invalid_redirect_uri``, any other bad field ``invalid_client_metadata``, and nothing is stored.

- Redirect URIs (RFC 9700 section 4.1.3, RFC 8252 sections 7 and 8.4): https, loopback http, or a
  private-use scheme for native clients; never ``javascript:``, ``data:``, fragments, user info, a
  backslash or a character outside printable ASCII (:func:`.clients.redirect_uri_problem`: such a
  URI is read differently by different parsers and never matches a registered one anyway).
- Private-use schemes (RFC 8252 section 8.4, repeated by OAuth 2.1 section 2.3.1): "authorization
  servers SHOULD enforce the requirement in Section 7.1 that clients use schemes that are reverse
  domain name based. At a minimum, any private-use URI scheme that doesn't contain a period
  character (".") SHOULD be rejected." The broker enforces the reverse-domain form
  (``com.example.app:/cb``) with one documented exception the SHOULD allows: the single-label
  schemes of deployed MCP clients that register nothing else (:data:`KNOWN_CLIENT_SCHEMES`:
  Cursor's ``cursor://``, VS Code's ``vscode://``); refusing them would fail their whole
  registration. Any other single-label scheme (``myapp://``) is refused.
- ``client_uri``, ``logo_uri``, ``policy_uri`` and ``tos_uri`` (section 2) are shown to users:
  https URLs only. A blank ``client_name`` is refused; an absent one is shown as "Unnamed client".
- Generated client secrets are high-entropy and stored with
  :func:`broker.crypto.hash_client_secret` (a fast salted HMAC checked in constant time).
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
import time
from typing import Any
from urllib.parse import urlsplit

from authlib.oauth2.rfc7591 import ClientRegistrationEndpoint
from authlib.oauth2.rfc7591.errors import InvalidClientMetadataError, InvalidRedirectURIError

from .. import audit
from ..config import is_loopback_host
from ..crypto import hash_client_secret
from ..db import utcnow
from ..models import Client
from .clients import redirect_uri_problem

SUPPORTED_GRANT_TYPES = ("authorization_code", "refresh_token")
AUTH_METHODS = ("none", "client_secret_basic", "client_secret_post")
MAX_REDIRECT_URIS = 20
FORBIDDEN_SCHEMES = {"javascript", "data", "vbscript", "file", "about", "blob", "ftp", "ws", "wss"}
PRIVATE_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*$")
# RFC 8252 section 7.1: a domain name under the app's control, in reverse order.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
REVERSE_DOMAIN_SCHEME = re.compile(rf"^[a-z](?:[a-z0-9-]{{0,61}}[a-z0-9])?(?:\.{_LABEL})+$")
KNOWN_CLIENT_SCHEMES = frozenset({"cursor", "vscode", "vscode-insiders"})
"""Single-label private-use schemes of deployed MCP clients (Cursor; VS Code and its Insiders
build), accepted although they are not reverse-domain based (RFC 8252 section 8.4 says SHOULD)."""
HTTPS_URL_FIELDS = ("client_uri", "logo_uri", "policy_uri", "tos_uri")
MAX_NESTING = 8


def validate_redirect_uri(uri: Any, application_type: str) -> str:
    """``uri`` if it may be registered (see the module docstring), else
    ``invalid_redirect_uri``."""
    if not isinstance(uri, str) or not uri or len(uri) > 2048:
        raise InvalidRedirectURIError(
            "Each redirect URI must be a string of at most 2048 characters."
        )
    if redirect_uri_problem(uri) is not None:
        raise InvalidRedirectURIError(
            "A redirect URI contains user info, a backslash, or a character outside "
            "printable ASCII."
        )
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise InvalidRedirectURIError("A redirect URI is not a valid URI.") from None
    scheme = parts.scheme.lower()
    if not scheme or scheme in FORBIDDEN_SCHEMES or not PRIVATE_SCHEME.match(scheme):
        raise InvalidRedirectURIError("A redirect URI uses a forbidden scheme.")
    if parts.fragment or "#" in uri:
        raise InvalidRedirectURIError("Redirect URIs must not contain a fragment.")
    if scheme in ("https", "http"):
        # A host name never contains "%": an encoded "@" or zone id is read differently by
        # different parsers.
        if not parts.hostname or "%" in parts.netloc:
            raise InvalidRedirectURIError("An http(s) redirect URI needs a plain host name.")
        if scheme == "http" and not is_loopback_host(parts.hostname):
            raise InvalidRedirectURIError("Plain http redirect URIs must be on a loopback host.")
        return uri
    # A private-use scheme (RFC 8252 section 7.1): native clients only, reverse-domain based.
    if application_type != "native":
        raise InvalidRedirectURIError("Private-use URI schemes are for native clients.")
    if not REVERSE_DOMAIN_SCHEME.match(scheme) and scheme not in KNOWN_CLIENT_SCHEMES:
        raise InvalidRedirectURIError(
            "A private-use URI scheme must be a reverse domain name, such as com.example.app "
            "(RFC 8252 section 7.1)."
        )
    return uri


def _https_url(key: str, value: Any) -> str | None:
    """A ``client_uri``-like field: an https URL with a host, or absent (``None`` or "")."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and len(value) <= 2048 and redirect_uri_problem(value) is None:
        try:
            parts = urlsplit(value)
            if parts.scheme.lower() == "https" and parts.hostname:
                return value
        except ValueError:
            pass
    raise InvalidClientMetadataError(f"{key} must be an https URL with a host.")


def _metadata_problem(value: Any, depth: int = 0) -> str | None:
    if depth > MAX_NESTING:
        return "Client metadata is nested too deeply."
    if isinstance(value, str):
        return (
            None if value.isprintable() else "Client metadata must not contain control characters."
        )
    if isinstance(value, dict):
        items: list[Any] = [*value.keys(), *value.values()]
    elif isinstance(value, list):
        items = value
    else:
        return None
    for item in items:
        if problem := _metadata_problem(item, depth + 1):
            return problem
    return None


def normalize_client_metadata(data: Any) -> dict[str, Any]:
    """The registration request, validated and reduced to what the broker supports."""
    if not isinstance(data, dict) or not data:
        raise InvalidClientMetadataError("The registration request must be a JSON object.")
    app_type = data.get("application_type", "native")
    if app_type not in ("native", "web"):
        raise InvalidClientMetadataError("application_type must be native or web.")
    uris = data.get("redirect_uris")
    if not isinstance(uris, list) or not uris:
        raise InvalidRedirectURIError("redirect_uris is required.")
    if len(uris) > MAX_REDIRECT_URIS:
        raise InvalidRedirectURIError("Too many redirect URIs.")
    redirect_uris = list(dict.fromkeys(validate_redirect_uri(u, app_type) for u in uris))
    if problem := _metadata_problem(data):  # after the redirect URIs: their own error first
        raise InvalidClientMetadataError(problem)

    # RFC 7591 section 2 defaults to client_secret_basic; MCP clients that omit the field are
    # public clients that would not use a secret, so the broker answers "none" explicitly.
    method = data.get("token_endpoint_auth_method", "none")
    if method not in AUTH_METHODS:
        raise InvalidClientMetadataError("Unsupported token_endpoint_auth_method.")

    requested_grants = data.get("grant_types", ["authorization_code"])
    if not isinstance(requested_grants, list) or not all(
        isinstance(g, str) for g in requested_grants
    ):
        raise InvalidClientMetadataError("grant_types must be a list of strings.")
    grant_types = [g for g in SUPPORTED_GRANT_TYPES if g in requested_grants]
    if "authorization_code" not in grant_types:
        raise InvalidClientMetadataError("The authorization_code grant is required.")
    if "refresh_token" not in grant_types:
        # Every MCP client benefits from refresh; rotation keeps it safe for public clients.
        grant_types.append("refresh_token")

    response_types = data.get("response_types", ["code"])
    if not isinstance(response_types, list) or "code" not in response_types:
        raise InvalidClientMetadataError("response_types must include code.")

    name = data.get("client_name")
    if name is not None and (not isinstance(name, str) or len(name) > 200 or not name.strip()):
        raise InvalidClientMetadataError(
            "client_name must be a non-blank string of at most 200 characters."
        )
    scope = data.get("scope")
    if scope is not None and not isinstance(scope, str):
        raise InvalidClientMetadataError("scope must be a string.")

    metadata: dict[str, Any] = {
        "redirect_uris": redirect_uris,
        "token_endpoint_auth_method": method,
        "grant_types": grant_types,
        "response_types": ["code"],
        "application_type": app_type,
    }
    if name is not None:
        metadata["client_name"] = name.strip()
    if scope:
        metadata["scope"] = " ".join(scope.split())
    for key in HTTPS_URL_FIELDS:
        if (url := _https_url(key, data.get(key))) is not None:
            metadata[key] = url
    for key in ("software_id", "software_version"):  # informational: kept when plain strings
        value = data.get(key)
        if isinstance(value, str) and len(value) <= 2048:
            metadata[key] = value
    return metadata


class ClientRegistration(ClientRegistrationEndpoint):  # type: ignore[misc]
    """Open registration (MCP clients register anonymously); unused registrations expire."""

    def authenticate_token(self, request: Any) -> bool:
        return True

    def extract_client_metadata(self, request: Any) -> dict[str, Any]:
        return normalize_client_metadata(request.payload.data)

    def generate_client_id(self, request: Any) -> str:
        return "mcp_" + secrets.token_urlsafe(24)

    def generate_client_info(self, request: Any) -> dict[str, Any]:
        info: dict[str, Any] = {
            "client_id": self.generate_client_id(request),
            "client_id_issued_at": int(time.time()),
        }
        if request.payload.data.get("token_endpoint_auth_method", "none") != "none":
            info["client_secret"] = secrets.token_urlsafe(32)
            info["client_secret_expires_at"] = 0
        return info

    def get_server_metadata(self) -> dict[str, Any]:
        return {}

    def save_client(
        self, client_info: dict[str, Any], client_metadata: dict[str, Any], request: Any
    ) -> Client:
        server = self.server
        state = server.state()
        now = utcnow()
        secret = client_info.get("client_secret")
        row = Client(
            client_id=client_info["client_id"],
            kind="dcr",
            name=client_metadata.get("client_name") or "Unnamed client",
            redirect_uris=client_metadata["redirect_uris"],
            grant_types=client_metadata["grant_types"],
            response_types=client_metadata["response_types"],
            token_endpoint_auth_method=client_metadata["token_endpoint_auth_method"],
            application_type=client_metadata["application_type"],
            scope=client_metadata.get("scope"),
            secret_hash=hash_client_secret(secret) if secret else None,
            client_metadata=client_metadata,
            created_at=now,
            expires_at=now + dt.timedelta(seconds=server.settings.registration_ttl),
        )
        state.session.add(row)
        audit.record(
            state.session,
            "register",
            "success",
            client_id=row.client_id,
            address=state.address,
            details={"client_name": row.name, "redirect_uris": row.redirect_uris},
        )
        return row
