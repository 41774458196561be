"""Configuration: ``broker.yaml`` with ``${VAR}`` / ``${VAR:-default}`` expansion, validated into
typed settings. A bad file stops start-up with one message per problem, each naming its key path."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

ENV_CONFIG = "BROKER_CONFIG"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
SIGNING_ALGS = ("ES256", "RS256", "EdDSA")
SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5B\x5D-\x7E]+$")  # RFC 6749 section 3.3 scope-token


class ConfigError(Exception):
    """One or more configuration problems; ``problems`` are ``key.path: message`` strings."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n" + "\n".join(f"  {p}" for p in problems))
        self.problems = problems


@dataclass(frozen=True)
class TokenSettings:
    access_ttl: int = 3600
    refresh_ttl: int = 30 * 24 * 3600
    refresh_idle_ttl: int = 14 * 24 * 3600
    refresh_reuse_grace: int = 30
    code_ttl: int = 300
    login_ttl: int = 600
    signing_alg: str = "ES256"
    key_rotation_days: int = 0


@dataclass(frozen=True)
class ResourceSettings:
    """An MCP server the broker protects; ``uri`` is its canonical URI and the token audience."""

    uri: str
    name: str
    scopes: Mapping[str, str]
    required_scopes: tuple[str, ...] = ()
    providers: tuple[str, ...] | None = None
    upstream_tokens: tuple[str, ...] = ()
    claims: tuple[str, ...] = ()


@dataclass(frozen=True)
class RuleSettings:
    """One policy rule: ``deny`` (with a reason) or ``grant`` (scopes), applied ``when`` all
    conditions match."""

    kind: str  # "grant" or "deny"
    scopes: tuple[str, ...]
    reason: str
    when: Mapping[str, tuple[str, ...]]
    resources: tuple[str, ...] | None = None


@dataclass(frozen=True)
class RateLimit:
    """``count`` requests per ``period`` seconds (a fixed window), written ``N/unit`` in the
    config (``20/hour``; units second, minute, hour, day)."""

    count: int
    period: int

    def __str__(self) -> str:
        unit = {1: "second", 60: "minute", 3600: "hour", 86400: "day"}.get(self.period)
        return f"{self.count}/{unit}" if unit else f"{self.count}/{self.period}s"


RATE_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(second|minute|hour|day)s?\s*$")

DEFAULT_RECHECK_INTERVAL = 3600
"""Seconds between re-checks of a user at a provider that can re-check (GitHub membership,
Atlassian sites, an OpenID provider's userinfo); ``recheck_interval: 0`` turns them off."""

DEFAULT_RATE_LIMITS: dict[str, dict[str, RateLimit]] = {
    # Claude registers on every fresh connection, from Anthropic's servers: one address for
    # every Claude user of the broker. The default holds a flood and lets a company through.
    "register": {"per_address": RateLimit(600, 3600)},
    # Documents are cached, so a host is fetched rarely; this bounds a client_id flood.
    "client_metadata_fetch": {"per_host": RateLimit(60, 60)},
    # Browsers, each from its user's address (an office NAT: many users, a few sign-ins each).
    "authorize": {"per_address": RateLimit(600, 60)},
}
"""The limits in force without ``rate_limits`` in the config; each one can be changed, or
turned off with ``off``."""

RATE_LIMIT_SUBJECTS: dict[str, tuple[str, ...]] = {
    "register": ("per_address",),
    "client_metadata_fetch": ("per_host",),
    "authorize": ("per_address",),
    # Off unless configured: the token path is the broker's hot path, and without Redis each
    # counted request is one more database write (README, "Rate limits").
    "token": ("per_address", "per_client"),
    "revoke": ("per_address", "per_client"),
    "introspect": ("per_address", "per_client"),
}
"""Every limit there is, and what each counts (a client is counted once authenticated)."""


