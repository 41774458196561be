"""The same generators over real HTTP, against gunicorn with two workers on PostgreSQL, set up as
an operator would (``broker.yaml``, ``broker db upgrade``, ``gunicorn wsgi:app -c
gunicorn.conf.py``), plus what only a real server sees: oversized request lines, headers and
bodies, bytes that are not UTF-8 in the request line, chunked bodies, and a second request on a
connection whose first body was refused. Every answer: never a 5xx, and nothing at ERROR or a
traceback in the server's log (the log is configured to name each record's level)."""

from __future__ import annotations

import contextlib
import functools
import http.client
import os
import secrets
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from broker import create_app
from broker.config import parse
from broker.db import Database
from tests.conftest import POSTGRES_URL, postgres_available
from tests.e2e.test_gunicorn import BIN, ROOT, gunicorn
from tests.fakes.github import FakeGitHub
from tests.fuzz.cases import CASES
from tests.fuzz.mutations import Op, Template, render
from tests.fuzz.runner import fuzz, run_case
from tests.fuzz.verdict import Snapshot, Violation, install_journal
from tests.fuzz.verdict import World as Checks
from tests.fuzz.wire import Answer, Wire, read_answer, request_bytes, send_socket
from tests.fuzz.world import FuzzWorld, cheap_users_file, settings_data
from tests.support import free_port, unavailable

pytestmark = pytest.mark.slow

LOG_CONFIG = """\
[loggers]
keys=root,error,access
[handlers]
keys=out
[formatters]
keys=plain
[logger_root]
level=INFO
handlers=out
[logger_error]
level=INFO
handlers=out
propagate=0
qualname=gunicorn.error
[logger_access]
level=INFO
handlers=out
propagate=0
qualname=gunicorn.access
[handler_out]
class=StreamHandler
formatter=plain
args=(sys.stdout,)
[formatter_plain]
format=%(levelname)s %(name)s: %(message)s
"""


@dataclass
class Served:
    """The world of a broker served by gunicorn; ``log`` is its combined log."""

    world: FuzzWorld
    log: Path
    address: tuple[str, int]
    _seen: int = 0

    def send(self, wire: Wire) -> Answer:
        return send_socket(self.address, wire)

    def checks(self) -> Checks:
        return self.world.checks()

    def snapshot(self) -> Snapshot:
        return self.world.snapshot()

    def new_log(self) -> str:
        text = self.log.read_text(errors="replace")
        new, self._seen = text[self._seen :], len(text)
        return new

    def check_log(self, what: str) -> None:
        bad = [
            line
            for line in self.new_log().splitlines()
            if line.startswith(("ERROR ", "CRITICAL ")) or "Traceback" in line
        ]
        if bad:
            raise Violation(f"{what}: the server logged\n" + "\n".join(bad[:20]))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, github_fake: FakeGitHub) -> Iterator[Served]:
    if not postgres_available():
        unavailable(f"PostgreSQL is not reachable at {POSTGRES_URL}")
    import psycopg

    schema = "fuzz_" + secrets.token_hex(6)
    plain = POSTGRES_URL.replace("+psycopg", "")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    base = tmp_path_factory.mktemp("fuzz-gunicorn")
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    users = base / "users.yaml"
    cheap_users_file(users)
    database_url = f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    data = settings_data(issuer, database_url, str(users), github_fake)
    config = base / "broker.yaml"
    config.write_text(yaml.safe_dump(data))
    (base / "logging.ini").write_text(LOG_CONFIG)
    env = {
        **os.environ,
        "BROKER_CONFIG": str(config),
        "GUNICORN_CMD_ARGS": f"--log-config {base / 'logging.ini'}",
    }
    subprocess.run(
        [str(BIN / "broker"), "db", "upgrade"],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=60,
    )
    database = Database(database_url)
    install_journal(database.engine)
    database.dispose()
    # The test's own handle on the database: the operator's static clients, and snapshots.
    data["instance_path"] = str(base / "instance")
    app = create_app(parse(data, env={}, base_dir=str(base), testing=True))
    log = base / "gunicorn.log"
    try:
        with gunicorn(env, port, log, workers=2):
            address = ("127.0.0.1", port)
            world = FuzzWorld(
                functools.partial(send_socket, address), issuer, app, github_fake.base_url
            ).setup()
            served = Served(world, log, address)
            served.check_log("setting up")
            yield served
        text = log.read_text(errors="replace")
        assert text.count("Booting worker with pid") >= 2, text[-2000:]
    finally:
        app.extensions["broker"].db.dispose()
        app.extensions["broker"].http.close()
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


# -- the same generators ---------------------------------------------------------------------

NAMES = sorted(CASES)


