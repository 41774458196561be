#!/usr/bin/env python
"""Instructions per first-time login in one process, counted by valgrind: a measure that does
not move with the neighbours' load, for changes too small for the timed benchmarks to see.

In one Python process under ``valgrind --tool=callgrind``, the broker's WSGI application (the
``local`` provider, its password hash argon2id with minimal cost so that the password check
does not dominate; SQLite, or a PostgreSQL schema of its own) serves logins of browsers that
have never been there: ``/authorize`` -> the consent page -> approve -> the login form -> the
code -> ``/token``, played by an ``httpx`` client on ``httpx.WSGITransport`` (its instructions
are counted too: they are the same for every tree). The process runs twice, with no logins and
with ``--logins``; the difference, divided by the logins, is the count per login, the set-up
(imports, the schema, the first logins' caches) left out. PostgreSQL's own work is in its
server processes, which are not counted.

``--against`` names another checkout of the broker (its own code, this script's harness),
measured side by side: the ratio is the change's. valgrind must be installed (Debian's
``valgrind``); the counts vary by well under 1% between runs of the same tree.

    .venv/bin/python bench/login_instructions.py                     # SQLite, about 2 min
    .venv/bin/python bench/login_instructions.py --against ../other  # two trees, about 2 min
    .venv/bin/python bench/login_instructions.py \\
        --database-url postgresql+psycopg://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


def child(root: Path, database_url: str | None, logins: int) -> None:
    """The measured process: set up ``root``'s broker, then ``logins`` logins."""
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
            url = "http://127.0.0.1:8000"
            with httpx.Client(transport=transport, base_url=url) as client:
                client_id = client.post("/register", json=te.BENCH_CLIENT).json()["client_id"]

                def login() -> None:
                    with httpx.Client(transport=transport, base_url=url) as browser:
                        te.redeem(client, client_id, *te.authorize(browser, client_id))

                for _ in range(3 + logins):  # three first: caches, compiled statements
                    login()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def count(root: Path, database_url: str | None, logins: int) -> int:
    """Instructions of a child process with ``logins`` logins."""
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    command += [sys.executable, __file__, "--child", str(root), "--logins", str(logins)]
    if database_url:
        command += ["--database-url", database_url]
    done = subprocess.run(command, capture_output=True, text=True)
    found = COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"the measured process failed ({root}):\n{done.stderr[-3000:]}")
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
    parser.add_argument("--logins", type=int, default=40, help="logins counted (default 40)")
    parser.add_argument("--database-url", help="a PostgreSQL URL (default: SQLite)")
    parser.add_argument("--against", type=Path, help="another checkout, measured side by side")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child(args.child.resolve(), args.database_url, args.logins)
        return 0
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    trees = [ROOT] + ([args.against.resolve()] if args.against else [])
    for tree in trees:
        if not (tree / "broker" / "wsgi.py").is_file():
            raise SystemExit(f"--against: {tree} is not a checkout of the broker")
    runs = [(tree, n) for tree in trees for n in (0, args.logins)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        counted = list(pool.map(lambda run: count(run[0], args.database_url, run[1]), runs))
    per_login = {
        tree: (counted[2 * i + 1] - counted[2 * i]) / args.logins for i, tree in enumerate(trees)
    }
    backend = "PostgreSQL" if args.database_url else "SQLite"
    print(
        f"Instructions per first-time login in one process, {backend}, the local provider, "
        f"{args.logins} logins counted (callgrind; the harness's httpx browser included)"
    )
    for tree in trees:
        print(f"  {per_login[tree] / 1e6:8.2f} M  {tree}  ({commit(tree)})")
    if args.against:
        print(f"this checkout / the other = {per_login[ROOT] / per_login[trees[1]]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