@dataclass(frozen=True)
class CIMDSettings:
    """Client ID Metadata Documents: clients whose ``client_id`` is an https URL."""

    enabled: bool = True
    timeout: float = 5.0
    max_bytes: int = 5120
    cache_min: int = 300
    cache_max: int = 86400
    # Test-only allowances (refused outside tests): loopback hosts to fetch from, and a CA file
    # to trust for them. Never a way to weaken the production SSRF rules.
    allow_hosts: tuple[str, ...] = ()
    ca_file: str | None = None
    # Production host policy: host names (``*.example.com`` matches subdomains) whose documents
    # may (allowed_hosts: only these, when set) or may not (denied_hosts) be fetched.
    allowed_hosts: tuple[str, ...] = ()
    denied_hosts: tuple[str, ...] = ()
    failure_cache: int = 60


METRICS_MODES = ("bearer_token", "bind", "public")


@dataclass(frozen=True)
class MetricsSettings:
    """``/metrics`` (docs/metrics.md). Off by default (404). At most one of: ``bearer_token``
    (the main port's ``/metrics`` asks for ``Authorization: Bearer <token>``), ``bind`` (a
    listener of its own, ``host:port``, started in the gunicorn master by
    ``broker.gunicorn_conf``; the main port answers 404) or ``public`` (open on the main port,
    for a proxy in front that restricts it)."""

    bearer_token: str | None = field(default=None, repr=False)
    bind: tuple[str, int] | None = None
    public: bool = False

    @property
    def mode(self) -> str:
        """``off``, ``bearer_token``, ``bind`` or ``public``."""
        if self.bearer_token is not None:
            return "bearer_token"
        if self.bind is not None:
            return "bind"
        return "public" if self.public else "off"

    @property
    def on_main_port(self) -> bool:
        return self.mode in ("bearer_token", "public")


