"""RFC 6749 grants as OAuth 2.1 keeps them: authorization code (with PKCE) and refresh token.

Section 4.1.2 / OAuth 2.1 section 4.1.3: codes are single use and short-lived; a code used twice
revokes what it produced. OAuth 2.1 section 4.3.1: refresh tokens of public clients rotate on
every use. Reuse of a rotated token after the grace window revokes the whole grant (RFC 9700
section 4.14.2); within the window the same successor is handed out again, because real clients
refresh twice in parallel.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from authlib.oauth2.rfc6749 import grants
from authlib.oauth2.rfc6749.errors import InvalidGrantError, InvalidRequestError
from sqlalchemy import select, update

from providers.contract import Identity as UpstreamIdentity

from .. import policy
from ..crypto import token_hash
from ..db import rows_affected, utcnow
from ..models import AuthorizationCode, Grant, Identity, RefreshToken, User
from .errors import InvalidTargetError
from .rfc8707 import resolve_resource

CLIENT_AUTH_METHODS = ["none", "client_secret_basic", "client_secret_post"]


@dataclass
class GrantUser:
    """The resource owner as Authlib passes it around: the grant a token belongs to."""

    grant: Grant

    def get_user_id(self) -> str:
        return self.grant.user_id


@dataclass
class CodeCredential:
    row: AuthorizationCode

    @property
    def code_challenge(self) -> str:
        return self.row.code_challenge

    @property
    def code_challenge_method(self) -> str:
        return self.row.code_challenge_method

    def get_redirect_uri(self) -> str:
        return self.row.redirect_uri

    def get_scope(self) -> str:
        return self.row.scope


@dataclass
class RefreshCredential:
    row: RefreshToken
    grant: Grant
    grace_successor: str | None = (
        None  # set when this is a parallel refresh inside the grace window
    )
    # The scopes the user is entitled to now (the grant's, narrowed by the current rules).
    entitled: list[str] | None = None

    def check_client(self, client: Any) -> bool:
        return bool(self.grant.client_id == client.get_client_id())

    def get_scope(self) -> str:
        return self.row.scope


def _live_grant(session: Any, grant_id: str) -> Grant | None:
    """The grant, if neither it is revoked nor its user disabled (one query)."""
    grant: Grant | None = session.scalars(
        select(Grant)
        .join(User, User.id == Grant.user_id)
        .where(Grant.id == grant_id, Grant.revoked_at.is_(None), User.disabled_at.is_(None))
    ).first()
    return grant


class AuthorizationCodeGrant(grants.AuthorizationCodeGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = CLIENT_AUTH_METHODS
    AUTHORIZATION_CODE_LENGTH = 43

    @staticmethod
    def validate_authorization_redirect_uri(request: Any, client: Any) -> str:
        """RFC 6749 section 3.1.2.4: an unregistered redirect URI is an error shown to the user,
        never a redirect. The description is fixed: a request value never goes into an
        ``error_description`` (section 5.2 allows only printable ASCII there, and the value is
        the attacker's)."""
        redirect_uri = request.payload.redirect_uri
        if redirect_uri:
            if not client.check_redirect_uri(redirect_uri):
                raise InvalidRequestError("The redirect URI is not registered for this client.")
            return str(redirect_uri)
        default = client.get_default_redirect_uri()
        if not default:
            raise InvalidRequestError("The redirect_uri parameter is missing.")
        return str(default)

    def validate_authorization_request(self) -> str:
        redirect_uri: str = super().validate_authorization_request()
        request = self.request
        # RFC 8707 section 2: an unknown resource is invalid_target, sent back to the client.
        values = request.payload.datalist.get("resource", [])
        request.resource = resolve_resource(
            self.server.settings, values, redirect_uri=redirect_uri, state=request.payload.state
        )
        request.validated_redirect_uri = redirect_uri
        return redirect_uri

    def save_authorization_code(self, code: str, request: Any) -> None:
        state = self.server.state()
        grant_user: GrantUser = request.user
        data = request.payload.data
        now = utcnow()
        state.session.add(
            AuthorizationCode(
                code_hash=token_hash(code),
                grant_id=grant_user.grant.id,
                client_id=request.client.get_client_id(),
                redirect_uri=request.payload.redirect_uri or "",
                scope=grant_user.grant.scope,
                resource=grant_user.grant.resource,
                code_challenge=data["code_challenge"],
                code_challenge_method=data.get("code_challenge_method", "S256"),
                created_at=now,
                expires_at=now + dt.timedelta(seconds=self.server.settings.tokens.code_ttl),
            )
        )

    def query_authorization_code(self, code: str, client: Any) -> CodeCredential | None:
        state = self.server.state()
        session = state.session
        digest = token_hash(code)
        now = utcnow()
        # The conditional update decides races between workers: exactly one redemption wins.
        won = rows_affected(
            session,
            update(AuthorizationCode)
            .where(
                AuthorizationCode.code_hash == digest,
                AuthorizationCode.client_id == client.get_client_id(),
                AuthorizationCode.used_at.is_(None),
                AuthorizationCode.expires_at > now,
            )
            .values(used_at=now),
        )
        row = session.get(AuthorizationCode, digest)
        if not won:
            if (
                row is not None
                and row.used_at is not None
                and row.client_id == client.get_client_id()
            ):
                state.revoke_grant(row.grant_id, "code_replay")
            return None
        assert row is not None
        return CodeCredential(row)

    def validate_token_request(self) -> None:
        super().validate_token_request()
        code: CodeCredential = self.request.authorization_code
        _check_token_resource(self.request, code.row.resource)

    def delete_authorization_code(self, authorization_code: CodeCredential) -> None:
        """Nothing to do: the code was marked used atomically when it was redeemed."""

    def authenticate_user(self, authorization_code: CodeCredential) -> GrantUser | None:
        grant = _live_grant(self.server.state().session, authorization_code.row.grant_id)
        return GrantUser(grant) if grant is not None else None


def _check_token_resource(request: Any, resource: str) -> None:
    """RFC 8707 section 2.2: a ``resource`` at the token endpoint must be the one the grant is for
    (one grant, one audience); a refresh may narrow scopes, never widen the audience."""
    values = request.payload.datalist.get("resource", [])
    if not values:
        return
    if len(values) > 1 or values[0].rstrip("/") != resource.rstrip("/"):
        raise InvalidTargetError("The resource does not match the authorization grant.")


class RefreshTokenGrant(grants.RefreshTokenGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = CLIENT_AUTH_METHODS
    INCLUDE_NEW_REFRESH_TOKEN = True

    def authenticate_refresh_token(self, refresh_token: str) -> RefreshCredential | None:
        state = self.server.state()
        session = state.session
        settings = self.server.settings
        digest = token_hash(refresh_token)
        now = utcnow()
        row = session.get(RefreshToken, digest)
        if row is None:
            return None
        grant = _live_grant(session, row.grant_id)
        if grant is None or row.expires_at <= now:
            return None
        if row.used_at is None:
            if row.idle_expires_at <= now:
                return None
            won = rows_affected(
                session,
                update(RefreshToken)
                .where(RefreshToken.token_hash == digest, RefreshToken.used_at.is_(None))
                .values(used_at=now),
            )
            if won:
                return RefreshCredential(row, grant)
            session.refresh(row)  # another worker rotated it a moment ago: fall through to grace
        assert row.used_at is not None
        grace = dt.timedelta(seconds=settings.tokens.refresh_reuse_grace)
        if now - row.used_at <= grace and row.successor_sealed and row.successor_hash:
            successor = session.get(RefreshToken, row.successor_hash)
            if successor is not None and successor.used_at is None:
                plaintext = self.server.sealer.open_text(
                    row.successor_sealed, successor_aad(row.token_hash)
                )
                return RefreshCredential(row, grant, grace_successor=plaintext)
        state.revoke_grant(row.grant_id, "refresh_token_reuse")
        return None

    def validate_token_request(self) -> None:
        super().validate_token_request()
        credential: RefreshCredential = self.request.refresh_token
        _check_token_resource(self.request, credential.grant.resource)
        self.redecide(credential)

    def redecide(self, credential: RefreshCredential) -> None:
        """Every refresh decides again (the user being disabled is checked with the grant):
        the resource must still be served, and the current rules, read against the stored
        identity, must still entitle the grant's required scopes. A narrowed entitlement
        narrows this and every later token of the grant; a lost one ends the grant
        (``invalid_grant``: the client must authorize again, and will be refused there too)."""
        server = self.server
        state = server.state()
        grant = credential.grant
        resource = server.settings.resource(grant.resource)
        identity = state.session.get(Identity, grant.identity_id) if grant.identity_id else None
        reason = None
        if resource is None:
            reason = "resource_removed"
        elif identity is None:
            reason = "identity_removed"
        else:
            upstream = UpstreamIdentity.from_snapshot(identity.snapshot)
            decision = policy.decide(server.settings, resource, upstream)
            granted = grant.scope.split()
            entitled = [s for s in granted if s in decision.scopes]
            if decision.denied is not None:
                reason = "denied_by_policy"
            elif not set(resource.required_scopes) <= set(entitled) or (granted and not entitled):
                reason = "entitlement_lost"
            else:
                credential.entitled = entitled
                if entitled != granted:
                    grant.scope = " ".join(entitled)  # never widened again without consent
        if reason is not None:
            state.revoke_grant(grant.id, reason)
            raise InvalidGrantError("Access under this grant is no longer allowed.")

    def authenticate_user(self, refresh_token: RefreshCredential) -> GrantUser:
        return GrantUser(refresh_token.grant)

    def issue_token(self, user: GrantUser, refresh_token: RefreshCredential) -> dict[str, Any]:
        """RFC 6749 section 6: the requested ``scope`` MUST NOT include any scope not originally
        granted (Authlib's check answers ``invalid_scope`` before this runs), and "if omitted is
        treated as equal to the scope originally granted". A scope of only spaces is omitted, not
        an empty scope (a token without the resource's required scopes), and the granted scope
        is written once per scope, space-separated (section 3.3)."""
        asked = " ".join(dict.fromkeys((self.request.payload.scope or "").split()))
        scope = asked or refresh_token.get_scope()
        if refresh_token.entitled is not None:  # narrowed by the current rules
            scope = " ".join(s for s in scope.split() if s in refresh_token.entitled)
        rotate = refresh_token.grace_successor is None
        token: dict[str, Any] = self.generate_token(
            user=user, scope=scope, include_refresh_token=rotate
        )
        if not rotate:  # a parallel refresh within the grace window: the same successor
            token["refresh_token"] = refresh_token.grace_successor
        return token

    def revoke_old_credential(self, refresh_token: RefreshCredential) -> None:
        """Nothing to do: the old token was marked used atomically, and linked to its successor
        when the successor was saved."""


def successor_aad(parent_hash: str) -> str:
    return f"refresh_tokens:{parent_hash}:successor"


def grant_refresh_tokens(session: Any, grant_id: str) -> list[RefreshToken]:
    return list(session.scalars(select(RefreshToken).where(RefreshToken.grant_id == grant_id)))


__all__ = [
    "AuthorizationCodeGrant",
    "CodeCredential",
    "GrantUser",
    "InvalidGrantError",
    "RefreshCredential",
    "RefreshTokenGrant",
]
