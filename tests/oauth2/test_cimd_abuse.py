"""Client ID Metadata Documents under abuse: failed fetches and invalid documents remembered
briefly (never as a client, never named on a page), a per-host fetch limit, and the host allow and
deny lists. Documents are served over real HTTPS by a local server with a test CA."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select

from broker.db import utcnow
from broker.models import AuditEvent, Client, ClientMetadataFailure
from broker.oauth2.cimd import CACHED_REASONS, REASONS, CIMDError, host_matches
from broker.purge import purge
from tests.oauth2.test_cimd import (  # noqa: F401 - fixtures: a test CA and an HTTPS host
    DocumentHost,
    ca,
    ca_file,
    host,
    local_document,
)
from tests.support import authorize_params, pkce


@pytest.fixture
def make_cimd_app(make_app: Callable[..., Flask], ca_file: str) -> Callable[..., Flask]:  # noqa: F811
    def make(rate_limits: dict[str, Any] | None = None, **documents: Any) -> Flask:
        settings: dict[str, Any] = {"allow_hosts": ["localhost"], "ca_file": ca_file}
        settings.update(documents)
        extra = {"rate_limits": rate_limits} if rate_limits else {}
        return make_app(client_metadata_documents=settings, **extra)

    return make


def authorize(app: Flask, client_id: str) -> Any:
    _, challenge = pkce()
    return app.test_client().get("/authorize", query_string=authorize_params(client_id, challenge))


def failure(app: Flask, client_id: str) -> tuple[str, dt.datetime] | None:
    """The remembered failure: (reason, retry_at)."""
    with app.extensions["broker"].db.read() as session:
        row = session.get(ClientMetadataFailure, client_id)
        return (row.reason, row.retry_at) if row is not None else None


def client_row(app: Flask, client_id: str) -> str | None:
    """The kind of the client row, if there is one."""
    with app.extensions["broker"].db.read() as session:
        row = session.get(Client, client_id)
        return row.kind if row is not None else None


def refused_events(app: Flask, client_id: str) -> list[str | None]:
    with app.extensions["broker"].db.read() as session:
        events = session.scalars(
            select(AuditEvent).where(
                AuditEvent.client_id == client_id, AuditEvent.outcome == "failure"
            )
        ).all()
        return [e.reason for e in events]


def assert_unverified_page(response: Any, *hidden: str) -> None:
    """400 page, never a redirect, that names no reason, host or port (section 8.6)."""
    assert response.status_code == 400
    assert "Location" not in response.headers
    assert "could not be verified" in response.text
    for text in hidden:
        assert text not in response.text


# -- failures remembered briefly ---------------------------------------------------------------


def test_a_failed_fetch_is_remembered_and_not_refetched(
    make_cimd_app: Callable[..., Flask],
    host: DocumentHost,  # noqa: F811
) -> None:
    app = make_cimd_app(failure_cache=2)
    url = host.serve(status=404, body=b"gone")
    assert_unverified_page(authorize(app, url), "bad_status", "404", str(host.port))
    remembered = failure(app, url)
    assert remembered is not None and remembered[0] == "bad_status"
    assert 1 <= (remembered[1] - utcnow()).total_seconds() <= 2
    assert client_row(app, url) is None  # never stored as a client
    # The host serves a good document now, but the failure is remembered: no fetch.
    host.serve(doc=local_document(url))
    for _ in range(3):
        assert_unverified_page(authorize(app, url), "bad_status")
    assert host.requests() == 1
    assert refused_events(app, url) == ["bad_status"]  # audited once, when it was fetched
    # Once the failure expires the document is fetched again, and the failure is forgotten.
    time.sleep(2.1)
    response = authorize(app, url)
    assert response.status_code == 302 and response.headers["Location"].startswith("/consent")
    assert host.requests() == 2
    assert failure(app, url) is None
    assert client_row(app, url) == "cimd"


def test_an_invalid_document_is_remembered_never_as_a_client(
    make_cimd_app: Callable[..., Flask],
    host: DocumentHost,  # noqa: F811
) -> None:
    app = make_cimd_app()
    url = host.serve(
        doc={**local_document(host.url()), "client_id": "https://elsewhere.example/cimd"}
    )
    assert_unverified_page(authorize(app, url), "client_id_mismatch", "elsewhere")
    assert_unverified_page(authorize(app, url), "client_id_mismatch")
    assert host.requests() == 1
    remembered = failure(app, url)
    assert remembered is not None and remembered[0] == "client_id_mismatch"
    assert client_row(app, url) is None
    token = app.test_client().post(
        "/token", data={"grant_type": "refresh_token", "refresh_token": "x", "client_id": url}
    )
    assert token.status_code in (400, 401) and token.json["error"] == "invalid_client"


def test_the_reason_reaches_the_log_and_the_error_only(
    make_cimd_app: Callable[..., Flask],
    host: DocumentHost,  # noqa: F811
) -> None:
    app = make_cimd_app()
    url = host.serve(status=500, body=b"internal details")
    with pytest.raises(CIMDError) as first:
        app.extensions["broker"].cimd.ensure_fresh(url)
    assert first.value.reason == "bad_status" and "500" in first.value.detail
    with pytest.raises(CIMDError) as again:  # remembered: the same reason, for the log
        app.extensions["broker"].cimd.ensure_fresh(url)
    assert again.value.reason == "bad_status" and "remembered" in again.value.detail
    assert str(again.value).startswith("bad_status: ")
    assert host.requests() == 1


def test_no_failure_cache_fetches_every_time(
    make_cimd_app: Callable[..., Flask],
    host: DocumentHost,  # noqa: F811
) -> None:
    app = make_cimd_app(failure_cache=0)
    url = host.serve(status=404, body=b"gone")
    for _ in range(2):
        assert_unverified_page(authorize(app, url))
    assert host.requests() == 2
    assert failure(app, url) is None


def test_a_known_client_whose_document_breaks_keeps_its_row(
    make_cimd_app: Callable[..., Flask],
    host: DocumentHost,  # noqa: F811
) -> None:
    app = make_cimd_app(cache_min=0)
    url = host.serve(doc=local_document(host.url()), headers={"Cache-Control": "no-store"})
    assert authorize(app, url).status_code == 302
    host.serve(status=404, body=b"gone")
    assert_unverified_page(authorize(app, url))
    assert_unverified_page(authorize(app, url))
    assert host.requests() == 2  # the second refusal is the remembered failure
    assert client_row(app, url) is not None  # its grants keep working at the token endpoint


def test_which_refusals_are_remembered() -> None:
    # Configuration, URL shape and the fetch limit are decided again at no cost.
    assert {"host_denied", "host_not_allowed", "rate_limited", "disabled"}.isdisjoint(
        CACHED_REASONS
    )
    assert {"bad_status", "timeout", "forbidden_address", "client_id_mismatch"} <= CACHED_REASONS
    assert CACHED_REASONS < REASONS


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_purge_deletes_expired_failures(
    make_cimd_app: Callable[..., Flask],
    host: DocumentHost,  # noqa: F811
) -> None:
    app = make_cimd_app()
    url = host.serve(status=404, body=b"gone")
    authorize(app, url)
    b = app.extensions["broker"]
    with b.db.session() as session:
        kept = purge(session, access_ttl=3600)
    assert kept.counts["client_metadata_failures"] == 0 and failure(app, url) is not None
    with b.db.session() as session:
        result = purge(session, access_ttl=3600, now=utcnow() + dt.timedelta(minutes=2))
    assert result.counts["client_metadata_failures"] == 1 and failure(app, url) is None


# -- the per-host fetch limit ----------------------------------------------------------------


def test_fetches_are_limited_per_host(
    make_cimd_app: Callable[..., Flask],
    host: DocumentHost,  # noqa: F811
) -> None:
    """One host, documents at ever new paths: three fetches a minute, then refused without a
    fetch (and without being remembered as the document's failure)."""
    app = make_cimd_app(rate_limits={"client_metadata_fetch": {"per_host": "3/minute"}})
    urls = [
        host.serve(f"/c{i}.json", doc=local_document(host.url(f"/c{i}.json"))) for i in range(5)
    ]
    for url in urls[:3]:
        assert authorize(app, url).status_code == 302
    assert_unverified_page(authorize(app, urls[3]), "rate_limited", "3/minute")
    with pytest.raises(CIMDError) as info:
        app.extensions["broker"].cimd.ensure_fresh(urls[4])
    assert info.value.reason == "rate_limited" and info.value.retry_after is not None
    assert 1 <= info.value.retry_after <= 60
    assert host.requests("/c3.json") == 0 and host.requests("/c4.json") == 0
    assert failure(app, urls[3]) is None and client_row(app, urls[3]) is None
    # Documents already fetched are cached: the limit counts fetches, not authorizations.
    assert authorize(app, urls[0]).status_code == 302


def test_the_fetch_limit_can_be_turned_off(
    make_cimd_app: Callable[..., Flask],
    host: DocumentHost,  # noqa: F811
) -> None:
    app = make_cimd_app(rate_limits={"client_metadata_fetch": {"per_host": "off"}})
    for i in range(4):
        url = host.serve(f"/c{i}.json", doc=local_document(host.url(f"/c{i}.json")))
        assert authorize(app, url).status_code == 302


# -- allowed_hosts and denied_hosts ----------------------------------------------------------


@pytest.mark.parametrize(
    ("documents", "reason"),
    [
        ({"allowed_hosts": ["*.example.com"]}, "host_not_allowed"),
        ({"allowed_hosts": ["example.com", "*.localhost"]}, "host_not_allowed"),
        ({"denied_hosts": ["localhost"]}, "host_denied"),
        ({"allowed_hosts": ["localhost"], "denied_hosts": ["localhost"]}, "host_denied"),
    ],
)
def test_hosts_outside_the_lists_are_never_fetched(
    make_cimd_app: Callable[..., Flask],
    host: DocumentHost,  # noqa: F811
    documents: dict[str, Any],
    reason: str,
) -> None:
    app = make_cimd_app(**documents)
    url = host.serve(doc=local_document(host.url()))
    assert_unverified_page(authorize(app, url), reason, "localhost")
    with pytest.raises(CIMDError) as info:
        app.extensions["broker"].cimd.ensure_fresh(url)
    assert info.value.reason == reason
    assert host.server.log == []
    assert failure(app, url) is None and client_row(app, url) is None


def test_a_listed_host_is_fetched(
    make_cimd_app: Callable[..., Flask],
    host: DocumentHost,  # noqa: F811
) -> None:
    app = make_cimd_app(allowed_hosts=["localhost"], denied_hosts=["*.localhost"])
    url = host.serve(doc=local_document(host.url()))
    assert authorize(app, url).status_code == 302


def test_denying_a_host_refuses_its_clients_already_cached(
    make_cimd_app: Callable[..., Flask],
    host: DocumentHost,  # noqa: F811
) -> None:
    open_app = make_cimd_app()
    url = host.serve(doc=local_document(host.url()), headers={"Cache-Control": "max-age=3600"})
    assert authorize(open_app, url).status_code == 302
    # The operator denies the host (same database, new configuration): refused at once,
    # though the cached document is still fresh.
    b = open_app.extensions["broker"]
    from broker import create_app
    from broker.config import parse

    data = {
        "issuer": b.settings.issuer,
        "secret_key": b.settings.secret_key,
        "database_url": b.settings.database_url,
        "instance_path": b.settings.instance_path,
        "providers": dict(b.settings.providers),
        "resources": [{"uri": r.uri, "scopes": dict(r.scopes)} for r in b.settings.resources],
        "client_metadata_documents": {
            "allow_hosts": ["localhost"],
            "ca_file": b.settings.client_metadata_documents.ca_file,
            "denied_hosts": ["localhost"],
        },
    }
    denied_app = create_app(parse(data, env={}, base_dir=b.settings.base_dir, testing=True))
    try:
        assert_unverified_page(authorize(denied_app, url))
        assert host.requests() == 1
    finally:
        denied_app.extensions["broker"].db.dispose()
        denied_app.extensions["broker"].http.close()


@pytest.mark.parametrize(
    ("name", "patterns", "matches"),
    [
        ("app.example.com", ["app.example.com"], True),
        ("APP.Example.com.", ["app.example.com"], True),
        ("a.example.com", ["*.example.com"], True),
        ("a.b.example.com", ["*.example.com"], True),
        ("example.com", ["*.example.com"], False),  # the pattern is for subdomains
        ("evilexample.com", ["*.example.com"], False),
        ("example.com.evil.net", ["*.example.com", "example.com"], False),
        ("app.example.com", [], False),
    ],
)
def test_host_patterns(name: str, patterns: list[str], matches: bool) -> None:
    assert host_matches(name, patterns) is matches
