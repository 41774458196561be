#!/usr/bin/env python
"""Instructions per request in one process, counted by valgrind: a measure that does not move
with the neighbours' load, for changes too small for the timed benchmarks to see.

In one Python process under ``valgrind --tool=callgrind``, the broker's WSGI application (the
``local`` provider, its password hash argon2id with minimal cost so that the password check
does not dominate; SQLite, or a PostgreSQL schema of its own) serves one kind of request:

- ``login``: first-time logins of browsers that have never been there: ``/authorize`` -> the
  consent page -> approve -> the login form -> the code -> ``/token``, played by an ``httpx``
  client on ``httpx.WSGITransport`` (its instructions are counted too: they are the same for
  every tree);
- ``refresh``: refresh-token grants of one family, rotated one after the other;
- ``health``: ``GET /health``, the bare endpoint the token endpoint's goal is measured against.

A refresh and ``/health`` are WSGI calls made directly, with the environ a WSGI server hands
the application (the body in ``wsgi.input``): no HTTP client is counted, only the application.
For each kind the process runs twice, without the counted requests and with them; the
difference, divided by their number, is the count per request, the set-up (imports, the schema,
three logins and, for the other two, a family's first 50 refreshes or 50 ``/health`` that fill
the caches) left out. PostgreSQL's own work is in its server processes, which are not counted.

``--against`` names another checkout of the broker (its own code, this script's harness),
measured side by side: the ratio is the change's. valgrind must be installed (Debian's
``valgrind``); the counts vary by well under 1% between runs of the same tree.

    .venv/bin/python bench/instructions.py                      # SQLite, all three, about 3 min
    .venv/bin/python bench/instructions.py --against ../other   # two trees, about 6 min
    .venv/bin/python bench/instructions.py --only refresh --against ../other
    .venv/bin/python bench/instructions.py \\
        --database-url postgresql+psycopg://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")
KINDS = ("login", "refresh", "health")
COUNTED = {"login": 40, "refresh": 400, "health": 1000}  # requests counted, by default
WARM = 50  # refreshes or /health before the counted ones (both runs make them)
ISSUER = "http://127.0.0.1:8000"


def environ(method: str, path: str, body: bytes = b"") -> dict[str, Any]:
    """The WSGI environ of a request as a WSGI server builds it (an httpx client's headers)."""
    values: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "50000",
        "HTTP_HOST": "127.0.0.1:8000",
        "HTTP_ACCEPT": "*/*",
        "HTTP_ACCEPT_ENCODING": "gzip, deflate",
        "HTTP_CONNECTION": "keep-alive",
        "HTTP_USER_AGENT": "python-httpx/0.28.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    if body:
        values["CONTENT_TYPE"] = "application/x-www-form-urlencoded"
        values["CONTENT_LENGTH"] = str(len(body))
    return values


def call(app: Callable[..., Any], values: dict[str, Any]) -> tuple[str, bytes]:
    """One request through the WSGI application: its status line and body."""
    status: list[str] = []

    def start_response(line: str, headers: Any, exc_info: Any = None) -> None:
        status.append(line)

    body = app(values, start_response)
    try:
        return status[0], b"".join(body)
    finally:
        getattr(body, "close", lambda: None)()


def child(root: Path, database_url: str | None, kind: str, count: int) -> None:
    """The measured process: set up ``root``'s broker, then ``count`` requests of ``kind``."""
    sys.path[:0] = [str(HERE), str(root)]
    os.chdir(root)
    import httpx
    import token_endpoint as te
    import yaml
    from argon2 import PasswordHasher

    work = Path(tempfile.mkdtemp(prefix="broker-bench-instructions-"))
    try:
        users = work / "users.yaml"
        cheap = PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
        users.write_text(
            yaml.safe_dump({"users": {te.USERNAME: {"password_hash": cheap.hash(te.PASSWORD)}}})
        )
        with te.database(database_url, work, "instructions") as db_url:
            config = te.write_config(work, "broker", 8000, db_url, users, "ES256")
            env = {**os.environ, "BROKER_CONFIG": str(config)}
            upgrade = "import sys; sys.path.insert(0, '.'); from broker.cli import main; main()"
            done = subprocess.run(
                [sys.executable, "-c", upgrade, "db", "upgrade"],
                cwd=root,
                env=env,
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise SystemExit(f"broker db upgrade failed:\n{done.stdout}{done.stderr}")
            os.environ["BROKER_CONFIG"] = str(config)
            from broker.wsgi import app

            transport = httpx.WSGITransport(app=app)
            with httpx.Client(transport=transport, base_url=ISSUER) as client:
                client_id = client.post("/register", json=te.BENCH_CLIENT).json()["client_id"]

                def login() -> str:
                    with httpx.Client(transport=transport, base_url=ISSUER) as browser:
                        return te.redeem(client, client_id, *te.authorize(browser, client_id))

                warm = [login() for _ in range(3)]  # caches, compiled statements
                if kind == "login":
                    for _ in range(count):
                        login()
                    return
            refresh_token = warm[-1]

            def refresh() -> None:
                nonlocal refresh_token
                form = {
                    "grant_type": "refresh_token",
                    "refresh_token": refresh_token,
                    "client_id": client_id,
                }
                status, body = call(app, environ("POST", "/token", urlencode(form).encode()))
                if not status.startswith("200"):
                    raise SystemExit(f"refresh: {status} {body[:300]!r}")
                refresh_token = json.loads(body)["refresh_token"]

            def health() -> None:
                status, body = call(app, environ("GET", "/health"))
                if not status.startswith("200"):
                    raise SystemExit(f"/health: {status} {body[:300]!r}")

            request = refresh if kind == "refresh" else health
            for _ in range(WARM + count):
                request()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(root: Path, database_url: str | None, kind: str, count: int) -> int:
    """Instructions of a child process with ``count`` requests of ``kind``."""
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    command += [sys.executable, __file__, "--child", str(root), kind, str(count)]
    if database_url:
        command += ["--database-url", database_url]
    done = subprocess.run(command, capture_output=True, text=True)
    found = COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"the measured process failed ({root}, {kind}):\n{done.stderr[-3000:]}")
    return int(found.group(1))


def commit(root: Path) -> str:
    done = subprocess.run(
        ["git", "-C", str(root), "log", "-1", "--format=%h %s"], capture_output=True, text=True
    )
    return done.stdout.strip()[:60] or "(not a git checkout)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", choices=KINDS, action="append", help="only this kind (repeatable; default all)"
    )
    parser.add_argument("--logins", type=int, default=COUNTED["login"], help="logins counted")
    parser.add_argument(
        "--refreshes", type=int, default=COUNTED["refresh"], help="refreshes counted"
    )
    parser.add_argument("--health", type=int, default=COUNTED["health"], help="/health counted")
    parser.add_argument("--database-url", help="a PostgreSQL URL (default: SQLite)")
    parser.add_argument("--against", type=Path, help="another checkout, measured side by side")
    parser.add_argument("--child", nargs=3, metavar=("ROOT", "KIND", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        root, kind, n = args.child
        child(Path(root).resolve(), args.database_url, kind, int(n))
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    trees = [ROOT] + ([args.against.resolve()] if args.against else [])
    for tree in trees:
        if not (tree / "broker" / "wsgi.py").is_file():
            raise SystemExit(f"--against: {tree} is not a checkout of the broker")
    kinds = [kind for kind in KINDS if kind in (args.only or KINDS)]
    counted = {"login": args.logins, "refresh": args.refreshes, "health": args.health}
    runs = [(tree, kind, n) for tree in trees for kind in kinds for n in (0, counted[kind])]
    with ThreadPoolExecutor(max_workers=2) as pool:
        totals = list(pool.map(lambda run: measure(run[0], args.database_url, *run[1:]), runs))
    by_run = dict(zip(runs, totals, strict=True))
    per = {
        (tree, kind): (by_run[tree, kind, counted[kind]] - by_run[tree, kind, 0]) / counted[kind]
        for tree in trees
        for kind in kinds
    }
    backend = "PostgreSQL" if args.database_url else "SQLite"
    print(
        f"Instructions per request in one process, {backend}, the local provider (callgrind; "
        "a login's httpx browser included, a refresh's and /health's WSGI calls direct)"
    )
    header = "".join(f"{kind + (' (M)' if kind == 'login' else ' (k)'):>14}" for kind in kinds)
    print(f"  {header}  tree")
    for tree in trees:
        cells = "".join(
            f"{per[tree, kind] / (1e6 if kind == 'login' else 1e3):14,.1f}" for kind in kinds
        )
        print(f"  {cells}  {tree} ({commit(tree)})")
    if "refresh" in kinds and "health" in kinds:
        for tree in trees:
            print(f"  refresh / health: {per[tree, 'refresh'] / per[tree, 'health']:.2f}  {tree}")
    if args.against:
        for kind in kinds:
            ratio = per[ROOT, kind] / per[trees[1], kind]
            print(f"  {kind}: this checkout / the other = {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
