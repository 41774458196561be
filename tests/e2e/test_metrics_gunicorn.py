"""/metrics under gunicorn with two workers on PostgreSQL, run as from an installed package:
``gunicorn -c python:broker.gunicorn_conf broker.wsgi:app`` in a directory of its own, where the
checkout's top-level ``wsgi.py`` and ``gunicorn.conf.py`` cannot be imported.

Requests spread over both workers (their pids are in the access log), and every scrape, whichever
worker answers it, counts all of them (prometheus_client's multiprocess mode); a worker that dies
keeps its counts in the sum. The bearer mode refuses a scrape without the token; the bind mode
serves the sum on a listener of its own and nothing on the main port."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from broker.metrics import CONTENT_TYPE_LATEST
from tests.e2e.conftest import resources
from tests.e2e.test_gunicorn import gunicorn
from tests.support import free_port

BIN = Path(sys.executable).parent
TOKEN = "t" * 48
ACCESS = re.compile(r'"(GET|POST) (\S+)" (\d{3}) .*pid=<?(\d+)>?')
BOOTED = re.compile(r"Booting worker with pid: (\d+)")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.parametrize("database_url", ["postgresql"], indirect=True),
]


@dataclass
class Served:
    url: str
    log: Path
    proc: subprocess.Popen[str]

    def text(self) -> str:
        return self.log.read_text()

    def workers(self) -> list[int]:
        return [int(pid) for pid in BOOTED.findall(self.text())]

    def pids(self, method: str, path: str) -> set[int]:
        """The workers that answered ``method path``, from the access log."""
        return {
            int(pid) for m, p, _, pid in ACCESS.findall(self.text()) if m == method and p == path
        }


def _wait(check: Callable[[], bool], served: Served, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if served.proc.poll() is not None:
            raise AssertionError(f"gunicorn exited: {served.text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if check():
                return
        time.sleep(0.1)
    raise AssertionError(f"{what}: {served.text()[-3000:]}")


@contextlib.contextmanager
def packaged_gunicorn(
    site: Path, database_url: str, users_file: Path, metrics: dict[str, Any], **env: str
) -> Iterator[Served]:
    """``broker.yaml`` in ``site``, ``broker db upgrade``, then gunicorn with the packaged
    settings and two workers, all with ``site`` as the working directory."""
    site.mkdir(exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = site / "broker.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "issuer": url,
                "secret_key": "${TEST_SECRET}",
                "database_url": database_url,
                "providers": {"local": {"users_file": str(users_file)}},
                "resources": resources(free_port(), free_port()),
                "metrics": metrics,
            }
        )
    )
    environ = {**os.environ, "BROKER_CONFIG": str(config), "TEST_SECRET": "p" * 48, **env}
    environ.pop("PYTHONPATH", None)
    # Not the checkout: its top-level modules are out of reach, the package is what runs.
    probe = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('wsgi'))"],
        env=environ,
        cwd=site,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert probe.stdout.strip() == "None", probe.stdout + probe.stderr
    upgrade = subprocess.run(
        [str(BIN / "broker"), "db", "upgrade"],
        env=environ,
        cwd=site,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert upgrade.returncode == 0, upgrade.stderr
    log = site / "gunicorn.log"
    package = ("-c", "python:broker.gunicorn_conf", "broker.wsgi:app")
    with gunicorn(environ, port, log, app=package, cwd=site) as proc:
        served = Served(url, log, proc)
        _wait(lambda: len(served.workers()) == 2, served, "two workers did not boot")
        yield served


@dataclass
class Sent:
    health: int = 0
    registrations: int = 0
    refusals: int = 0


def spread_requests(served: Served, sent: Sent, rounds: int = 60) -> None:
    """Rounds of concurrent requests, each on a new connection, until both workers answered
    each kind (which worker accepts a connection is the kernel's choice)."""
    url = served.url

    def health() -> None:
        assert httpx.get(f"{url}/health").status_code == 200

    def register() -> None:
        response = httpx.post(
            f"{url}/register", json={"redirect_uris": ["http://127.0.0.1/callback"]}
        )
        assert response.status_code == 201, response.text

    def refusal() -> None:
        response = httpx.post(f"{url}/token", data={"grant_type": "password"})
        assert response.json()["error"] == "unsupported_grant_type"

    workers = set(served.workers())
    kinds = (("GET", "/health"), ("POST", "/register"), ("POST", "/token"))
    with ThreadPoolExecutor(8) as pool:
        for _ in range(rounds):
            jobs = [health] * 4 + [register] * 2 + [refusal] * 2
            for future in [pool.submit(job) for job in jobs]:
                future.result()
            sent.health += 4
            sent.registrations += 2
            sent.refusals += 2
            if all(workers <= served.pids(method, path) for method, path in kinds):
                return
    raise AssertionError(f"requests did not reach both workers: {served.text()[-3000:]}")


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def assert_totals(text: str, sent: Sent) -> None:
    found = samples(text)

    def value(name: str, **labels: str) -> float:
        return found.get((name, frozenset(labels.items())), 0.0)

    count = "broker_request_duration_seconds_count"
    assert value(count, endpoint="health.health") == sent.health
    assert value(count, endpoint="oauth.register") == sent.registrations
    assert value("broker_registrations_total", outcome="success") == sent.registrations
    assert (
        value("broker_oauth_errors_total", endpoint="oauth.token", error="unsupported_grant_type")
        == sent.refusals
    )


def test_bearer_mode_counts_every_worker(
    database_url: str, users_file: Path, tmp_path: Path
) -> None:
    directory = tmp_path / "prometheus"
    directory.mkdir()
    (directory / "counter_1.db").write_bytes(b"left over from an earlier run")
    with packaged_gunicorn(
        tmp_path / "site",
        database_url,
        users_file,
        {"bearer_token": TOKEN},
        PROMETHEUS_MULTIPROC_DIR=str(directory),
    ) as served:
        assert not (directory / "counter_1.db").exists()  # emptied at start
        missing = httpx.get(f"{served.url}/metrics")
        assert missing.status_code == 401
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = httpx.get(f"{served.url}/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "broker_" not in wrong.text

        sent = Sent()
        spread_requests(served, sent)
        # Whichever worker answers a scrape, it sums both.
        auth = {"Authorization": f"Bearer {TOKEN}"}
        for _ in range(6):
            scraped = httpx.get(f"{served.url}/metrics", headers=auth)
            assert scraped.status_code == 200
            assert scraped.headers["content-type"] == CONTENT_TYPE_LATEST
            assert_totals(scraped.text, sent)
    # An operator's directory is left in place.
    assert directory.is_dir()


def test_bind_mode_serves_the_sum_on_its_own_listener(
    database_url: str, users_file: Path, tmp_path: Path
) -> None:
    metrics_port = free_port()
    with packaged_gunicorn(
        tmp_path / "site", database_url, users_file, {"bind": f"127.0.0.1:{metrics_port}"}
    ) as served:
        created = re.search(r"metrics: multiprocess directory (\S+)", served.text())
        assert created is not None and Path(created.group(1)).is_dir()
        assert httpx.get(f"{served.url}/metrics").status_code == 404
        endpoint = f"http://127.0.0.1:{metrics_port}/metrics"
        sent = Sent()
        spread_requests(served, sent)
        assert_totals(httpx.get(endpoint).text, sent)

        # A worker that dies keeps its counts in the sum; its replacement adds to them.
        first, second = served.workers()
        os.kill(first, signal.SIGTERM)
        _wait(lambda: len(served.workers()) == 3, served, "no replacement worker")
        _wait(
            lambda: httpx.get(f"{served.url}/ready", timeout=1).status_code == 200,
            served,
            "not ready after the restart",
        )
        for _ in range(5):
            assert httpx.get(f"{served.url}/health").status_code == 200
        sent.health += 5
        assert_totals(httpx.get(endpoint).text, sent)
        assert second in served.workers()
    assert served.proc.returncode == 0
    assert not Path(created.group(1)).exists()  # the directory it created is removed at exit
