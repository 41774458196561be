#!/usr/bin/env python
"""The token endpoint under gunicorn, side by side with a bare endpoint, in one run.

Starts the broker as an operator does (``broker.yaml``, ``broker db upgrade``,
``gunicorn wsgi:app -c gunicorn.conf.py``; 2 gthread workers) on 127.0.0.1 with a tiny
configuration (the ``local`` provider, one resource), registers a public client through
``/register`` and signs in through ``/authorize`` -> ``/consent`` -> ``/login/local`` like a
browser, then measures with the same client concurrency (threads, each with a keep-alive
``httpx.Client``), after a warm-up:

(a) ``GET /health``: requests/s of a bare Flask endpoint on the same gunicorn settings;
(b) refresh-token grants/s: one refresh-token family per client thread, rotated sequentially
    (a refresh token is single use), all families of one client (as when many users share a
    metadata-document client); goal: refresh >= 0.5 x bare;
(b2) the same with one client per family (as dynamically registered clients are);
(c) authorization-code redemptions/s (codes minted beforehand through ``/authorize``, with the
    consent remembered by the browser session; the minting rate is printed too);
(d) refresh latency (one client thread, sequential) with few vs many stored grants: two more
    broker instances, one database each, seeded with SQL bulk inserts, measured in alternating
    rounds; goal: p50 with many <= 1.2 x p50 with few;
(e) refresh latency of a family that has already rotated many times vs a young family, on the
    same instance, alternating (each rotation leaves a row behind).

(a), (b) and (b2) alternate in rounds; every ratio is taken within this run only (figures on a
shared 2-core machine vary by about 30% with the neighbours' load). "server CPU" is the
user+system time of the gunicorn workers per request (read from /proc), "database CPU" that of
the PostgreSQL server processes serving this instance's connections (found by their
application_name; the server runs on this machine), "client CPU" the load generator's: on one
2-core box they all share the cores. The rate limits of /token and /authorize are off (the load
comes from one address and, in (b), one client, far above them); later authorizations of the
signed-in browser are confirmed as the signed-in user (a loopback redirect URI is confirmed every
time).

    .venv/bin/python bench/token_endpoint.py                 # SQLite, about 100 s
    .venv/bin/python bench/token_endpoint.py --quick         # about 25 s
    .venv/bin/python bench/token_endpoint.py \\
        --database-url postgresql+psycopg://postgres@127.0.0.1:5432/test
    .venv/bin/python bench/token_endpoint.py --grants 1000000   # (d) at 1,000,000 (+30-60 s)
    .venv/bin/python bench/token_endpoint.py --skip-throughput --grants 1000000   # (d), (e) only
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import hashlib
import os
import queue
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import endpoint_cpu
import httpx
import yaml
from sqlalchemy import JSON, BindParameter, bindparam, func, insert, select, text

from broker.config import DEFAULT_RATE_LIMITS
from broker.db import Database, UTCDateTime
from broker.models import Grant, RefreshToken
from providers.local import hash_password

ROOT = Path(__file__).resolve().parents[1]
ENDPOINT_CPU_ENV = "BENCH_ENDPOINT_CPU_DIR"  # endpoint_cpu.ENV (that module imports the broker)
BIN = Path(sys.executable).parent
RESOURCE = "http://127.0.0.1:8001/mcp"
REDIRECT_URI = "http://127.0.0.1:5555/callback"
USERNAME, PASSWORD = "bench", "bench-password"
SCOPE = "bench:read"
REFRESH_GOAL = 0.5  # refresh grants/s >= this x bare requests/s
SCALE_GOAL = 1.2  # latency with many grants <= this x latency with few
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# The load comes from one address (and in (b) from one client): the limits of the endpoints it
# calls are off, their counting is not what is measured.
LIMITS_OFF = {
    name: dict.fromkeys(limits, "off")
    for name, limits in DEFAULT_RATE_LIMITS.items()
    if name in ("token", "authorize") and limits
}


# -- the broker under gunicorn ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def database(base_url: str | None, directory: Path, name: str) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a PostgreSQL schema created and dropped here."""
    if base_url is None:
        yield f"sqlite:///{directory / f'{name}.db'}"
        return
    import psycopg

    if "?" in base_url:
        raise SystemExit("--database-url: give it without a query string (a schema is added)")
    schema = f"bench_{name}_{secrets.token_hex(4)}"
    plain = base_url.replace("+psycopg", "")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        # The schema also names the connections (application_name): their server processes'
        # CPU is read from /proc (Instance.database_cpu_seconds).
        yield f"{base_url}?options=-csearch_path%3D{schema}&application_name={schema}"
    finally:
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@dataclass
class Instance:
    url: str
    db_url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def worker_pids(self) -> list[int]:
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
            return [int(pid) for pid in children.split()]
        except OSError:
            pids = []
            for stat in Path("/proc").glob("[0-9]*/stat"):
                with contextlib.suppress(OSError, IndexError, ValueError):
                    if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                        pids.append(int(stat.parent.name))
            return pids

    def cpu_seconds(self) -> float:
        """user + system time of the workers so far."""
        return process_cpu(self.worker_pids())

    def database_cpu(self) -> dict[int, float]:
        """user + system seconds so far of each PostgreSQL server process serving this instance
        (its connections carry the schema as application_name; the server runs on this
        machine); none on SQLite, whose work is the workers' own."""
        if "application_name=" not in self.db_url:
            return {}
        import psycopg

        name = self.db_url.rsplit("application_name=", 1)[1]
        plain = self.db_url.split("?", 1)[0].replace("+psycopg", "")
        with psycopg.connect(plain, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (name,)
            ).fetchall()
        return {int(row[0]): process_cpu([int(row[0])]) for row in rows}


