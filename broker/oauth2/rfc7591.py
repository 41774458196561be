"""RFC 7591 - OAuth 2.0 Dynamic Client Registration.

Claude, VS Code, Cursor and the MCP SDKs register this way. Section 2 fields are validated here
rather than by Authlib's ``ClientMetadataClaims``, which refuses a registration that lists a grant
type the server does not support; real clients list device-code and jwt-bearer grants they never
use, so unsupported values are dropped and only what the broker supports is granted (section 3.2.1
allows the server to replace requested values). Redirect URIs are strict: https, loopback http, or
a private-use scheme for native clients; never ``javascript:``, ``data:`` or fragments.
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

from ..config import is_loopback_host
from ..crypto import hash_password
from ..db import utcnow
from ..models import AuditEvent, Client

SUPPORTED_GRANT_TYPES = ("authorization_code", "refresh_token")
AUTH_METHODS = ("none", "client_secret_basic", "client_secret_post")
MAX_REDIRECT_URIS = 20
FORBIDDEN_SCHEMES = {"javascript", "data", "vbscript", "file", "about", "blob", "ftp", "ws", "wss"}
PRIVATE_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*$")


def validate_redirect_uri(uri: Any, application_type: str) -> str:
    if not isinstance(uri, str) or not uri or len(uri) > 2048:
        raise InvalidRedirectURIError(
            "Each redirect URI must be a string of at most 2048 characters."
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
    if scheme == "https":
        if not parts.hostname or parts.username or parts.password:
            raise InvalidRedirectURIError("An https redirect URI needs a host and no user info.")
        return uri
    if scheme == "http":
        if not is_loopback_host(parts.hostname) or parts.username or parts.password:
            raise InvalidRedirectURIError("Plain http redirect URIs must be on a loopback host.")
        return uri
    # A private-use scheme (RFC 8252 section 7.1): native clients only, reverse-DNS style or
    # an app name such as cursor:// or vscode://.
    if application_type != "native":
        raise InvalidRedirectURIError("Private-use URI schemes are for native clients.")
    return uri


def _has_control_characters(value: Any, depth: int = 0) -> bool:
    if depth > 8:
        return True
    if isinstance(value, str):
        return not value.isprintable()
    if isinstance(value, dict):
        return any(
            _has_control_characters(k, depth + 1) or _has_control_characters(v, depth + 1)
            for k, v in value.items()
        )
    if isinstance(value, list):
        return any(_has_control_characters(v, depth + 1) for v in value)
    return False


def normalize_client_metadata(data: Any) -> dict[str, Any]:
    """The registration request, validated and reduced to what the broker supports."""
    if not isinstance(data, dict) or not data:
        raise InvalidClientMetadataError("The registration request must be a JSON object.")
    if _has_control_characters(data):
        raise InvalidClientMetadataError("Client metadata must not contain control characters.")
    app_type = data.get("application_type", "native")
    if app_type not in ("native", "web"):
        raise InvalidClientMetadataError("application_type must be native or web.")
    uris = data.get("redirect_uris")
    if not isinstance(uris, list) or not uris:
        raise InvalidRedirectURIError("redirect_uris is required.")
    if len(uris) > MAX_REDIRECT_URIS:
        raise InvalidRedirectURIError("Too many redirect URIs.")
    redirect_uris = list(dict.fromkeys(validate_redirect_uri(u, app_type) for u in uris))

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
    if name is not None and (not isinstance(name, str) or len(name) > 200):
        raise InvalidClientMetadataError("client_name must be a string of at most 200 characters.")
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
    if name:
        metadata["client_name"] = name
    if scope:
        metadata["scope"] = " ".join(scope.split())
    for key in (
        "client_uri",
        "logo_uri",
        "software_id",
        "software_version",
        "tos_uri",
        "policy_uri",
    ):
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
            secret_hash=hash_password(secret) if secret else None,
            client_metadata=client_metadata,
            created_at=now,
            expires_at=now + dt.timedelta(seconds=server.settings.registration_ttl),
        )
        state.session.add(row)
        state.session.add(
            AuditEvent(
                type="register",
                outcome="success",
                client_id=row.client_id,
                address=state.address,
                details={"client_name": row.name, "redirect_uris": row.redirect_uris},
            )
        )
        return row
