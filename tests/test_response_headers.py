"""The headers every response gets (``broker.views.security_headers``): the security headers
unless the view set its own, and on the API paths browsers call from other origins the CORS
headers, which replace the view's. Each header appears once."""

from __future__ import annotations

from collections import Counter

from flask import Flask, Response

from broker.views import CORS_HEADERS, SECURITY_HEADERS


def _names(response: Response) -> Counter[str]:
    return Counter(key.lower() for key, _ in response.headers)


def test_a_page_path_gets_the_security_headers_once_and_no_cors(app: Flask) -> None:
    response = app.test_client().get("/health")
    assert response.status_code == 200
    for key, value in SECURITY_HEADERS:
        assert response.headers.getlist(key) == [value]
    assert not any(key.lower().startswith("access-control-") for key, _ in response.headers)


def test_the_token_endpoint_gets_the_security_and_cors_headers_once(app: Flask) -> None:
    client = app.test_client()
    answers = [
        client.post("/token", data={"grant_type": "password"}),  # an OAuth error from Authlib
        client.options("/token"),  # a preflight
    ]
    for response in answers:
        for key, value in (*SECURITY_HEADERS, *CORS_HEADERS):
            assert response.headers.getlist(key) == [value], (response.status_code, key)
        counted = _names(response)
        assert all(count == 1 for count in counted.values()), counted
    assert answers[0].status_code == 400
    assert answers[0].headers["Cache-Control"] == "no-store"


def test_a_view_keeps_its_own_security_header_and_loses_its_own_cors(app: Flask) -> None:
    @app.route("/.well-known/own-headers")
    def own() -> Response:
        return Response(
            "{}",
            headers=[
                ("x-frame-options", "SAMEORIGIN"),
                ("Access-Control-Allow-Origin", "https://one.example"),
                ("Access-Control-Allow-Origin", "https://two.example"),
            ],
        )

    response = app.test_client().get("/.well-known/own-headers")
    assert response.headers.getlist("X-Frame-Options") == ["SAMEORIGIN"]
    assert response.headers.getlist("Access-Control-Allow-Origin") == ["*"]
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert all(count == 1 for count in _names(response).values()), _names(response)
