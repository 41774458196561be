"""RFC 8414 - OAuth 2.0 Authorization Server Metadata.

Section 2 lists the fields; section 3.3: ``issuer`` MUST be identical to the issuer the metadata
was requested for. The same document is served at the OpenID discovery name, and at the
path-inserted well-known URLs when the issuer has a path. ``scopes_supported`` deliberately does
not list every scope of every resource (scope minimisation): clients learn a resource's scopes
from its protected resource metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from authlib.oauth2.rfc8414 import AuthorizationServerMetadata
from authlib.oauth2.rfc9207 import AuthorizationServerMetadata as IssMetadata

from ..config import Settings
from .server import BrokerAuthorizationServer

WELL_KNOWN_NAMES = ("oauth-authorization-server", "openid-configuration")


def server_metadata(settings: Settings, grant_types: Sequence[str] | None = None) -> dict[str, Any]:
    """The metadata document; ``grant_types`` are those of the running server
    (:meth:`BrokerAuthorizationServer.grant_types_supported`), by default the grants every
    broker server registers."""
    if grant_types is None:
        grant_types = [grant.GRANT_TYPE for grant in BrokerAuthorizationServer.TOKEN_GRANTS]
    issuer = settings.issuer
    metadata = AuthorizationServerMetadata(
        {
            "issuer": issuer,
            "authorization_endpoint": f"{issuer}/authorize",
            "token_endpoint": f"{issuer}/token",
            "revocation_endpoint": f"{issuer}/revoke",
            "introspection_endpoint": f"{issuer}/introspect",
            "jwks_uri": f"{issuer}/jwks.json",
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": list(grant_types),
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": [
                "none",
                "client_secret_basic",
                "client_secret_post",
            ],
            "revocation_endpoint_auth_methods_supported": [
                "none",
                "client_secret_basic",
                "client_secret_post",
            ],
            "introspection_endpoint_auth_methods_supported": [
                "client_secret_basic",
                "client_secret_post",
            ],
            "scopes_supported": ["offline_access"],
            "authorization_response_iss_parameter_supported": True,
            "client_id_metadata_document_supported": settings.client_metadata_documents.enabled,
        }
    )
    if settings.registration_enabled:  # RFC 8414 section 2: OPTIONAL; absent when switched off
        metadata["registration_endpoint"] = f"{issuer}/register"
    metadata.validate(metadata_classes=[IssMetadata])
    return dict(metadata)


def well_known_paths(issuer: str) -> list[str]:
    """Where the metadata is served: ``/.well-known/<name>`` and, when the issuer has a path,
    the RFC 8414 section 3.1 path-inserted form and OpenID's appended form."""
    path = urlsplit(issuer).path.rstrip("/")
    paths = []
    for name in WELL_KNOWN_NAMES:
        paths.append(f"/.well-known/{name}")
        if path:
            paths.append(f"/.well-known/{name}{path}")
            paths.append(f"{path}/.well-known/{name}")
    return paths
