"""The authorization code flow through the local provider, and its bad inputs (RFC 6749,
OAuth 2.1, RFC 7636, RFC 8707, RFC 9207)."""

from __future__ import annotations

from typing import Any

import jwt
from flask.testing import FlaskClient
from sqlalchemy import func, select

from broker.models import AuditEvent, AuthorizationCode, Grant, PendingLogin, RefreshToken
from tests.support import (
    OTHER_RESOURCE,
    RESOURCE,
    authorize_params,
    pkce,
    query,
    redeem,
    sign_in_local,
)

ISSUER = "http://127.0.0.1:8000"


def _count(app: Any, model: Any) -> int:
    with app.extensions["broker"].db.session() as session:
        return int(session.execute(select(func.count()).select_from(model)).scalar_one())


def _code(
    client: FlaskClient, registered: dict[str, Any], **extra: str
) -> tuple[str, str, dict[str, str]]:
    verifier, challenge = pkce()
    params = authorize_params(registered["client_id"], challenge, **extra)
    response = sign_in_local(client, params)
    assert response.status_code == 302, response.text
    result = query(response.headers["Location"])
    assert "code" in result, result
    return result["code"], verifier, result


def test_full_flow_issues_a_jwt_bound_to_the_resource(
    app: Any, client: FlaskClient, registered: dict[str, Any]
) -> None:
    code, verifier, result = _code(client, registered)
    assert result["iss"] == ISSUER  # RFC 9207
    response = redeem(client, registered["client_id"], code, verifier)
    assert response.status_code == 200, response.json
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json
    assert body["token_type"] == "Bearer" and body["scope"] == "demo:read"
    header = jwt.get_unverified_header(body["access_token"])
    assert header["typ"] == "at+jwt" and header["alg"] == "ES256"
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["aud"] == RESOURCE and claims["iss"] == ISSUER
    assert claims["client_id"] == registered["client_id"]
    assert {"sub", "exp", "iat", "jti", "auth_time"} <= set(claims)
    jwks = client.get("/jwks.json").json
    key = jwt.PyJWKSet.from_dict(jwks)[header["kid"]]
    jwt.decode(
        body["access_token"], key.key, algorithms=["ES256"], audience=RESOURCE, issuer=ISSUER
    )


def test_second_authorization_goes_straight_through_with_session_and_consent(
    client: FlaskClient, registered: dict[str, Any]
) -> None:
    # An https redirect URI: at a loopback one this dynamically registered client would be
    # confirmed every time (RFC 8252 section 8.6; tests/test_consent_confirmation.py).
    web = "https://app.example.com/cb"
    _code(client, registered, redirect_uri=web)
    _verifier, challenge = pkce()
    response = client.get(
        "/authorize",
        query_string=authorize_params(registered["client_id"], challenge, redirect_uri=web),
    )
    assert response.status_code == 302
    assert "code=" in response.headers["Location"]


def test_refresh_rotates_and_grace_returns_same_successor(
    app: Any, client: FlaskClient, registered: dict[str, Any]
) -> None:
    code, verifier, _ = _code(client, registered)
    first = redeem(client, registered["client_id"], code, verifier).json
    data = {
        "grant_type": "refresh_token",
        "refresh_token": first["refresh_token"],
        "client_id": registered["client_id"],
        "resource": RESOURCE,
    }
    second = client.post("/token", data=data)
    assert second.status_code == 200, second.json
    assert second.json["refresh_token"] != first["refresh_token"]
    parallel = client.post("/token", data=data)  # a second process refreshing at the same moment
    assert parallel.status_code == 200
    assert parallel.json["refresh_token"] == second.json["refresh_token"]
    third = client.post("/token", data={**data, "refresh_token": second.json["refresh_token"]})
    assert third.status_code == 200


