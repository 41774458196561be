"""Requests as the fuzzer sends them (bytes, exactly as they go on the wire), the answers, and the
two ways of sending: into the WSGI app in-process (Flask's test client, with the raw path and
query string put into the WSGI environ untouched), and over a raw socket to a real server."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote_from_bytes, unquote_to_bytes

from flask.testing import FlaskClient
from werkzeug.datastructures import Headers


@dataclass(frozen=True)
class Raw:
    """A value sent verbatim: never percent-encoded (raw non-UTF-8 bytes, a stray ``%``)."""

    data: bytes


Value = str | bytes | Raw
"""A parameter name or value: ``str`` is sent UTF-8 and percent-encoded, ``bytes`` percent-encoded
as they are (``%FF``), :class:`Raw` verbatim."""

Pair = tuple[Value, Value]


def value_bytes(value: Value) -> bytes:
    """The bytes of ``value`` before any encoding (what a server decodes it to)."""
    if isinstance(value, Raw):
        return value.data
    if isinstance(value, bytes):
        return value
    return value.encode("utf-8", "surrogatepass")


def encode_value(value: Value) -> bytes:
    if isinstance(value, Raw):
        return value.data
    return quote_from_bytes(value_bytes(value), safe=b"").encode("ascii")


def encode_pairs(pairs: Sequence[Pair]) -> bytes:
    """``application/x-www-form-urlencoded`` (also a query string)."""
    return b"&".join(encode_value(k) + b"=" + encode_value(v) for k, v in pairs)


@dataclass(frozen=True)
class Wire:
    """One HTTP request as bytes. ``framing``: how the body is delimited over a socket
    (``length``: Content-Length, ``chunked``: Transfer-Encoding, ``none``: neither)."""

    method: str
    path: bytes
    query: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    framing: str = "length"

    @property
    def target(self) -> bytes:
        return self.path + (b"?" + self.query if self.query else b"")

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def describe(self) -> str:
        """A readable form for failure messages and for turning a failure into an example."""
        shown = self.body if len(self.body) <= 600 else self.body[:600] + b"..."
        target = self.target if len(self.target) <= 600 else self.target[:600] + b"..."
        return (
            f"{self.method} {target!r}\n"
            + "".join(f"  {k}: {v[:300]!r}\n" for k, v in self.headers)
            + f"  body ({len(self.body)} bytes, {self.framing}): {shown!r}"
        )


@dataclass
class Answer:
    status: int
    headers: Headers
    body: bytes = b""
    # True when the answer came from the application (every answer of the broker carries its
    # security headers); False for the HTTP server's own refusals (gunicorn's 400 pages).
    from_app: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mimetype(self) -> str:
        return (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def location(self) -> str | None:
        return self.headers.get("Location")


def _answer(status: int, headers: Headers, body: bytes) -> Answer:
    return Answer(status, headers, body, from_app="X-Content-Type-Options" in headers)


def send_wsgi(client: FlaskClient, wire: Wire, remote_addr: str = "127.0.0.1") -> Answer:
    """Through the WSGI app, in-process. The raw path and query string go into the environ as
    a WSGI server puts them there (bytes decoded as latin-1), so undecodable bytes arrive as
    they would from the network."""
    target = wire.target.decode("latin-1")
    response = client.open(
        "/",
        method=wire.method,
        headers=list(wire.headers),
        data=wire.body,
        environ_overrides={
            "PATH_INFO": unquote_to_bytes(wire.path).decode("latin-1"),
            "QUERY_STRING": wire.query.decode("latin-1"),
            "REQUEST_URI": target,
            "RAW_URI": target,
            "REMOTE_ADDR": remote_addr,
        },
    )
    try:
        body = response.get_data()
    finally:
        response.close()
    return _answer(response.status_code, Headers(response.headers), body)


def request_bytes(wire: Wire, host: str, *, close: bool = True) -> bytes:
    """The request as it goes over a socket: request line, headers, framing, body."""
    lines = [wire.method.encode("latin-1") + b" " + wire.target + b" HTTP/1.1"]
    if wire.header("Host") is None:
        lines.append(b"Host: " + host.encode("ascii"))
    for name, value in wire.headers:
        lines.append(name.encode("latin-1") + b": " + value.encode("latin-1"))
    body = wire.body
    if wire.framing == "length" and (body or wire.method not in ("GET", "HEAD")):
        lines.append(b"Content-Length: " + str(len(body)).encode())
    elif wire.framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        chunks = [body[i : i + 1000] for i in range(0, len(body), 1000)]
        body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def read_answer(sock: socket.socket, method: str) -> Answer:
    """One HTTP response from ``sock`` (raises on a closed or broken connection)."""
    response = http.client.HTTPResponse(sock, method=method)
    try:
        response.begin()
        body = response.read()
        headers = Headers(list(response.getheaders()))
        return _answer(response.status, headers, body)
    finally:
        response.close()


def send_socket(address: tuple[str, int], wire: Wire, timeout: float = 15.0) -> Answer:
    """Over a fresh TCP connection to a real server; the connection is closed afterwards."""
    host = f"{address[0]}:{address[1]}"
    with socket.create_connection(address, timeout=timeout) as sock:
        # The server may answer before reading everything (a refused body): read that answer.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request_bytes(wire, host))
        return read_answer(sock, wire.method)
