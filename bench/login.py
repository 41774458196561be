#!/usr/bin/env python
"""Full first-time logins through the broker vs the same upstream serving its own, in one run.

The upstream is the real OpenID provider of the tests (panva's ``oidc-provider`` in
``tests/idp``, started by ``tests/idp_server.py``); the broker runs as an operator runs it
(``broker.yaml`` with an ``oidc`` provider for that issuer, ``broker db upgrade``, gunicorn
with 2 gthread workers). With the same client concurrency, alternating in rounds, it measures:

(u) the upstream alone: its authorization endpoint, its sign-in page and the form posted
    to it (the password checked against a scrypt hash with the parameters the scrypt paper
    gives for interactive logins, as a real IdP checks one; consent is granted without a
    page, as for a company's own apps), the code, and its token endpoint, as a confidential
    client of the IdP would do it;
(b) a login through the broker, in a browser that has never been there (no cookies), ending
    with the MCP client's tokens: ``/authorize`` -> consent page -> approve with the IdP ->
    the upstream's authorization, sign-in and code -> the broker's ``/callback`` (which
    redeems the upstream code, validates the ID token and reads UserInfo) -> the code ->
    the broker's ``/token``.

Every login is a fresh browser: cookies are dropped, connections (keep-alive) are kept. The
ratio (b) / (u) is the goal (>= 0.85): how close the broker comes to the rate at which the
upstream serves its own logins alone, on the same machine. The table adds the CPU each side
spent per login (the broker's gunicorn workers, the IdP's Node process; on PostgreSQL the
database's own processes are not counted) and the load generator's.

``--upstream-sign-in hint`` measures against the IdP the tests use instead, which signs the
user in without a form or a password (6 ms of IdP CPU a login, less than the broker's own
back-channel calls to it): a floor for the IdP's cost that no real upstream has.

    .venv/bin/python bench/login.py                    # SQLite, about 70 s
    .venv/bin/python bench/login.py --quick            # about 25 s
    .venv/bin/python bench/login.py --database-url postgresql+psycopg://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import endpoint_cpu
import httpx
import yaml
from token_endpoint import (
    CLOCK_TICKS,
    DEFAULT_RATE_LIMITS,
    ROOT,
    Phase,
    database,
    form_value,
    free_port,
    gunicorn,
    percentile,
    pkce,
    register,
    run_load,
    upgrade,
)

sys.path.insert(0, str(ROOT))
from tests.idp_server import IdPUnavailable, start_idp, submit_sign_in

GOAL = 0.85
USER = "alice"  # the test IdP's account every login signs in as
RESOURCE = "http://127.0.0.1:8001/mcp"
SCOPE = "bench:read"
CLIENT_REDIRECT = "http://127.0.0.1:5555/callback"
DIRECT_REDIRECT = "http://127.0.0.1:1/direct"  # never fetched: the browser stops there
BROKER_SECRET = "bench-broker-" + secrets.token_hex(8)
DIRECT_SECRET = "bench-direct-" + secrets.token_hex(8)
# Each phase's load comes from one address: the per-address limits are not what is measured.
LIMITS_OFF = {name: dict.fromkeys(limits, "off") for name, limits in DEFAULT_RATE_LIMITS.items()}


def process_cpu(pids: list[int]) -> float:
    """user + system seconds of ``pids`` so far."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def follow(browser: httpx.Client, url: str, stop: str, limit: int = 20) -> str:
    """GET ``url`` and follow redirects with the browser's cookies until one leads to ``stop``
    (not fetched); returns that location. The IdP's sign-in page, when it shows one, is
    filled in as its user does (``USER``'s password)."""
    for _ in range(limit):
        response = browser.get(url)
        if response.status_code == 200 and 'type="password"' in response.text:
            response = submit_sign_in(browser, url, response.text, USER, f"{USER}-password")
        if response.status_code not in (301, 302, 303, 307, 308):
            raise RuntimeError(
                f"{urlsplit(url).path}: {response.status_code} {response.text[:200]}"
            )
        url = urljoin(url, response.headers["location"])
        if url.startswith(stop):
            return url
    raise RuntimeError("too many redirects")


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


