"""The local provider: users file, argon2/scrypt hashes, throttled failures."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask.testing import FlaskClient

from providers.errors import ConfigError, LoginFailed
from providers.local import LocalProvider, hash_password
from tests.support import login_form


def _scrypt(password: str) -> str:
    salt = b"0123456789abcdef"
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)
    return f"scrypt$16384$8$1${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def test_users_file_hashes_and_reload(tmp_path: Path) -> None:
    users = tmp_path / "users.yaml"
    users.write_text(
        yaml.safe_dump(
            {
                "users": {
                    "ann": {
                        "password_hash": hash_password("pw1"),
                        "email": "ann@example.com",
                        "groups": ["a"],
                    },
                    "sam": {"password_hash": _scrypt("pw2")},
                    "old": {"password_hash": hash_password("pw3"), "disabled": True},
                }
            }
        )
    )
    provider = LocalProvider.from_config(
        "local", {"users_file": "users.yaml"}, base_dir=str(tmp_path)
    )
    identity = provider.authenticate("ann", "pw1").identity
    assert identity.subject == "ann" and identity.email_verified and identity.groups == ("a",)
    assert provider.authenticate("sam", "pw2").identity.subject == "sam"
    for user, password in (("ann", "nope"), ("nobody", "pw1"), ("old", "pw3")):
        with pytest.raises(LoginFailed) as info:
            provider.authenticate(user, password)
        assert info.value.reason == "bad_credentials"
    users.write_text(yaml.safe_dump({"users": {"ann": {"password_hash": hash_password("new")}}}))
    import os

    os.utime(users, ns=(1, 1))  # a different mtime, whatever the clock resolution
    assert provider.authenticate("ann", "new").identity.subject == "ann"


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        LocalProvider.from_config("local", {"colour": "red"}, base_dir=str(tmp_path))
    assert info.value.problems == ["colour: unknown key", "users_file: required"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"users": {"x": {"password_hash": "plaintext"}}}))
    with pytest.raises(ConfigError) as info:
        LocalProvider.from_config("local", {"users_file": str(bad)}, base_dir=str(tmp_path))
    assert "password_hash: required, an argon2 or scrypt hash" in info.value.problems[0]


def test_failed_logins_are_throttled_per_user(
    client: FlaskClient, registered: dict[str, Any]
) -> None:
    login_id, csrf = login_form(client, registered["client_id"])
    data = {"login": login_id, "csrf": csrf, "username": "alice", "password": "wrong"}
    for _ in range(5):
        assert client.post("/login/local", data=data).status_code == 400
    from tests.conftest import PASSWORDS

    blocked = client.post("/login/local", data={**data, "password": PASSWORDS["alice"]})
    assert blocked.status_code == 429 and "Too many failed attempts" in blocked.text
    assert "Location" not in blocked.headers
    # Another user is not locked out by alice's failures.
    other = client.post(
        "/login/local", data={**data, "username": "bob", "password": PASSWORDS["bob"]}
    )
    assert other.status_code == 302


def test_failed_logins_are_throttled_per_address(
    client: FlaskClient, registered: dict[str, Any]
) -> None:
    login_id, csrf = login_form(client, registered["client_id"])
    for i in range(20):
        data = {"login": login_id, "csrf": csrf, "username": f"user{i}", "password": "x"}
        assert client.post("/login/local", data=data).status_code == 400
    from tests.conftest import PASSWORDS

    blocked = client.post(
        "/login/local",
        data={"login": login_id, "csrf": csrf, "username": "bob", "password": PASSWORDS["bob"]},
    )
    assert blocked.status_code == 429
