#!/usr/bin/env python
"""A gunicorn worker's resident memory after 10,000 logins, and through a soak.

Starts the broker as an operator does (``broker.yaml``, ``broker db upgrade``, gunicorn with 2
gthread workers, no worker recycling) with the ``local`` provider, and signs in like browsers
that have never been there (no cookies): ``/authorize`` -> consent -> the login form -> the
code -> ``/token``, from 4 client threads. That is a real login through every part of the
broker; the user's password hash is argon2id with minimal cost parameters, so that the password
check (whose memory argon2 frees again) does not dominate the run. Every worker's resident set
(``VmRSS`` from ``/proc``) is sampled as the logins go on; after the 10,000 (``--logins``) the
soak goes on for ``--minutes`` (logins, each followed by a refresh of its tokens), sampled
every ``--every`` seconds. Goal: under 120 MB per worker after 10,000 logins, flat in the soak.

    .venv/bin/python bench/memory.py                 # 10,000 logins, then a 1-minute soak
    .venv/bin/python bench/memory.py --minutes 10    # the soak of the goal
    .venv/bin/python bench/memory.py --logins 2000 --minutes 0   # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from argon2 import PasswordHasher
from token_endpoint import (
    DEFAULT_RATE_LIMITS,
    PASSWORD,
    USERNAME,
    Families,
    Instance,
    authorize,
    database,
    free_port,
    gunicorn,
    redeem,
    register,
    upgrade,
    write_config,
)

GOAL_MB = 120.0
FLAT_MB = 5.0  # a soak is flat when its last third is within this of its first third
LIMITS_OFF = {name: dict.fromkeys(limits, "off") for name, limits in DEFAULT_RATE_LIMITS.items()}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Load:
    """Client threads that sign in (and, in the soak, refresh) until told to stop."""

    def __init__(self, instance: Instance, client_id: str, threads: int) -> None:
        self.instance = instance
        self.client_id = client_id
        self.logins = 0
        self.refreshes = 0
        self.errors: queue.Queue[str] = queue.Queue()
        self.refresh_too = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _run(self) -> None:
        url = self.instance.url
        with httpx.Client(base_url=url, timeout=30) as client:
            while not self._stop.is_set():
                try:
                    # A browser that has never been here, on connections of its own (so that
                    # the kernel spreads logins over every worker, as it spreads browsers).
                    with httpx.Client(base_url=url, timeout=30, follow_redirects=False) as browser:
                        code, verifier = authorize(browser, self.client_id)
                    refresh = redeem(client, self.client_id, code, verifier)
                    with self._lock:
                        self.logins += 1
                    if self.refresh_too:
                        Families([self.client_id], [refresh]).refresh(client, 0)
                        with self._lock:
                            self.refreshes += 1
                except (httpx.HTTPError, RuntimeError, KeyError, ValueError) as error:
                    self.errors.put(repr(error)[:300])
                    return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--logins", type=int, default=10_000, help="logins before the soak")
    parser.add_argument("--minutes", type=float, default=1.0, help="soak length (default 1)")
    parser.add_argument("--every", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--database-url", help="a PostgreSQL URL (default: SQLite)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (default 2)")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads (default 4)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="broker-bench-memory-"))
    cheap = PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
    users = work / "users.yaml"
    users.write_text(yaml.safe_dump({"users": {USERNAME: {"password_hash": cheap.hash(PASSWORD)}}}))
    samples: list[tuple[float, str, int, list[float]]] = []
    try:
        with contextlib.ExitStack() as stack:
            db_url = stack.enter_context(database(args.database_url, work, "memory"))
            port = free_port()
            config = write_config(work, "memory", port, db_url, users, "ES256")
            data = yaml.safe_load(config.read_text())
            config.write_text(yaml.safe_dump({**data, "rate_limits": LIMITS_OFF}))
            upgrade(config)
            instance = stack.enter_context(
                gunicorn(config, port, db_url, work / "gunicorn.log", args.workers, None)
            )
            pids = instance.worker_pids()
            load = Load(instance, register(instance.url), args.concurrency)

            def sample(phase: str) -> None:
                sizes = [rss_mb(pid) for pid in pids]
                samples.append((time.monotonic() - started, phase, load.logins, sizes))
                print(
                    f"  {samples[-1][0]:7.0f} s  {phase:<6} {load.logins:>7,} logins "
                    f"{load.refreshes:>7,} refreshes  RSS "
                    + "  ".join(f"{size:6.1f} MB" for size in sizes),
                    flush=True,
                )

            sample("start")
            load.start()
            next_sample = time.monotonic() + args.every
            while load.logins < args.logins:
                time.sleep(0.5)
                if not load.errors.empty():
                    raise SystemExit(f"a login failed: {load.errors.get()}")
                if time.monotonic() >= next_sample:
                    sample("logins")
                    next_sample += args.every
            sample("after")
            after_logins = samples[-1]
            load.refresh_too = True
            soak_end = time.monotonic() + args.minutes * 60
            next_sample = time.monotonic() + args.every
            while time.monotonic() < soak_end:
                time.sleep(0.5)
                if not load.errors.empty():
                    raise SystemExit(f"the soak failed: {load.errors.get()}")
                if time.monotonic() >= next_sample:
                    sample("soak")
                    next_sample += args.every
            load.stop()
            sample("end")
        report(args, samples, after_logins)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"({time.monotonic() - started:.0f} s)")
    return 0


def report(
    args: Any,
    samples: list[tuple[float, str, int, list[float]]],
    after_logins: tuple[float, str, int, list[float]],
) -> None:
    backend = "PostgreSQL" if args.database_url else "SQLite"
    worst = max(after_logins[3])
    print(
        f"\nWorker resident memory, {backend}, gunicorn {args.workers} gthread workers, "
        f"{args.concurrency} client threads, the local provider"
    )
    print(
        f"after {after_logins[2]:,} logins: "
        + ", ".join(f"{size:.1f} MB" for size in after_logins[3])
        + f" (goal < {GOAL_MB:.0f} MB: {'met' if worst < GOAL_MB else 'NOT met'})"
    )
    soak = [s for s in samples if s[1] in ("after", "soak", "end")]
    if len(soak) >= 3 and args.minutes > 0:
        third = max(1, len(soak) // 3)
        minutes = (soak[-1][0] - soak[0][0]) / 60
        logins = soak[-1][2] - soak[0][2]
        print(f"soak: {minutes:.1f} min, {logins:,} more logins (each with a refresh)")
        for worker in range(len(soak[0][3])):
            first = statistics.mean(s[3][worker] for s in soak[:third])
            last = statistics.mean(s[3][worker] for s in soak[-third:])
            growth = last - first
            print(
                f"  worker {worker + 1}: mean RSS first third {first:.1f} MB, last third "
                f"{last:.1f} MB: {growth:+.1f} MB "
                f"({'flat' if abs(growth) <= FLAT_MB else 'NOT flat'}, within {FLAT_MB:.0f} MB)"
            )


if __name__ == "__main__":
    sys.exit(main())
