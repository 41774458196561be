"""docs/deployment.md, walked as an operator would on a fresh directory: the configuration from
the guide (only the database pointed at the test PostgreSQL), `broker check-config` (nothing
written), the guide's database commands, its gunicorn command with two workers, and then the
metadata, readiness and `/metrics` served."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg
import pytest
import yaml

from tests.conftest import POSTGRES_URL
from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "deployment.md"
BIN = Path(sys.executable).parent
GUIDE_CONFIG = "/etc/broker/broker.yaml"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.parametrize("database_url", ["postgresql"], indirect=True),
]


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", GUIDE.read_text(), re.S)


def shell_lines(block: str) -> list[str]:
    """The commands of a ``sh`` block, continuation lines joined, comments dropped."""
    joined = block.replace("\\\n", " ")
    return [line.split(" #")[0].strip() for line in joined.splitlines() if line.strip()]


def tables(database_url: str) -> list[str]:
    schema = re.search(r"search_path%3D(\w+)", database_url)
    assert schema
    with psycopg.connect(POSTGRES_URL.replace("+psycopg", "")) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            (schema.group(1),),
        ).fetchall()
    return [r[0] for r in rows]


def test_the_deployment_guide_walked_on_a_fresh_directory(
    database_url: str, tmp_path: Path
) -> None:
    # 1. Configuration: the guide's, with the database pointed at the test PostgreSQL.
    config = yaml.safe_load(blocks("yaml")[0])
    assert config["issuer"] == "https://sso.example.com"
    config["database_url"] = database_url
    path = tmp_path / "broker.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "PROMETHEUS"))},
        "BROKER_SECRET_KEY": "d" * 64,
        "METRICS_TOKEN": "m" * 40,
        "OIDC_SECRET": "oidc-secret-from-the-vault",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }

    def run(command: str) -> subprocess.CompletedProcess[str]:
        command = command.replace(GUIDE_CONFIG, str(path))
        return subprocess.run(
            ["bash", "-c", command],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )

    [check_config, connect] = re.findall(r"`(broker [^`]*check-config[^`]*)`", GUIDE.read_text())
    check = run(check_config)
    assert check.returncode == 0, check.stderr
    assert check.stdout.startswith("configuration ok: issuer https://sso.example.com")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broker.yaml"]  # nothing written
    assert tables(database_url) == []

    # 2. Database: the guide's commands, as written (creating the role is the DBA's part).
    database = [
        line
        for line in shell_lines(blocks("sh")[0])
        if line.startswith(("broker ", "BROKER_CONFIG="))
    ]
    assert [shlex.split(line)[-2:] for line in database] == [["db", "upgrade"], ["db", "check"]]
    for line in database:
        done = run(line)
        assert done.returncode == 0, (line, done.stdout, done.stderr)
    assert "signing_keys" in tables(database_url)
    # The connected check the guide gives next (the provider's upstream is not reachable here:
    # that line fails, naming it; the database lines pass).
    checked = run(connect)
    assert "ok   database" in checked.stdout and "ok   signing keys" in checked.stdout
    assert "FAIL provider corp: discovery GET https://idp.example.com/" in checked.stderr

    # 3. gunicorn: the guide's command, two workers, a free port.
    [command] = [line for line in shell_lines(blocks("sh")[1]) if "gunicorn" in line]
    port = free_port()
    command = command.replace("BROKER_BIND=127.0.0.1:8000", f"BROKER_BIND=127.0.0.1:{port}")
    assert f"127.0.0.1:{port}" in command and "broker.wsgi:app" in command
    log = tmp_path / "gunicorn.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["bash", "-c", f"exec env BROKER_WORKERS=2 {command.replace(GUIDE_CONFIG, str(path))}"],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        metadata = httpx.get(f"{base}/.well-known/oauth-authorization-server").json()
        assert metadata["issuer"] == "https://sso.example.com"
        assert metadata["token_endpoint"] == "https://sso.example.com/token"
        assert httpx.get(f"{base}/jwks.json").json()["keys"]
        assert httpx.get(f"{base}/metrics").status_code == 401
        scraped = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {'m' * 40}"})
        assert scraped.status_code == 200, scraped.text
        assert "broker_request_duration_seconds" in scraped.text
        text = log.read_text()
        assert len(re.findall(r"Booting worker with pid", text)) == 2, text
        assert "Traceback" not in text
    finally:
        proc.terminate()
        proc.wait(20)
