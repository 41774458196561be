"""OAuth errors Authlib does not define, with short fixed descriptions."""

from __future__ import annotations

from authlib.oauth2 import OAuth2Error


class InvalidTargetError(OAuth2Error):  # type: ignore[misc]
    """RFC 8707 section 2: the requested resource is invalid, unknown or malformed."""

    error = "invalid_target"
    status_code = 400


class TemporarilyUnavailableError(OAuth2Error):  # type: ignore[misc]
    """RFC 6749 section 4.1.2.1; at the token endpoint answered with 503 so that clients keep their
    credentials (they throw them away on ``invalid_grant``)."""

    error = "temporarily_unavailable"
    status_code = 503


class ServerError(OAuth2Error):  # type: ignore[misc]
    error = "server_error"
    status_code = 500


class TooManyRequestsError(OAuth2Error):  # type: ignore[misc]
    """RFC 6585 section 4: 429 with ``Retry-After``; ``too_many_requests`` as
    :data:`broker.ratelimit.TOO_MANY_REQUESTS` explains (OAuth has no code of its own)."""

    error = "too_many_requests"
    status_code = 429

    def __init__(self, description: str, retry_after: int) -> None:
        super().__init__(description=description)
        self.retry_after = retry_after

    def get_headers(self) -> list[tuple[str, str]]:
        headers: list[tuple[str, str]] = super().get_headers()
        return [*headers, ("Retry-After", str(self.retry_after))]
