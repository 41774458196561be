"""``gunicorn wsgi:app -c gunicorn.conf.py`` from a checkout; the application is
:mod:`broker.wsgi`'s, which an installed package serves as ``broker.wsgi:app``."""

from broker.wsgi import app

__all__ = ["app"]
