"""Reading a provider's configuration: every problem at once, each with its key path.

Shared by every built-in provider and open to third-party ones (``from providers import
ConfigReader``). A reader method records a problem and returns a default, so ``from_config``
reports all problems in one :class:`~providers.errors.ConfigError`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import Any, overload
from urllib.parse import urlsplit

from .errors import ConfigError

__all__ = ["SCOPE_TOKEN", "ConfigReader", "check_url", "is_loopback_host", "sanitize_code"]

SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")
"""RFC 6749 section 3.3: a scope token."""
_UNSAFE_CODE_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")


def sanitize_code(value: object) -> str:
    """An upstream error code reduced to a short, log-safe token (never shown to anyone)."""
    if not isinstance(value, str):
        return "invalid"
    return _UNSAFE_CODE_CHARS.sub("", value)[:64] or "invalid"


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(value: object, *, allow_query: bool = True) -> str | None:
    """Why ``value`` is not an acceptable upstream URL, or ``None`` when it is: an absolute https
    URL without fragment (plain http only for loopback hosts, for local IdPs and tests)."""
    message = "must be an https URL (http allowed only for loopback hosts)"
    if not isinstance(value, str) or not value:
        return message
    try:
        parts = urlsplit(value)
        host = parts.hostname
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError:
        return message
    if not host or parts.scheme not in ("https", "http"):
        return message
    if parts.scheme == "http" and not is_loopback_host(host):
        return message
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials"
    if parts.fragment or value.endswith("#"):
        return "must not have a fragment"
    if not allow_query and (parts.query or value.endswith("?")):
        return "must not have a query"
    return None


class ConfigReader:
    """Reads one provider's configuration mapping and collects every problem at once.

    Each reader method records a problem prefixed with the key path and returns a default, so
    ``from_config`` reports all problems in one :class:`ConfigError`. Keys never read are
    reported as unknown by :meth:`finish`.
    """

    def __init__(self, config: object, *, prefix: str = "") -> None:
        self.problems: list[str] = []
        self._prefix = prefix
        self._seen: set[str] = set()
        if isinstance(config, Mapping):
            self._config: Mapping[str, Any] = config
        else:
            self._config = {}
            self.problems.append(f"{prefix.rstrip('.') or '(provider)'}: must be a mapping")

    def path(self, key: str) -> str:
        return f"{self._prefix}{key}"

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self.path(key)}: {message}")

    def has(self, key: str) -> bool:
        return key in self._config and self._config[key] is not None

    def raw(self, key: str) -> Any:
        self._seen.add(key)
        return self._config.get(key)

    def string(self, key: str, *, required: bool = False, default: str | None = None) -> str | None:
        value = self.raw(key)
        if value is None:
            if required:
                self.problem(key, "required")
            return default
        if not isinstance(value, str) or not value.strip():
            self.problem(key, "must be a non-empty string")
            return default
        return value

    def url(self, key: str, *, required: bool = False, allow_query: bool = True) -> str | None:
        value = self.raw(key)
        if value is None:
            if required:
                self.problem(key, "required")
            return None
        error = check_url(value, allow_query=allow_query)
        if error:
            self.problem(key, error)
            return None
        assert isinstance(value, str)
        return value

    @overload
    def base_url(self, key: str) -> str | None: ...
    @overload
    def base_url(self, key: str, default: str) -> str: ...
    def base_url(self, key: str, default: str | None = None) -> str | None:
        """An overridable base URL (an enterprise host, a local fake): a :meth:`url` without
        query, its trailing ``/`` dropped so that paths can be appended; ``default`` when the
        key is missing or wrong (the problem is recorded)."""
        value = self.url(key, allow_query=False)
        return value.rstrip("/") if value else default

    def string_list(self, key: str, default: Iterable[str]) -> tuple[str, ...]:
        value = self.raw(key)
        if value is None:
            return tuple(default)
        if isinstance(value, str):
            value = value.split()
        if not isinstance(value, list | tuple) or not all(
            isinstance(item, str) and item for item in value
        ):
            self.problem(key, "must be a list of strings")
            return tuple(default)
        return tuple(dict.fromkeys(value))

    def number(self, key: str, default: float, *, minimum: float, maximum: float) -> float:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problem(key, "must be a number")
            return default
        if not minimum < value <= maximum:
            self.problem(key, f"must be more than {minimum:g} and at most {maximum:g}")
            return default
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.problem(key, "must be true or false")
            return default
        return value

    def choice(self, key: str, choices: Iterable[str], default: str) -> str:
        allowed = tuple(choices)
        value = self.raw(key)
        if value is None:
            return default
        if value not in allowed:
            self.problem(key, f"must be one of {', '.join(allowed)}")
            return default
        assert isinstance(value, str)
        return value

    def string_map(self, key: str) -> dict[str, str]:
        value = self.raw(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.problem(key, "must be a mapping of strings")
            return {}
        result: dict[str, str] = {}
        for item_key, item in value.items():
            if not isinstance(item_key, str) or not item_key:
                self.problem(key, "keys must be non-empty strings")
            elif isinstance(item, bool) or not isinstance(item, str | int):
                self.problem(f"{key}.{item_key}", "must be a string")
            else:
                result[item_key] = str(item)
        return result

    def pattern_list(
        self, key: str, pattern: re.Pattern[str], must_be: str, *, lower: bool = False
    ) -> tuple[str, ...]:
        """A :meth:`string_list` of names each matching ``pattern`` (lower-cased first with
        ``lower``, for names compared case-insensitively); a mismatch is ``key[i]: must be
        <must_be>``. Names an ``allowed_...`` restriction lists: logins, ids, domains."""
        values = self.string_list(key, ())
        names = tuple(value.lower() for value in values) if lower else values
        for index, value in enumerate(names):
            if not pattern.match(value):
                self.problem(f"{key}[{index}]", f"must be {must_be}")
        return tuple(dict.fromkeys(names))

    def url_list(self, key: str) -> tuple[str, ...]:
        """A list of upstream URLs (each as :func:`check_url` requires), without trailing ``/``."""
        urls = []
        for index, value in enumerate(self.string_list(key, ())):
            error = check_url(value, allow_query=False)
            if error:
                self.problem(f"{key}[{index}]", error)
            else:
                urls.append(value.rstrip("/"))
        return tuple(urls)

    def scopes(self, key: str, default: Iterable[str]) -> tuple[str, ...]:
        """Upstream scopes: a list (or a space-separated string) of RFC 6749 scope tokens."""
        scopes = self.string_list(key, default)
        if self.has(key) and any(not SCOPE_TOKEN.match(scope) for scope in scopes):
            self.problem(key, "contains invalid characters")
        return scopes

    def finish(self, *, ignore: Iterable[str] = ("type",)) -> None:
        """Report unknown keys, then raise :class:`ConfigError` if anything was wrong."""
        ignored = set(ignore)
        for key in self._config:
            if str(key) not in self._seen and str(key) not in ignored:
                self.problem(str(key), "unknown key")
        if self.problems:
            raise ConfigError(list(self.problems))