@fuzz(1.5)
@given(data=st.data())
def test_the_generators_over_http(served: Served, data: st.DataObject) -> None:
    case = CASES[data.draw(st.sampled_from(NAMES), label="endpoint")]
    variant = data.draw(st.integers(0, case.variants - 1), label="variant")
    plan: tuple[Op, ...] = data.draw(case.plans, label="plan")
    case.run(served.world, variant, plan, served)
    served.check_log(case.name)


# -- what only a real server sees --------------------------------------------------------------


def raw_exchange(served: Served, data: bytes, *, read_two: bool = False) -> list[Answer | str]:
    """Send ``data`` on one connection and end the sending side (a body that promised more
    than it sent ends there); the answers, or ``closed`` where the server closed the connection
    (cleanly or with a reset). A hang fails."""
    answers: list[Answer | str] = []
    with socket.create_connection(served.address, timeout=15) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        for _ in range(2 if read_two else 1):
            try:
                answers.append(read_answer(sock, "GET"))
            except TimeoutError:
                raise AssertionError(f"the server hung: {data[:200]!r}") from None
            except (OSError, http.client.HTTPException):
                answers.append("closed")
                break
    return answers


def _no_5xx(answers: list[Answer | str], what: str) -> None:
    for answer in answers:
        if isinstance(answer, Answer) and answer.status >= 500:
            raise Violation(f"{what}: {answer.status} {answer.body[:300]!r}")


HOST = "Host: 127.0.0.1\r\n"
REQUEST_LINES = [
    b"GET /health?\xff\xfe=\xc0\xaf HTTP/1.1",
    b"GET /authorize?state=\xff&client_id=\x80 HTTP/1.1",
    b"GET /\xff\xfe HTTP/1.1",
    b"GET /consent?login=%ff%00 HTTP/1.1",
    b"GET /health\x00 HTTP/1.1",
    b"GET /health HTTP/9.9",
    b"GET /health HTTP/1.1 extra",
    b"GET  /health  HTTP/1.1",
    b"GET\t/health\tHTTP/1.1",
    b"get /health HTTP/1.1",
    b"G\xc3\x89T /health HTTP/1.1",
    b"GET http://evil.example/token HTTP/1.1",
    b"CONNECT 127.0.0.1:80 HTTP/1.1",
    b"OPTIONS * HTTP/1.1",
    b"GET /" + b"a" * 9000 + b" HTTP/1.1",
    b"GET /authorize?" + b"state=" + b"s" * 9000 + b" HTTP/1.1",
    b"GET /health",
    b"\xff\xfe\xfd",
    b"",
]


@pytest.mark.parametrize("line", REQUEST_LINES, ids=range(len(REQUEST_LINES)))
def test_request_lines(served: Served, line: bytes) -> None:
    answers = raw_exchange(served, line + b"\r\n" + HOST.encode() + b"Connection: close\r\n\r\n")
    _no_5xx(answers, repr(line[:80]))
    served.check_log(repr(line[:80]))


HEADERS = [
    b"X-Big: " + b"x" * 9000 + b"\r\n",
    b"".join(b"X-%d: y\r\n" % i for i in range(150)),
    b"Cookie: " + b"c=" + b"z" * 9000 + b"\r\n",
    b"X-Bad: \xff\xfe\x00\r\n",
    b"X-Folded: a\r\n continued\r\n",
    b"No-Colon-Here\r\n",
    b" Leading-Space: x\r\n",
    b"Content-Length: -1\r\n",
    b"Content-Length: 1, 2\r\n",
    b"Content-Length: 99999999999999999999\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n",
    b"Transfer-Encoding: identity\r\n",
    b"Authorization: Basic /w==\r\n",
    b"Host: \xff\r\n",
]


@pytest.mark.parametrize("header", HEADERS, ids=range(len(HEADERS)))
def test_headers(served: Served, header: bytes) -> None:
    for path in (b"/health", b"/token"):
        head = b"POST " + path + b" HTTP/1.1\r\n" + HOST.encode() + header
        data = head + b"Connection: close\r\n\r\n"
        if b"chunked" in header:
            data += b"0\r\n\r\n"
        answers = raw_exchange(served, data)
        _no_5xx(answers, repr(header[:60]))
    served.check_log(repr(header[:60]))


def _form(size: int) -> bytes:
    return b"grant_type=refresh_token&refresh_token=" + b"r" * size


def _post(path: bytes, body: bytes, *, chunked: bool = False, close: bool = False) -> bytes:
    wire = Wire(
        "POST",
        path,
        headers=(("Content-Type", "application/x-www-form-urlencoded"),),
        body=body,
        framing="chunked" if chunked else "length",
    )
    return request_bytes(wire, "127.0.0.1", close=close)