def process_cpu(pids: list[int]) -> float:
    """user + system seconds of ``pids`` so far (those that have exited count nothing)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def write_config(
    directory: Path, name: str, port: int, db_url: str, users_file: Path, alg: str
) -> Path:
    config = directory / f"{name}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "issuer": f"http://127.0.0.1:{port}",
                "secret_key": secrets.token_hex(32),
                "database_url": db_url,
                "instance_path": str(directory / f"{name}-instance"),
                "tokens": {"signing_alg": alg},
                "providers": {"local": {"users_file": str(users_file)}},
                "rate_limits": LIMITS_OFF,
                "resources": [
                    {
                        "uri": RESOURCE,
                        "name": "Bench tools",
                        "scopes": {SCOPE: "Read bench data"},
                        "required_scopes": [SCOPE],
                    }
                ],
            }
        )
    )
    return config


def upgrade(config: Path) -> None:
    env = {**os.environ, "BROKER_CONFIG": str(config)}
    done = subprocess.run(
        [str(BIN / "broker"), "db", "upgrade"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise SystemExit(f"broker db upgrade failed:\n{done.stdout}{done.stderr}")


@contextlib.contextmanager
def gunicorn(
    config: Path,
    port: int,
    db_url: str,
    log: Path,
    workers: int,
    threads: int | None,
    *,
    by_endpoint: Path | None = None,
) -> Iterator[Instance]:
    """gunicorn serving the broker; with ``by_endpoint``, :mod:`endpoint_cpu`'s application,
    which writes the CPU of each request by endpoint to that directory."""
    env = {**os.environ, "BROKER_CONFIG": str(config)}
    application = "wsgi:app"
    if by_endpoint is not None:
        by_endpoint.mkdir(parents=True, exist_ok=True)
        env[ENDPOINT_CPU_ENV] = str(by_endpoint)
        application = "bench.endpoint_cpu:app"
    command = [
        str(BIN / "gunicorn"),
        application,
        "-c",
        "gunicorn.conf.py",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
    ]
    if threads is not None:
        command += ["--threads", str(threads)]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    instance = Instance(f"http://127.0.0.1:{port}", db_url, proc, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"gunicorn exited:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{instance.url}/ready", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"gunicorn did not become ready:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield instance
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# -- a browser and an MCP client ------------------------------------------------------------------


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def form_value(html: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    if match is None:
        raise RuntimeError(f"no {name} in the page")
    return match.group(1)


# The registration of the benchmarks' public client (RFC 7591), as the MCP SDKs register.
BENCH_CLIENT = {
    "client_name": "bench",
    "redirect_uris": ["http://127.0.0.1/callback"],
    "token_endpoint_auth_method": "none",
    "grant_types": ["authorization_code", "refresh_token"],
    "application_type": "native",
}


def register(url: str) -> str:
    response = httpx.post(f"{url}/register", json=BENCH_CLIENT)
    if response.status_code != 201:
        raise RuntimeError(f"/register: {response.status_code} {response.text}")
    return str(response.json()["client_id"])


def authorize(browser: httpx.Client, client_id: str) -> tuple[str, str]:
    """One authorization code (and its PKCE verifier): the consent page and the local login form
    the first time; once this browser has a session, the one-click confirmation (a loopback
    redirect URI, RFC 8252 section 8.6) as the signed-in user."""
    verifier, challenge = pkce()
    state = secrets.token_urlsafe(8)
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": REDIRECT_URI,
        "state": state,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "resource": RESOURCE,
        "scope": SCOPE,
    }
    response = browser.get("/authorize", params=params)
    location = response.headers.get("location", "")
    if response.status_code != 302:
        raise RuntimeError(f"/authorize: {response.status_code} {response.text[:300]}")
    if not location.startswith(REDIRECT_URI):
        consent = browser.get(location)
        login = form_value(consent.text, "login")
        # Signed in before: the one-click confirmation a loopback redirect URI gets each time
        # (RFC 8252 section 8.6), as the signed-in user; else approve and sign in.
        provider = "session" if 'value="session"' in consent.text else "local"
        response = browser.post(
            "/consent",
            data={
                "login": login,
                "csrf": form_value(consent.text, "csrf"),
                "action": "approve",
                "provider": provider,
            },
        )
        location = response.headers.get("location", "")
        if response.status_code != 302:
            raise RuntimeError(f"/consent: {response.status_code} {response.text[:300]}")
    if not location.startswith(REDIRECT_URI):
        form = browser.get(location)
        response = browser.post(
            location.split("?")[0],
            data={
                "login": login,
                "csrf": form_value(form.text, "csrf"),
                "username": USERNAME,
                "password": PASSWORD,
            },
        )
        location = response.headers.get("location", "")
        if response.status_code != 302 or not location.startswith(REDIRECT_URI):
            raise RuntimeError(f"/login/local: {response.status_code} {response.text[:300]}")
    answer = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
    if answer.get("state") != state or "code" not in answer:
        raise RuntimeError(f"unexpected redirect: {location[:200]}")
    return answer["code"], verifier


def redeem_data(client_id: str, code: str, verifier: str) -> dict[str, str]:
    return {
        "grant_type": "authorization_code",
        "code": code,
        "client_id": client_id,
        "redirect_uri": REDIRECT_URI,
        "code_verifier": verifier,
        "resource": RESOURCE,
    }


def redeem(client: httpx.Client, client_id: str, code: str, verifier: str) -> str:
    response = client.post("/token", data=redeem_data(client_id, code, verifier))
    if response.status_code != 200:
        raise RuntimeError(f"/token: {response.status_code} {response.text[:300]}")
    return str(response.json()["refresh_token"])


@dataclass
class Families:
    """Refresh-token families (the client each belongs to, its current refresh token): each is
    rotated by one thread at a time."""

    client_ids: list[str]
    tokens: list[str]

    def refresh(self, client: httpx.Client, index: int) -> None:
        response = client.post(
            "/token",
            data={
                "grant_type": "refresh_token",
                "refresh_token": self.tokens[index],
                "client_id": self.client_ids[index],
            },
        )
        if response.status_code != 200:
            raise RuntimeError(f"refresh: {response.status_code} {response.text[:300]}")
        self.tokens[index] = response.json()["refresh_token"]


def signed_in(url: str, client_id: str) -> httpx.Client:
    """A browser that has signed in once and approved ``client_id``."""
    browser = httpx.Client(base_url=url, timeout=30, follow_redirects=False)
    authorize(browser, client_id)  # consent + login; its code is left unused
    return browser


def mint_families(url: str, client_ids: list[str], browser: httpx.Client) -> Families:
    """One refresh-token family per entry of ``client_ids`` (a client may appear several times)."""
    with httpx.Client(base_url=url, timeout=30) as client:
        tokens = [redeem(client, cid, *authorize(browser, cid)) for cid in client_ids]
    return Families(list(client_ids), tokens)


# -- load --------------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    count: int = 0
    errors: int = 0
    elapsed: float = 0.0
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    database_cpu: float = 0.0
    latencies: list[float] = field(default_factory=list)
    first_error: str = ""

    @property
    def rate(self) -> float:
        return self.count / self.elapsed if self.elapsed else 0.0

    def add(self, other: Phase) -> None:
        self.count += other.count
        self.errors += other.errors
        self.elapsed += other.elapsed
        self.server_cpu += other.server_cpu
        self.client_cpu += other.client_cpu
        self.database_cpu += other.database_cpu
        self.latencies += other.latencies
        self.first_error = self.first_error or other.first_error


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_load(
    instance: Instance,
    name: str,
    concurrency: int,
    request: Callable[[httpx.Client, Any], Any],
    *,
    duration: float | None = None,
    work: queue.Queue[Any] | None = None,
    cookies: httpx.Cookies | None = None,
) -> Phase:
    """``concurrency`` threads, each with its own keep-alive client, call ``request(client, i)``
    until ``duration`` has passed (or, with ``work``, ``request(client, item)`` until the queue is
    empty)."""
    phase = Phase(name)
    lock = threading.Lock()
    ready = threading.Barrier(concurrency + 1)
    stop = [0.0]

    def worker(index: int) -> None:
        latencies: list[float] = []
        errors, first_error = 0, ""
        with httpx.Client(base_url=instance.url, timeout=30, cookies=cookies) as client:
            with contextlib.suppress(httpx.HTTPError):
                client.get("/health")  # open the connection before the clock starts
            ready.wait(timeout=60)
            while True:
                if work is not None:
                    try:
                        item = work.get_nowait()
                    except queue.Empty:
                        break
                elif time.perf_counter() >= stop[0]:
                    break
                else:
                    item = index
                started = time.perf_counter()
                try:
                    request(client, item)
                except (httpx.HTTPError, RuntimeError, KeyError, ValueError) as error:
                    errors += 1
                    first_error = first_error or repr(error)[:300]
                    if work is None:
                        break  # a broken refresh family cannot go on
                    continue
                latencies.append(time.perf_counter() - started)
        with lock:
            phase.latencies += latencies
            phase.errors += errors
            phase.first_error = phase.first_error or first_error

    database_before = instance.database_cpu()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    cpu_before, client_before = instance.cpu_seconds(), time.process_time()
    stop[0] = time.perf_counter() + (duration or 0)
    started = time.perf_counter()
    ready.wait(timeout=60)  # a thread that never arrives breaks the barrier instead of hanging
    for thread in threads:
        thread.join()
    phase.elapsed = time.perf_counter() - started
    phase.server_cpu = instance.cpu_seconds() - cpu_before
    phase.client_cpu = time.process_time() - client_before
    database_after = instance.database_cpu()
    phase.database_cpu = sum(  # processes that came or went meanwhile: what is known of them
        cpu - database_before.get(pid, 0.0) for pid, cpu in database_after.items()
    )
    phase.count = len(phase.latencies)
    return phase


# -- seeding many grants --------------------------------------------------------------------------


SEED_STATEMENTS = (
    "INSERT INTO users (id, created_at) SELECT 'usr_seed_' || i, :now FROM {rows} WHERE i < :users",
    "INSERT INTO grants (id, user_id, client_id, resource, scope, auth_time, created_at) "
    "SELECT 'gr_seed_' || i, 'usr_seed_' || (i % :users), 'seed-client-' || (i % 500), "
    ":resource, :scope, :now, :now FROM {rows}",
    # A rotated (used) token and the live one of each family.
    "INSERT INTO refresh_tokens (token_hash, grant_id, scope, issued_at, expires_at, "
    "idle_expires_at, used_at) SELECT {hash}, 'gr_seed_' || i, :scope, :now, :later, :later, :now "
    "FROM {rows}",
    "INSERT INTO refresh_tokens (token_hash, grant_id, scope, issued_at, expires_at, "
    "idle_expires_at) SELECT {hash}, 'gr_seed_' || i, :scope, :now, :later, :later FROM {rows}",
    "INSERT INTO audit_events (at, type, outcome, user_id, client_id, resource, details) "
    "SELECT :now, 'issue', 'success', 'usr_seed_' || (i % :users), 'seed-client-' || (i % 500), "
    ":resource, :details FROM {rows}",
)


def seed(db_url: str, grants: int, *, batch: int = 100_000) -> float:
    """Bulk-insert ``grants`` grants, each with a rotated (used) and a live refresh token and an
    audit event, for one user per 10 grants: what a busy broker's tables hold. The rows are
    generated by the database (INSERT ... SELECT over a series), in batches. Returns seconds."""
    if grants <= 0:
        return 0.0
    started = time.monotonic()
    db = Database(db_url)
    now = dt.datetime.now(dt.UTC)
    if db.is_sqlite:
        rows = (
            "(WITH RECURSIVE n(i) AS (SELECT :lo UNION ALL SELECT i + 1 FROM n WHERE i + 1 < :hi) "
            "SELECT i FROM n)"
        )
        random_hash = "lower(hex(randomblob(32)))"  # the shape of a SHA-256 hex of a random token
    else:
        rows = "generate_series(:lo, :hi - 1) AS n(i)"
        random_hash = "encode(sha256(gen_random_uuid()::text::bytea), 'hex')"
    params = {
        "now": now,
        "later": now + dt.timedelta(days=30),
        "users": max(1, grants // 10),
        "resource": RESOURCE,
        "scope": SCOPE,
        "details": {"seeded": True},
    }
    types: list[BindParameter[Any]] = [
        bindparam("now", type_=UTCDateTime()),
        bindparam("later", type_=UTCDateTime()),
        bindparam("details", type_=JSON()),
    ]
    try:
        with db.engine.connect() as conn:
            for lo in range(0, grants, batch):
                hi = min(grants, lo + batch)
                with conn.begin():
                    for sql in SEED_STATEMENTS:
                        statement = text(sql.format(rows=rows, hash=random_hash))
                        used = [t for t in types if f":{t.key}" in sql]
                        conn.execute(statement.bindparams(*used), {**params, "lo": lo, "hi": hi})
            if not db.is_sqlite:  # as autovacuum would soon (SQLite has no automatic ANALYZE)
                conn.exec_driver_sql("ANALYZE")
                conn.commit()
    finally:
        db.dispose()
    return time.monotonic() - started


def count_grants(db_url: str) -> tuple[int, int]:
    db = Database(db_url)
    try:
        with db.session() as session:
            return (
                int(session.scalar(select(func.count()).select_from(Grant)) or 0),
                int(session.scalar(select(func.count()).select_from(RefreshToken)) or 0),
            )
    finally:
        db.dispose()


def age_family(db_url: str, refresh_token: str, rotations: int, *, batch: int = 10_000) -> None:
    """Give the family of ``refresh_token`` ``rotations`` used ancestors, as if it had been
    refreshed that many times (the broker keeps every rotated token's row)."""
    db = Database(db_url)
    now = dt.datetime.now(dt.UTC)
    earlier = now - dt.timedelta(hours=1)
    try:
        with db.session() as session:
            row = session.get(RefreshToken, hashlib.sha256(refresh_token.encode()).hexdigest())
            assert row is not None
            grant_id, expires = row.grant_id, row.expires_at
        for offset in range(0, rotations, batch):
            rows = [
                {
                    "token_hash": hashlib.sha256(secrets.token_bytes(32)).hexdigest(),
                    "grant_id": grant_id,
                    "scope": SCOPE,
                    "issued_at": earlier,
                    "expires_at": expires,
                    "idle_expires_at": expires,
                    "used_at": earlier,
                }
                for _ in range(min(batch, rotations - offset))
            ]
            with db.engine.begin() as conn:
                conn.execute(insert(RefreshToken), rows)
    finally:
        db.dispose()


# -- the benchmark --------------------------------------------------------------------------------


@dataclass
class Settings:
    database_url: str | None
    workers: int
    threads: int | None
    concurrency: int
    alg: str
    warmup: float
    duration: float
    rounds: int
    codes: int
    grants_small: int
    grants_large: int
    latency_samples: int
    latency_rounds: int
    rotations: int
    client_per_family: bool
    skip_codes: bool
    skip_scale: bool
    keep: bool
    by_endpoint: bool = False
    background_grants: int = 10_000


# What each throughput phase sends (endpoint_cpu's keys).
PHASE_REQUESTS = {"bare": "GET /health", "refresh": "POST /token", "refresh_own": "POST /token"}


def throughput(settings: Settings, work: Path, users_file: Path) -> dict[str, Any]:
    """(a), (b), (c) on one instance."""
    port = free_port()
    with database(settings.database_url, work, "main") as db_url:
        config = write_config(work, "main", port, db_url, users_file, settings.alg)
        upgrade(config)
        # Tables that hold rows, and PostgreSQL's statistics of them, as a running broker's do.
        # On empty tables PostgreSQL plans the token statements for a table of a few rows (a
        # sequential scan of refresh_tokens), and the prepared statements keep that plan until
        # an ANALYZE: every refresh then scanned the whole table, growing by a row each time.
        seeded = seed(db_url, settings.background_grants)
        if settings.background_grants:
            print(f"  seeded {settings.background_grants:,} grants in {seeded:.1f} s", flush=True)
        counted = work / "endpoint-cpu" if settings.by_endpoint else None
        with gunicorn(
            config,
            port,
            db_url,
            work / "main.log",
            settings.workers,
            settings.threads,
            by_endpoint=counted,
        ) as instance:
            started = time.monotonic()
            client_id = register(instance.url)
            browser = signed_in(instance.url, client_id)
            c = settings.concurrency
            shared = mint_families(instance.url, [client_id] * c, browser)
            own = None
            if settings.client_per_family:
                # Each further client needs its own consent (and so a login) in the browser.
                own = mint_families(
                    instance.url, [register(instance.url) for _ in range(c)], browser
                )
            print(
                f"  signed in and minted {c} refresh-token families for one client"
                + (f", {c} more for {c} clients" if own else "")
                + f" in {time.monotonic() - started:.1f} s",
                flush=True,
            )

            def health(client: httpx.Client, _: int) -> None:
                response = client.get("/health")
                if response.status_code != 200:
                    raise RuntimeError(f"/health: {response.status_code}")

            phases: dict[str, Callable[[httpx.Client, Any], Any]] = {
                "bare": health,
                "refresh": shared.refresh,
            }
            if own is not None:
                phases["refresh_own"] = own.refresh
            warm = settings.warmup / len(phases)
            for name, call in phases.items():
                phase = run_load(instance, "warm-up", c, call, duration=warm)
                if phase.errors:
                    raise SystemExit(f"{name} failed during the warm-up: {phase.first_error}")
            totals = {name: Phase(name) for name in phases}
            per_round = []
            inside: dict[str, tuple[int, float]] = {}
            for index in range(settings.rounds):
                order = list(phases)
                shift = index % len(order)
                measured = {}
                for name in order[shift:] + order[:shift]:
                    counted_before = endpoint_cpu.totals(counted) if counted else {}
                    measured[name] = run_load(
                        instance, name, c, phases[name], duration=settings.duration
                    )
                    if counted is not None:
                        spent = endpoint_cpu.difference(
                            endpoint_cpu.totals(counted), counted_before
                        )
                        count, seconds = spent.get(PHASE_REQUESTS[name], (0, 0.0))
                        was = inside.get(name, (0, 0.0))
                        inside[name] = (was[0] + count, was[1] + seconds)
                    if measured[name].errors:
                        raise SystemExit(f"{name} failed: {measured[name].first_error}")
                    totals[name].add(measured[name])
                per_round.append({name: phase.rate for name, phase in measured.items()})
                print(
                    f"  round {index + 1}: "
                    + ", ".join(f"{name} {phase.rate:,.0f}/s" for name, phase in measured.items()),
                    flush=True,
                )
            result: dict[str, Any] = {
                **totals,
                "per_round": per_round,
                "db_url": db_url,
                "inside": inside,
            }
            if not settings.skip_codes:
                codes: queue.Queue[tuple[str, str]] = queue.Queue()
                cookies = browser.cookies

                def mint(client: httpx.Client, _: int) -> None:
                    codes.put(authorize(client, client_id))

                minting: queue.Queue[int] = queue.Queue()
                for i in range(settings.codes):
                    minting.put(i)
                result["authorize"] = run_load(
                    instance, "authorize", c, mint, work=minting, cookies=cookies
                )

                def redeem_one(client: httpx.Client, item: tuple[str, str]) -> None:
                    redeem(client, client_id, *item)

                result["code"] = run_load(instance, "code", c, redeem_one, work=codes)
            browser.close()
    return result


def scale(settings: Settings, work: Path, users_file: Path) -> dict[str, Any]:
    """(d) and (e): two instances with few and many grants; latency in alternating rounds."""
    families_per_instance = 4
    sizes = {"few": settings.grants_small, "many": settings.grants_large}
    result: dict[str, Any] = {"sizes": {}, "seed_seconds": {}}
    with contextlib.ExitStack() as stack:
        instances: dict[str, Instance] = {}
        families: dict[str, Families] = {}
        for name, size in sizes.items():
            db_url = stack.enter_context(database(settings.database_url, work, name))
            port = free_port()
            config = write_config(work, name, port, db_url, users_file, settings.alg)
            upgrade(config)
            seeded = max(0, size - families_per_instance - 1)
            result["seed_seconds"][name] = seed(db_url, seeded)
            print(
                f"  seeded {seeded:,} grants for '{name}' in {result['seed_seconds'][name]:.1f} s",
                flush=True,
            )
            instances[name] = stack.enter_context(
                gunicorn(
                    config, port, db_url, work / f"{name}.log", settings.workers, settings.threads
                )
            )
            client_id = register(instances[name].url)
            browser = signed_in(instances[name].url, client_id)
            families[name] = mint_families(
                instances[name].url, [client_id] * families_per_instance, browser
            )
            browser.close()
        for name, instance in instances.items():
            result["sizes"][name] = count_grants(instance.db_url)
        # (e): on the 'few' instance, one family with many rotations behind it.
        if settings.rotations:
            aged = families["few"].tokens[0]
            age_family(instances["few"].db_url, aged, settings.rotations)

        clients = {
            name: stack.enter_context(httpx.Client(base_url=instance.url, timeout=30))
            for name, instance in instances.items()
        }

        def sample(name: str, count: int, indexes: range) -> list[float]:
            latencies = []
            family = families[name]
            for n in range(count):
                index = indexes[n % len(indexes)]
                started = time.perf_counter()
                family.refresh(clients[name], index)
                latencies.append(time.perf_counter() - started)
            return latencies

        young = range(1, families_per_instance)
        for name in instances:  # warm-up, as for the throughput phases
            deadline = time.monotonic() + settings.warmup / 2
            while time.monotonic() < deadline:
                sample(name, 20, young)
        samples: dict[str, list[float]] = {"few": [], "many": [], "aged": [], "young": []}
        for index in range(settings.latency_rounds):
            order = ["few", "many"] if index % 2 == 0 else ["many", "few"]
            for name in order:
                samples[name] += sample(name, settings.latency_samples, young)
            if settings.rotations:
                per = max(1, settings.latency_samples // 4)
                if index % 2:
                    samples["young"] += sample("few", per, range(1, 2))
                    samples["aged"] += sample("few", per, range(0, 1))
                else:
                    samples["aged"] += sample("few", per, range(0, 1))
                    samples["young"] += sample("few", per, range(1, 2))
        result["samples"] = samples
    return result


def report(settings: Settings, tp: dict[str, Any] | None, sc: dict[str, Any] | None) -> None:
    backend = "PostgreSQL" if settings.database_url else "SQLite"
    threads = settings.threads or int(os.environ.get("BROKER_THREADS", "4"))
    print(
        f"\nToken endpoint, {backend}, gunicorn {settings.workers} gthread workers x {threads} "
        f"threads, {settings.concurrency} client threads (httpx, keep-alive), {settings.alg}, "
        f"{os.cpu_count()} CPUs"
    )
    if tp is not None:
        header = (
            f"{'endpoint':<28} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'server CPU ms/req':>18} "
            f"{'database CPU ms/req':>20} {'client CPU ms/req':>18} {'requests':>9} {'errors':>7}"
        )
        print(header)
        print("-" * len(header))
        rows = [("(a) GET /health", tp["bare"]), ("(b) refresh, one client", tp["refresh"])]
        if "refresh_own" in tp:
            rows.append(("(b2) refresh, client each", tp["refresh_own"]))
        if "code" in tp:
            rows.append(("(c) authorization_code", tp["code"]))
            rows.append(("    (/authorize, consented)", tp["authorize"]))
        for label, phase in rows:
            count = max(phase.count, 1)
            database = phase.database_cpu * 1e3 / count if settings.database_url else float("nan")
            print(
                f"{label:<28} {phase.rate:>8,.0f} {percentile(phase.latencies, 0.5) * 1e3:>8.2f} "
                f"{percentile(phase.latencies, 0.95) * 1e3:>8.2f} "
                f"{phase.server_cpu * 1e3 / count:>18.2f} "
                f"{database:>20.2f} "
                f"{phase.client_cpu * 1e3 / count:>18.2f} "
                f"{phase.count:>9,} {phase.errors:>7}"
            )

        def cpu_per_request(phase: Phase) -> float:
            return phase.server_cpu / max(phase.count, 1)

        print()
        for name, label in (("refresh", "(b)"), ("refresh_own", "(b2)")):
            if name not in tp:
                continue
            ratio = tp[name].rate / tp["bare"].rate
            by_cpu = cpu_per_request(tp["bare"]) / cpu_per_request(tp[name])
            per_round = [r[name] / r["bare"] for r in tp["per_round"]]
            print(
                f"{label} refresh / bare = {ratio:.2f} (goal >= {REFRESH_GOAL}: "
                f"{'met' if ratio >= REFRESH_GOAL else 'NOT met'}); per round "
                + ", ".join(f"{r:.2f}" for r in per_round)
                + f"; by server CPU per request {by_cpu:.2f}"
            )
        if "code" in tp:
            print(f"(c) authorization_code / bare = {tp['code'].rate / tp['bare'].rate:.2f}")
        if tp["inside"]:
            print(
                "\nserver CPU per request, inside the application (its thread's CPU, "
                "endpoint_cpu.py) and the rest (gunicorn: parsing, writing, its threads, poller):"
            )
            for name, label in (("bare", "(a)"), ("refresh", "(b)"), ("refresh_own", "(b2)")):
                if name not in tp["inside"]:
                    continue
                count, seconds = tp["inside"][name]
                app = seconds * 1e3 / max(count, 1)
                total = cpu_per_request(tp[name]) * 1e3
                print(
                    f"  {label:<5} {PHASE_REQUESTS[name]:<12} application {app:.2f} ms, "
                    f"the rest {total - app:.2f} ms (of {total:.2f})"
                )
    if sc is not None:
        samples = sc["samples"]
        print(
            f"\n(d) refresh latency, one client thread, sequential, {settings.latency_rounds} "
            "alternating rounds"
        )
        header = f"{'stored':<34} {'grants':>10} {'refresh rows':>13} {'p50 ms':>8} {'p95 ms':>8}"
        header += f" {'samples':>8}"
        print(header)
        print("-" * len(header))
        for name in ("few", "many"):
            grants, tokens = sc["sizes"][name]
            print(
                f"{name:<34} {grants:>10,} {tokens:>13,} "
                f"{percentile(samples[name], 0.5) * 1e3:>8.2f} "
                f"{percentile(samples[name], 0.95) * 1e3:>8.2f} {len(samples[name]):>8}"
            )
        p50 = percentile(samples["many"], 0.5) / percentile(samples["few"], 0.5)
        p95 = percentile(samples["many"], 0.95) / percentile(samples["few"], 0.95)
        print(
            f"many / few: p50 {p50:.2f} (goal <= {SCALE_GOAL}: "
            f"{'met' if p50 <= SCALE_GOAL else 'NOT met'}), p95 {p95:.2f} (noisier)"
        )
        if samples["aged"]:
            print(
                f"\n(e) one family with {settings.rotations:,} rotations behind it vs a young "
                "family, same instance ('few'), alternating"
            )
            for name in ("young", "aged"):
                print(
                    f"  {name:<6} p50 {percentile(samples[name], 0.5) * 1e3:>7.2f} ms, "
                    f"p95 {percentile(samples[name], 0.95) * 1e3:>7.2f} ms "
                    f"({len(samples[name])} samples)"
                )
            aged = percentile(samples["aged"], 0.5) / percentile(samples["young"], 0.5)
            print(f"  aged / young p50: {aged:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="about 25 s instead of about 100 s")
    parser.add_argument(
        "--database-url",
        help="a PostgreSQL URL such as postgresql+psycopg://postgres@127.0.0.1:5432/test; "
        "each broker instance gets a fresh schema there, dropped at the end (default: SQLite)",
    )
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (default 2)")
    parser.add_argument(
        "--threads", type=int, help="gthread threads per worker (default: gunicorn.conf.py's)"
    )
    parser.add_argument("--concurrency", type=int, default=8, help="client threads (default 8)")
    parser.add_argument("--alg", default="ES256", choices=["ES256", "RS256", "EdDSA"])
    parser.add_argument("--duration", type=float, help="seconds per (a)/(b) measurement")
    parser.add_argument("--rounds", type=int, help="alternating (a)/(b) rounds")
    parser.add_argument("--codes", type=int, help="authorization codes to mint and redeem")
    parser.add_argument("--grants-few", type=int, default=1000, help="(d) few stored grants")
    parser.add_argument(
        "--grants", type=int, help="(d) many stored grants (default 100,000; quick 20,000)"
    )
    parser.add_argument("--rotations", type=int, help="(e) rotations behind the aged family")
    parser.add_argument(
        "--one-client",
        action="store_true",
        help="leave out (b2), refresh families of one client each (b: all of one client)",
    )
    parser.add_argument("--skip-codes", action="store_true", help="leave out (c)")
    parser.add_argument("--skip-scale", action="store_true", help="leave out (d) and (e)")
    parser.add_argument(
        "--skip-throughput", action="store_true", help="leave out (a)-(c): (d) and (e) only"
    )
    parser.add_argument(
        "--background-grants",
        type=int,
        default=10_000,
        help="grants stored before (a)-(c), with PostgreSQL's ANALYZE (default 10,000; 0: "
        "empty tables)",
    )
    parser.add_argument(
        "--by-endpoint",
        action="store_true",
        help="also split the server CPU of (a) and (b) into the application's and the rest "
        "(served by endpoint_cpu.py)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    quick = args.quick
    settings = Settings(
        database_url=args.database_url,
        workers=args.workers,
        threads=args.threads,
        concurrency=args.concurrency,
        alg=args.alg,
        warmup=2.0 if quick else 6.0,
        duration=args.duration or (2.0 if quick else 5.0),
        rounds=args.rounds or (1 if quick else 3),
        codes=args.codes or (100 if quick else 1000),
        grants_small=args.grants_few,
        grants_large=args.grants or (20_000 if quick else 100_000),
        latency_samples=20 if quick else 40,
        latency_rounds=6 if quick else 20,
        rotations=args.rotations if args.rotations is not None else (2000 if quick else 10_000),
        client_per_family=not args.one_client,
        skip_codes=args.skip_codes,
        skip_scale=args.skip_scale,
        keep=args.keep,
        by_endpoint=args.by_endpoint,
        background_grants=args.background_grants,
    )
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="broker-bench-"))
    try:
        users_file = work / "users.yaml"
        users_file.write_text(
            yaml.safe_dump(
                {"users": {USERNAME: {"password_hash": hash_password(PASSWORD), "name": "Bench"}}}
            )
        )
        print("(a)-(c): throughput", flush=True)
        tp = None if args.skip_throughput else throughput(settings, work, users_file)
        sc = None
        if not settings.skip_scale:
            print("(d)-(e): stored grants and family age", flush=True)
            sc = scale(settings, work, users_file)
        report(settings, tp, sc)
    finally:
        if settings.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
