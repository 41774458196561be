"""``gunicorn wsgi:app -c gunicorn.conf.py`` from a checkout. The settings live in
:mod:`broker.gunicorn_conf`, which an installed package uses as
``gunicorn -c python:broker.gunicorn_conf broker.wsgi:app``."""

from broker.gunicorn_conf import *  # noqa: F403
