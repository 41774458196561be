"""gunicorn's logger with an access log that builds only the values its format names.

gunicorn's ``Logger.atoms`` builds, for every request, a dictionary of every atom it knows:
the request's time as text, every request header, every response header and every WSGI
environment variable (``{name}i``, ``{name}o``, ``{name}e``), and then ``SafeAtoms`` copies
all of it again to escape quotes. The broker's format names six of them. Built for every
request, that was about 0.2 ms of worker CPU, as much as the broker spends on a refresh
token's database read. Here the atoms are a mapping that computes a value when the format
asks for it, with gunicorn's meaning for each (the same names, the same ``-`` for a missing
one, the same escaping of ``"``), so an operator's own ``access_log_format`` or logging
configuration sees what gunicorn's own logger gives.

gunicorn loads it by name: ``logger_class = "broker.gunicorn_log.AccessLogger"``
(:mod:`broker.gunicorn_conf`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from typing import Any

from gunicorn.glogging import Logger


def _status(resp: Any) -> Any:
    status = resp.status
    return status.split(None, 1)[0] if isinstance(status, str) else status


def _sent(resp: Any) -> str:
    sent = getattr(resp, "sent", None)
    return str(sent) if sent is not None and str(sent) else "-"


class LazyAtoms(Mapping[str, Any]):
    """The atoms of one access-log line, each computed when it is read (``%(name)s``).

    Reading is what ``SafeAtoms`` gives: ``{name}i``, ``{name}o`` and ``{name}e`` match
    whatever the case, a name that is not known reads as ``-``, and ``"`` in a text value is
    escaped. Iterating yields every name gunicorn's own ``atoms`` would hold, computed then."""

    __slots__ = ("_environ", "_logger", "_req", "_request_time", "_resp")

    def __init__(
        self, logger: Logger, resp: Any, req: Any, environ: dict[str, Any], request_time: timedelta
    ) -> None:
        self._logger = logger
        self._resp = resp
        self._req = req
        self._environ = environ
        self._request_time = request_time

    # gunicorn's fixed atoms (glogging.Logger.atoms), one function each
    _FIXED: dict[str, Callable[[LazyAtoms], Any]] = {
        "h": lambda a: a._environ.get("REMOTE_ADDR", "-"),
        "l": lambda a: "-",
        "u": lambda a: a._logger._get_user(a._environ) or "-",
        "t": lambda a: a._logger.now(),
        "r": lambda a: "{} {} {}".format(
            a._environ["REQUEST_METHOD"], a._environ["RAW_URI"], a._environ["SERVER_PROTOCOL"]
        ),
        "s": lambda a: _status(a._resp),
        "m": lambda a: a._environ.get("REQUEST_METHOD"),
        "U": lambda a: a._environ.get("PATH_INFO"),
        "q": lambda a: a._environ.get("QUERY_STRING"),
        "H": lambda a: a._environ.get("SERVER_PROTOCOL"),
        "b": lambda a: _sent(a._resp),
        "B": lambda a: getattr(a._resp, "sent", None),
        "f": lambda a: a._environ.get("HTTP_REFERER", "-"),
        "a": lambda a: a._environ.get("HTTP_USER_AGENT", "-"),
        "T": lambda a: a._request_time.seconds,
        "D": lambda a: a._request_time.seconds * 1_000_000 + a._request_time.microseconds,
        "M": lambda a: a._request_time.seconds * 1000 + a._request_time.microseconds // 1000,
        "L": lambda a: f"{a._request_time.seconds}.{a._request_time.microseconds:06d}",
        "p": lambda a: f"<{os.getpid()}>",
    }

    def _pairs(self, kind: str) -> list[tuple[str, Any]]:
        if kind == "i":
            headers = getattr(self._req, "headers", self._req)
        elif kind == "o":
            headers = self._resp.headers
        else:
            headers = self._environ
        return list(headers.items() if hasattr(headers, "items") else headers)

    def _raw(self, key: str) -> Any:
        fixed = self._FIXED.get(key)
        if fixed is not None:
            return fixed(self)
        if len(key) > 3 and key[0] == "{" and key[-2] == "}" and key[-1] in "ioe":
            name = key[1:-2].lower()
            found: Any = "-"
            # The last of repeated headers wins, as in gunicorn's dictionary.
            for k, v in self._pairs(key[-1]):
                if k.lower() == name:
                    found = v
            return found
        return "-"

    def __getitem__(self, key: str) -> Any:
        value = self._raw(key)
        return value.replace('"', '\\"') if isinstance(value, str) else value

    def __iter__(self) -> Iterator[str]:
        yield from self._FIXED
        for kind in "ioe":
            seen: set[str] = set()
            for k, _ in self._pairs(kind):
                key = "{" + k.lower() + "}" + kind
                if key not in seen:
                    seen.add(key)
                    yield key

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __bool__(self) -> bool:
        return True  # logging treats a lone mapping argument as the format's values if true


class AccessLogger(Logger):  # type: ignore[misc]
    """gunicorn's logger; its access-log atoms are computed as the format reads them."""

    def atoms(self, resp: Any, req: Any, environ: Any, request_time: timedelta) -> LazyAtoms:
        return LazyAtoms(self, resp, req, environ, request_time)

    @staticmethod
    def atoms_wrapper_class(atoms: LazyAtoms) -> LazyAtoms:
        return atoms  # LazyAtoms escapes and defaults as SafeAtoms does