def test_refresh_reuse_after_grace_revokes_the_grant(make_app: Any) -> None:
    app = make_app(tokens={"refresh_reuse_grace": 0})
    client = app.test_client()
    registered = client.post(
        "/register",
        json={"redirect_uris": ["http://127.0.0.1/callback"], "token_endpoint_auth_method": "none"},
    ).json
    code, verifier, _ = _code(client, registered)
    first = redeem(client, registered["client_id"], code, verifier).json
    data = {
        "grant_type": "refresh_token",
        "refresh_token": first["refresh_token"],
        "client_id": registered["client_id"],
    }
    second = client.post("/token", data=data).json
    reuse = client.post("/token", data=data)
    assert reuse.status_code == 400 and reuse.json["error"] == "invalid_grant"
    # The whole family is gone: the legitimate successor no longer works either.
    after = client.post("/token", data={**data, "refresh_token": second["refresh_token"]})
    assert after.status_code == 400 and after.json["error"] == "invalid_grant"


def test_refresh_may_narrow_scope_but_not_widen_or_change_resource(
    client: FlaskClient, registered: dict[str, Any]
) -> None:
    code, verifier, _ = _code(client, registered, scope="demo:read demo:write")
    first = redeem(client, registered["client_id"], code, verifier).json
    assert set(first["scope"].split()) == {"demo:read", "demo:write"}
    base = {"grant_type": "refresh_token", "client_id": registered["client_id"]}
    other = client.post(
        "/token", data={**base, "refresh_token": first["refresh_token"], "resource": OTHER_RESOURCE}
    )
    assert other.status_code == 400 and other.json["error"] == "invalid_target"
    narrowed = client.post(
        "/token", data={**base, "refresh_token": first["refresh_token"], "scope": "demo:read"}
    )
    assert narrowed.status_code == 200 and narrowed.json["scope"] == "demo:read"
    wider = client.post(
        "/token",
        data={**base, "refresh_token": narrowed.json["refresh_token"], "scope": "demo:read admin"},
    )
    assert wider.status_code == 400 and wider.json["error"] == "invalid_scope"


def test_unknown_client_gets_a_400_page_not_a_redirect(client: FlaskClient) -> None:
    _, challenge = pkce()
    response = client.get("/authorize", query_string=authorize_params("nope", challenge))
    assert response.status_code == 400
    assert "Location" not in response.headers
    assert response.mimetype == "text/html"


def test_unregistered_redirect_uri_gets_a_400_page(
    client: FlaskClient, registered: dict[str, Any]
) -> None:
    _, challenge = pkce()
    for uri in (
        "https://evil.example.com/cb",
        "http://localhost:5555/callback",
        "http://127.0.0.1:5555/other",
        "https://app.example.com/cb/extra",
    ):
        response = client.get(
            "/authorize",
            query_string=authorize_params(registered["client_id"], challenge, redirect_uri=uri),
        )
        assert response.status_code == 400, uri
        assert "Location" not in response.headers


def test_loopback_redirect_any_port(client: FlaskClient, registered: dict[str, Any]) -> None:
    _, challenge = pkce()
    for uri in (
        "http://127.0.0.1:1234/callback",
        "http://127.0.0.1:65000/callback",
        "http://127.0.0.1/callback",
    ):
        response = client.get(
            "/authorize",
            query_string=authorize_params(registered["client_id"], challenge, redirect_uri=uri),
        )
        assert response.status_code == 302, uri


def _redirect_error(client: FlaskClient, params: dict[str, str]) -> dict[str, str]:
    before = None
    response = client.get("/authorize", query_string=params)
    assert response.status_code == 302, response.text
    result = query(response.headers["Location"])
    assert response.headers["Location"].startswith(params["redirect_uri"])
    assert result["iss"] == ISSUER and result["state"] == params["state"]
    del before
    return result


def test_missing_pkce_plain_pkce_and_unknown_resource(
    app: Any, client: FlaskClient, registered: dict[str, Any]
) -> None:
    _, challenge = pkce()
    cid = registered["client_id"]
    params = authorize_params(cid, challenge)
    del params["code_challenge"], params["code_challenge_method"]
    assert _redirect_error(client, params)["error"] == "invalid_request"
    plain = authorize_params(cid, "a" * 43, code_challenge_method="plain")
    assert _redirect_error(client, plain)["error"] == "invalid_request"
    unknown = authorize_params(cid, challenge, resource="https://unknown.example.com/mcp")
    assert _redirect_error(client, unknown)["error"] == "invalid_target"
    assert _count(app, PendingLogin) == 0  # nothing half-written


