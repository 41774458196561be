"""RFC 9207 - OAuth 2.0 Authorization Server Issuer Identification.

Section 2: the ``iss`` parameter is added to every authorization response, errors included.
"""

from __future__ import annotations

from authlib.oauth2.rfc9207 import IssuerParameter as _IssuerParameter


class IssuerParameter(_IssuerParameter):  # type: ignore[misc]
    def __init__(self, issuer: str) -> None:
        self._issuer = issuer

    def get_issuer(self) -> str:
        return self._issuer
