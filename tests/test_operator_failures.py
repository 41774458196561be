"""What an operator sees when something outside the broker is wrong: one line that says what
failed, where and why, never a traceback (``--debug`` prints it); and ``broker check-config``,
which writes nothing, with ``--connect`` checking what the config points at."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from werkzeug.serving import make_server

from broker.failures import database_cause, describe, safe_url
from tests.conftest import POSTGRES_URL
from tests.support import free_port

BIN = Path(sys.executable).parent


def write_config(tmp_path: Path, users_file: Path, **changes: Any) -> Path:
    config = {
        "issuer": "http://127.0.0.1:8000",
        "secret_key": "operator-" + "s" * 40,
        "database_url": f"sqlite:///{tmp_path / 'broker.db'}",
        "providers": {"local": {"users_file": str(users_file)}},
        "resources": [{"uri": "http://127.0.0.1:8001/mcp", "scopes": {"demo:read": "Read"}}],
        **changes,
    }
    path = tmp_path / "broker.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def broker(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "broker"), "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=config.parent,
    )


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def refused_port() -> int:
    """A loopback port nothing listens on."""
    return free_port()


# -- check-config -------------------------------------------------------------------------------


def test_check_config_writes_nothing(tmp_path: Path, users_file: Path) -> None:
    config = write_config(tmp_path, users_file)
    done = broker(config, "check-config")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("configuration ok: issuer http://127.0.0.1:8000")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broker.yaml"]


def test_check_config_connect_reports_a_missing_database_without_creating_it(
    tmp_path: Path, users_file: Path
) -> None:
    config = write_config(tmp_path, users_file)
    done = broker(config, "check-config", "--connect")
    assert done.returncode == 1
    assert f"FAIL database sqlite:///{tmp_path}/broker.db: does not exist" in done.stderr
    assert "ok   provider local: users file" in done.stdout
    assert not (tmp_path / "broker.db").exists()
    # After db upgrade it is at head; the keys are made at the first start, not by the check.
    assert broker(config, "db", "upgrade").returncode == 0
    done = broker(config, "check-config", "--connect")
    assert done.returncode == 0, done.stderr
    assert "ok   database" in done.stdout and "at head" in done.stdout
    assert "ok   signing keys: none yet" in done.stdout


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_check_config_connect_on_postgresql_behind_and_at_head(
    database_url: str, tmp_path: Path, users_file: Path
) -> None:
    config = write_config(tmp_path, users_file, database_url=database_url)
    done = broker(config, "check-config", "--connect")
    assert done.returncode == 1
    assert "FAIL database" in done.stderr and "run `broker db upgrade`" in done.stderr, done.stderr
    assert broker(config, "db", "upgrade").returncode == 0
    done = broker(config, "check-config", "--connect")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_wrong_secret_is_a_failed_check(
    database_url: str, tmp_path: Path, users_file: Path
) -> None:
    config = write_config(tmp_path, users_file, database_url=database_url)
    assert broker(config, "db", "upgrade").returncode == 0
    assert broker(config, "keys", "list").returncode == 0  # the first start makes the keys
    write_config(tmp_path, users_file, database_url=database_url, secret_key="other-" + "x" * 40)
    done = broker(config, "check-config", "--connect")
    assert done.returncode == 1
    assert "FAIL signing keys: secret_key: opens none of the 2 signing keys" in done.stderr


@pytest.fixture
def discovery_server() -> Iterator[dict[str, Any]]:
    """A tiny OpenID provider discovery endpoint whose answers a test chooses."""
    from flask import Flask, jsonify

    state: dict[str, Any] = {"issuer": None, "status": 200}
    app = Flask("discovery")
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    @app.get("/.well-known/openid-configuration")
    def discovery() -> Any:
        issuer = state["issuer"] or base
        body = {
            "issuer": issuer,
            "authorization_endpoint": f"{base}/authorize",
            "token_endpoint": f"{base}/token",
            "jwks_uri": f"{base}/jwks",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        }
        return jsonify(body), state["status"]

    @app.get("/jwks")
    def jwks() -> Any:
        return jsonify({"keys": [{"kty": "RSA", "kid": "k1", "n": "AQAB", "e": "AQAB"}]})

    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state["base"] = base
    try:
        yield state
    finally:
        server.shutdown()


def test_check_config_connect_asks_every_provider(
    tmp_path: Path, users_file: Path, discovery_server: dict[str, Any]
) -> None:
    base = discovery_server["base"]
    gone = f"http://127.0.0.1:{refused_port()}"
    providers = {
        "local": {"users_file": str(users_file)},
        "idp": {"type": "oidc", "issuer": base, "client_id": "b", "client_secret": "s" * 20},
        "gone": {"type": "oidc", "issuer": gone, "client_id": "b", "client_secret": "s" * 20},
    }
    config = write_config(tmp_path, users_file, providers=providers)
    done = broker(config, "check-config", "--connect")
    assert done.returncode == 1
    assert f"ok   provider idp: discovery {base}/.well-known/openid-configuration: issuer" in (
        done.stdout
    )
    assert f"ok   provider idp: jwks {base}/jwks: 1 key(s)" in done.stdout
    failed = [line for line in done.stderr.splitlines() if line.startswith("FAIL provider gone")]
    assert len(failed) == 1 and f"GET {gone}/.well-known/openid-configuration" in failed[0]
    assert "ConnectError" in failed[0]
    # An issuer mismatch names both values.
    discovery_server["issuer"] = "https://evil.example"
    done = broker(config, "check-config", "--connect")
    line = next(x for x in done.stderr.splitlines() if x.startswith("FAIL provider idp"))
    assert "'https://evil.example'" in line and repr(base) in line


def test_a_github_provider_checks_its_endpoints(tmp_path: Path, users_file: Path) -> None:
    from tests.fakes.github import FakeGitHub

    with FakeGitHub() as github:
        providers = {"github": github.provider_config()}
        config = write_config(tmp_path, users_file, providers=providers)
        done = broker(config, "check-config", "--connect")
    lines = [x for x in done.stdout.splitlines() if x.startswith("ok   provider github")]
    assert len(lines) == 2, done.stdout + done.stderr
    assert f"authorization endpoint {github.base_url}/login/oauth/authorize answers" in lines[0]


def test_check_config_connect_reports_redis(tmp_path: Path, users_file: Path) -> None:
    config = write_config(tmp_path, users_file, redis_url=f"redis://127.0.0.1:{refused_port()}/0")
    done = broker(config, "check-config", "--connect")
    assert done.returncode == 1
    assert "FAIL redis redis://127.0.0.1:" in done.stderr and "unreachable" in done.stderr


# -- one line, never a traceback ----------------------------------------------------------------


def test_an_unreachable_postgresql_is_one_line(tmp_path: Path, users_file: Path) -> None:
    url = f"postgresql+psycopg://broker:hunter2@127.0.0.1:{refused_port()}/broker"
    config = write_config(tmp_path, users_file, database_url=url)
    for args in (("db", "upgrade"), ("users", "list"), ("keys", "list"), ("audit",)):
        line = one_line(broker(config, *args))
        assert line == (f"broker: database {safe_url(url)} unreachable: connection refused"), args
        assert "hunter2" not in line and "***" in line
    debug = broker(config, "--debug", "users", "list")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_a_database_that_does_not_exist_is_one_line(tmp_path: Path, users_file: Path) -> None:
    url = POSTGRES_URL.rsplit("/", 1)[0] + "/no_such_database_here"
    config = write_config(tmp_path, users_file, database_url=url)
    line = one_line(broker(config, "db", "upgrade"))
    assert line.startswith(f"broker: database {safe_url(url)} unreachable: ")
    assert 'database "no_such_database_here" does not exist' in line


def test_descriptions() -> None:
    from sqlalchemy.exc import OperationalError

    class Orig(Exception):
        pass

    refused = OperationalError(
        "SELECT 1",
        {"secret": "x"},
        Orig(
            'connection failed: connection to server at "10.0.0.5", port 5432 failed: '
            "Connection refused\n\tIs the server running on that host?"
        ),
    )
    assert database_cause(refused) == "connection refused"
    line = describe(refused, database_url="postgresql+psycopg://u:pw@db/broker")
    assert line == "database postgresql+psycopg://u:***@db/broker unreachable: connection refused"
    statement = OperationalError("SELECT 1", {"secret": "x"}, Orig("no such table: clients"))
    line = describe(statement, database_url="sqlite:///b.db")
    assert line == "database sqlite:///b.db refused a statement: no such table: clients"
    assert describe(redis.ConnectionError("Error 111 connecting"), redis_url="redis://r:6379")
    assert describe(ValueError("a bug")) is None


# -- gunicorn -------------------------------------------------------------------------------------


def gunicorn(config: Path, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(BIN / "gunicorn"),
            "-c",
            "python:broker.gunicorn_conf",
            "broker.wsgi:app",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "2",
        ],
        env={**os.environ, "BROKER_CONFIG": str(config)},
        cwd=config.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_gunicorn_that_cannot_start_says_why_in_one_line(tmp_path: Path, users_file: Path) -> None:
    url = f"postgresql+psycopg://broker:hunter2@127.0.0.1:{refused_port()}/broker"
    config = write_config(tmp_path, users_file, database_url=url)
    done = gunicorn(config, free_port())
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert f"Error: broker: database {safe_url(url)}: unreachable: connection refused" in output
    assert "Traceback" not in output and "hunter2" not in output
    assert "Booting worker" not in output  # said once, by the master, before any worker
    # A schema behind the release: the same, naming the command that fixes it.
    config = write_config(tmp_path, users_file)
    done = gunicorn(config, free_port())
    assert "Error: broker: database sqlite:///" in done.stderr, done.stderr
    assert "does not exist (run `broker db upgrade`)" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_the_wsgi_entry_that_cannot_load_exits_with_one_line(
    tmp_path: Path, users_file: Path
) -> None:
    """What a worker does when the app cannot load (the master checked before, but the database
    may go away in between): one line, and gunicorn's "application failed to load" status, which
    stops the master instead of booting more workers."""
    url = f"postgresql+psycopg://broker:hunter2@127.0.0.1:{refused_port()}/broker"
    config = write_config(tmp_path, users_file, database_url=url)
    done = subprocess.run(
        [sys.executable, "-c", "import broker.wsgi"],
        env={**os.environ, "BROKER_CONFIG": str(config)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 4
    assert (
        done.stderr.strip() == f"broker: database {safe_url(url)} unreachable: connection refused"
    )


# -- make demo ----------------------------------------------------------------------------------


def test_a_taken_demo_port_is_said_first_and_nothing_is_made(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [
                str(BIN / "broker"),
                "demo",
                "--dir",
                str(tmp_path / "demo"),
                "--port",
                str(port),
                "--mcp-port",
                str(free_port()),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == (
        f"broker demo: cannot listen on 127.0.0.1:{port} for the broker: address already in use "
        "(choose other ports: make demo PORT=8010 MCP_PORT=8011, "
        "or broker demo --port 8010 --mcp-port 8011)"
    )
    assert not (tmp_path / "demo").exists()