@dataclass
class Logins:
    broker: str
    idp: str
    client_id: str

    def through_broker(self, browser: httpx.Client, _: Any) -> None:
        browser.cookies.clear()  # a browser that has never signed in anywhere
        verifier, challenge = pkce()
        state = secrets.token_urlsafe(8)
        params = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": CLIENT_REDIRECT,
            "state": state,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "resource": RESOURCE,
            "scope": SCOPE,
        }
        response = browser.get(f"{self.broker}/authorize", params=params)
        if response.status_code != 302:
            raise RuntimeError(f"/authorize: {response.status_code} {response.text[:200]}")
        consent = browser.get(urljoin(self.broker, response.headers["location"]))
        response = browser.post(
            f"{self.broker}/consent",
            data={
                "login": form_value(consent.text, "login"),
                "csrf": form_value(consent.text, "csrf"),
                "action": "approve",
                "provider": "corp",
            },
        )
        if response.status_code != 302:
            raise RuntimeError(f"/consent: {response.status_code} {response.text[:200]}")
        callback = follow(browser, response.headers["location"], f"{self.broker}/callback/")
        done = follow(browser, callback, CLIENT_REDIRECT)
        answer = query_of(done)
        if answer.get("state") != state or "code" not in answer:
            raise RuntimeError(f"unexpected redirect: {done[:200]}")
        tokens = browser.post(
            f"{self.broker}/token",
            data={
                "grant_type": "authorization_code",
                "code": answer["code"],
                "client_id": self.client_id,
                "redirect_uri": CLIENT_REDIRECT,
                "code_verifier": verifier,
                "resource": RESOURCE,
            },
        )
        if tokens.status_code != 200 or "access_token" not in tokens.json():
            raise RuntimeError(f"/token: {tokens.status_code} {tokens.text[:200]}")

    def at_upstream(self, browser: httpx.Client, _: Any) -> None:
        browser.cookies.clear()
        verifier, challenge = pkce()
        state, nonce = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
        params = {
            "response_type": "code",
            "client_id": "direct",
            "redirect_uri": DIRECT_REDIRECT,
            "scope": "openid email profile",
            "state": state,
            "nonce": nonce,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        discovered = self.idp + "/auth"
        done = follow(browser, f"{discovered}?{urlencode(params)}", DIRECT_REDIRECT)
        answer = query_of(done)
        if answer.get("state") != state or "code" not in answer:
            raise RuntimeError(f"unexpected redirect: {done[:200]}")
        basic = base64.b64encode(f"direct:{DIRECT_SECRET}".encode()).decode()
        tokens = browser.post(
            f"{self.idp}/token",
            data={
                "grant_type": "authorization_code",
                "code": answer["code"],
                "redirect_uri": DIRECT_REDIRECT,
                "code_verifier": verifier,
            },
            headers={"Authorization": f"Basic {basic}"},
        )
        if tokens.status_code != 200 or "id_token" not in tokens.json():
            raise RuntimeError(f"upstream /token: {tokens.status_code} {tokens.text[:200]}")


@dataclass
class Settings:
    database_url: str | None
    workers: int
    threads: int | None
    concurrency: int
    warmup: float
    duration: float
    rounds: int
    keep: bool
    sign_in: str
    by_endpoint: bool = False


def write_config(directory: Path, port: int, db_url: str, issuer: str) -> Path:
    config = directory / "broker.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "issuer": f"http://127.0.0.1:{port}",
                "secret_key": secrets.token_hex(32),
                "database_url": db_url,
                "instance_path": str(directory / "instance"),
                "providers": {
                    "corp": {
                        "type": "oidc",
                        "issuer": issuer,
                        "client_id": "broker",
                        "client_secret": BROKER_SECRET,
                        "display_name": "Bench IdP",
                    }
                },
                "resources": [
                    {
                        "uri": RESOURCE,
                        "name": "Bench tools",
                        "scopes": {SCOPE: "Read bench data"},
                        "required_scopes": [SCOPE],
                    }
                ],
                "rate_limits": LIMITS_OFF,
            }
        )
    )
    return config


