"""``broker check-config --connect``: what the configuration points at, checked from here.

Each check reads and never writes: a SQLite file that does not exist is reported, not created;
the schema is compared with the migrations, not upgraded; signing keys are opened, not made;
providers are asked what they need to sign someone in (an OpenID provider's discovery and keys,
an OAuth 2.0 provider's endpoints, the local provider's users file). One :class:`Check` per
thing, with the URL and the cause of a failure.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session

from providers.contract import CheckingProvider
from providers.errors import LoginFailed, ProviderError

from .config import Settings
from .crypto import Sealer
from .failures import describe, safe_url
from .keys import KeyRing
from .plugins import ProviderRegistry

TIMEOUT = 10.0


@dataclass(frozen=True)
class Check:
    what: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.what}: {self.detail}"


def run(settings: Settings, providers: ProviderRegistry) -> list[Check]:
    checks = database_checks(settings)
    if settings.redis_url:
        checks.append(redis_check(settings))
    with httpx.Client(timeout=TIMEOUT, follow_redirects=False) as http:
        for name, provider in providers.items():
            checks.extend(provider_checks(name, provider, http))
    return checks


def startup_problem(settings: Settings) -> str | None:
    """Why a broker with ``settings`` cannot start, in one line, or ``None``: the provider
    plugins refuse their config, or the database is unreachable, behind, or holds keys the
    secret does not open. Reads only; the upstreams are not asked (one being down must not stop
    the broker)."""
    from .config import ConfigError
    from .plugins import plugin_manager

    try:
        ProviderRegistry.for_settings(plugin_manager(), settings)
    except ConfigError as exc:
        return "invalid configuration: " + "; ".join(exc.problems)
    for check in database_checks(settings):
        if not check.ok:
            return f"{check.what}: {check.detail}"
    return None


def database_checks(settings: Settings) -> list[Check]:
    """Reachable, at every migration head, and the signing keys open with ``secret_key``."""
    from .migrate import migration_status

    what = f"database {safe_url(settings.database_url)}"
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite":
        path = url.database
        if path and path != ":memory:" and not Path(path).exists():
            return [Check(what, False, "does not exist (run `broker db upgrade`)")]
    try:
        with _engine(settings.database_url) as engine:
            status = migration_status(engine, settings.client_migrations)
            if status.problems:
                return [Check(what, False, "; ".join(status.problems))]
            checks = [Check(what, True, f"at head ({' '.join(status.current) or 'none'})")]
            with Session(engine) as session:
                sealer = Sealer(settings.secret_key, previous=settings.previous_secret_keys)
                keys = KeyRing(sealer, settings.tokens.signing_alg)
                problem = keys.startup_problem(session)
                total = len(keys.public_keys(session))
            if problem:
                checks.append(Check("signing keys", False, problem))
            elif not total:
                checks.append(Check("signing keys", True, "none yet (made at the first start)"))
            else:
                checks.append(Check("signing keys", True, f"secret_key opens all {total}"))
            return checks
    except Exception as exc:
        line = describe(exc, database_url=settings.database_url)
        if line is None:
            raise
        return [Check(what, False, line.removeprefix(what).lstrip(" :"))]


@contextlib.contextmanager
def _engine(database_url: str) -> Iterator[Engine]:
    engine = create_engine(database_url, pool_pre_ping=False)
    try:
        yield engine
    finally:
        engine.dispose()


def redis_check(settings: Settings) -> Check:
    assert settings.redis_url is not None
    what = f"redis {safe_url(settings.redis_url)}"
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=3, socket_connect_timeout=3)
    try:
        client.ping()
        version = client.info("server").get("redis_version", "?")
    except redis.RedisError as exc:
        return Check(what, False, f"unreachable: {exc}")
    finally:
        client.close()
    return Check(what, True, f"answers (Redis {version})")


def provider_checks(name: str, provider: object, http: httpx.Client) -> list[Check]:
    what = f"provider {name}"
    if not isinstance(provider, CheckingProvider):
        return [Check(what, True, "nothing to check (the plugin has no check)")]
    try:
        lines = provider.check(http)
    except LoginFailed as exc:
        return [Check(what, False, exc.detail or exc.reason)]
    except ProviderError as exc:
        return [Check(what, False, str(exc))]
    return [Check(what, True, line) for line in lines] or [Check(what, True, "ok")]
