"""The access log's atoms, computed when read (broker.gunicorn_log), give what gunicorn's own
logger gives for every format: the fixed atoms, headers and environment in any case, ``-`` for
what is missing, ``"`` escaped."""

from __future__ import annotations

import datetime as dt
import logging
import os
from types import SimpleNamespace
from typing import Any

import pytest
from gunicorn.config import Config
from gunicorn.glogging import Logger

from broker.gunicorn_log import AccessLogger, LazyAtoms

ENVIRON: dict[str, Any] = {
    "REQUEST_METHOD": "POST",
    "RAW_URI": "/token?x=1",
    "PATH_INFO": "/token",
    "QUERY_STRING": "x=1",
    "SERVER_PROTOCOL": "HTTP/1.1",
    "REMOTE_ADDR": "203.0.113.7",
    "HTTP_USER_AGENT": 'agent "quoted"',
    "HTTP_AUTHORIZATION": "Basic YWxpY2U6c2VjcmV0",  # alice:secret
    "wsgi.url_scheme": "https",
}
REQUEST = SimpleNamespace(
    headers=[("User-Agent", 'agent "quoted"'), ("X-Forwarded-For", "a"), ("X-FORWARDED-FOR", "b")]
)
RESPONSE = SimpleNamespace(
    status="201 Created", headers=[("Content-Type", "application/json")], sent=1234
)
ELAPSED = dt.timedelta(seconds=2, microseconds=345678)

FORMATS = [
    '%(h)s "%(m)s %(U)s" %(s)s %(b)s %(M)sms pid=%(p)s',  # the broker's
    Config().access_log_format,  # gunicorn's default
    "%(l)s %(u)s %(r)s %(q)s %(H)s %(B)s %(f)s %(a)s %(T)s %(D)s %(L)s",
    "%({x-forwarded-for}i)s %({User-Agent}i)s %({content-type}o)s %({remote_addr}e)s",
    "%({missing}i)s %({missing}o)s %({missing}e)s %(nothing)s %({}i)s",
]


def _logger(cls: type[Logger]) -> Logger:
    cfg = Config()
    cfg.set("accesslog", "-")
    return cls(cfg)


def _gunicorn(fmt: str, response: Any = RESPONSE) -> str:
    logger = _logger(Logger)
    return str(fmt % logger.atoms_wrapper_class(logger.atoms(response, REQUEST, ENVIRON, ELAPSED)))


def _lazy(fmt: str, response: Any = RESPONSE) -> str:
    logger = _logger(AccessLogger)
    return str(fmt % logger.atoms_wrapper_class(logger.atoms(response, REQUEST, ENVIRON, ELAPSED)))


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_as_with_gunicorns_logger(fmt: str, monkeypatch: Any) -> None:
    monkeypatch.setattr(Logger, "now", lambda self: "[04/Dec/2026:01:00:00 +0000]")
    assert _lazy(fmt) == _gunicorn(fmt)


def test_values_are_gunicorns() -> None:
    line = _lazy('%(h)s "%(m)s %(U)s" %(s)s %(b)s %(M)sms pid=%(p)s %(u)s %(a)s')
    pid = os.getpid()
    assert line == f'203.0.113.7 "POST /token" 201 1234 2345ms pid=<{pid}> alice agent \\"quoted\\"'
    unsent = SimpleNamespace(status=404, headers=[], sent=None)
    fmt = "%(s)s %(b)s %(B)s"
    assert _lazy(fmt, unsent) == _gunicorn(fmt, unsent) == "404 - None"


def test_iterating_gives_gunicorns_names() -> None:
    logger = _logger(Logger)
    theirs = logger.atoms(RESPONSE, REQUEST, ENVIRON, ELAPSED)
    ours = LazyAtoms(_logger(AccessLogger), RESPONSE, REQUEST, ENVIRON, ELAPSED)
    assert set(ours) == set(theirs)
    assert len(ours) == len(theirs)
    assert dict(ours)["{content-type}o"] == "application/json"


def test_a_line_reaches_the_access_log(caplog: pytest.LogCaptureFixture) -> None:
    """Through logging, with the mapping as the record's arguments (what a logging config or a
    JSON formatter of the operator's reads)."""
    logger = _logger(AccessLogger)
    logger.access_log.propagate = True
    with caplog.at_level(logging.INFO, logger="gunicorn.access"):
        logger.access(RESPONSE, REQUEST, ENVIRON, ELAPSED)
    record = next(r for r in caplog.records if r.name == "gunicorn.access")
    assert record.getMessage().startswith("203.0.113.7 - alice [")
    assert record.args["s"] == "201"  # type: ignore[call-overload,index]
