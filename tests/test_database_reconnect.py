"""Dropped PostgreSQL connections cost no request and no round trip: the pool has no pre-ping
(``broker/db.py``). A pooled connection the server closed is replaced at checkout (its socket has
the server's farewell to read); one that died unseen fails the token request's first statement,
a read, which runs again once on a fresh connection. An outage answers 503 while it lasts, and the
broker recovers once the database is back. The connections are real: the broker reaches
PostgreSQL through a TCP forwarder the test controls."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from flask import Flask

from tests.support import authorize_params, pkce, query, redeem, sign_in_local


class _Pair:
    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client, self.server = client, server
        self.silent = False  # the server side is gone; the client finds out when it speaks


class Forwarder:
    """Forwards 127.0.0.1:<port> to PostgreSQL. ``drop()`` closes every connection (the broker
    sees its end closed); ``drop(silent=True)`` closes only the PostgreSQL side, and the broker's
    side is closed when the broker next sends on it (a middlebox that forgot the connection);
    ``refusing`` closes new connections at once (the database is down)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.pairs: list[_Pair] = []
        self.accepted = 0
        self.refusing = False
        self.open = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.open:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if self.refusing:
                conn.close()
                continue
            self.accepted += 1
            pair = _Pair(conn, socket.create_connection(self.target))
            self.pairs.append(pair)
            threading.Thread(target=self._upstream, args=(pair,), daemon=True).start()
            threading.Thread(target=self._downstream, args=(pair,), daemon=True).start()

    def _upstream(self, pair: _Pair) -> None:
        """Broker to PostgreSQL."""
        try:
            while data := pair.client.recv(65536):
                if pair.silent:
                    break
                pair.server.sendall(data)
        except OSError:
            pass
        _close(pair.client, pair.server)

    def _downstream(self, pair: _Pair) -> None:
        """PostgreSQL to the broker."""
        try:
            while data := pair.server.recv(65536):
                pair.client.sendall(data)
        except OSError:
            pass
        if not pair.silent:
            _close(pair.client, pair.server)

    def drop(self, *, silent: bool = False) -> None:
        pairs, self.pairs = self.pairs, []
        for pair in pairs:
            pair.silent = silent
            _close(pair.server) if silent else _close(pair.client, pair.server)

    def stop(self) -> None:
        self.open = False
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.drop()


def _close(*sockets: socket.socket) -> None:
    for s in sockets:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        s.close()


@pytest.fixture
def forwarded(
    database_url: str, make_app: Callable[..., Flask]
) -> Iterator[tuple[Flask, Forwarder]]:
    parts = urlsplit(database_url)
    forwarder = Forwarder((parts.hostname or "127.0.0.1", parts.port or 5432))
    user = f"{parts.username}@" if parts.username else ""
    app = make_app(
        database_url=urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{forwarder.port}"))
    )
    yield app, forwarder
    forwarder.stop()


def _signed_in(app: Flask) -> tuple[Any, str, str]:
    """A test client, a client id and a refresh token of a fresh sign-in."""
    client = app.test_client()
    client_id = client.post(
        "/register", json={"redirect_uris": ["http://127.0.0.1/callback"]}
    ).json["client_id"]
    verifier, challenge = pkce()
    response = sign_in_local(client, authorize_params(client_id, challenge))
    tokens = redeem(client, client_id, query(response.headers["Location"])["code"], verifier)
    assert tokens.status_code == 200, tokens.json
    return client, client_id, tokens.json["refresh_token"]


def _refresh(client: Any, client_id: str, token: str) -> Any:
    return client.post(
        "/token",
        data={"grant_type": "refresh_token", "refresh_token": token, "client_id": client_id},
    )


POSTGRESQL = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


@POSTGRESQL
def test_connections_the_server_closed_are_replaced_without_a_failed_request(
    forwarded: tuple[Flask, Forwarder],
) -> None:
    app, forwarder = forwarded
    client, client_id, token = _signed_in(app)
    before = forwarder.accepted
    forwarder.drop()
    assert client.get("/ready").status_code == 200  # any request: replaced at checkout
    assert forwarder.accepted > before  # a new connection, not a pre-ping of the old one
    forwarder.drop()
    answer = _refresh(client, client_id, token)
    assert answer.status_code == 200, answer.json


@POSTGRESQL
def test_a_connection_that_died_unseen_costs_the_first_read_a_retry(
    forwarded: tuple[Flask, Forwarder],
) -> None:
    app, forwarder = forwarded
    client, client_id, token = _signed_in(app)
    forwarder.drop(silent=True)  # the pooled connection looks alive until it is used
    answer = _refresh(client, client_id, token)
    assert answer.status_code == 200, answer.json
    again = _refresh(client, client_id, answer.json["refresh_token"])
    assert again.status_code == 200, again.json


@POSTGRESQL
def test_an_outage_answers_503_and_the_broker_recovers_after_it(
    forwarded: tuple[Flask, Forwarder],
) -> None:
    app, forwarder = forwarded
    client, client_id, token = _signed_in(app)
    forwarder.refusing = True
    forwarder.drop()
    down = _refresh(client, client_id, token)
    assert down.status_code == 503 and down.json["error"] == "temporarily_unavailable"
    assert client.get("/ready").status_code == 503
    forwarder.refusing = False
    answer = _refresh(client, client_id, token)  # nothing was written during the outage
    assert answer.status_code == 200, answer.json
    assert client.get("/ready").status_code == 200