@dataclass(frozen=True)
class Settings:
    issuer: str
    secret_key: str
    database_url: str
    instance_path: str
    base_dir: str
    # Older root secrets: what they sealed still opens until ``broker keys reseal`` re-seals it.
    previous_secret_keys: tuple[str, ...] = ()
    redis_url: str | None = None
    redis_prefix: str = "broker:"
    trust_proxy: bool = False
    tokens: TokenSettings = field(default_factory=TokenSettings)
    providers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Seconds between re-checks of a user upstream, per provider (0: never); read by the broker,
    # never passed to the provider.
    recheck_intervals: Mapping[str, int] = field(default_factory=dict)
    resources: tuple[ResourceSettings, ...] = ()
    rules: tuple[RuleSettings, ...] = ()
    registration_ttl: int = 7 * 24 * 3600
    registration_enabled: bool = True
    client_migrations: str = "client_migrations"
    rate_limits: Mapping[str, Mapping[str, RateLimit]] = field(
        default_factory=lambda: dict(DEFAULT_RATE_LIMITS)
    )
    client_metadata_documents: CIMDSettings = field(default_factory=CIMDSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    testing: bool = False
    allow_insecure_issuer: bool = False

    @property
    def secure_cookies(self) -> bool:
        return self.issuer.startswith("https://")

    def resource(self, uri: str) -> ResourceSettings | None:
        for resource in self.resources:
            if resource.uri == uri:
                return resource
        return None


def expand_env(value: Any, env: Mapping[str, str], path: str, problems: list[str]) -> Any:
    """Expand ``${VAR}`` and ``${VAR:-default}`` in every string of a parsed YAML tree."""
    if isinstance(value, str):

        def repl(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env and env[name] != "":
                return env[name]
            if default is not None:
                return default
            problems.append(f"{path}: environment variable {name} is not set")
            return ""

        return _VAR.sub(repl, value)
    if isinstance(value, dict):
        return {
            k: expand_env(v, env, f"{path}.{k}" if path else str(k), problems)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [expand_env(v, env, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    return value


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Reader:
    """Reads typed values out of a mapping, recording problems with key paths."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems

    def mapping(self, data: Any, path: str) -> dict[str, Any]:
        if data is None:
            return {}
        if not isinstance(data, dict):
            self.problems.append(f"{path}: must be a mapping")
            return {}
        return data

    def unknown(self, data: Mapping[str, Any], allowed: set[str], path: str) -> None:
        for key in data:
            if key not in allowed:
                self.problems.append(f"{_join(path, str(key))}: unknown key")

    def string(
        self,
        data: Mapping[str, Any],
        key: str,
        path: str,
        *,
        required: bool = False,
        default: str | None = None,
    ) -> str | None:
        value = data.get(key)
        if value is None or value == "":
            if required:
                self.problems.append(f"{_join(path, key)}: required")
            return default
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            self.problems.append(f"{_join(path, key)}: must be a string")
            return default
        return value

    def integer(
        self,
        data: Mapping[str, Any],
        key: str,
        path: str,
        default: int,
        *,
        minimum: int = 0,
        maximum: int | None = None,
    ) -> int:
        value = data.get(key, default)
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            self.problems.append(f"{_join(path, key)}: must be an integer")
            return default
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            self.problems.append(f"{_join(path, key)}: must be {bound}")
            return default
        return value

    def boolean(self, data: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
        value = data.get(key, default)
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            self.problems.append(f"{_join(path, key)}: must be true or false")
            return default
        return value

    def strings(self, data: Mapping[str, Any], key: str, path: str) -> tuple[str, ...] | None:
        value = data.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.problems.append(f"{_join(path, key)}: must be a list of strings")
            return None
        return tuple(value)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check_issuer(issuer: str, problems: list[str], allow_insecure: bool) -> None:
    parts = urlsplit(issuer)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        problems.append("issuer: must be an absolute https URL")
        return
    if parts.query or parts.fragment:
        problems.append("issuer: must not have a query or fragment (RFC 8414 section 2)")
    if issuer.endswith("/"):
        problems.append("issuer: must not end with a slash")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname) and not allow_insecure:
        problems.append("issuer: plain http is allowed only on a loopback host")


def canonical_resource_problem(uri: str) -> str | None:
    """Why ``uri`` is not a usable canonical resource URI (RFC 8707 section 2), or None."""
    parts = urlsplit(uri)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return "must be an absolute http(s) URI"
    if parts.fragment or "#" in uri:
        return "must not contain a fragment"
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        return "plain http is allowed only on a loopback host"
    return None


def _claim_names(
    data: Mapping[str, Any], path: str, reader: _Reader, problems: list[str]
) -> tuple[str, ...]:
    """``resources[].claims``: identity facts the resource's tokens carry (``preferred_username``
    is the token's name of the ``username`` fact). Which facts exist is checked against the
    providers at start-up."""
    names = []
    for name in reader.strings(data, "claims", path) or ():
        name = "username" if name == "preferred_username" else name
        if not FACT_NAME.match(name):
            problems.append(f"{path}.claims: {name} is not a fact name")
        elif name not in names:
            names.append(name)
    return tuple(names)


def _resources(raw: Any, reader: _Reader, problems: list[str]) -> tuple[ResourceSettings, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.append("resources: must be a list")
        return ()
    result: list[ResourceSettings] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        path = f"resources[{i}]"
        data = reader.mapping(item, path)
        reader.unknown(
            data,
            {"uri", "name", "scopes", "required_scopes", "providers", "upstream_tokens", "claims"},
            path,
        )
        uri = reader.string(data, "uri", path, required=True)
        if uri is None:
            continue
        why = canonical_resource_problem(uri)
        if why:
            problems.append(f"{path}.uri: {why}")
        if uri in seen:
            problems.append(f"{path}.uri: duplicate resource {uri}")
        seen.add(uri)
        name = reader.string(data, "name", path, default=uri) or uri
        scopes_raw = data.get("scopes") or {}
        scopes: dict[str, str] = {}
        if isinstance(scopes_raw, list):
            scopes_raw = {s: s for s in scopes_raw}
        if not isinstance(scopes_raw, dict):
            problems.append(f"{path}.scopes: must be a mapping of scope to description")
        else:
            for scope, desc in scopes_raw.items():
                if not isinstance(scope, str) or not SCOPE_TOKEN.match(scope):
                    problems.append(f"{path}.scopes.{scope}: not a valid scope token")
                    continue
                scopes[scope] = str(desc) if desc is not None else scope
        required = reader.strings(data, "required_scopes", path) or ()
        for scope in required:
            if scope not in scopes:
                problems.append(
                    f"{path}.required_scopes: {scope} is not one of the resource's scopes"
                )
        result.append(
            ResourceSettings(
                uri=uri,
                name=name,
                scopes=scopes,
                required_scopes=required,
                providers=reader.strings(data, "providers", path),
                upstream_tokens=reader.strings(data, "upstream_tokens", path) or (),
                claims=_claim_names(data, path, reader, problems),
            )
        )
    return tuple(result)


FACT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
"""A rule condition names an identity fact; which facts exist is up to the providers (checked
against them at start-up, :func:`broker.policy.check_rules`)."""


def _rules(raw: Any, reader: _Reader, problems: list[str]) -> tuple[RuleSettings, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.append("rules: must be a list")
        return ()
    rules: list[RuleSettings] = []
    for i, item in enumerate(raw):
        path = f"rules[{i}]"
        data = reader.mapping(item, path)
        reader.unknown(data, {"grant", "deny", "when", "resources"}, path)
        if ("grant" in data) == ("deny" in data):
            problems.append(f"{path}: needs exactly one of grant or deny")
            continue
        when_raw = reader.mapping(data.get("when"), f"{path}.when")
        when: dict[str, tuple[str, ...]] = {}
        for key in when_raw:
            if not isinstance(key, str) or not FACT_NAME.match(key):
                problems.append(f"{path}.when.{key}: not a fact name (lower-case letters, _)")
                continue
            values = reader.strings(when_raw, key, f"{path}.when")
            if values is not None:
                when[key] = values
        resources = reader.strings(data, "resources", path)
        if "deny" in data:
            reason = data["deny"]
            if not isinstance(reason, str) or not reason:
                problems.append(f"{path}.deny: must be a reason (a string)")
                continue
            rules.append(RuleSettings("deny", (), reason, when, resources))
        else:
            scopes = reader.strings(data, "grant", path)
            if scopes is None:
                problems.append(f"{path}.grant: must be a list of scopes")
                continue
            rules.append(RuleSettings("grant", scopes, "", when, resources))
    return tuple(rules)


_HOST_PATTERN = re.compile(r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9-]{1,63}$")


def _host_patterns(
    data: Mapping[str, Any], key: str, reader: _Reader, problems: list[str]
) -> tuple[str, ...]:
    values = reader.strings(data, key, "client_metadata_documents") or ()
    result = []
    for index, value in enumerate(values):
        host = value.lower().rstrip(".")
        if not _HOST_PATTERN.match(host):
            problems.append(
                f"client_metadata_documents.{key}[{index}]: not a host name "
                "(example.com, or *.example.com for its subdomains)"
            )
        else:
            result.append(host)
    return tuple(result)


def parse_rate(value: Any) -> RateLimit | None:
    """``N/unit`` as a :class:`RateLimit`, or ``None`` when it is not one."""
    if isinstance(value, str) and (match := _RATE.match(value)):
        count = int(match.group(1))
        return RateLimit(count, RATE_UNITS[match.group(2)]) if count > 0 else None
    return None


def _rate_limits(raw: Any, reader: _Reader, problems: list[str]) -> dict[str, dict[str, RateLimit]]:
    """``rate_limits.<name>.<per_...>: N/unit`` (or ``off``) over :data:`DEFAULT_RATE_LIMITS`."""
    limits = {name: dict(per) for name, per in DEFAULT_RATE_LIMITS.items()}
    data = reader.mapping(raw, "rate_limits")
    for name, per in data.items():
        path = f"rate_limits.{name}"
        if name not in RATE_LIMIT_SUBJECTS:
            problems.append(f"{path}: unknown limit (known: {', '.join(RATE_LIMIT_SUBJECTS)})")
            continue
        for subject, value in reader.mapping(per, path).items():
            if subject not in RATE_LIMIT_SUBJECTS[name]:
                known = ", ".join(RATE_LIMIT_SUBJECTS[name])
                problems.append(f"{path}.{subject}: unknown key (known: {known})")
            elif value in ("off", False):
                limits.setdefault(name, {}).pop(subject, None)
            elif (rate := parse_rate(value)) is None:
                problems.append(
                    f"{path}.{subject}: must be N/unit (unit second, minute, hour or day), "
                    "N at least 1, or off"
                )
            else:
                limits.setdefault(name, {})[subject] = rate
    return limits


_BEARER_TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")  # RFC 6750 section 2.1 b64token
_BIND = re.compile(r"^(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9.-]+)):([0-9]{1,5})$")


def _bind_address(value: str, path: str, problems: list[str]) -> tuple[str, int] | None:
    """``host:port`` (``[v6]:port`` for an IPv6 address) as (host, port)."""
    match = _BIND.match(value.strip())
    port = int(match.group(3)) if match else 0
    if match is None or not 1 <= port <= 65535:
        problems.append(f"{path}: must be host:port (127.0.0.1:9100, [::1]:9100)")
        return None
    host = match.group(1) or match.group(2)
    if match.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            problems.append(f"{path}: {host} is not an IPv6 address")
            return None
    return host, port


def _metrics(raw: Any, reader: _Reader, problems: list[str]) -> MetricsSettings:
    """``metrics``: absent or ``off`` (404), or a mapping with one of ``bearer_token``,
    ``bind`` or ``public: true``."""
    if raw is None or raw is False or raw == "off":
        return MetricsSettings()
    if not isinstance(raw, dict):
        problems.append("metrics: must be a mapping (bearer_token, bind or public) or off")
        return MetricsSettings()
    reader.unknown(raw, set(METRICS_MODES), "metrics")
    token = None
    if "bearer_token" in raw:  # present but empty (an unset ${VAR:-}) is a mistake, not off
        token = reader.string(raw, "bearer_token", "metrics", required=True)
        if token is not None and not _BEARER_TOKEN.match(token):
            problems.append(
                "metrics.bearer_token: letters, digits and -._~+/ only (use `openssl rand -hex 32`)"
            )
        elif token is not None and len(token) < 32:
            problems.append(
                "metrics.bearer_token: must be at least 32 characters (use `openssl rand -hex 32`)"
            )
    bind = None
    if "bind" in raw:
        value = raw["bind"]
        if not isinstance(value, str) or not value:
            problems.append("metrics.bind: must be host:port (127.0.0.1:9100, [::1]:9100)")
        else:
            bind = _bind_address(value, "metrics.bind", problems)
    public = reader.boolean(raw, "public", "metrics", False)
    chosen = [key for key in ("bearer_token", "bind") if key in raw] + (
        ["public"] if public else []
    )
    if len(chosen) > 1:
        problems.append(
            f"metrics: choose one of bearer_token, bind or public (not {' and '.join(chosen)})"
        )
    return MetricsSettings(bearer_token=token, bind=bind, public=public)


TOP_LEVEL = {
    "issuer",
    "database_url",
    "secret_key",
    "previous_secret_keys",
    "redis_url",
    "redis_prefix",
    "trust_proxy",
    "tokens",
    "providers",
    "resources",
    "rules",
    "registration_ttl",
    "registration_enabled",
    "client_migrations",
    "rate_limits",
    "client_metadata_documents",
    "metrics",
    "instance_path",
}


def parse(
    data: Mapping[str, Any] | None,
    *,
    env: Mapping[str, str] | None = None,
    base_dir: str = ".",
    testing: bool = False,
) -> Settings:
    """Validate an already-parsed mapping into :class:`Settings`, or raise :class:`ConfigError`."""
    problems: list[str] = []
    env = os.environ if env is None else env
    data = dict(expand_env(dict(data or {}), env, "", problems))
    reader = _Reader(problems)
    allow_insecure = bool(data.pop("allow_insecure_issuer", False)) and testing
    reader.unknown(data, TOP_LEVEL, "")

    issuer = reader.string(data, "issuer", "", required=True) or ""
    if issuer:
        _check_issuer(issuer, problems, allow_insecure)
    secret_key = reader.string(data, "secret_key", "", required=True) or ""
    if secret_key and len(secret_key) < 32:
        problems.append("secret_key: must be at least 32 characters (use `openssl rand -hex 32`)")
    previous_secret_keys = reader.strings(data, "previous_secret_keys", "") or ()
    for index, old in enumerate(previous_secret_keys):
        if len(old) < 32:
            problems.append(f"previous_secret_keys[{index}]: must be at least 32 characters")
        elif old == secret_key:
            problems.append(f"previous_secret_keys[{index}]: is the current secret_key")

    instance_path = reader.string(
        data, "instance_path", "", default=str(Path(base_dir) / "instance")
    )
    assert instance_path is not None
    database_url = reader.string(
        data, "database_url", "", default=f"sqlite:///{Path(instance_path).resolve() / 'broker.db'}"
    )
    assert database_url is not None
    if not database_url.startswith(("sqlite", "postgresql")):
        problems.append("database_url: only sqlite:// and postgresql+psycopg:// are supported")
    elif database_url.startswith("postgresql") and not database_url.startswith(
        "postgresql+psycopg"
    ):
        database_url = (
            "postgresql+psycopg" + database_url[len("postgresql") :].split("+psycopg2", 1)[-1]
        )

    tokens_raw = reader.mapping(data.get("tokens"), "tokens")
    reader.unknown(
        tokens_raw,
        {
            "access_ttl",
            "refresh_ttl",
            "refresh_idle_ttl",
            "refresh_reuse_grace",
            "code_ttl",
            "login_ttl",
            "signing_alg",
            "key_rotation_days",
        },
        "tokens",
    )
    tokens = TokenSettings(
        access_ttl=reader.integer(
            tokens_raw, "access_ttl", "tokens", 3600, minimum=60, maximum=86400
        ),
        refresh_ttl=reader.integer(tokens_raw, "refresh_ttl", "tokens", 30 * 86400, minimum=300),
        refresh_idle_ttl=reader.integer(
            tokens_raw, "refresh_idle_ttl", "tokens", 14 * 86400, minimum=300
        ),
        refresh_reuse_grace=reader.integer(
            tokens_raw, "refresh_reuse_grace", "tokens", 30, minimum=0, maximum=300
        ),
        code_ttl=reader.integer(tokens_raw, "code_ttl", "tokens", 300, minimum=10, maximum=600),
        login_ttl=reader.integer(tokens_raw, "login_ttl", "tokens", 600, minimum=60, maximum=3600),
        signing_alg=reader.string(tokens_raw, "signing_alg", "tokens", default="ES256") or "ES256",
        key_rotation_days=reader.integer(
            tokens_raw, "key_rotation_days", "tokens", 0, minimum=0, maximum=3650
        ),
    )
    if tokens.signing_alg not in SIGNING_ALGS:
        problems.append(f"tokens.signing_alg: must be one of {', '.join(SIGNING_ALGS)}")

    providers_raw = reader.mapping(data.get("providers"), "providers")
    providers: dict[str, Mapping[str, Any]] = {}
    recheck_intervals: dict[str, int] = {}
    for name, conf in providers_raw.items():
        if not isinstance(name, str) or not re.match(r"^[a-z][a-z0-9_-]{0,31}$", name):
            problems.append(
                f"providers.{name}: provider names are lower-case letters, digits, - and _"
            )
            continue
        provider_conf = dict(reader.mapping(conf, f"providers.{name}"))
        recheck_intervals[name] = reader.integer(
            provider_conf,
            "recheck_interval",
            f"providers.{name}",
            DEFAULT_RECHECK_INTERVAL,
            minimum=0,
            maximum=30 * 86400,
        )
        if 0 < recheck_intervals[name] < 60:
            problems.append(f"providers.{name}.recheck_interval: must be 0 (never) or >= 60")
        provider_conf.pop("recheck_interval", None)
        providers[name] = provider_conf
    if not providers:
        problems.append("providers: at least one provider is required")

    resources = _resources(data.get("resources"), reader, problems)
    if not resources:
        problems.append("resources: at least one resource (MCP server) is required")
    for index, res in enumerate(resources):
        for p in res.providers or ():
            if p not in providers:
                problems.append(f"resources[{index}].providers: unknown provider {p}")
        for p in res.upstream_tokens:
            if p not in providers:
                problems.append(f"resources[{index}].upstream_tokens: unknown provider {p}")
            elif res.providers is not None and p not in res.providers:
                problems.append(
                    f"resources[{index}].upstream_tokens: {p} is not one of the resource's "
                    "providers, so no user of it signs in there"
                )

    cimd_raw = reader.mapping(data.get("client_metadata_documents"), "client_metadata_documents")
    reader.unknown(
        cimd_raw,
        {
            "enabled",
            "timeout",
            "max_bytes",
            "cache_min",
            "cache_max",
            "allowed_hosts",
            "denied_hosts",
            "failure_cache",
        }
        | ({"allow_hosts", "ca_file"} if testing else set()),
        "client_metadata_documents",
    )
    cimd = CIMDSettings(
        enabled=reader.boolean(cimd_raw, "enabled", "client_metadata_documents", True),
        timeout=float(
            reader.integer(
                cimd_raw, "timeout", "client_metadata_documents", 5, minimum=1, maximum=30
            )
        ),
        max_bytes=reader.integer(
            cimd_raw, "max_bytes", "client_metadata_documents", 5120, minimum=512, maximum=65536
        ),
        cache_min=reader.integer(
            cimd_raw, "cache_min", "client_metadata_documents", 300, minimum=0, maximum=86400
        ),
        cache_max=reader.integer(
            cimd_raw, "cache_max", "client_metadata_documents", 86400, minimum=60, maximum=7 * 86400
        ),
        allow_hosts=reader.strings(cimd_raw, "allow_hosts", "client_metadata_documents") or (),
        ca_file=reader.string(cimd_raw, "ca_file", "client_metadata_documents"),
        allowed_hosts=_host_patterns(cimd_raw, "allowed_hosts", reader, problems),
        denied_hosts=_host_patterns(cimd_raw, "denied_hosts", reader, problems),
        failure_cache=reader.integer(
            cimd_raw, "failure_cache", "client_metadata_documents", 60, minimum=0, maximum=3600
        ),
    )

    redis_url = reader.string(data, "redis_url", "")
    if redis_url and not redis_url.startswith(("redis://", "rediss://", "unix://")):
        problems.append("redis_url: must be a redis://, rediss:// or unix:// URL")

    return_settings = Settings(
        issuer=issuer,
        secret_key=secret_key,
        database_url=database_url,
        instance_path=instance_path,
        base_dir=base_dir,
        redis_url=redis_url,
        redis_prefix=reader.string(data, "redis_prefix", "", default="broker:") or "broker:",
        trust_proxy=reader.boolean(data, "trust_proxy", "", False),
        tokens=tokens,
        providers=providers,
        recheck_intervals=recheck_intervals,
        previous_secret_keys=previous_secret_keys,
        resources=resources,
        rules=_rules(data.get("rules"), reader, problems),
        registration_ttl=reader.integer(data, "registration_ttl", "", 7 * 86400, minimum=3600),
        registration_enabled=reader.boolean(data, "registration_enabled", "", True),
        client_migrations=str(
            Path(base_dir)
            / (reader.string(data, "client_migrations", "", default="client_migrations") or "")
        ),
        rate_limits=_rate_limits(data.get("rate_limits"), reader, problems),
        client_metadata_documents=cimd,
        metrics=_metrics(data.get("metrics"), reader, problems),
        testing=testing,
        allow_insecure_issuer=allow_insecure,
    )
    if problems:
        raise ConfigError(problems)
    return return_settings


def load(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    testing: bool = False,
) -> Settings:
    """Read and validate the YAML file at ``path`` (default: ``$BROKER_CONFIG``)."""
    env = os.environ if env is None else env
    path = path or env.get(ENV_CONFIG)
    if not path:
        raise ConfigError([f"no configuration file: pass --config or set {ENV_CONFIG}"])
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read ({exc.strerror})"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # The parser's reason names tokens (``expected ',' or '}', but got '}'``), never values.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        context = getattr(exc, "context", None)
        problem = getattr(exc, "problem", None)
        reason = ", ".join(str(part) for part in (context, problem) if part)
        raise ConfigError(
            [f"{file}: not valid YAML{where}" + (f": {reason}" if reason else "")]
        ) from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError([f"{file}: the top level must be a mapping"])
    return parse(data, env=env, base_dir=str(file.resolve().parent), testing=testing)
