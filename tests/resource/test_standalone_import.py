"""The resource kit stands alone: an MCP server that imports ``broker.resource`` (and its MCP SDK
adapter) loads nothing of the broker's server side, Flask, SQLAlchemy or Authlib."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SERVER_SIDE = (
    "flask",
    "werkzeug",
    "sqlalchemy",
    "alembic",
    "authlib",
    "psycopg",
    "pluggy",
    "redis",
)


def loaded_modules(statement: str) -> list[str]:
    """The modules a fresh interpreter has loaded after ``statement``."""
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    modules: list[str] = json.loads(done.stdout.splitlines()[-1])
    return modules


@pytest.mark.parametrize(
    "statement",
    [
        "import broker.resource",
        "from broker.resource import BrokerTokenVerifier, ProtectedResource, ResourceMetadata",
        "import broker.resource.mcp",
    ],
)
def test_the_kit_imports_no_server_code(statement: str) -> None:
    modules = loaded_modules(statement)
    ours = [m for m in modules if m == "broker" or m.startswith(("broker.", "providers"))]
    assert all(m == "broker" or m.startswith("broker.resource") for m in ours), ours
    server_side = [m for m in modules if m.split(".")[0] in SERVER_SIDE]
    assert server_side == [], server_side
    assert "jwt" in modules  # it does verify with PyJWT


def test_the_package_still_offers_the_factory() -> None:
    modules = loaded_modules("from broker import create_app")
    assert "broker.app" in modules and "flask" in modules
