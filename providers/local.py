"""The ``local`` provider: users in a YAML file with argon2 or scrypt password hashes.

For the demo, small teams and break-glass access. The broker renders the login form (with CSRF
protection and throttled failures); this module only checks credentials.

``users.yaml``::

    users:
      alice:
        password_hash: "$argon2id$v=19$m=65536,t=3,p=4$..."   # broker hash-password
        name: Alice Example
        email: alice@example.com        # local emails count as verified: the operator wrote them
        groups: [staff]
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from .contract import Identity, LoginResult
from .errors import ConfigError, LoginFailed
from .hookspecs import hookimpl

_hasher = PasswordHasher()
_DUMMY = _hasher.hash(base64.b64encode(os.urandom(16)).decode())


def hash_password(password: str) -> str:
    """An argon2id hash for ``users.yaml``."""
    return _hasher.hash(password)


def _check_scrypt(encoded: str, password: str) -> bool:
    # scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>
    try:
        _, n, r, p, salt, digest = encoded.split("$")
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
            maxmem=256 * 1024 * 1024,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def verify_password(encoded: str, password: str) -> bool:
    if encoded.startswith("scrypt$"):
        return _check_scrypt(encoded, password)
    try:
        return _hasher.verify(encoded, password)
    except (VerificationError, InvalidHashError):
        return False


@dataclass(frozen=True)
class LocalUser:
    username: str
    password_hash: str
    name: str | None
    email: str | None
    groups: tuple[str, ...]
    disabled: bool


def load_users(path: Path) -> dict[str, LocalUser]:
    """Parse a users file; raises :class:`ConfigError` with key paths."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError([f"users_file: cannot read {path} ({exc.strerror})"]) from None
    except yaml.YAMLError:
        raise ConfigError([f"users_file: {path} is not valid YAML"]) from None
    raw = data.get("users") if isinstance(data, dict) else None
    if not isinstance(raw, dict):
        raise ConfigError([f"users_file: {path} must have a 'users' mapping"])
    users: dict[str, LocalUser] = {}
    problems: list[str] = []
    for username, entry in raw.items():
        where = f"users_file({path.name}).users.{username}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a mapping")
            continue
        pw = entry.get("password_hash")
        if not isinstance(pw, str) or not (pw.startswith("$argon2") or pw.startswith("scrypt$")):
            problems.append(f"{where}.password_hash: required, an argon2 or scrypt hash")
            continue
        groups = entry.get("groups") or []
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            problems.append(f"{where}.groups: must be a list of strings")
            continue
        users[str(username)] = LocalUser(
            username=str(username),
            password_hash=pw,
            name=entry.get("name"),
            email=entry.get("email"),
            groups=tuple(groups),
            disabled=bool(entry.get("disabled", False)),
        )
    if problems:
        raise ConfigError(problems)
    return users


class LocalProvider:
    """Users from a file, signed in on the broker's own form (``PasswordLogin``); the file is
    re-read when it changes."""

    type_name = "local"
    facts = frozenset({"groups"})

    def __init__(self, name: str, users_file: Path, display_name: str) -> None:
        self.name = name
        self.display_name = display_name
        self._path = users_file
        self._lock = threading.Lock()
        self._users = load_users(users_file)
        self._mtime = users_file.stat().st_mtime_ns

    @classmethod
    def from_config(cls, name: str, config: Mapping[str, Any], *, base_dir: str) -> LocalProvider:
        problems = [
            f"{k}: unknown key" for k in config if k not in ("type", "users_file", "display_name")
        ]
        users_file = config.get("users_file")
        if not isinstance(users_file, str) or not users_file:
            problems.append("users_file: required")
        if problems:
            raise ConfigError(problems)
        assert isinstance(users_file, str)
        path = Path(users_file)
        if not path.is_absolute():
            path = Path(base_dir) / path
        display = config.get("display_name") or "Username and password"
        return cls(name, path, str(display))

    def _current_users(self) -> dict[str, LocalUser]:
        with self._lock:
            try:
                mtime = self._path.stat().st_mtime_ns
                if mtime != self._mtime:
                    self._users = load_users(self._path)
                    self._mtime = mtime
            except (OSError, ConfigError):
                pass  # keep the last good file; the operator sees the problem at next start
            return self._users

    def check(self, http: Any) -> list[str]:
        """The users file reads and validates now (it is read again whenever it changes)."""
        try:
            users = load_users(self._path)
        except ConfigError as exc:
            raise LoginFailed("users_file_invalid", detail="; ".join(exc.problems)) from None
        return [f"users file {self._path}: {len(users)} user(s)"]

    def authenticate(self, username: str, password: str) -> LoginResult:
        user = self._current_users().get(username)
        if user is None or user.disabled:
            verify_password(_DUMMY, password)  # same cost as a real check: no user enumeration
            raise LoginFailed("bad_credentials")
        if not verify_password(user.password_hash, password):
            raise LoginFailed("bad_credentials")
        identity = Identity(
            provider=self.name,
            subject=user.username,
            username=user.username,
            name=user.name,
            email=user.email,
            email_verified=user.email is not None,
            groups=user.groups,
        )
        return LoginResult(identity=identity)


@hookimpl
def broker_register_providers() -> list[type[LocalProvider]]:
    return [LocalProvider]
