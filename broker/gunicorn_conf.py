"""gunicorn settings for the broker:
``gunicorn -c python:broker.gunicorn_conf broker.wsgi:app`` (from a checkout also
``gunicorn wsgi:app -c gunicorn.conf.py``, whose settings are these).

Every value can be overridden on the command line or with the environment variables below.

``/metrics`` across workers (docs/metrics.md) is prometheus_client's multiprocess mode, set up
here in the master before any worker forks: ``PROMETHEUS_MULTIPROC_DIR`` names the directory
where each worker writes its values (a fresh private temporary directory, removed at exit,
unless the variable is set already); it is emptied at start, a worker that exits is marked dead,
and with ``metrics.bind`` in ``$BROKER_CONFIG`` the master serves the sum of every worker on
that listener. Only gunicorn imports this module: importing it sets that variable.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "access_log_format",
    "accesslog",
    "bind",
    "child_exit",
    "errorlog",
    "forwarded_allow_ips",
    "graceful_timeout",
    "keepalive",
    "logger_class",
    "loglevel",
    "on_exit",
    "on_starting",
    "preload_app",
    "threads",
    "timeout",
    "when_ready",
    "worker_class",
    "workers",
]

bind = os.environ.get("BROKER_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("BROKER_WORKERS", str(min(4, multiprocessing.cpu_count() * 2))))
worker_class = "gthread"
threads = int(os.environ.get("BROKER_THREADS", "4"))
timeout = 30
graceful_timeout = 30
keepalive = 5
# Each worker opens its own database pool after the fork; nothing is shared by preloading.
preload_app = False
# Behind nginx: trust X-Forwarded-* only from the proxy (set trust_proxy: true in broker.yaml).
forwarded_allow_ips = os.environ.get("BROKER_FORWARDED_ALLOW_IPS", "127.0.0.1")
accesslog = "-"
# %(U)s is the path without the query string: codes and states never reach the access log.
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(b)s %(M)sms pid=%(p)s'
# gunicorn's logger, computing only the access-log values the format names (broker.gunicorn_log).
logger_class = "broker.gunicorn_log.AccessLogger"
errorlog = "-"
loglevel = os.environ.get("BROKER_LOG_LEVEL", "info")

# -- metrics: prometheus_client's multiprocess mode -------------------------------------------

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # broker.metrics.MULTIPROC_ENV, not imported yet
# Set while gunicorn reads this module, in the master: prometheus_client chooses where values
# live when it is first imported, so the variable must exist before the application is loaded
# anywhere (in a worker, or in the master when preload_app is turned on). A master re-executed
# by USR2 starts from gunicorn's original environment: it makes a directory of its own.
_created_directory: str | None = None
if not os.environ.get(MULTIPROC_ENV):
    _created_directory = tempfile.mkdtemp(prefix="broker-metrics-")
    os.environ[MULTIPROC_ENV] = _created_directory


def on_starting(server: Any) -> None:
    """Check the broker can start (once, here, rather than a traceback from every worker), then
    empty the metrics directory: files of an earlier run would be summed in. Not when this
    master takes over from another (``USR2``) in a directory set for both, where the old
    workers are still counting."""
    _check_broker()
    directory = Path(os.environ[MULTIPROC_ENV])
    directory.mkdir(parents=True, exist_ok=True)
    if not server.master_pid:
        for stale in directory.glob("*.db"):
            stale.unlink()
    server.log.info("metrics: multiprocess directory %s", directory)


def _check_broker() -> None:
    """With ``$BROKER_CONFIG``: the config, the plugins and the database as the workers will
    find them; a problem stops gunicorn with that one line (gunicorn prints ``Error: ...``)."""
    if not os.environ.get("BROKER_CONFIG"):
        return
    from broker.checks import startup_problem
    from broker.config import ConfigError, load

    try:
        problem = startup_problem(load())
    except ConfigError as exc:
        problem = "invalid configuration: " + "; ".join(exc.problems)
    if problem is not None:
        _remove_created_directory()
        raise RuntimeError(f"broker: {problem}")


def when_ready(server: Any) -> None:
    """With ``metrics.bind``: serve every worker's sum on that listener, from this process."""
    if not os.environ.get("BROKER_CONFIG"):
        return  # the application names its configuration itself: no metrics.bind to read
    from prometheus_client import start_http_server

    from broker.config import ConfigError, load
    from broker.metrics import multiprocess_registry

    try:
        settings = load()
    except ConfigError as exc:
        _remove_created_directory()
        raise RuntimeError(str(exc)) from None  # gunicorn prints it and exits 1
    if settings.metrics.bind is None:
        return
    host, port = settings.metrics.bind
    try:
        start_http_server(port, addr=host, registry=multiprocess_registry())
    except OSError as exc:
        _remove_created_directory()
        raise RuntimeError(
            f"metrics.bind: cannot listen on {host}:{port} ({exc.strerror or exc})"
        ) from None
    server.log.info("metrics: serving /metrics at %s:%d", host, port)


def child_exit(server: Any, worker: Any) -> None:
    """A worker exited: its counters stay in the sum; prometheus_client's bookkeeping of a dead
    process (live gauges) is done."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def on_exit(server: Any) -> None:
    """Remove the directory this master created (its workers have stopped)."""
    _remove_created_directory()


def _remove_created_directory() -> None:
    if _created_directory is not None:
        shutil.rmtree(_created_directory, ignore_errors=True)
