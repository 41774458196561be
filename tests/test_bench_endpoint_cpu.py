"""bench/endpoint_cpu.py, which ``--by-endpoint`` serves: each request's CPU inside the
application is summed by ``METHOD path`` and written per worker; the benchmark adds the
workers' files up and takes the difference over a phase."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

# Loaded from its file: bench/ is not a package, and putting it on sys.path would let its
# script names shadow other modules for the rest of the run.
_SPEC = importlib.util.spec_from_file_location(
    "bench_endpoint_cpu", Path(__file__).resolve().parents[1] / "bench" / "endpoint_cpu.py"
)
assert _SPEC is not None and _SPEC.loader is not None
endpoint_cpu = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(endpoint_cpu)


def _busy_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    sum(i * i for i in range(20_000))  # some CPU to count
    return [b"ok"]


def test_requests_are_counted_by_endpoint_and_summed_over_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(endpoint_cpu.ENV, str(tmp_path))
    monkeypatch.setattr(endpoint_cpu, "_broker_app", _busy_app)
    monkeypatch.setattr(endpoint_cpu, "_sums", {})
    monkeypatch.setattr(endpoint_cpu, "FLUSH_EVERY", 1)
    before = endpoint_cpu.totals(tmp_path)
    statuses: list[str] = []
    for method, path in [("POST", "/token"), ("POST", "/token"), ("GET", "/health")]:
        environ = {"REQUEST_METHOD": method, "PATH_INFO": path}
        body = endpoint_cpu.app(environ, lambda status, headers: statuses.append(status))
        assert list(body) == [b"ok"]
    assert statuses == ["200 OK"] * 3
    # Another worker's file is added in.
    (tmp_path / "1.json").write_text(json.dumps({"GET /health": [4, 0.5]}))
    spent = endpoint_cpu.difference(endpoint_cpu.totals(tmp_path), before)
    assert set(spent) == {"POST /token", "GET /health"}
    assert spent["POST /token"][0] == 2 and spent["POST /token"][1] > 0
    assert spent["GET /health"][0] == 5 and spent["GET /health"][1] > 0.5
    # Nothing new: no difference.
    assert (
        endpoint_cpu.difference(endpoint_cpu.totals(tmp_path), endpoint_cpu.totals(tmp_path)) == {}
    )