def measure(settings: Settings, work: Path) -> dict[str, Any]:
    port = free_port()
    clients = [
        {
            "client_id": "broker",
            "client_secret": BROKER_SECRET,
            "redirect_uris": [f"http://127.0.0.1:{port}/callback/corp"],
        },
        {"client_id": "direct", "client_secret": DIRECT_SECRET, "redirect_uris": [DIRECT_REDIRECT]},
    ]
    with contextlib.ExitStack() as stack:
        try:
            idp = stack.enter_context(start_idp(clients, options={"signIn": settings.sign_in}))
        except IdPUnavailable as exc:
            raise SystemExit(f"the test IdP cannot run here: {exc}") from None
        db_url = stack.enter_context(database(settings.database_url, work, "login"))
        config = write_config(work, port, db_url, idp.issuer)
        upgrade(config)
        counted = work / "endpoint-cpu" if settings.by_endpoint else None
        instance = stack.enter_context(
            gunicorn(
                config,
                port,
                db_url,
                work / "gunicorn.log",
                settings.workers,
                settings.threads,
                by_endpoint=counted,
            )
        )
        logins = Logins(instance.url, idp.issuer, register(instance.url))
        phases: dict[str, Callable[[httpx.Client, Any], Any]] = {
            "upstream": logins.at_upstream,
            "broker": logins.through_broker,
        }
        idp_pid = [idp.process.pid]
        c = settings.concurrency
        for name, call in phases.items():
            warm = run_load(instance, "warm-up", c, call, duration=settings.warmup / 2)
            if warm.errors:
                raise SystemExit(f"{name} failed during the warm-up: {warm.first_error}")
        totals = {name: Phase(name) for name in phases}
        idp_cpu = dict.fromkeys(phases, 0.0)
        per_round = []
        by_endpoint: dict[str, tuple[int, float]] = {}
        for index in range(settings.rounds):
            order = list(phases) if index % 2 == 0 else list(reversed(phases))
            rates = {}
            for name in order:
                before = process_cpu(idp_pid)
                counted_before = endpoint_cpu.totals(counted) if counted else {}
                phase = run_load(instance, name, c, phases[name], duration=settings.duration)
                idp_cpu[name] += process_cpu(idp_pid) - before
                if counted is not None and name == "broker":
                    spent = endpoint_cpu.difference(endpoint_cpu.totals(counted), counted_before)
                    for key, (count, seconds) in spent.items():
                        was = by_endpoint.get(key, (0, 0.0))
                        by_endpoint[key] = (was[0] + count, was[1] + seconds)
                if phase.errors:
                    raise SystemExit(f"{name} failed: {phase.first_error}")
                totals[name].add(phase)
                rates[name] = phase.rate
            per_round.append(rates)
            print(
                f"  round {index + 1}: "
                + ", ".join(f"{name} {rate:,.1f} logins/s" for name, rate in rates.items()),
                flush=True,
            )
    return {
        "totals": totals,
        "idp_cpu": idp_cpu,
        "per_round": per_round,
        "by_endpoint": by_endpoint,
    }