KEEP_ALIVE = [
    ("token, 200 KB", b"/token", 200_000, False),
    ("token, 200 KB chunked", b"/token", 200_000, True),
    ("register, 40 KB", b"/register", 40_000, False),
    ("register, 40 KB chunked", b"/register", 40_000, True),
    ("token, small chunked", b"/token", 100, True),
]


@pytest.mark.parametrize(
    ("path", "size", "chunked"),
    [case[1:] for case in KEEP_ALIVE],
    ids=[case[0] for case in KEEP_ALIVE],
)
def test_keep_alive_after_a_refused_body(
    served: Served, path: bytes, size: int, chunked: bool
) -> None:
    """A body refused (413, or the endpoint's own error) and then, on the same connection, a
    second request: it gets a proper answer, or the server closes the connection cleanly. The
    rest of a refused body is never read as the next request."""
    second = request_bytes(Wire("GET", b"/health"), "127.0.0.1", close=True)
    answers = raw_exchange(
        served, _post(path, _form(size), chunked=chunked) + second, read_two=True
    )
    _no_5xx(answers, f"{path!r} {size}")
    first = answers[0]
    assert isinstance(first, Answer), answers
    if size > 64 * 1024 or (path == b"/register" and size > 16 * 1024):
        assert first.status == 413, (first.status, first.body[:200])
    else:
        assert 400 <= first.status < 500, (first.status, first.body[:200])
    if len(answers) > 1 and isinstance(answers[1], Answer):
        # Whatever came second is the answer to GET /health, not to leftover body bytes.
        assert answers[1].status == 200 and answers[1].json() == {"status": "ok"}, answers[1]
    served.check_log(f"keep-alive {path!r}")


CHUNKED = [
    b"5\r\nhello\r\n0\r\n\r\n",
    b"zz\r\nhello\r\n0\r\n\r\n",
    b"5;ext=1\r\nhello\r\n0\r\n\r\n",
    b"5\r\nhelloEXTRA\r\n0\r\n\r\n",
    b"-5\r\nhello\r\n0\r\n\r\n",
    b"fffffffffffffffffff\r\nx\r\n0\r\n\r\n",
    b"0\r\nX-Trailer: \xff\r\n\r\n",
    b"5\r\n\xff\xfe\x00\x01\x02\r\n0\r\n\r\n",
]


@pytest.mark.parametrize("body", CHUNKED, ids=range(len(CHUNKED)))
def test_chunked_bodies(served: Served, body: bytes) -> None:
    for path in (b"/token", b"/register", b"/revoke", b"/consent"):
        head = (
            b"POST " + path + b" HTTP/1.1\r\n" + HOST.encode() + b"Transfer-Encoding: chunked\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\nConnection: close\r\n\r\n"
        )
        answers = raw_exchange(served, head + body)
        _no_5xx(answers, f"{path!r} {body[:40]!r}")
    served.check_log(f"chunked {body[:40]!r}")


def test_a_valid_chunked_token_request(served: Served) -> None:
    """A chunked body is read whole: the same request as a Content-Length one."""
    template: Template = served.world.token_client_credentials()
    wire = render(template)
    chunked = Wire(wire.method, wire.path, wire.query, wire.headers, wire.body, "chunked")
    answer = run_case(served, template, ())
    assert answer.status == 200, answer.text
    answer = send_socket(served.address, chunked)
    assert answer.status == 200, answer.text
    served.check_log("chunked token request")


@pytest.mark.parametrize("body", [b"zz\r\nhello\r\n0\r\n\r\n", b"5\r\nhelloEXTRA\r\n0\r\n\r\n"])
def test_a_chunked_body_the_server_cannot_read_is_400(served: Served, body: bytes) -> None:
    """Found by the fuzzer: a chunk size that is not hexadecimal, or a chunk longer than its
    size, made gunicorn raise ``InvalidChunkSize`` (``ChunkMissingTerminator``) inside the
    broker's read of the body: a 500 with a traceback. Now 400 ``invalid_request``; a request
    after it on the same connection gets its own answer, or the connection is closed."""
    head = (
        b"POST /token HTTP/1.1\r\n" + HOST.encode() + b"Transfer-Encoding: chunked\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n\r\n"
    )
    second = request_bytes(Wire("GET", b"/health"), "127.0.0.1", close=True)
    answers = raw_exchange(served, head + body + second, read_two=True)
    first = answers[0]
    assert isinstance(first, Answer), answers
    assert first.status == 400 and first.json()["error"] == "invalid_request", first.body
    if len(answers) > 1 and isinstance(answers[1], Answer):
        assert answers[1].status == 200 and answers[1].json() == {"status": "ok"}, answers[1]
    served.check_log("unreadable chunked body")