def test_wrong_verifier_replayed_code_and_mismatched_redirect(
    app: Any, client: FlaskClient, registered: dict[str, Any]
) -> None:
    cid = registered["client_id"]
    code, verifier, _ = _code(client, registered)
    wrong = redeem(client, cid, code, verifier[:-4] + "AAAA")
    assert wrong.status_code == 400 and wrong.json["error"] == "invalid_grant"
    assert _count(app, RefreshToken) == 0
    # A request that fails does not use the code up (it is claimed only once all is valid),
    # and revokes nothing: the client's own redemption still works.
    elsewhere = redeem(client, cid, code, verifier, redirect_uri="http://127.0.0.1:5556/callback")
    assert elsewhere.status_code == 400 and _count(app, RefreshToken) == 0
    with app.extensions["broker"].db.session() as session:
        issued = session.scalars(select(AuditEvent.id).where(AuditEvent.type == "issue"))
        assert issued.all() == []
    first = redeem(client, cid, code, verifier)
    assert first.status_code == 200, first.json
    with app.extensions["broker"].db.session() as session:
        assert session.scalars(select(Grant.revoked_at)).all() == [None]

    code, verifier, _ = _code(client, registered)
    mismatch = redeem(client, cid, code, verifier, redirect_uri="http://127.0.0.1:5556/callback")
    assert mismatch.status_code == 400 and mismatch.json["error"] == "invalid_grant"

    code, verifier, _ = _code(client, registered)
    missing = redeem(client, cid, code, None)  # type: ignore[arg-type]
    assert missing.status_code == 400 and missing.json["error"] == "invalid_request"

    code, verifier, _ = _code(client, registered)
    ok = redeem(client, cid, code, verifier)
    assert ok.status_code == 200
    replay = redeem(client, cid, code, verifier)
    assert replay.status_code == 400 and replay.json["error"] == "invalid_grant"
    # The replay revoked the grant the code produced: its refresh token is dead too.
    refresh = client.post(
        "/token",
        data={
            "grant_type": "refresh_token",
            "client_id": cid,
            "refresh_token": ok.json["refresh_token"],
        },
    )
    assert refresh.status_code == 400 and refresh.json["error"] == "invalid_grant"
    with app.extensions["broker"].db.session() as session:
        reasons = set(session.scalars(select(Grant.revoke_reason)))
    assert "code_replay" in reasons


def test_expired_code(app: Any, client: FlaskClient, registered: dict[str, Any]) -> None:
    import datetime as dt

    from sqlalchemy import update

    code, verifier, _ = _code(client, registered)
    with app.extensions["broker"].db.session() as session:
        session.execute(
            update(AuthorizationCode).values(
                expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
            )
        )
    response = redeem(client, registered["client_id"], code, verifier)
    assert response.status_code == 400 and response.json["error"] == "invalid_grant"


def test_token_resource_mismatch_is_invalid_target(
    client: FlaskClient, registered: dict[str, Any]
) -> None:
    code, verifier, _ = _code(client, registered)
    response = redeem(client, registered["client_id"], code, verifier, resource=OTHER_RESOURCE)
    assert response.status_code == 400 and response.json["error"] == "invalid_target"


def test_consent_denied_redirects_access_denied(
    client: FlaskClient, registered: dict[str, Any]
) -> None:
    _, challenge = pkce()
    params = authorize_params(registered["client_id"], challenge)
    response = sign_in_local(client, params, approve=False)
    assert response.status_code == 302
    result = query(response.headers["Location"])
    assert result["error"] == "access_denied" and result["iss"] == ISSUER
    assert result["state"] == params["state"]


def test_consent_form_without_csrf_is_refused(
    app: Any, client: FlaskClient, registered: dict[str, Any]
) -> None:
    _, challenge = pkce()
    response = client.get(
        "/authorize", query_string=authorize_params(registered["client_id"], challenge)
    )
    login_id = query(response.headers["Location"])["login"]
    for data in (
        {"login": login_id, "action": "approve", "provider": "local"},
        {"login": login_id, "action": "approve", "provider": "local", "csrf": "x" * 64},
    ):
        refused = client.post("/consent", data=data)
        assert refused.status_code == 400
        assert "Location" not in refused.headers
    with app.extensions["broker"].db.session() as session:
        pending = session.get(PendingLogin, login_id)
        assert pending is not None and pending.approved_at is None