def report(settings: Settings, result: dict[str, Any]) -> float:
    totals: dict[str, Phase] = result["totals"]
    backend = "PostgreSQL" if settings.database_url else "SQLite"
    threads = settings.threads or int(os.environ.get("BROKER_THREADS", "4"))
    print(
        f"\nFirst-time logins, {backend}, broker: gunicorn {settings.workers} gthread workers x "
        f"{threads} threads; upstream: oidc-provider (tests/idp, one Node process, sign-in "
        f"{'form with a password check' if settings.sign_in == 'form' else 'without a form'}); "
        f"{settings.concurrency} client threads; {os.cpu_count()} CPUs"
    )
    header = (
        f"{'':<30} {'logins/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'broker CPU ms':>14} "
        f"{'IdP CPU ms':>11} {'client CPU ms':>14} {'logins':>7}"
    )
    print(header)
    print("-" * len(header))
    labels = {"upstream": "(u) the upstream alone", "broker": "(b) through the broker"}
    for name in ("upstream", "broker"):
        phase = totals[name]
        count = max(phase.count, 1)
        print(
            f"{labels[name]:<30} {phase.rate:>9,.1f} "
            f"{percentile(phase.latencies, 0.5) * 1e3:>8.1f} "
            f"{percentile(phase.latencies, 0.95) * 1e3:>8.1f} "
            f"{phase.server_cpu * 1e3 / count:>14.2f} "
            f"{result['idp_cpu'][name] * 1e3 / count:>11.2f} "
            f"{phase.client_cpu * 1e3 / count:>14.2f} {phase.count:>7,}"
        )
    if result["by_endpoint"]:
        by_endpoint_report(result["by_endpoint"], totals["broker"])
    ratio = totals["broker"].rate / totals["upstream"].rate
    rounds = [r["broker"] / r["upstream"] for r in result["per_round"]]
    print(
        f"\n(b) / (u) = {ratio:.2f} (goal >= {GOAL}: {'met' if ratio >= GOAL else 'NOT met'}); "
        "per round " + ", ".join(f"{r:.2f}" for r in rounds)
    )
    return ratio


# The broker's requests of one login (bench/login.py's Logins.through_broker), in order.
LOGIN_REQUESTS = [
    "GET /authorize",
    "GET /consent",
    "POST /consent",
    "GET /callback/corp",
    "POST /token",
]


def by_endpoint_report(spent: dict[str, tuple[int, float]], broker: Phase) -> None:
    """The broker's CPU per login by request: inside the application (each request's thread
    CPU, :mod:`endpoint_cpu`; a worker writes its sums every few requests, so the mean per
    request is exact and the counts are not), and what is left of the workers' CPU per login
    (gunicorn: parsing each request, writing the answer, its threads and poller)."""
    print("\n(b)'s broker CPU per login, by request (thread CPU inside the application):")
    inside = 0.0
    for key in LOGIN_REQUESTS:
        count, seconds = spent.get(key, (0, 0.0))
        each = seconds * 1e3 / max(count, 1)
        inside += each
        print(f"  {key:<24} {each:>7.2f} ms  ({count:,} requests)")
    total = broker.server_cpu * 1e3 / max(broker.count, 1)
    print(f"  {'the application':<24} {inside:>7.2f} ms")
    print(f"  {'gunicorn and the rest':<24} {total - inside:>7.2f} ms (of {total:.2f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="about 25 s instead of about 70 s")
    parser.add_argument(
        "--database-url", help="a PostgreSQL URL (default: SQLite); see token_endpoint.py"
    )
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (default 2)")
    parser.add_argument("--threads", type=int, help="gthread threads per worker")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads (default 4)")
    parser.add_argument("--duration", type=float, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, help="alternating rounds")
    parser.add_argument(
        "--upstream-sign-in",
        choices=["form", "hint"],
        default="form",
        help="form (default): the IdP's sign-in form with a password check; hint: the tests' "
        "IdP that signs in without either",
    )
    parser.add_argument(
        "--by-endpoint",
        action="store_true",
        help="also print the broker's CPU per login by endpoint (served by endpoint_cpu.py)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    settings = Settings(
        database_url=args.database_url,
        workers=args.workers,
        threads=args.threads,
        concurrency=args.concurrency,
        warmup=2.0 if args.quick else 6.0,
        duration=args.duration or (3.0 if args.quick else 8.0),
        rounds=args.rounds or (2 if args.quick else 4),
        keep=args.keep,
        sign_in=args.upstream_sign_in,
        by_endpoint=args.by_endpoint,
    )
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="broker-bench-login-"))
    try:
        report(settings, measure(settings, work))
    finally:
        if settings.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
