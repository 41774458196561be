"""The WSGI application of an installed broker:
``gunicorn -c python:broker.gunicorn_conf broker.wsgi:app`` (configuration from
``$BROKER_CONFIG``).

A broker that cannot start (a bad config, the database unreachable) says why in one line on
standard error and exits with gunicorn's "application failed to load" status, which stops the
master instead of booting workers that fail again; anything else keeps its traceback."""

from __future__ import annotations

import sys

from flask import Flask

from .app import create_app
from .config import load
from .failures import describe

APP_LOAD_ERROR = 4  # gunicorn.arbiter.Arbiter.APP_LOAD_ERROR: the master halts


def _load() -> Flask:
    settings = None
    try:
        settings = load()
        return create_app(settings)
    except Exception as exc:
        line = describe(exc, database_url=settings.database_url if settings else None)
        if line is None:
            raise
        print(f"broker: {line}", file=sys.stderr, flush=True)
        raise SystemExit(APP_LOAD_ERROR) from None


app = _load()
