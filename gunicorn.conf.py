"""gunicorn settings for the broker: ``gunicorn wsgi:app -c gunicorn.conf.py``.

Every value can be overridden on the command line or with the environment variables below.
"""

from __future__ import annotations

import multiprocessing
import os

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
errorlog = "-"
loglevel = os.environ.get("BROKER_LOG_LEVEL", "info")
