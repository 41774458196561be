"""The broker's WSGI application, with the CPU each request spends inside it counted by endpoint:
what ``--by-endpoint`` of ``bench/login.py`` and ``bench/token_endpoint.py`` serves under
gunicorn (``bench.endpoint_cpu:app``) instead of ``wsgi:app``.

For every request it reads the thread's CPU time (``time.thread_time``) before the call and
after the response body is built, and adds it to the request's ``METHOD path``. Each worker
writes its sums, every ``FLUSH_EVERY`` requests, to ``<pid>.json`` in the directory named by
``$BENCH_ENDPOINT_CPU_DIR``; :func:`totals` adds up every worker's file. What gunicorn does
for the request outside the application (parsing it, writing the answer, its threads and
poller) is not in these sums: the benchmarks print it as what is left of the workers' CPU.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ENV = "BENCH_ENDPOINT_CPU_DIR"  # token_endpoint.ENDPOINT_CPU_ENV
FLUSH_EVERY = 25

_lock = threading.Lock()
_sums: dict[str, list[float]] = {}  # "METHOD path" -> [requests, CPU seconds]
_requests = 0
_broker_app: Callable[..., Iterable[bytes]] | None = None


def _broker() -> Callable[..., Iterable[bytes]]:
    # Imported on the first request, in the worker: the benchmark that reads the sums
    # (:func:`totals`) imports this module without a broker configuration.
    global _broker_app
    if _broker_app is None:
        from broker.wsgi import app as broker_app

        _broker_app = broker_app
    return _broker_app


def _flush() -> None:
    directory = os.environ.get(ENV)
    if not directory:
        return
    path = Path(directory) / f"{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_sums))
    tmp.replace(path)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    global _requests
    inner = _broker()  # its first call loads the application: not counted
    started = time.thread_time()
    result = inner(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    spent = time.thread_time() - started
    key = f"{environ['REQUEST_METHOD']} {environ.get('PATH_INFO', '')}"
    with _lock:
        entry = _sums.setdefault(key, [0, 0.0])
        entry[0] += 1
        entry[1] += spent
        _requests += 1
        if _requests % FLUSH_EVERY == 0:
            _flush()
    return [body]


def totals(directory: Path) -> dict[str, tuple[int, float]]:
    """Every worker's sums so far: ``METHOD path`` -> (requests, CPU seconds)."""
    summed: dict[str, list[float]] = {}
    for path in directory.glob("*.json"):
        for key, (count, seconds) in json.loads(path.read_text()).items():
            entry = summed.setdefault(key, [0, 0.0])
            entry[0] += count
            entry[1] += seconds
    return {key: (int(count), seconds) for key, (count, seconds) in summed.items()}


def difference(
    after: dict[str, tuple[int, float]], before: dict[str, tuple[int, float]]
) -> dict[str, tuple[int, float]]:
    """What was counted between two :func:`totals`."""
    changed = {}
    for key, (count, seconds) in after.items():
        was_count, was_seconds = before.get(key, (0, 0.0))
        if count > was_count:
            changed[key] = (count - was_count, seconds - was_seconds)
    return changed
