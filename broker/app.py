"""The application factory: configuration, database, keys, plugins and blueprints in one app."""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass
from typing import Any

import httpx
from flask import Flask, Request, Response
from flask.sessions import SessionInterface, SessionMixin
from werkzeug.middleware.proxy_fix import ProxyFix

from . import config as config_module
from . import metrics
from .config import Settings
from .crypto import Sealer
from .db import Database
from .flow import AuthorizationFlow
from .keys import KeyRing
from .oauth2.cimd import ClientMetadataDocuments
from .oauth2.rfc7009 import TokenRevocation
from .oauth2.rfc7591 import ClientRegistration
from .oauth2.rfc7662 import TokenIntrospection
from .oauth2.rfc8693 import register_token_exchange
from .oauth2.server import BrokerAuthorizationServer
from .plugins import ProviderRegistry, plugin_manager
from .recheck import UpstreamRecheck
from .throttle import LoginThrottle, redis_client

__all__ = ["Broker", "create_app"]

log = logging.getLogger(__name__)


@dataclass
class Broker:
    """Everything one application instance holds (``app.extensions["broker"]``)."""

    settings: Settings
    db: Database
    sealer: Sealer
    keys: KeyRing
    server: BrokerAuthorizationServer
    flow: AuthorizationFlow
    providers: ProviderRegistry
    http: httpx.Client
    cimd: ClientMetadataDocuments
    throttle: LoginThrottle
    recheck: UpstreamRecheck


class NoCookieSession(SessionInterface):
    """Flask's session, never opened: every request gets the null session."""

    def open_session(self, app: Flask, request: Request) -> SessionMixin | None:
        return self.make_null_session(app)

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        return None


def create_app(
    config: Settings | str | os.PathLike[str] | None = None,
    *,
    plugins: tuple[object, ...] = (),
    check_schema: bool = True,
    check_keys: bool = True,
) -> Flask:
    """The application factory.

    ``config`` is a :class:`Settings`, a path to ``broker.yaml``, or ``None`` for
    ``$BROKER_CONFIG``. A bad configuration raises :class:`broker.config.ConfigError` listing every
    problem with its key path; so does a ``secret_key`` that opens no signing key in the database
    (unless ``check_keys`` is false: ``broker keys reseal --discard-unreadable``).
    """
    settings = config if isinstance(config, Settings) else config_module.load(config)
    app = Flask(
        "broker",  # the package: templates and static files live beside this module
        instance_path=os.path.abspath(settings.instance_path),
        instance_relative_config=False,
    )
    app.config.update(
        SECRET_KEY=settings.secret_key,
        MAX_CONTENT_LENGTH=64 * 1024,
        SESSION_COOKIE_SECURE=settings.secure_cookies,
        TRAP_HTTP_EXCEPTIONS=False,
    )
    # Browser state lives in the database behind the broker's own cookies, never in Flask's
    # signed cookie session: none is opened (Flask would build a signer for it per request).
    app.session_interface = NoCookieSession()
    if settings.trust_proxy:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1, x_port=1)  # type: ignore[method-assign]

    pm = plugin_manager(extra=plugins)
    providers = ProviderRegistry.for_settings(pm, settings)

    db = Database(settings.database_url)
    if check_schema:
        from .migrate import migration_status

        status = migration_status(db.engine, settings.client_migrations)
        if status.problems:
            db.dispose()
            raise config_module.ConfigError([f"database_url: {p}" for p in status.problems])
    sealer = Sealer(settings.secret_key, previous=settings.previous_secret_keys)
    keys = KeyRing(sealer, settings.tokens.signing_alg, access_ttl=settings.tokens.access_ttl)
    with db.session() as session:
        # Before anything is created: a changed secret_key would otherwise answer 500 at /token.
        unreadable = keys.startup_problem(session) if check_keys else None
        if unreadable is None:
            keys.ensure_active(session)  # first start: create the signing key
            keys.ensure_next(session)  # and the next one, published before it ever signs
            if settings.tokens.key_rotation_days:
                keys.rotate_if_older(session, dt.timedelta(days=settings.tokens.key_rotation_days))
    if unreadable is not None:
        db.dispose()
        raise config_module.ConfigError([unreadable])
    server = BrokerAuthorizationServer(settings, db, keys, sealer)
    server.register_endpoint(ClientRegistration)
    server.register_endpoint(TokenRevocation)
    server.register_endpoint(TokenIntrospection)
    http = metrics.UpstreamClient(  # an httpx.Client that times upstream requests
        timeout=httpx.Timeout(10.0),
        follow_redirects=False,
        headers={"User-Agent": "mcp-identity-broker"},
    )
    upstream_tokens = register_token_exchange(server, providers, http)
    app.extensions["broker"] = Broker(
        settings,
        db,
        sealer,
        keys,
        server,
        AuthorizationFlow(settings, server, sealer),
        providers,
        http,
        ClientMetadataDocuments(settings, db),
        LoginThrottle(
            redis_client(settings.redis_url) if settings.redis_url else None,
            prefix=settings.redis_prefix,
        ),
        UpstreamRecheck(settings, db, providers, upstream_tokens, http),
    )

    from .views import init_app as init_views

    init_views(app)
    from .cli import init_app as init_cli

    init_cli(app)
    return app


def get_broker(app: Any) -> Broker:
    broker: Broker = app.extensions["broker"]
    return broker