def test_bad_password_and_policy_requirements(
    client: FlaskClient, registered: dict[str, Any]
) -> None:
    _, challenge = pkce()
    response = sign_in_local(
        client, authorize_params(registered["client_id"], challenge), password="wrong"
    )
    assert response.status_code == 400
    assert "Invalid username or password" in response.text


def test_token_endpoint_errors_are_json(client: FlaskClient, registered: dict[str, Any]) -> None:
    bad_grant = client.post(
        "/token",
        data={
            "grant_type": "password",
            "username": "a",
            "password": "b",
            "client_id": registered["client_id"],
        },
    )
    assert bad_grant.status_code == 400 and bad_grant.json["error"] == "unsupported_grant_type"
    unknown_client = client.post(
        "/token",
        data={
            "grant_type": "authorization_code",
            "code": "x",
            "client_id": "nope",
            "code_verifier": "y" * 43,
        },
    )
    # RFC 6749 section 5.2: 401 only when the client tried the Authorization header.
    assert unknown_client.status_code == 400 and unknown_client.json["error"] == "invalid_client"
    get = client.get("/token")
    assert get.status_code == 405 and get.json["error"] == "invalid_request"


def test_state_is_returned_exactly_and_empty_scope_gets_entitled_scopes(
    client: FlaskClient, registered: dict[str, Any]
) -> None:
    # VS Code: base64 state with + / =, and an empty scope parameter.
    state = "ab+cd/ef=="
    code, verifier, result = _code(client, registered, state=state, scope="")
    assert result["state"] == state
    body = redeem(client, registered["client_id"], code, verifier).json
    assert set(body["scope"].split()) == {"demo:read", "demo:write"}


def test_grace_successors_are_dropped_after_the_window(make_app: Any) -> None:
    from broker.models import RefreshToken

    app = make_app(tokens={"refresh_reuse_grace": 0})
    client = app.test_client()
    registered = client.post(
        "/register", json={"redirect_uris": ["http://127.0.0.1/callback"]}
    ).json
    code, verifier, _ = _code(client, registered)
    token = redeem(client, registered["client_id"], code, verifier).json["refresh_token"]
    for _ in range(3):
        token = client.post(
            "/token",
            data={
                "grant_type": "refresh_token",
                "refresh_token": token,
                "client_id": registered["client_id"],
            },
        ).json["refresh_token"]
    with app.extensions["broker"].db.session() as session:
        sealed = session.scalars(
            select(RefreshToken).where(RefreshToken.successor_sealed.is_not(None))
        ).all()
    assert len(sealed) <= 1  # only the newest rotation may still hold its successor


def test_prompt_login_asks_for_the_password_again(
    client: FlaskClient, registered: dict[str, Any]
) -> None:
    _code(client, registered)  # signed in, consent recorded
    _, challenge = pkce()
    params = authorize_params(registered["client_id"], challenge, prompt="login")
    response = client.get("/authorize", query_string=params)
    assert response.headers["Location"].startswith("/consent")
    page = client.get(response.headers["Location"])
    assert 'value="session"' not in page.text
    login_id = query(response.headers["Location"])["login"]
    from tests.support import form_value

    refused = client.post(
        "/consent",
        data={
            "login": login_id,
            "csrf": form_value(page.text, "csrf"),
            "action": "approve",
            "provider": "session",
        },
    )
    assert refused.status_code == 400


def test_a_sign_in_finishes_once(app: Any, client: FlaskClient, registered: dict[str, Any]) -> None:
    from tests.conftest import PASSWORDS
    from tests.support import login_form

    login_id, csrf = login_form(client, registered["client_id"])
    data = {
        "login": login_id,
        "csrf": csrf,
        "username": "alice",
        "password": PASSWORDS["alice"],
    }
    first = client.post("/login/local", data=data)
    assert first.status_code == 302 and "code=" in first.headers["Location"]
    second = client.post("/login/local", data=data)
    assert second.status_code == 400 and "Location" not in second.headers
    assert _count(app, AuthorizationCode) == 1
