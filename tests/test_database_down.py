"""A database that goes away is a temporary failure: 503 ``temporarily_unavailable`` at the
token endpoint (clients throw their credentials away on ``invalid_grant``), a 503 page for
browsers, and ``/ready`` says so. The outage is real: the broker reaches PostgreSQL through a
TCP forwarder that the test cuts."""

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


class Forwarder:
    """Forwards 127.0.0.1:<port> to a target; ``cut()`` closes everything and refuses more."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.open = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.open:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.open = False
        # Wakes the thread blocked in accept(); close() alone would leave it accepting.
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@pytest.fixture
def forwarded(
    database_url: str, make_app: Callable[..., Flask]
) -> Iterator[tuple[Flask, Forwarder]]:
    parts = urlsplit(database_url)
    forwarder = Forwarder((parts.hostname or "127.0.0.1", parts.port or 5432))
    netloc = (
        f"{parts.username}@127.0.0.1:{forwarder.port}"
        if parts.username
        else (f"127.0.0.1:{forwarder.port}")
    )
    app = make_app(database_url=urlunsplit(parts._replace(netloc=netloc)))
    yield app, forwarder
    forwarder.cut()


# The outage is made on the PostgreSQL connection (SQLite is a file, not a server).
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_token_endpoint_answers_503_when_the_database_is_down(
    forwarded: tuple[Flask, Forwarder],
) -> None:
    app, forwarder = forwarded
    client = app.test_client()
    registered: dict[str, Any] = client.post(
        "/register", json={"redirect_uris": ["http://127.0.0.1/callback"]}
    ).json
    verifier, challenge = pkce()
    response = sign_in_local(client, authorize_params(registered["client_id"], challenge))
    code = query(response.headers["Location"])["code"]
    tokens = redeem(client, registered["client_id"], code, verifier).json
    forwarder.cut()
    refresh = client.post(
        "/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
            "client_id": registered["client_id"],
        },
    )
    assert refresh.status_code == 503
    assert refresh.json["error"] == "temporarily_unavailable"
    assert refresh.headers["Cache-Control"] == "no-store"
    page = client.get(
        "/authorize", query_string=authorize_params(registered["client_id"], challenge)
    )
    assert page.status_code == 503 and "Location" not in page.headers
    assert client.get("/ready").status_code == 503
    assert client.get("/health").status_code == 200
